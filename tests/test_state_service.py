"""The state service and its gateway client over real CURVE sockets on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import zmq
from cp_helpers import free_state_endpoints
from waiting import eventually_async
from zmq.utils import z85

from common import clone, zap
from common.clone import AckOutcome, StateEndpoints, StateServer
from common.config import Lane, Session
from common.keys import KeyPair
from common.receipts import GatewayReport
from controlplane.placement import registration_problem
from controlplane.state import Placed, StateService, StateSettings, diff, zap_reply
from gateway.sessions import SessionTable
from gateway.state import CloneSessionSource

pytestmark = pytest.mark.timeout(30)

BEAT_S = 0.05


def _pair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


SERVER, GATEWAY, STRANGER = _pair(), _pair(), _pair()


def session(name: str, *, consumers: int = 0, expires: datetime | None = None) -> Session:
    return Session(id=name, client_keys=[zmq.curve_keypair()[0].decode()],
                   allowed_networks=["10.0.0.0/8"], allowed_targets=["127.0.0.0/8"],
                   consumers=[f"tcp://127.0.0.1:{7000 + c}" for c in range(consumers)],
                   expires_at=expires)


@pytest.fixture
def endpoints() -> StateEndpoints:
    return free_state_endpoints()


class Store:
    """What the app's snapshot_source would read: the live sessions."""

    def __init__(self, *sessions: Session) -> None:
        self.sessions = {s.id: s for s in sessions}

    async def live(self) -> Iterable[Placed]:
        return [Placed(s) for s in self.sessions.values()]


@asynccontextmanager
async def serving(endpoints: StateEndpoints, store: Store, *, reconcile_s: float = 60.0,
                  keypair: KeyPair = SERVER) -> AsyncIterator[StateService]:
    settings = StateSettings(endpoints, heartbeat_s=BEAT_S, reconcile_s=reconcile_s)
    async with StateService(settings, keypair, {"gw": GATEWAY.public}, store.live) as service:
        yield service


class Tables:
    """Collects the tables a client hands on, from its thread."""

    def __init__(self) -> None:
        self.received: list[SessionTable] = []

    def __call__(self, table: SessionTable) -> None:
        self.received.append(table)

    def ids(self) -> set[str]:
        return {e.id for e in self.received[-1]} if self.received else set()

    async def become(self, *ids: str, timeout_s: float = 1.0) -> None:
        """Wait for the last table handed on to hold exactly ``ids``."""
        def holds() -> bool:
            assert self.ids() == set(ids)
            return True

        await eventually_async(holds, timeout_s=timeout_s, what=f"a table of {sorted(ids)}")


@contextmanager
def client(endpoints: StateEndpoints | list[StateServer], tables: Tables,
           keypair: KeyPair = GATEWAY, **options: object) -> Iterator[CloneSessionSource]:
    servers = (endpoints if isinstance(endpoints, list)
               else [StateServer(endpoints, SERVER.public)])
    source = CloneSessionSource(servers, keypair, tables,
                                heartbeat_s=BEAT_S, **options)  # type: ignore[arg-type]
    source.start()
    try:
        yield source
    finally:
        source.stop()


async def test_snapshot_then_updates_reach_the_gateway_table(endpoints: StateEndpoints) -> None:
    store = Store(session("a"), session("b"))
    tables = Tables()
    async with serving(endpoints, store) as service:
        with client(endpoints, tables) as source:
            await tables.become("a", "b")
            assert source.wait_synced(0)
            await service.publish("c", Placed(session("c")))
            await service.publish("a", Placed(session("a", consumers=2)))
            await tables.become("a", "b", "c")

            def a_has_two_consumers() -> bool:
                entry = source.load().by_id("a")
                return entry is not None and len(entry.session.consumers) == 2

            await eventually_async(a_has_two_consumers, timeout_s=1.0,
                                   what="session a's update to two consumers")
            assert source.load() is tables.received[-1]


async def test_tombstones_remove_sessions(endpoints: StateEndpoints) -> None:
    tables = Tables()
    async with serving(endpoints, Store(session("a"), session("b"))) as service:
        with client(endpoints, tables):
            await tables.become("a", "b")
            assert await service.publish("a", None)
            assert not await service.publish("a", None)
            await tables.become("b")


