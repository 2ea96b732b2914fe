"""The state service: publishes live sessions to gateways with the ZeroMQ Clone pattern.

Wire format and client rules: ``common.clone``. The service holds the published state (session
id -> Session) with one sequence number; every change bumps it and goes out on the PUB socket,
a ROUTER socket answers snapshot requests from the same map (so a snapshot at seq S holds exactly
the changes up to S), and a heartbeat carries the current seq every ``heartbeat_s``.

Each start draws a new random epoch and starts the seq at 0: nothing needs persisting, and a
gateway seeing the new epoch knows the sequence broke and asks for a new snapshot.

The app calls ``publish`` after each committed change; ``reconcile`` (run every
``reconcile_s``) compares ``snapshot_source`` — the live sessions as the store sees them now —
with what was published and publishes the difference, so changes nobody announced (a consumer
lease or a session that expired, a revocation) still reach the gateways.

Replicas on one database each run a state service, and each publishes what the store holds, so a
gateway may follow any of them. A change made through one replica reaches the others' gateways at
their next reconcile, or at once with a ``ReplicaSignal``: a change published here is announced,
and an announcement from another replica starts a reconcile now. Only changes made here are
announced (not those a reconcile found), so announcements do not echo between replicas.

Each published session carries its placement: the names of the gateways of its lanes, lane by
lane (one for a session whose scans pass one gateway), or none for a session every gateway serves
(a single-gateway site's). A gateway's snapshot holds its own and the unplaced sessions; updates
go out on per-gateway topics (``common.clone``), a placed session's to its gateways, each told
which lane it carries (``Session.lane``), and as tombstones to the others, so a session (or a
lane) moved to another gateway leaves the first. The allow-list names each gateway: ``NAME.key``
admits the key of gateway NAME.

The ROUTER also takes the gateways' registrations (``on_register`` stores one, or says why it is
refused; the answer goes back either way) and their reports of spooled and interrupted scans:
``on_report`` records one and says how (recorded, duplicate, refused); the service acknowledges
it only then, so a report the store could not take is sent again by the gateway.

Both sockets are CURVE servers with the state service's key pair. Gateways authenticate with their
own CURVE client keys: a ZAP handler on the service's context admits only allow-listed keys, and
``ZAP_ENFORCE_DOMAIN`` makes libzmq refuse every connection when no handler answers (fail closed).

Wiring into an aiohttp app is one cleanup_ctx generator:
    async with StateService(settings, keypair, {name: key}, source) as service:
        app[STATE] = service
        yield
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol, Self

import zmq
import zmq.asyncio

from common import clone, zap
from common.config import Lane, Session, parse_endpoint
from common.keys import KeyPair
from common.receipts import GatewayReport
from controlplane.settings import DEFAULT_STATE_ENDPOINTS

ZAP_DOMAIN: Final = b"dsn-state"
_REFUSED: Final = "not an allowed gateway"

log = logging.getLogger("dsn.controlplane.state")


@dataclass(frozen=True, slots=True)
class Placed:
    """A published session and the gateways of its lanes, lane by lane (none: every gateway serves
    it, whole)."""

    session: Session
    gateways: tuple[str, ...] = ()

    def on(self, gateway: str) -> Session | None:
        """The session as ``gateway`` serves it, told its lane if it has several; None if
        ``gateway`` does not serve it."""
        if self.gateways and gateway not in self.gateways:
            return None
        lanes = len(self.gateways)
        # Set here, whatever the stored configuration says: the lane is the placement's.
        lane = Lane(lane=self.gateways.index(gateway), lanes=lanes) if lanes > 1 else None
        return self.session.model_copy(update={"lane": lane})


SnapshotSource = Callable[[], Awaitable[Iterable[Placed]]]
ReportSink = Callable[[GatewayReport], Awaitable[clone.AckOutcome]]
# (gateway name, its authenticated Z85 key, what it registers) -> None, or why it is refused.
RegisterSink = Callable[[str, str, clone.Registration], Awaitable[str | None]]


class ReplicaSignal(Protocol):
    """How replicas sharing one database tell each other that the sessions changed."""

    async def notify(self) -> None:
        """Tell the other replicas."""

    async def listen(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` on every other replica's notice, and each time listening starts
        (notices may have been missed before); until cancelled."""

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StateSettings:
    endpoints: clone.StateEndpoints = DEFAULT_STATE_ENDPOINTS
    heartbeat_s: float = 1.0
    reconcile_s: float = 1.0

    def __post_init__(self) -> None:
        for endpoint in self.endpoints:
            parse_endpoint(endpoint, allow_wildcard=True)
        if self.heartbeat_s <= 0 or self.reconcile_s <= 0:
            raise ValueError("heartbeat_s and reconcile_s must be positive")


