"""The layer-7 routing core: per message, decide what the socket loop does. No I/O.

Input per message: the session id libzmq attached to it (the ZAP ``User-Id``, or None), the header
bytes, the number of parts and the payload length. Output: a Decision the socket loop executes —
forward the message to one consumer slot (with a replacement header for NCEM headers), send
control messages (routed scan_begin / scan_end), act on a scan's spool, or nothing; a refused
message carries ``drop``.

Spooling: with ``spooling`` on, a scan that begins while its session has no consumer is spooled
instead of refused: its scan_begin yields SpoolOpen, each accepted data message SpoolWrite, and the
last scan_end SpoolClose with the scan's loss manifest (dataplane.spool). A scan stays spooled to
its end even if consumers appear meanwhile (the member list is fixed per scan). With ``spooling``
off (no usable spool directory) such a scan is refused as "no_consumers".

Consumers gone mid-scan: when a new table no longer lists a member of an open scan (its lease
expired or it left), or the socket loop sees its connection break (``consumer_lost``: a killed
rank, in either mode), the scan is interrupted. The members form one job that cannot finish the scan
without the one that left, so every member gets a scan_abort, every sector already forwarded is
listed as lost ("consumer_gone": the gateway cannot know whether it was counted), and the rest of
the scan is spooled (or, with spooling off, dropped as "consumer_gone").
A scan that begins while a member of its session is known to be gone (its connection broke and
has not come back) is spooled as if the session had no consumer: the job it would go to cannot
gather it.

NCEM producers send only data: the first NCEM data message of an unknown scan opens it (number
and shape from its header, the rest from the session's detector), as a scan_begin would; the scan
closes when every sector of every frame has arrived (``closing`` on that message's decision), or
idle. Each NCEM header's frame_number must be the position its x and y name.

Idle scans: a scan that has seen no message for its session's ``limits.scan_idle_s`` (a producer
died before its scan_end) is closed by ``expire_idle`` exactly as its last scan_end would have
closed it; consumers list whatever never arrived.

Restarts: with a journal (``gateway.journal``), every scan opened, ended by one of its producers,
or closed is recorded as it happens; a restarted gateway's router is handed what was still open
(``restore``) and carries each such scan to its end: its members get their routed scan_begin
again (a consumer that has it already ignores it), its data is routed, the scan_ends its producers
sent before the restart still count, and its scan_end says ``resumed`` (the counts start at
the restart; what was in flight when the gateway died is missing at the consumers, which list it).

Reports: the decision that closes a scan, however it closes, carries its GatewayReport
(``common.receipts``): forwarded, spooled or interrupted, with its totals and loss manifest. The
socket loop completes it with the spool's path (``with_spool``) once the spool is published.

Accounting: every data message is either forwarded, spooled, or counted as a drop under
(session, reason). A drop that belongs to an open scan (a valid data header) is also counted in that
scan and listed in the loss manifest of the consumer owning its frame, which receives it in its
routed scan_end, or, for a spooled scan, in the spool's trailer.
Counters are plain integers read by the metrics collector at scrape time.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Final, NamedTuple, Protocol

import msgspec
import numpy as np

from common.config import Lane, Session
from common.protocol import (
    MAX_MANIFEST,
    MAX_U63,
    VERSION,
    Data,
    DropReason,
    NcemHeader,
    ProtocolError,
    RoutedScanAbort,
    RoutedScanBegin,
    RoutedScanEnd,
    ScanBegin,
    ScanEnd,
    decode_ncem_header,
    decode_producer_header,
    encode,
    is_native_header,
)
from common.receipts import ClosedBy, GatewayReport, Outcome
from dataplane.spool import SpoolManifest
from gateway.journal import Opened, Recovered
from gateway.sessions import SessionEntry, SessionTable

log = logging.getLogger("dsn.gateway.router")

# Scan ids a session closed recently, kept to tell a late message ("scan_closed") from a stray one.
CLOSED_SCANS_KEPT: Final = 1024
# Refused scan_begins remembered for the receipts of their producers.
REFUSALS_KEPT: Final = 4096
# Sessions that ended keep their own totals this long (newest first); older ones are folded into
# one ENDED total, so a gateway serving sessions for months exports a bounded set of series whose
# totals never go down.
ENDED_SESSIONS_KEPT: Final = 64
ENDED: Final = "(ended)"


class Journal(Protocol):
    """Where the router records the scans it opens, ends and closes (``gateway.journal``)."""

    def opened(self, record: Opened) -> None: ...

    def ended(self, session: str, scan: int, sent: int) -> None: ...

    def closed(self, session: str, scan: int) -> None: ...


class Outgoing(NamedTuple):
    """A control message for the consumer in ``slot``."""

    slot: int
    header: bytes


class ScanKey(NamedTuple):
    session: str
    scan: int


@dataclass(frozen=True, slots=True)
class SpoolOpen:
    """Create the spool of ``key``; ``begin`` is the scan_begin header it records."""

    key: ScanKey
    begin: bytes


@dataclass(frozen=True, slots=True)
class SpoolWrite:
    """Append this data message (with ``Decision.header`` replacing part 1 when set)."""

    key: ScanKey


@dataclass(frozen=True, slots=True)
class SpoolClose:
    """The scan ended: write the trailer with ``manifest`` and publish the spool."""

    key: ScanKey
    manifest: SpoolManifest


SpoolAction = SpoolOpen | SpoolWrite | SpoolClose


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one message. ``slot`` >= 0: forward it there (``header`` replaces part 1
    when set); ``control``: send these; ``spool``: act on a spool; ``drop``: the reason it was
    refused; ``report``: a scan closed, this is its report (after the spool action, which gives
    its spool file). ``opening`` is carried out before all that (the scan this message opened),
    ``closing`` after it (the scan it completed)."""

    slot: int = -1
    header: bytes | None = None
    control: tuple[Outgoing, ...] = ()
    drop: str | None = None
    spool: SpoolAction | None = None
    report: GatewayReport | None = None
    opening: Decision | None = None
    closing: Decision | None = None