async def test_reconcile_publishes_changes_nobody_announced(endpoints: StateEndpoints) -> None:
    store, tables = Store(session("a")), Tables()
    async with serving(endpoints, store, reconcile_s=BEAT_S):
        with client(endpoints, tables):
            await tables.become("a")
            # A revocation or an expired lease: the store changed, no one called publish().
            store.sessions = {"b": session("b")}
            await tables.become("b")


async def test_a_gap_triggers_a_resnapshot(endpoints: StateEndpoints) -> None:
    tables = Tables()
    async with serving(endpoints, Store(session("a"))) as service:
        with client(endpoints, tables) as source:
            await tables.become("a")
            # An update the gateway never sees: the state changes and the seq moves on silently.
            service._published["lost"] = Placed(session("lost"))
            service.seq += 1
            await service.publish("b", Placed(session("b")))
            await tables.become("a", "b", "lost")
            assert source.resyncs >= 1


async def test_a_restarted_server_is_resynchronised_and_the_last_table_kept_meanwhile(
        endpoints: StateEndpoints) -> None:
    tables = Tables()
    with client(endpoints, tables, missed_heartbeats=2) as source:
        async with serving(endpoints, Store(session("a"))) as first:
            await tables.become("a")
        # Server down until the gateway has found it silent twice: it keeps serving "a".
        silences = source.resyncs + 2
        await eventually_async(lambda: source.resyncs >= silences, timeout_s=1.0,
                               what="the gateway to find the stopped server silent twice")
        assert tables.ids() == {"a"} and source.load().by_id("a") is not None
        async with serving(endpoints, Store(session("b"))) as second:
            assert second.epoch != first.epoch
            await tables.become("b", timeout_s=3.0)
            assert all(len(t) > 0 for t in tables.received)


REPLICA = _pair()


@pytest.fixture
def replicas(endpoints: StateEndpoints) -> list[StateServer]:
    """Two replicas' state services, each with its own key pair (SERVER, REPLICA)."""
    other = free_state_endpoints()
    return [StateServer(endpoints, SERVER.public), StateServer(other, REPLICA.public)]


async def test_a_gateway_fails_over_to_the_next_replica_when_the_one_it_follows_dies(
        replicas: list[StateServer]) -> None:
    first, second = replicas
    # Both replicas read one database: the same sessions, each under its own epoch.
    store, tables = Store(session("a")), Tables()
    async with serving(second.endpoints, store, keypair=REPLICA, reconcile_s=BEAT_S):
        with ExitStack() as following:
            async with serving(first.endpoints, store, reconcile_s=BEAT_S):
                source = following.enter_context(client(replicas, tables, missed_heartbeats=2))
                await tables.become("a")
                assert source.server == first and source.failovers == 0
            # The first replica is gone; a session opened through the second meanwhile.
            store.sessions["b"] = session("b")
            await tables.become("a", "b", timeout_s=3.0)
            assert source.server == second and source.failovers == 1
            # Every table handed on kept the sessions: none went missing during the move.
            assert all("a" in {e.id for e in table} for table in tables.received)
            # It stays with the replica that answers.
            store.sessions.pop("a")
            await tables.become("b")
            assert source.failovers == 1


async def test_a_gateway_whose_first_replica_is_down_at_start_follows_the_next(
        replicas: list[StateServer]) -> None:
    tables = Tables()
    async with serving(replicas[1].endpoints, Store(session("a")), keypair=REPLICA):
        with client(replicas, tables, missed_heartbeats=2) as source:
            await tables.become("a", timeout_s=3.0)
            assert source.wait_synced(0) and source.server == replicas[1]


