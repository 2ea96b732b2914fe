"""Dynamic membership: a rank binds an ephemeral port, registers it, keeps its lease, and leaves.

With a control plane, a job's endpoints are not known before it starts (a fresh session lists no
consumers), so each rank binds ``tcp://BIND_HOST:*`` and registers the port it got. The ranks join
together or not at all (``join_session``): every rank learns whether all others joined, so a rank
that failed never leaves the others waiting in a collective. The lease is renewed from a background
thread at a third of its length; a lease that lapsed anyway is taken again by registering anew.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import socket as sockets
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
from mpi4py import MPI

from common.errors import DsnError
from common.logs import fields
from common.restclient import RestError, with_retries
from common.tokenfile import read_token
from dataplane.consumer.controlplane import ControlPlaneClient, Lease, Registration
from dataplane.consumer.errors import JoinError, SetupError

ROOT = 0
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# The control plane may cap a lease at its session's expiry; never heartbeat in a tight loop.
MIN_HEARTBEAT_S = 1.0


@dataclass(frozen=True)
class RegistrationArguments:
    """Where and how ranks register: ``dsn consumer run --controlplane ...``."""

    controlplane_urls: tuple[str, ...]  # the replicas', tried in order
    token_file: Path
    bind_host: str
    job_id: str | None


def job_id_for(given: str | None, world: MPI.Comm) -> str:
    """The job id every rank registers under: the given one, or one rank 0 made up for all."""
    chosen = given if given is not None else f"job-{secrets.token_hex(8)}"
    job_id: str = world.bcast(chosen if world.Get_rank() == ROOT else None, root=ROOT)
    if not JOB_ID.fullmatch(job_id):
        # Every rank holds the same id, so every rank stops here: no MPI abort needed.
        raise JoinError(f"job id {job_id!r} must be 1-128 letters, digits, '_', '.' or '-'")
    return job_id


ROUTE_PREFIX = "route:"


def bind_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address ``--bind-host`` names: an IP address, or ``route:PEER``, the address this node
    reaches PEER by.

    A compute node has several networks (management, high-speed) and a job script cannot know
    which address the gateway can reach; the route the kernel picks toward the gateway's name on
    the compute network answers that on every node alike. No packet is sent: connecting a UDP
    socket only selects the route.
    """
    if host.startswith(ROUTE_PREFIX):
        return _route_source(host.removeprefix(ROUTE_PREFIX))
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise SetupError(f"--bind-host {host!r} is not an IP address or route:HOST") from None