def zap_reply(allowed: frozenset[bytes], request: zap.ZapRequest) -> list[bytes]:
    """Answer one ZAP request: 200 for an allow-listed gateway's CURVE key, 400 for anything
    else."""
    key = request.curve_key() if request.domain == ZAP_DOMAIN else None
    if key is not None and key.encode("ascii") in allowed:
        return zap.allow(request.request_id, key)
    return zap.deny(request.request_id, _REFUSED)


def diff(published: dict[str, Placed],
         live: Iterable[Placed]) -> list[tuple[str, Placed | None]]:
    """The changes that turn ``published`` into ``live``: new, changed or moved sessions, then
    tombstones."""
    current = {p.session.id: p for p in live}
    changes: list[tuple[str, Placed | None]] = [
        (sid, p) for sid, p in current.items() if published.get(sid) != p]
    changes.extend((sid, None) for sid in published if sid not in current)
    return changes


class StateService:
    """The Clone-pattern server. Runs on the current asyncio loop; use ``async with``."""

    def __init__(self, settings: StateSettings, keypair: KeyPair,
                 gateway_keys: Mapping[str, bytes], snapshot_source: SnapshotSource,
                 on_report: ReportSink | None = None,
                 on_register: RegisterSink | None = None,
                 replicas: ReplicaSignal | None = None) -> None:
        if keypair.secret is None:
            raise ValueError("the state service needs its secret key")
        self.settings = settings
        self.epoch = secrets.token_hex(16)
        self.seq = 0
        self._keypair = keypair
        self._keys = dict(gateway_keys)  # name -> Z85 public key
        self._names = {key.decode("ascii"): name for name, key in self._keys.items()}
        self._allowed = frozenset(self._keys.values())
        self._source = snapshot_source
        self.on_report = on_report
        self.on_register = on_register
        self._published: dict[str, Placed] = {}
        self._replicas = replicas
        self._changed_elsewhere = asyncio.Event()
        self._context = zmq.asyncio.Context()
        self._zap: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def start(self) -> None:
        """Load the live sessions, start ZAP, bind both sockets and start serving."""
        try:
            self._published = {p.session.id: p for p in await self._source()}
            self._zap = self._socket(zmq.REP, curve=False)
            self._zap.bind(zap.ENDPOINT)
            self._tasks.append(asyncio.create_task(self._serve_zap(), name="dsn-state-zap"))
            self._router = self._socket(zmq.ROUTER)
            # Refuse to send rather than drop silently; a whole snapshot fits one peer's queue.
            self._router.router_mandatory = 1
            self._router.sndhwm = clone.MAX_SESSIONS + 1
            self._router.maxmsgsize = clone.MAX_BODY_BYTES + clone.MAX_KEY_BYTES + 1024
            self._router.bind(self.settings.endpoints.snapshot)
            self._pub = self._socket(zmq.PUB)
            self._pub.bind(self.settings.endpoints.updates)
            loops = [(self._serve_snapshots(), "snapshots"), (self._beat(), "heartbeats"),
                     (self._reconcile_loop(), "reconcile")]
            if self._replicas is not None:
                loops.append((self._replicas.listen(self._changed_elsewhere.set), "replicas"))
            for coro, name in loops:
                self._tasks.append(asyncio.create_task(coro, name=f"dsn-state-{name}"))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._replicas is not None:
            await self._replicas.aclose()
        for sock in (self._pub, self._router, self._zap):
            if sock is not None:
                sock.close(linger=0)
        self._context.term()

    def _socket(self, kind: int, *, curve: bool = True) -> zmq.asyncio.Socket:
        sock = self._context.socket(kind)
        sock.linger = 0
        if curve:
            sock.curve_server = True
            sock.curve_secretkey = self._keypair.secret
            sock.curve_publickey = self._keypair.public
            sock.zap_domain = ZAP_DOMAIN
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        return sock

    @property
    def sessions(self) -> dict[str, Session]:
        return {sid: placed.session for sid, placed in self._published.items()}

    def placement(self, session_id: str) -> tuple[str, ...]:
        """The gateways of ``session_id``'s lanes as last published (none: every one, or not
        live)."""
        placed = self._published.get(session_id)
        return placed.gateways if placed is not None else ()

    async def publish(self, session_id: str, placed: Placed | None) -> bool:
        """Publish a session's new state (None: it ended), and tell the other replicas; False if
        that changes nothing."""
        changed = await self._publish(session_id, placed)
        if changed:
            await self._announce()
        return changed

    async def reconcile(self) -> int:
        """Publish whatever differs between the store's live sessions and the published ones, and
        tell the other replicas if anything did."""
        changes = await self._reconcile()
        if changes:
            await self._announce()
        return changes

    async def _publish(self, session_id: str, placed: Placed | None) -> bool:
        if self._published.get(session_id) == placed:
            return False
        if placed is None:
            del self._published[session_id]
        else:
            self._published[session_id] = placed
        self.seq += 1
        if placed is None or not placed.gateways:
            session = None if placed is None else placed.session.model_copy(update={"lane": None})
            await self._send(clone.ALL_TOPIC, clone.Entry(self.epoch, self.seq, session_id,
                                                          session))
            return True
        for name, key in self._keys.items():
            await self._send(key, clone.Entry(self.epoch, self.seq, session_id, placed.on(name)))
        return True

    async def _reconcile(self) -> int:
        changes = diff(self._published, await self._source())
        for session_id, placed in changes:
            await self._publish(session_id, placed)
        return len(changes)

    async def _announce(self) -> None:
        if self._replicas is None:
            return
        try:
            await self._replicas.notify()
        except Exception:  # the other replicas' reconcile loops still catch up within reconcile_s
            log.warning("the other replicas were not told of a session change", exc_info=True)

    async def _send(self, topic: bytes, message: clone.Message) -> None:
        assert self._pub is not None  # started
        await self._pub.send_multipart(clone.encode_update(topic, message))

    async def _beat(self) -> None:
        while True:
            await self._send(clone.ALL_TOPIC, clone.Heartbeat(self.epoch, self.seq))
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _reconcile_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed_elsewhere.wait(), self.settings.reconcile_s)
            self._changed_elsewhere.clear()
            try:
                await self._reconcile()
            except Exception:  # a store outage must not stop the heartbeats; the next round retries
                log.exception("state reconcile failed")

    async def _serve_zap(self) -> None:
        assert self._zap is not None
        while True:
            frames = await self._zap.recv_multipart()
            try:
                request = zap.parse(frames)
            except zap.ZapError as exc:
                reply, peer = zap.deny(exc.request_id, _REFUSED), exc.address
            else:
                reply, peer = zap_reply(self._allowed, request), request.address
            if reply[2] != zap.ALLOWED:
                log.info("gateway refused", extra={"fields": {"peer": peer}})
            await self._zap.send_multipart(reply)

    async def _serve_snapshots(self) -> None:
        assert self._router is not None
        while True:
            received = await self._router.recv_multipart(copy=False)
            if len(received) < 2:
                continue
            # ZAP admitted the peer as its Z85 key; libzmq attaches it to every message.
            key = str(received[1].get("User-Id"))
            name = self._names.get(key)
            frames = [frame.bytes for frame in received]
            if name is None:
                continue  # unreachable while ZAP is enforced: no user id, no connection
            try:
                request = clone.decode(frames[1:])
            except clone.CloneError as exc:
                log.info("bad request from a gateway", extra={"fields": {
                    "gateway": name, "error": str(exc)}})
                if frames[1] == clone.REGISTER:
                    await self._registered(frames[0], name, str(exc))
                continue
            if isinstance(request, clone.SnapshotRequest):
                await self._answer(frames[0], self._snapshot(name))
            elif isinstance(request, clone.Report):
                await self._take_report(frames[0], request)
            elif isinstance(request, clone.Register):
                await self._take_registration(frames[0], name, key, request.registration)

    async def _take_registration(self, identity: bytes, name: str, key: str,
                                 registration: clone.Registration) -> None:
        if self.on_register is None:
            problem: str | None = "this state service takes no registrations"
        else:
            try:
                problem = await self.on_register(name, key, registration)
            except Exception:  # not stored: no answer, the gateway's next heartbeat retries
                log.exception("gateway registration not stored")
                return
        await self._registered(identity, name, problem)

    async def _registered(self, identity: bytes, name: str, problem: str | None) -> None:
        if problem is not None:
            log.warning("gateway registration refused", extra={"fields": {
                "gateway": name, "reason": problem}})
        await self._answer(identity, [clone.Registered(self.epoch, problem is None,
                                                       problem or "")])

    async def _take_report(self, identity: bytes, report: clone.Report) -> None:
        if self.on_report is None:
            outcome: clone.AckOutcome = "refused"
        else:
            try:
                outcome = await self.on_report(report.scan)
            except Exception:  # not recorded: no ACK, the gateway sends it again
                log.exception("scan report not recorded")
                return
        await self._answer(identity, [clone.Ack(self.epoch, report.report_id, outcome)])

    def _snapshot(self, gateway: str) -> list[clone.Message]:
        """``gateway``'s state at one seq (its own sessions and the unplaced ones), built before
        the first send so no publish can interleave."""
        served = ((sid, placed.on(gateway)) for sid, placed in self._published.items())
        entries: list[clone.Message] = [clone.Entry(self.epoch, self.seq, sid, session)
                                        for sid, session in served if session is not None]
        entries.append(clone.SnapshotEnd(self.epoch, self.seq, len(entries)))
        return entries

    async def _answer(self, identity: bytes, messages: list[clone.Message]) -> None:
        assert self._router is not None
        try:
            for message in messages:
                # NOBLOCK: the queue holds a whole snapshot; a full one means a stuck peer.
                await self._router.send_multipart([identity, *clone.encode(message)],
                                                  flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # The gateway left or stopped reading; its snapshot timeout makes it ask again.
            log.info("snapshot not delivered", extra={"fields": {"error": exc.strerror}})