async def test_reports_not_acknowledged_by_a_dead_replica_go_to_the_next(
        replicas: list[StateServer]) -> None:
    received: list[GatewayReport] = []

    async def sink(report: GatewayReport) -> AckOutcome:
        received.append(report)
        return "recorded"

    tables = Tables()
    async with serving(replicas[1].endpoints, Store(session("a")), keypair=REPLICA) as second:
        second.on_report = sink
        with ExitStack() as following:
            async with serving(replicas[0].endpoints, Store(session("a"))) as first:
                source = following.enter_context(
                    client(replicas, tables, missed_heartbeats=2, resend_s=60.0))
                await tables.become("a")
                # This replica's heartbeats go on, but it answers nothing any more.
                first._router.close(linger=0)  # type: ignore[union-attr]
                source.report(REPORT)
                await asyncio.sleep(0.2)
                assert source.unacknowledged == 1
            await eventually_async(lambda: source.acknowledged == {"recorded": 1}, timeout_s=3,
                                   what="the report acknowledged by the second replica")
            assert received == [REPORT] and source.server == replicas[1]


def test_a_gateway_needs_a_state_service() -> None:
    with pytest.raises(ValueError, match="at least one state service"):
        CloneSessionSource([], GATEWAY, Tables())


async def test_an_unknown_gateway_key_gets_nothing(endpoints: StateEndpoints) -> None:
    tables = Tables()
    async with serving(endpoints, Store(session("a"))) as service:
        with client(endpoints, tables, keypair=STRANGER) as source:
            await service.publish("b", Placed(session("b")))
            # Its snapshot request goes unanswered twice (it asks again after each timeout).
            await eventually_async(lambda: source.resyncs >= 2, timeout_s=1.0,
                                   what="two unanswered snapshot requests")
            assert not source.wait_synced(0) and tables.received == []
            assert len(source.load()) == 0


async def test_sessions_leave_the_table_at_their_expiry_without_an_update(
        endpoints: StateEndpoints) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=0.3)
    tables = Tables()
    async with serving(endpoints, Store(session("a", expires=soon), session("b"))):
        with client(endpoints, tables):
            await tables.become("a", "b")
            await tables.become("b")


def test_zap_admits_only_listed_gateway_keys() -> None:
    request = [b"1.0", b"7", b"dsn-state", b"127.0.0.1", b"", b"CURVE", z85.decode(GATEWAY.public)]
    allowed = frozenset([GATEWAY.public])
    assert zap_reply(allowed, zap.parse(request))[2:5] == [b"200", b"OK", GATEWAY.public]
    for bad in ([*request[:2], b"dsn", *request[3:]], [*request[:5], b"NULL"],
                [*request[:6], z85.decode(STRANGER.public)], [*request, b"extra"]):
        assert zap_reply(allowed, zap.parse(bad)) == [
            b"1.0", b"7", b"400", b"not an allowed gateway", b"", b""]


def test_diff_names_new_changed_and_gone_sessions() -> None:
    a, b, c = session("a"), session("b"), session("c")
    b2 = b.model_copy(update={"consumers": ["tcp://127.0.0.1:7000"]})
    published = {"a": Placed(a), "b": Placed(b)}
    assert diff(published, [Placed(a), Placed(b2), Placed(c)]) == [("b", Placed(b2)),
                                                                   ("c", Placed(c))]
    assert diff(published, [Placed(a), Placed(c)]) == [("c", Placed(c)), ("b", None)]
    # A session moved to another gateway is a change too.
    assert diff(published, [Placed(a, ("east",)), Placed(b)]) == [("a", Placed(a, ("east",)))]


REPORT = GatewayReport(session="a", scan=2, outcome="interrupted", reason="consumer_gone",
                       closed_by="scan_end", sent=8, accepted=8, forwarded=2, spooled=6, lost=2,
                       dropped={"consumer_gone": 2},
                       drops=[(0, 0, "consumer_gone"), (0, 1, "consumer_gone")],
                       drops_truncated=False, spool="/spool/a_scan000002.spool")


