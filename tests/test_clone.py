"""The state-distribution wire format and the pure Clone client state."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from common import clone
from common.clone import CloneState, Entry, Heartbeat, Outcome, SnapshotEnd, SnapshotRequest
from common.receipts import GatewayReport

EPOCH = "a" * 32
OTHER_EPOCH = "b" * 32
KEYS = [zmq.curve_keypair()[0].decode() for _ in range(4)]


def session(index: int, *, consumers: int = 0, expires: datetime | None = None) -> clone.Session:
    return clone.Session(
        id=f"s{index}", client_keys=[KEYS[index]], allowed_networks=["10.0.0.0/8"],
        allowed_targets=["127.0.0.0/8"],
        consumers=[f"tcp://127.0.0.1:{7000 + c}" for c in range(consumers)], expires_at=expires)


@pytest.mark.parametrize("message", [
    SnapshotRequest("", 0),
    SnapshotRequest(EPOCH, 7),
    Entry(EPOCH, 3, "s1", session(1, consumers=2, expires=datetime(2030, 1, 1, tzinfo=UTC))),
    Entry(EPOCH, 4, "s1", None),
    SnapshotEnd(EPOCH, 9, 2),
    Heartbeat(EPOCH, 9),
    clone.Report(3, GatewayReport(
        session="s1", scan=4, outcome="interrupted", reason="consumer_gone", closed_by="scan_end",
        sent=10, accepted=9, forwarded=4, spooled=5, lost=5,
        dropped={"consumer_gone": 4, "out_of_range": 1},
        drops=[(0, 0, "consumer_gone"), (0, 1, "consumer_gone")], drops_truncated=False,
        spool="/var/spool/dsn/s1_scan000004.spool")),
    clone.Ack(EPOCH, 3, "duplicate"),
])
def test_messages_round_trip(message: clone.Message) -> None:
    frames = clone.encode(message)
    assert len(frames) == 3
    assert clone.decode(frames) == message


def _header(**fields: object) -> bytes:
    return msgspec.msgpack.encode({"v": 1, "epoch": EPOCH, "seq": 1, **fields})


@pytest.mark.parametrize("frames", [
    [b"HUGZ", _header()],
    [b"HUGZ", _header(), b"", b""],
    [b"HUGZ", _header(extra=1), b""],
    [b"HUGZ", _header(v=2), b""],
    [b"HUGZ", _header(seq=-1), b""],
    [b"HUGZ", _header(seq=1.0), b""],
    [b"HUGZ", _header(epoch="not-hex"), b""],
    [b"HUGZ", _header(epoch=""), b""],
    [b"HUGZ", _header(), b"body"],
    [b"HUGZ", b"\xc1", b""],
    [b"WHAT", _header(), b""],
    [b"KTHXBAI", _header(), msgspec.msgpack.encode({"count": -1})],
    [b"session/s1", _header(), b"\xc1"],
    [b"session/s1", _header(), msgspec.msgpack.encode({"id": "s1"})],
    [b"session/s2", _header(), clone.encode(Entry(EPOCH, 1, "s1", session(1)))[2]],
    [b"session/" + b"x" * 80, _header(), b""],
    [b"HUGZ", _header(pad="x" * 200), b""],
    [b"session/s1", _header(), b"\x00" * (clone.MAX_BODY_BYTES + 1)],
    [b"REPORT", _header(epoch=""), msgspec.msgpack.encode({"session": "s1"})],
    [b"REPORT", _header(epoch=""), b"\xc1"],
    [b"ACK", _header(), msgspec.msgpack.encode({"outcome": "maybe"})],
    [b"ACK", _header(epoch=""), msgspec.msgpack.encode({"outcome": "recorded"})],
])
def test_malformed_messages_are_refused(frames: list[bytes]) -> None:
    with pytest.raises(clone.CloneError):
        clone.decode(frames)


def _synced(*sessions: clone.Session, seq: int = 5, epoch: str = EPOCH) -> CloneState:
    state = CloneState()
    state.request()
    for s in sessions:
        state.apply_snapshot_entry(Entry(epoch, seq, s.id, s))
    assert state.apply(SnapshotEnd(epoch, seq, len(sessions))) is Outcome.CHANGED
    return state


def test_updates_apply_in_order_and_tombstones_remove() -> None:
    state = _synced(session(0))
    assert state.apply(Entry(EPOCH, 6, "s1", session(1))) is Outcome.CHANGED
    assert state.apply(Entry(EPOCH, 7, "s0", None)) is Outcome.CHANGED
    assert state.apply(Entry(EPOCH, 7, "s0", None)) is Outcome.UNCHANGED
    assert dict(state.sessions) == {"s1": session(1)} and state.seq == 7


@pytest.mark.parametrize("message", [
    Entry(EPOCH, 7, "s1", session(1)),        # seq 6 was missed
    Entry(OTHER_EPOCH, 6, "s1", session(1)),  # the server restarted
    Heartbeat(EPOCH, 6),                      # the last update was missed
    Heartbeat(OTHER_EPOCH, 5),
])
def test_discontinuities_ask_for_a_snapshot_and_keep_the_last_good_state(
        message: clone.Message) -> None:
    state = _synced(session(0))
    assert state.apply(message) is Outcome.RESYNC
    state.request()
    assert not state.synced and dict(state.sessions) == {"s0": session(0)}


def test_updates_during_a_snapshot_are_buffered_and_only_newer_ones_applied() -> None:
    state = CloneState()
    state.request()
    assert state.apply(Entry(EPOCH, 5, "s0", session(0, consumers=1))) is Outcome.UNCHANGED
    assert state.apply(Entry(EPOCH, 6, "s1", session(1))) is Outcome.UNCHANGED
    state.apply_snapshot_entry(Entry(EPOCH, 5, "s0", session(0)))
    assert state.apply(SnapshotEnd(EPOCH, 5, 1)) is Outcome.CHANGED
    assert dict(state.sessions) == {"s0": session(0), "s1": session(1)} and state.seq == 6


def test_an_incomplete_snapshot_is_refused() -> None:
    state = CloneState()
    state.request()
    state.apply_snapshot_entry(Entry(EPOCH, 5, "s0", session(0)))
    assert state.apply(SnapshotEnd(EPOCH, 5, 2)) is Outcome.RESYNC
    assert not state.synced and not state.sessions


def test_updates_before_any_snapshot_ask_for_one() -> None:
    assert CloneState().apply(Entry(EPOCH, 1, "s0", session(0))) is Outcome.RESYNC


def test_expired_sessions_are_not_served() -> None:
    past, future = datetime(2020, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC)
    state = _synced(session(0, expires=past), session(1, expires=future), session(2))
    live = state.live_sessions(datetime(2025, 1, 1, tzinfo=UTC))
    assert [s.id for s in live] == ["s1", "s2"]


# --- property: any message sequence is safe, and a resnapshot converges --------------------------

POOL = [session(i, consumers=c) for i in range(3) for c in range(2)]


class Server:
    """A reference server: the state the client must converge to. Each restart is a new epoch."""

    def __init__(self) -> None:
        self.restarts, self.seq, self.sessions = 0, 0, dict[str, clone.Session]()

    @property
    def epoch(self) -> str:
        return f"{self.restarts:032x}"

    def change(self, index: int) -> Entry:
        target = POOL[index] if index < len(POOL) else None
        session_id = f"s{index % 3}"
        if target is None:
            self.sessions.pop(session_id, None)
        else:
            self.sessions[session_id] = target
        self.seq += 1
        return Entry(self.epoch, self.seq, session_id, target)

    def restart(self) -> None:
        self.restarts += 1
        self.seq = 0

    def answer(self, state: CloneState) -> Outcome:
        for sid, s in self.sessions.items():
            state.apply_snapshot_entry(Entry(self.epoch, self.seq, sid, s))
        return state.apply(SnapshotEnd(self.epoch, self.seq, len(self.sessions)))


# Junk comes from epochs the server never uses: messages a peer could replay or reorder, which
# must never raise nor be taken for the server's current state.
_FOREIGN = st.sampled_from(["e" * 32, "f" * 32])
_junk = st.one_of(
    st.builds(Heartbeat, _FOREIGN, st.integers(0, 20)),
    st.builds(SnapshotEnd, _FOREIGN, st.integers(0, 20), st.integers(0, 5)),
    st.builds(Entry, _FOREIGN, st.integers(0, 20), st.sampled_from(["s0", "s1", "s2"]),
              st.sampled_from([None, *POOL])),
    st.builds(SnapshotRequest, st.just(""), st.integers(0, 20)))
# A snapshot is asked for and answered in separate steps, so updates published in between
# (delivered or lost) land in the client's buffer, as they do on real sockets.
_ops = st.lists(st.one_of(
    st.tuples(st.just("change"), st.integers(0, len(POOL) + 2), st.booleans()),
    st.tuples(st.just("beat"), st.booleans()),
    st.tuples(st.just("restart")),
    st.tuples(st.just("ask")),
    st.tuples(st.just("answer")),
    st.tuples(st.just("junk"), _junk)), max_size=40)


def _run(server: Server, state: CloneState, op: tuple) -> None:  # type: ignore[type-arg]
    match op:
        case ("change", index, delivered):
            update = server.change(index)
            if delivered:
                assert state.apply(update) in Outcome
        case ("beat", delivered) if delivered:
            assert state.apply(Heartbeat(server.epoch, server.seq)) in Outcome
        case ("restart",):
            server.restart()
        case ("ask",):
            state.request()
        case ("answer",):
            assert server.answer(state) in Outcome
        case ("junk", message):
            assert state.apply(message) in Outcome
            if isinstance(message, Entry):
                assert state.apply_snapshot_entry(message) in Outcome


@settings(max_examples=400, deadline=None)
@given(_ops)
def test_any_message_sequence_is_safe_and_a_resnapshot_converges(ops: list) -> None:  # type: ignore[type-arg]
    server, state = Server(), CloneState()
    for op in ops:
        _run(server, state, op)
    # The client's recovery rule: a heartbeat reveals anything missed, and a snapshot repairs it.
    if state.apply(Heartbeat(server.epoch, server.seq)) is Outcome.RESYNC or not state.synced:
        state.request()
        assert server.answer(state) is Outcome.CHANGED
    assert state.synced and dict(state.sessions) == server.sessions
    assert state.apply(Heartbeat(server.epoch, server.seq)) is Outcome.UNCHANGED