def _route_source(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        family, kind, proto, _, target = sockets.getaddrinfo(
            peer.strip("[]"), 9, type=sockets.SOCK_DGRAM)[0]
        with sockets.socket(family, kind, proto) as probe:
            probe.connect(target)
            return ipaddress.ip_address(probe.getsockname()[0])
    except (OSError, IndexError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SetupError(f"--bind-host route:{peer}: no route to {peer!r}: {reason}") from None


def bind_ephemeral(context: zmq.Context[zmq.Socket[bytes]], host: str,
                   hwm: int) -> tuple[zmq.Socket[bytes], str]:
    """A PULL socket on a free port of ``host`` (see ``bind_address``) and its connectable
    endpoint."""
    address = bind_address(host)
    if address.is_unspecified:
        raise SetupError(f"--bind-host {host}: bind the address the gateway connects to, not "
                         "every interface")
    socket: zmq.Socket[bytes] = context.socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, hwm)
    socket.setsockopt(zmq.IPV6, address.version == 6)
    bracketed = f"[{address}]" if address.version == 6 else str(address)
    try:
        socket.bind(f"tcp://{bracketed}:*")
    except zmq.ZMQError as exc:
        socket.close()
        raise SetupError(f"cannot bind a port on {host}: {exc}") from None
    return socket, socket.getsockopt_string(zmq.LAST_ENDPOINT)


class LeaseKeeper:
    """Renews a consumer's lease from a daemon thread until ``stop``; ``lease`` is the current
    one."""

    def __init__(self, client: ControlPlaneClient, session: str, me: Registration, lease: Lease,
                 log: logging.Logger) -> None:
        self._client = client
        self._session = session
        self._me = me
        self.lease = lease
        self._log = log
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsn-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        # A heartbeat in flight ends within the request timeout.
        self._thread.join(self._client.timeout_s + 1)

    def _run(self) -> None:
        while not self._stopped.wait(max(self.lease.seconds / 3, MIN_HEARTBEAT_S)):
            try:
                self.lease = self._renew()
            except RestError as exc:
                if not exc.retryable and exc.status != 409:
                    self._log.error("the control plane refuses this consumer's heartbeats; "
                                    "no longer renewing", extra=fields(error=str(exc)))
                    return
                self._log.warning("heartbeat failed", extra=fields(error=str(exc)))

    def _renew(self) -> Lease:
        try:
            return self._client.heartbeat(self._session, self.lease.consumer_id)
        except RestError as exc:
            if exc.status != 409:
                raise
        # 409: the lease lapsed (a stalled heartbeat) and cannot be revived; take a new one.
        lease = self._client.register(self._session, self._me)
        self._log.warning("lease lapsed; registered again",
                          extra=fields(consumer=lease.consumer_id))
        return lease


@dataclass
class Joined:
    """A rank's place in the session: its socket, endpoint and the keeper of its lease."""

    socket: zmq.Socket[bytes]
    endpoint: str
    keeper: LeaseKeeper

    def leave(self, client: ControlPlaneClient, session: str, log: logging.Logger) -> None:
        """Stop heartbeating, deregister (a failure only lets the lease run out) and close."""
        self.keeper.stop()
        consumer = self.keeper.lease.consumer_id
        try:
            with_retries(lambda: client.leave(session, consumer), attempts=3)
        except RestError as exc:
            log.warning("could not leave the session; the lease will expire",
                        extra=fields(consumer=consumer, error=str(exc)))
        else:
            log.info("left the session", extra=fields(consumer=consumer))
        self.socket.close(linger=0)


def _join_one(args: RegistrationArguments, context: zmq.Context[zmq.Socket[bytes]],
              session: str, hwm: int, rank: int, job_id: str,
              log: logging.Logger) -> tuple[ControlPlaneClient, Joined]:
    client = ControlPlaneClient(args.controlplane_urls, read_token(args.token_file))
    socket, endpoint = bind_ephemeral(context, args.bind_host, hwm)
    me = Registration(endpoint=endpoint, rank=rank, job_id=job_id, host=sockets.gethostname())
    try:
        lease = with_retries(lambda: client.register(session, me))
    except RestError:
        socket.close(linger=0)
        raise
    log.info("registered", extra=fields(endpoint=endpoint, consumer=lease.consumer_id,
                                        job_id=job_id, lease_s=lease.seconds))
    keeper = LeaseKeeper(client, session, me, lease, log)
    keeper.start()
    return client, Joined(socket, endpoint, keeper)


def join_session(args: RegistrationArguments, context: zmq.Context[zmq.Socket[bytes]],
                 session: str, hwm: int, world: MPI.Comm, job_id: str,
                 log: logging.Logger) -> tuple[ControlPlaneClient, Joined]:
    """Bind and register on every rank; JoinError on every rank unless all of them succeeded."""
    outcome: tuple[ControlPlaneClient, Joined] | DsnError
    try:
        outcome = _join_one(args, context, session, hwm, world.Get_rank(), job_id, log)
    except DsnError as exc:  # a refused registration, a bad token file, a port not bound
        outcome = exc
    failed = [r for r, bad in enumerate(world.allgather(isinstance(outcome, DsnError))) if bad]
    if isinstance(outcome, DsnError):
        raise JoinError(str(outcome)) from outcome
    if failed:
        client, joined = outcome
        joined.leave(client, session, log)
        raise JoinError(f"rank(s) {', '.join(map(str, failed))} could not join session "
                        f"{session!r} (see their errors); this rank left it again")
    return outcome