async def test_a_report_is_sent_until_the_service_has_recorded_it(
        endpoints: StateEndpoints) -> None:
    received: list[GatewayReport] = []
    failures = [RuntimeError("the store is locked")]  # the first attempt is not recorded

    async def sink(report: GatewayReport) -> AckOutcome:
        received.append(report)
        if failures:
            raise failures.pop()
        return "recorded" if received.count(report) == 2 else "duplicate"

    tables = Tables()
    async with serving(endpoints, Store(session("a"))) as service:
        service.on_report = sink
        with client(endpoints, tables, resend_s=0.2) as source:
            await tables.become("a")
            source.report(REPORT)
            await eventually_async(lambda: source.acknowledged == {"recorded": 1}, timeout_s=3,
                                   what="the report's acknowledgement")
            assert source.unacknowledged == 0
            assert received == [REPORT, REPORT]  # unacknowledged, so sent again
            # Nothing to wait for: a resend would come within 0.2 s, none may come at all.
            await asyncio.sleep(0.5)
            assert len(received) == 2  # acknowledged: never again


async def test_a_gateway_that_is_not_allowed_cannot_report(endpoints: StateEndpoints) -> None:
    received: list[GatewayReport] = []

    async def sink(report: GatewayReport) -> AckOutcome:
        received.append(report)
        return "recorded"

    async with serving(endpoints, Store(session("a"))) as service:
        service.on_report = sink
        with client(endpoints, Tables(), keypair=STRANGER, resend_s=0.1) as source:
            source.report(REPORT)
            # Nothing to wait for: the report is resent every 0.1 s, none may ever arrive.
            await asyncio.sleep(0.5)
            assert received == [] and source.unacknowledged == 1


EAST, WEST = _pair(), _pair()


@asynccontextmanager
async def serving_two(endpoints: StateEndpoints, store: Store) -> AsyncIterator[StateService]:
    """A service admitting gateways ``east`` and ``west``, serving ``store``'s placed sessions."""
    settings = StateSettings(endpoints, heartbeat_s=BEAT_S, reconcile_s=60.0)
    keys = {"east": EAST.public, "west": WEST.public}
    async with StateService(settings, SERVER, keys, store.live) as service:
        yield service


class PlacedStore(Store):
    """Sessions with their gateways."""

    def __init__(self, *placed: Placed) -> None:
        super().__init__()
        self.placed = list(placed)

    async def live(self) -> Iterable[Placed]:
        return list(self.placed)


async def test_each_gateway_gets_its_own_sessions_and_the_unplaced_ones(
        endpoints: StateEndpoints) -> None:
    store = PlacedStore(Placed(session("shared")), Placed(session("e1"), ("east",)),
                        Placed(session("w1"), ("west",)))
    east, west = Tables(), Tables()
    async with serving_two(endpoints, store) as service:
        with client(endpoints, east, EAST), client(endpoints, west, WEST):
            await east.become("shared", "e1")
            await west.become("shared", "w1")
            # Updates follow the placement: a new session reaches its own gateway only.
            await service.publish("e2", Placed(session("e2"), ("east",)))
            await east.become("shared", "e1", "e2")
            # A session moved to the other gateway leaves the first and reaches the second.
            await service.publish("e1", Placed(session("e1"), ("west",)))
            await east.become("shared", "e2")
            await west.become("shared", "w1", "e1")
            await service.publish("shared", None)
            await east.become("e2")
            await west.become("w1", "e1")
            assert service.placement("e1") == ("west",)


async def test_each_gateway_of_a_laned_session_is_told_its_own_lane(
        endpoints: StateEndpoints) -> None:
    """Snapshot and updates alike: a session split over east and west reaches each as the lane
    it carries, and a lane moved to the other gateway leaves the first."""
    east, west = Tables(), Tables()

    def lanes(tables: Tables) -> dict[str, tuple[int, int] | None]:
        return {e.id: None if e.session.lane is None else (e.session.lane.lane,
                                                           e.session.lane.lanes)
                for e in tables.received[-1]}

    async with serving_two(endpoints, PlacedStore(Placed(session("l"), ("east", "west")))
                           ) as service:
        with client(endpoints, east, EAST), client(endpoints, west, WEST):
            await east.become("l")
            await west.become("l")
            assert (lanes(east), lanes(west)) == ({"l": (0, 2)}, {"l": (1, 2)})
            # The lanes swap gateways: each is told its new lane.
            await service.publish("l", Placed(session("l"), ("west", "east")))
            await eventually_async(lambda: lanes(east) == {"l": (1, 2)}, timeout_s=1,
                                   what="east told it now carries lane 1")
            assert lanes(west) == {"l": (0, 2)}
            # A one-lane session carries no lane, whatever its stored configuration says.
            await service.publish("l", Placed(session("l").model_copy(
                update={"lane": Lane(lane=1, lanes=2)}), ("east",)))
            await west.become()
            await eventually_async(lambda: lanes(east) == {"l": None}, timeout_s=1,
                                   what="east told the session has one lane")