class TableChange(NamedTuple):
    """What adopting a table asks of the socket loop: scans to interrupt, and decisions closing
    the scans of sessions that left."""

    interruptions: list[Interruption]
    closed: list[Decision]
    resumed: list[Decision] = []  # scans restored after a restart: their scan_begins or spools


@dataclass(frozen=True, slots=True)
class Interruption:
    """A scan lost a member: tell every member (best effort: some are gone) and open its spool."""

    key: ScanKey
    notices: tuple[Outgoing, ...]
    spool: SpoolOpen | None


_ACCEPTED: Final = Decision()


@dataclass(frozen=True, slots=True)
class SessionStats:
    """A snapshot of one session's counters, for metrics and logs."""

    session: str
    messages: int
    bytes: int
    open_scans: int
    consumers: int
    connected: int  # consumers whose connection is up
    spooled: int
    spooled_bytes: int
    interrupted: int  # scans a consumer left mid-scan
    idle_closed: int  # scans closed after scan_idle_s without a message
    live: bool = True  # False: the session ended (or ENDED: the sessions folded together)

    def plus(self, other: SessionStats) -> SessionStats:
        """These totals and ``other``'s, as one ended session."""
        return SessionStats(
            self.session, self.messages + other.messages, self.bytes + other.bytes, 0, 0, 0,
            self.spooled + other.spooled, self.spooled_bytes + other.spooled_bytes,
            self.interrupted + other.interrupted, self.idle_closed + other.idle_closed,
            live=False)


_NOTHING_ENDED: Final = SessionStats(ENDED, 0, 0, 0, 0, 0, 0, 0, 0, 0, live=False)