def _registration(keypair: KeyPair, **fields: object) -> clone.Registration:
    values: dict[str, object] = {"endpoint": "tcp://127.0.0.1:5555",
                                 "receipts_endpoint": "tcp://127.0.0.1:5556",
                                 "server_key": keypair.public.decode(), "capacity": 4}
    return clone.Registration(**{**values, **fields})  # type: ignore[arg-type]


async def test_a_registration_names_the_gateway_by_its_allow_list_entry_and_is_answered(
        endpoints: StateEndpoints) -> None:
    seen: list[tuple[str, str, clone.Registration]] = []

    async def sink(name: str, key: str, registration: clone.Registration) -> str | None:
        seen.append((name, key, registration))
        return registration_problem(registration, key)

    good, stolen = _registration(EAST), _registration(EAST)
    async with serving_two(endpoints, PlacedStore()) as service:
        service.on_register = sink
        with client(endpoints, Tables(), EAST, registration=good, register_s=0.1) as east, \
                client(endpoints, Tables(), WEST, registration=stolen, register_s=0.1) as west:
            def answered() -> bool:
                assert east.registered is not None and west.registered is not None
                return True

            await eventually_async(answered, timeout_s=3, what="both registrations answered")
            assert east.registered == clone.Registered(service.epoch, True, "")
            # West announces east's key: producers would be handed a key it cannot serve.
            assert west.registered is not None and not west.registered.accepted
            assert "not the key this gateway authenticated with" in west.registered.reason
            await eventually_async(lambda: len(seen) >= 4, timeout_s=3,
                                   what="registrations repeated as heartbeats")
    assert {(name, key) for name, key, _ in seen} == {("east", EAST.public.decode()),
                                                       ("west", WEST.public.decode())}


@pytest.mark.parametrize(("fields", "reason"), [
    ({"capacity": 0}, "Expected `int` >= 1"),
    ({"endpoint": "tcp://*:5555"}, "endpoint: a wildcard host"),
    ({"receipts_endpoint": "tcp://gateway.example:5556"}, "receipts_endpoint: must look like"),
    ({"plain_endpoint": "udp://127.0.0.1:1"}, "plain_endpoint: must look like tcp://IP:PORT"),
    ({"server_key": "~" * 40}, "server_key: not a Z85 CURVE public key"),
    ({"server_key": "short"}, "Expected `str` of length >= 40"),
])
async def test_a_malformed_registration_is_refused_with_its_reason(
        endpoints: StateEndpoints, zmq_context: zmq.Context[zmq.Socket[bytes]],
        fields: dict[str, object],
        reason: str) -> None:
    stored: list[str] = []

    async def sink(name: str, key: str, registration: clone.Registration) -> str | None:
        problem = registration_problem(registration, key)
        if problem is None:
            stored.append(name)
        return problem

    # Encoded by hand: the bounds a decoder enforces must hold against any sender.
    body = msgspec.msgpack.encode({**msgspec.structs.asdict(_registration(EAST)), **fields})
    frames = [clone.REGISTER, msgspec.msgpack.encode({"v": 1, "epoch": "", "seq": 0}), body]
    async with serving_two(endpoints, PlacedStore()) as service:
        service.on_register = sink
        with zmq_context.socket(zmq.DEALER) as dealer:
            dealer.curve_serverkey, dealer.curve_publickey = SERVER.public, EAST.public
            dealer.curve_secretkey = EAST.secret
            dealer.connect(endpoints.snapshot)
            await asyncio.to_thread(dealer.send_multipart, frames)
            assert await asyncio.to_thread(dealer.poll, 3000)
            answer = clone.decode(dealer.recv_multipart())
    assert isinstance(answer, clone.Registered) and not answer.accepted
    assert reason in answer.reason, answer.reason
    assert stored == []