class _Scan:
    """An open scan: member list fixed at its first scan_begin, and its accounting."""

    __slots__ = (
        "begin",
        "dropped",
        "drops",
        "ends",
        "expected",
        "forward",
        "forwarded",
        "geometry",
        "interrupted",
        "missing",
        "resumed",
        "members",
        "sectors",
        "seen",
        "sent",
        "arrived",
        "spool",
        "spool_failed",
        "spool_reason",
        "spooled",
        "to_spool",
        "truncated",
    )

    def __init__(self, begin: ScanBegin, members: tuple[int, ...], now: float,
                 spool: SpoolWrite | None = None, spool_reason: str = "") -> None:
        self.begin = begin
        self.seen = now
        self.geometry = begin.geometry
        self.members = members
        self.forward = tuple(Decision(slot=slot) for slot in members)
        # A spooled scan has no members; its single manifest goes into the spool's trailer.
        self.spool = spool
        self.to_spool = Decision(spool=spool)
        self.spool_failed = False
        self.spool_reason = spool_reason
        # Opened by NCEM headers: the sectors still to come, one bit each in ``arrived``.
        self.missing = 0
        self.arrived = bytearray()
        self.resumed = False  # restored after a gateway restart
        self.spooled = 0
        self.interrupted = False
        self.sectors = begin.sectors  # read for every forwarded message: one lookup, not two
        # One bit per (frame, sector) forwarded: what is lost, exactly, if a member goes.
        self.forwarded = bytearray((begin.geometry.positions * begin.sectors + 7) // 8
                                   if members else 0)
        manifests = max(len(members), 1)
        self.expected = [0] * manifests
        self.ends = 0
        self.sent = 0
        self.dropped: dict[str, int] = {}
        self.drops: list[list[tuple[int, int, str]]] = [[] for _ in range(manifests)]
        self.truncated = [False] * manifests

    def record_drop(self, frame: int, sector: int, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        owner = frame % len(self.members) if self.members else 0
        if len(self.drops[owner]) < MAX_MANIFEST:
            self.drops[owner].append((frame, sector, reason))
        else:
            self.truncated[owner] = True

    def expect_every_sector(self) -> None:
        """A scan with no scan_end (opened by NCEM headers): it is done when every sector of
        every frame has arrived, every sector of its lane's modules in a lane of several."""
        lane, lanes = self.begin.lane or 0, self.begin.lanes or 1
        self.missing = self.geometry.positions * len(range(lane, self.sectors, lanes))
        self.arrived = bytearray((self.geometry.positions * self.sectors + 7) // 8)

    @property
    def every_sector(self) -> bool:
        """Opened by NCEM headers: it waits for every sector (of its lane's modules)."""
        return bool(self.arrived)

    def arrive(self, msg: Data) -> bool:
        """Note an accepted sector of a scan that expects every sector; True once all are in."""
        if not self.missing:
            return False
        bit = msg.frame * self.sectors + msg.sector
        if not self.arrived[bit >> 3] & (1 << (bit & 7)):
            self.arrived[bit >> 3] |= 1 << (bit & 7)
            self.missing -= 1
        return not self.missing

    def take_forwarded(self) -> Iterator[tuple[int, int]]:
        """Every (frame, sector) forwarded so far, in order; forgets them."""
        bits = np.unpackbits(np.frombuffer(self.forwarded, dtype=np.uint8), bitorder="little")
        self.forwarded = bytearray()
        for bit in np.flatnonzero(bits).tolist():
            yield divmod(bit, self.sectors)

    def routed_begins(self, session: str) -> tuple[Outgoing, ...]:
        b, n = self.begin, len(self.members)
        return tuple(
            Outgoing(slot, encode(RoutedScanBegin(
                v=VERSION, session=session, scan=b.scan, scan_shape=b.scan_shape,
                frame_shape=b.frame_shape, sectors=b.sectors, dtype=b.dtype, members=n, index=i,
                lane=b.lane, lanes=b.lanes)))
            for i, slot in enumerate(self.members))

    def routed_ends(self) -> tuple[Outgoing, ...]:
        accepted = sum(self.expected)
        return tuple(
            Outgoing(slot, encode(RoutedScanEnd(
                v=VERSION, scan=self.begin.scan, expected=self.expected[i], sent=self.sent,
                accepted=accepted, dropped=dict(self.dropped), drops=self.drops[i],
                drops_truncated=self.truncated[i], resumed=self.resumed, lane=self.begin.lane,
                lanes=self.begin.lanes)))
            for i, slot in enumerate(self.members))

    def all_drops(self) -> tuple[list[tuple[int, int, str]], bool]:
        """The manifests of every member as one (member by member, each in the order recorded),
        and whether it was truncated."""
        drops = [d for member in self.drops for d in member]
        return drops[:MAX_MANIFEST], any(self.truncated) or len(drops) > MAX_MANIFEST

    def manifest(self) -> SpoolManifest:
        drops, truncated = self.all_drops()
        return SpoolManifest(sent=self.sent, dropped=dict(self.dropped), drops=drops,
                             drops_truncated=truncated)

    def outcome(self) -> tuple[Outcome, str]:
        """What became of the scan, and why."""
        if self.interrupted:
            return "interrupted", DropReason.CONSUMER_GONE.value
        if self.spool is not None:
            return "spooled", self.spool_reason
        return "forwarded", ""

    def report(self, session: str, closed_by: ClosedBy) -> GatewayReport:
        drops, truncated = self.all_drops()
        outcome, reason = self.outcome()
        forwarded = sum(self.expected)
        return GatewayReport(
            session=session, scan=self.begin.scan, outcome=outcome, reason=reason,
            closed_by=closed_by, sent=self.sent, accepted=forwarded + self.spooled,
            forwarded=forwarded, spooled=self.spooled, lost=sum(self.dropped.values()),
            dropped=dict(self.dropped), drops=drops, drops_truncated=truncated, spool="",
            resumed=self.resumed, lane=self.begin.lane, lanes=self.begin.lanes)


def with_spool(report: GatewayReport, spool: str | None) -> GatewayReport:
    """An interrupted scan's report once its spool was closed: the published file, or (``None``:
    it could not be published) what it held counted as lost to ``spool_failed``."""
    if spool is not None:
        return msgspec.structs.replace(report, spool=spool)
    if not report.spooled:
        return report
    failed = DropReason.SPOOL_FAILED.value
    dropped = {**report.dropped, failed: report.dropped.get(failed, 0) + report.spooled}
    return msgspec.structs.replace(report, spooled=0, lost=report.lost + report.spooled,
                                   dropped=dropped)


class _SessionState:
    __slots__ = ("bytes", "closed", "entry", "idle_closed", "interrupted", "members", "messages",
                 "scans", "spooled", "spooled_bytes")

    def __init__(self, entry: SessionEntry, members: tuple[int, ...]) -> None:
        self.entry = entry
        self.members = members
        self.scans: dict[int, _Scan] = {}
        self.closed: deque[int] = deque(maxlen=CLOSED_SCANS_KEPT)
        self.messages = 0
        self.bytes = 0
        self.spooled = 0
        self.spooled_bytes = 0
        self.interrupted = 0
        self.idle_closed = 0


def _drop(reason: str) -> Decision:
    return Decision(drop=reason)


# Drop decisions carry no per-message data, so one instance per reason serves every message.
_DROPS: Final = {r.value: _drop(r.value) for r in DropReason}


def _decode(header: bytes | memoryview) -> ScanBegin | Data | ScanEnd | str:
    """The decoded header, or the drop reason."""
    try:
        return decode_producer_header(header)
    except ProtocolError as exc:
        return exc.reason.value


class Router:
    """Per-session scans, routing and accounting for the L7 gateway."""

    def __init__(self, table: SessionTable, *, clock: Callable[[], float] = time.time,
                 spooling: bool = False, journal: Journal | None = None,
                 ncem_lane: Lane | None = None, lanes: bool = True) -> None:
        self.endpoints: list[str] = []
        # The lane this gateway carries of the NCEM scans, whose producers cannot say (a
        # session's own lane, set by the control plane, comes first).
        self._ncem_lane = ncem_lane
        # Whether a scan may be split over gateways: not where the control plane places each
        # session on one, and its ranks would wait for lanes no gateway carries.
        self._lanes = lanes
        self.live_slots: frozenset[int] = frozenset()
        self.spooling = spooling
        self.drops: dict[tuple[str, str], int] = {}
        # Why the latest scan_begin of a (session, scan) was refused, newest last.
        self.refusals: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._slots: dict[str, int] = {}
        self._lost: set[int] = set()  # slots whose connection broke and has not come back
        self._connected: set[int] = set()  # slots whose consumer completed a handshake
        # Totals of ended sessions, newest last, and of those folded together (ENDED).
        self.ended: OrderedDict[str, SessionStats] = OrderedDict()
        self.ended_total: SessionStats | None = None
        self._sessions: dict[str, _SessionState] = {}
        self._clock = clock
        self._journal = journal
        self._to_restore = Recovered([], {})
        self.use_table(table)

    def use_table(self, table: SessionTable) -> TableChange:
        """Adopt a new session table. Sessions that left it (ended, expired, revoked) are forgotten
        at once, their open scans closed as their last scan_end would have closed them (a spool is
        published, an interrupted scan reported); a changed consumer list applies from each
        session's next scan, except that an open scan whose member left is interrupted. What the
        socket loop must do is returned. New consumer endpoints get new slots at the end of
        ``endpoints``; ``live_slots`` are the slots of the consumers the table lists."""
        sessions: dict[str, _SessionState] = {}
        interruptions: list[Interruption] = []
        resumed: list[Decision] = []
        for entry in table:
            members = tuple(self._slot(endpoint) for endpoint in entry.session.consumers)
            state = self._sessions.get(entry.id)
            if state is None:
                state = _SessionState(entry, members)
                log.info("session added", extra={"fields": {
                    "session": entry.id, "consumers": list(entry.session.consumers)}})
                resumed.extend(self._restore_into(state))
            interruptions.extend(self._interrupt_scans_without(state, frozenset(members)))
            state.entry, state.members = entry, members
            sessions[entry.id] = state
        gone = [state for sid, state in self._sessions.items() if sid not in sessions]
        closed = [self._close(state, scan, "session_end")
                  for state in gone for scan in list(state.scans.values())]
        for state in gone:
            self._retire(state)
        self._sessions = sessions
        self.live_slots = frozenset(slot for state in sessions.values() for slot in state.members)
        return TableChange(interruptions, closed, resumed)

    def restore(self, recovered: Recovered) -> TableChange:
        """Carry on the scans a previous gateway left open (its journal): those of sessions in
        the table now, and of each session that appears later, at its first table."""
        self._to_restore = recovered
        resumed = [d for state in self._sessions.values() for d in self._restore_into(state)]
        interruptions = [i for state in self._sessions.values()
                         for i in self._interrupt_scans_without(state, frozenset(state.members))]
        return TableChange(interruptions, [], resumed)

    def _restore_into(self, state: _SessionState) -> list[Decision]:
        sid, now = state.entry.id, self._clock()
        state.closed.extend(self._to_restore.closed.pop(sid, []))
        mine = [o for o in self._to_restore.open if o.session == sid]
        self._to_restore.open[:] = [o for o in self._to_restore.open if o.session != sid]
        return [self._resume(state, opened, now) for opened in mine]

    def _resume(self, state: _SessionState, opened: Opened, now: float) -> Decision:
        begin = decode_producer_header(opened.begin)
        assert isinstance(begin, ScanBegin)  # the journal holds what the router encoded
        key = ScanKey(state.entry.id, begin.scan)
        members = tuple(self._slot(endpoint) for endpoint in opened.members)
        spool = None if members else SpoolWrite(key)
        scan = _Scan(begin, members, now, spool, opened.spool_reason)
        scan.resumed = True
        sent = self._to_restore.ends.pop((key.session, key.scan), [])
        scan.ends, scan.sent = len(sent), sum(sent)
        if opened.every_sector:
            scan.expect_every_sector()
        state.scans[begin.scan] = scan
        log.warning("scan resumed after a restart", extra={"fields": {
            "session": key.session, "scan": key.scan, "members": list(opened.members)}})
        if spool is not None:
            return Decision(spool=SpoolOpen(key, opened.begin))
        return Decision(control=scan.routed_begins(state.entry.id))

    def _interrupt_scans_without(self, state: _SessionState,
                                 live: frozenset[int]) -> Iterable[Interruption]:
        for scan in state.scans.values():
            if scan.members and not scan.interrupted and not live.issuperset(scan.members):
                yield self._interrupt(state, scan)

    def _interrupt(self, state: _SessionState, scan: _Scan) -> Interruption:
        sid, gone = state.entry.id, DropReason.CONSUMER_GONE.value
        lost = 0
        for frame, sector in scan.take_forwarded():
            scan.record_drop(frame, sector, gone)
            lost += 1
        self.drops[(sid, gone)] = self.drops.get((sid, gone), 0) + lost
        scan.interrupted = True
        state.interrupted += 1
        key = ScanKey(sid, scan.begin.scan)
        notice = encode(RoutedScanAbort(v=VERSION, scan=scan.begin.scan, reason=gone))
        notices = tuple(Outgoing(slot, notice) for slot in scan.members)
        if not self.spooling:
            return Interruption(key, notices, None)
        scan.spool = SpoolWrite(key)
        scan.to_spool = Decision(spool=scan.spool)
        return Interruption(key, notices, SpoolOpen(key, encode(scan.begin)))

    def consumer_lost(self, slot: int) -> list[Interruption]:
        """The connection to the consumer in ``slot`` broke: interrupt every open scan it is a
        member of, and spool new scans of its session until it is back."""
        self._lost.add(slot)
        self._connected.discard(slot)
        return [self._interrupt(state, scan) for state in self._sessions.values()
                for scan in state.scans.values()
                if slot in scan.members and not scan.interrupted]

    def consumer_back(self, slot: int) -> None:
        """The consumer in ``slot`` is connected (again): its session's next scans go to it."""
        self._lost.discard(slot)
        self._connected.add(slot)

    def _slot(self, endpoint: str) -> int:
        slot = self._slots.get(endpoint)
        if slot is None:
            slot = self._slots[endpoint] = len(self.endpoints)
            self.endpoints.append(endpoint)
        return slot

    def route(self, session_id: str | None, header: bytes | memoryview, parts: int,
              payload_bytes: int) -> Decision:
        """Decide what happens to one message (``payload_bytes`` is 0 for one-part messages)."""
        state = self._sessions.get(session_id) if session_id is not None else None
        if state is None:
            return self._count(session_id or "", DropReason.UNAUTHENTICATED.value)
        now = self._clock()
        if now >= state.entry.expires:
            return self._count(state.entry.id, DropReason.SESSION_EXPIRED.value)
        if parts == 2:
            return self._data(state, header, payload_bytes, now)
        if parts != 1:
            return self._count(state.entry.id, DropReason.WRONG_PART_COUNT.value)
        msg = _decode(header)
        if isinstance(msg, str):
            return self._count(state.entry.id, msg)
        if isinstance(msg, ScanBegin):
            return self._scan_begin(state, msg, now)
        if isinstance(msg, ScanEnd):
            return self._scan_end(state, msg, now)
        return self._data_drop(state, msg, DropReason.WRONG_PART_COUNT.value)

    def expire_idle(self) -> list[Decision]:
        """Close every scan idle for its session's ``scan_idle_s``; what the loop must do."""
        now, closed = self._clock(), []
        for state in self._sessions.values():
            idle_s = state.entry.session.limits.scan_idle_s
            for scan in [s for s in state.scans.values() if now - s.seen >= idle_s]:
                log.warning("scan closed after %d s without a message: %d of %d producers "
                            "ended it", idle_s, scan.ends, scan.begin.producers,
                            extra={"fields": {"session": state.entry.id, "scan": scan.begin.scan}})
                state.idle_closed += 1
                closed.append(self._close(state, scan, "idle"))
        return closed

    def undelivered(self, session_id: str | None) -> None:
        """Count a message that was routed but could not be sent (the gateway stopped first)."""
        self._count(session_id or "", DropReason.UNDELIVERED.value)

    def spool_failed(self, key: ScanKey, payload_bytes: int) -> None:
        """The spool of ``key`` could not be created (``payload_bytes`` 0: its scan_begin) or
        written (a data message of that size): that message is counted as lost, not spooled, and
        so is every later data message of the scan. The scan's file stays ``.partial``."""
        self._count(key.session, DropReason.SPOOL_FAILED.value)
        state = self._sessions.get(key.session)
        scan = state.scans.get(key.scan) if state is not None else None
        if state is None or scan is None:
            return
        scan.spool_failed = True
        if payload_bytes:
            state.spooled -= 1
            state.spooled_bytes -= payload_bytes

    def _count(self, session: str, reason: str) -> Decision:
        key = (session, reason)
        self.drops[key] = self.drops.get(key, 0) + 1
        return _DROPS[reason]

    def _data(self, state: _SessionState, header: bytes | memoryview, payload_bytes: int,
              now: float) -> Decision:
        if not is_native_header(header):
            return self._ncem_data(state, header, payload_bytes, now)
        msg = _decode(header)
        if type(msg) is str:
            return self._count(state.entry.id, msg)
        if type(msg) is not Data:
            return self._count(state.entry.id, DropReason.WRONG_PART_COUNT.value)
        scan = state.scans.get(msg.scan)
        if scan is None:
            return self._no_scan(state, msg.scan)
        scan.seen = now
        return self._accept(state, scan, msg, payload_bytes, native=True)

    def _no_scan(self, state: _SessionState, scan: int) -> Decision:
        reason = DropReason.SCAN_CLOSED if scan in state.closed else DropReason.UNKNOWN_SCAN
        return self._count(state.entry.id, reason.value)

    def _ncem_data(self, state: _SessionState, header: bytes | memoryview, payload_bytes: int,
                   now: float) -> Decision:
        """An NCEM data message: decoded once, its scan opened by it if need be, its position
        checked, and its scan closed once every sector of it has arrived."""
        try:
            ncem = decode_ncem_header(header)
        except ProtocolError as exc:
            return self._count(state.entry.id, exc.reason.value)
        msg = ncem.to_data()
        scan, opening = state.scans.get(msg.scan), None
        if scan is None and msg.scan not in state.closed:
            opening = self._scan_begin(state, self._ncem_begin(state, ncem), now,
                                       every_sector=True)
            scan = state.scans.get(msg.scan)
            if scan is None:
                return opening  # refused, and counted, as its scan_begin would have been
        if scan is None:
            return self._no_scan(state, msg.scan)
        scan.seen = now
        lanes = scan.begin.lanes
        if lanes is not None and scan.every_sector and msg.sector % lanes != scan.begin.lane:
            # A scan NCEM headers opened (it expects every sector of its lane's modules): this
            # module's stream belongs to another lane's gateway, and counted here it would close
            # this lane before its own modules are in. A native scan's lanes are its producers'.
            decision = self._data_drop(state, msg, DropReason.WRONG_LANE.value, scan)
        elif (ncem.rows, ncem.positions_per_row) != tuple(scan.begin.scan_shape):
            # A frame number computed from another shape would land on the wrong position.
            decision = self._data_drop(state, msg, DropReason.GEOMETRY_MISMATCH.value, scan)
        elif ncem.frame_number != msg.frame:
            decision = self._data_drop(state, msg, DropReason.POSITION_MISMATCH.value, scan)
        else:
            decision = self._accept(state, scan, msg, payload_bytes, native=False)
        closing = (self._close(state, scan, "complete")
                   if decision.drop is None and scan.arrive(msg) else None)
        if opening is None and closing is None:
            return decision
        return replace(decision, opening=opening, closing=closing)

    def _lane_problem(self, session: Session, msg: ScanBegin) -> str | None:
        """Why ``msg`` names a lane this gateway does not carry for ``session``, or None."""
        if session.lane is not None:
            # The control plane placed this lane here; a producer of another lane (or of none)
            # would have the ranks wait for a lane that never comes.
            wanted = (session.lane.lane, session.lane.lanes)
            return None if (msg.lane, msg.lanes) == wanted else DropReason.WRONG_LANE.value
        if msg.lanes is not None and not self._lanes:
            return DropReason.NO_LANES.value
        return None

    def _ncem_begin(self, state: _SessionState, ncem: NcemHeader) -> ScanBegin:
        session = state.entry.session
        detector = session.detector
        lane = session.lane or self._ncem_lane
        begin = ScanBegin(v=VERSION, scan=ncem.scan_number,
                          scan_shape=(ncem.rows, ncem.positions_per_row),
                          frame_shape=detector.frame_shape, sectors=detector.sectors, producers=1,
                          dtype=detector.dtype)
        if lane is None:
            return begin
        return msgspec.structs.replace(begin, lane=lane.lane, lanes=lane.lanes)

    def _accept(self, state: _SessionState, scan: _Scan, msg: Data, payload_bytes: int,
                native: bool) -> Decision:
        """A data message of an open scan: checked against its geometry, then forwarded,
        spooled or dropped."""
        try:
            scan.geometry.check(msg, payload_bytes)
        except ProtocolError as exc:
            return self._data_drop(state, msg, exc.reason.value, scan)
        if scan.spool is not None or scan.interrupted:
            return self._divert(state, msg, scan, native, payload_bytes)
        frame = msg.frame
        index = frame % len(scan.members)
        # Inline (no method call): this runs for every forwarded message.
        bit = frame * scan.sectors + msg.sector
        scan.forwarded[bit >> 3] |= 1 << (bit & 7)
        scan.expected[index] += 1
        state.messages += 1
        state.bytes += payload_bytes
        if native:
            return scan.forward[index]
        return Decision(slot=scan.members[index], header=encode(msg))

    def _divert(self, state: _SessionState, msg: Data, scan: _Scan, native: bool,
                payload_bytes: int) -> Decision:
        """A data message of a spooled or interrupted scan: to its spool, or dropped."""
        spool = scan.spool
        if spool is None:
            return self._data_drop(state, msg, DropReason.CONSUMER_GONE.value, scan)
        if scan.spool_failed:
            return self._data_drop(state, msg, DropReason.SPOOL_FAILED.value, scan)
        scan.spooled += 1
        state.spooled += 1
        state.spooled_bytes += payload_bytes
        if native:
            return scan.to_spool
        return Decision(header=encode(msg), spool=spool)

    def _data_drop(self, state: _SessionState, msg: Data, reason: str,
                   scan: _Scan | None = None) -> Decision:
        scan = scan if scan is not None else state.scans.get(msg.scan)
        if scan is not None:
            scan.record_drop(msg.frame, msg.sector, reason)
        return self._count(state.entry.id, reason)

    def _scan_begin(self, state: _SessionState, msg: ScanBegin, now: float,
                    every_sector: bool = False) -> Decision:
        session = state.entry.session
        sid, detector, limits = session.id, session.detector, session.limits
        if (tuple(msg.frame_shape), msg.sectors, msg.dtype) != (
                tuple(detector.frame_shape), detector.sectors, detector.dtype):
            return self._refuse(sid, msg, DropReason.GEOMETRY_MISMATCH.value)
        if msg.scan_shape[0] * msg.scan_shape[1] > limits.max_scan_positions:
            return self._refuse(sid, msg, DropReason.SCAN_TOO_LARGE.value)
        if msg.producers > limits.max_producers:
            return self._refuse(sid, msg, DropReason.TOO_MANY_PRODUCERS.value)
        lane = self._lane_problem(session, msg)
        if lane is not None:
            return self._refuse(sid, msg, lane)
        scan = state.scans.get(msg.scan)
        if scan is not None:
            return self._join_scan(sid, scan, msg, now)
        if msg.scan in state.closed:
            return self._refuse(sid, msg, DropReason.SCAN_CLOSED.value)
        if len(state.scans) >= limits.max_open_scans:
            return self._refuse(sid, msg, DropReason.TOO_MANY_SCANS.value)
        if not state.members:
            return self._begin_spooled(state, msg, now, DropReason.NO_CONSUMERS.value,
                                       every_sector)
        if not self._lost.isdisjoint(state.members):
            return self._begin_spooled(state, msg, now, DropReason.CONSUMER_GONE.value,
                                       every_sector)
        scan = self._open(state, _Scan(msg, state.members, now), every_sector)
        return Decision(control=scan.routed_begins(sid))

    def _begin_spooled(self, state: _SessionState, msg: ScanBegin, now: float,
                       reason: str, every_sector: bool) -> Decision:
        if not self.spooling:
            return self._refuse(state.entry.id, msg, reason)
        key = ScanKey(state.entry.id, msg.scan)
        self._open(state, _Scan(msg, (), now, SpoolWrite(key), reason), every_sector)
        # The spool records the canonical encoding: what a replaying producer would send.
        return Decision(spool=SpoolOpen(key, encode(msg)))

    def _open(self, state: _SessionState, scan: _Scan, every_sector: bool) -> _Scan:
        """Register a new scan, and journal it before any decision about it takes effect."""
        if every_sector:
            scan.expect_every_sector()
        state.scans[scan.begin.scan] = scan
        log.info("scan opened", extra={"fields": {
            "session": state.entry.id, "scan": scan.begin.scan,
            "scan_shape": list(scan.begin.scan_shape), "members": len(scan.members),
            "spooled": scan.spool_reason or None}})
        if self._journal is not None:
            self._journal.opened(Opened(
                session=state.entry.id, scan=scan.begin.scan, begin=encode(scan.begin),
                members=[self.endpoints[slot] for slot in scan.members],
                spool_reason=scan.spool_reason, every_sector=every_sector))
        return scan

    def _refuse(self, sid: str, msg: ScanBegin, reason: str) -> Decision:
        """Refuse a scan_begin, remembering why for the scan's producers (receipts)."""
        self.refusals[(sid, msg.scan)] = reason
        self.refusals.move_to_end((sid, msg.scan))
        if len(self.refusals) > REFUSALS_KEPT:
            self.refusals.popitem(last=False)
        return self._count(sid, reason)

    def _join_scan(self, sid: str, scan: _Scan, msg: ScanBegin, now: float) -> Decision:
        if msg != scan.begin:
            return self._count(sid, DropReason.SCAN_MISMATCH.value)
        scan.seen = now
        # Every producer sends the same scan_begin, and sends it again after a reconnect
        # (dataplane.producer): nothing changes. The scan closes at its ``producers``-th scan_end.
        return _ACCEPTED

    def _scan_end(self, state: _SessionState, msg: ScanEnd, now: float) -> Decision:
        scan = state.scans.get(msg.scan)
        if scan is None:
            reason = DropReason.SCAN_CLOSED if msg.scan in state.closed else DropReason.UNKNOWN_SCAN
            return self._count(state.entry.id, reason.value)
        if scan.sent + msg.sent > MAX_U63:
            # Each claim fits the wire type; their sum, which the routed scan_end and the report
            # carry, must too, or no consumer could decode the scan's end.
            return self._count(state.entry.id, DropReason.INVALID_HEADER.value)
        scan.ends += 1
        scan.sent += msg.sent
        scan.seen = now
        if scan.ends >= scan.begin.producers:
            return self._close(state, scan, "scan_end")
        if self._journal is not None:
            self._journal.ended(state.entry.id, msg.scan, msg.sent)
        return _ACCEPTED

    def _close(self, state: _SessionState, scan: _Scan, closed_by: ClosedBy) -> Decision:
        """Close an open scan: routed scan_ends to its members, or its spool; and its report."""
        del state.scans[scan.begin.scan]
        state.closed.append(scan.begin.scan)
        if self._journal is not None:
            self._journal.closed(state.entry.id, scan.begin.scan)
        report = scan.report(state.entry.id, closed_by)
        if not scan.interrupted and scan.spool is None:
            return Decision(control=scan.routed_ends(), report=report)
        if scan.spool is None or scan.spool_failed:
            return Decision(report=report)
        return Decision(spool=SpoolClose(scan.spool.key, scan.manifest()), report=report)

    def scan_open(self, session: str, scan: int) -> bool:
        """Whether ``scan`` of ``session`` is open; safe to call from another thread."""
        state = self._sessions.get(session)
        return state is not None and scan in state.scans

    def refused(self, session: str, scan: int) -> str:
        """Why the latest scan_begin of ``scan`` was refused ("" if none); thread-safe too."""
        return self.refusals.get((session, scan), "")

    def stats(self) -> Iterator[SessionStats]:
        """Counters per session, live and ended; safe to call from another thread while routing
        goes on."""
        for state in list(self._sessions.values()):
            yield self._stats(state)
        yield from list(self.ended.values())
        if self.ended_total is not None:
            yield self.ended_total

    def _stats(self, state: _SessionState) -> SessionStats:
        connected = len(self._connected.intersection(state.members))
        return SessionStats(state.entry.id, state.messages, state.bytes, len(state.scans),
                            len(state.members), connected, state.spooled, state.spooled_bytes,
                            state.interrupted, state.idle_closed)

    def _retire(self, state: _SessionState) -> None:
        """Keep an ended session's totals; fold the oldest kept ones into ENDED."""
        sid = state.entry.id
        log.info("session left", extra={"fields": {"session": sid}})
        self.ended[sid] = replace(self._stats(state), open_scans=0, consumers=0, connected=0,
                                  live=False)
        if len(self.ended) <= ENDED_SESSIONS_KEPT:
            return
        oldest, folded = self.ended.popitem(last=False)
        self.ended_total = (self.ended_total or _NOTHING_ENDED).plus(folded)
        for key in [key for key in self.drops if key[0] == oldest]:
            total = (ENDED, key[1])
            self.drops[total] = self.drops.get(total, 0) + self.drops.pop(key)

    @property
    def open_scans(self) -> int:
        return sum(len(state.scans) for state in list(self._sessions.values()))
