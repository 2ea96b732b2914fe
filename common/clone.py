"""State distribution wire format and the pure client-side state (the ZeroMQ Clone pattern).

The control plane's state service publishes the sessions every gateway must serve. A gateway
subscribes to updates first, then asks for a snapshot, so nothing published in between is lost.

Sockets (both CURVE servers on the control plane; gateways are CURVE clients on an allow-list):
    snapshot  ROUTER <- DEALER   a gateway asks, the server answers with the whole state; a
                                 gateway registers there too
    updates   PUB    -> SUB      sequenced changes and heartbeats

Each gateway is sent only its own sessions (those the control plane placed on it) and the
sessions placed on no gateway (a single-gateway site's). A snapshot is filtered for the gateway
that asks (the ROUTER knows which allow-listed key it is); an update goes out with a topic frame
in front of the three frames below: ``ALL_TOPIC`` for what every gateway takes (heartbeats,
unplaced sessions), else the Z85 public key of the gateway it is for. A session placed on one
gateway goes to it and, as a tombstone, to every other (so all of them see every seq and a moved
session leaves its old gateway). A gateway subscribes to ``ALL_TOPIC`` and its own key. The topic
sorts messages; it is no secret boundary: every allow-listed gateway is trusted with sessions.

Every message is three frames, like the zguide's kvmsg (a ROUTER adds the peer identity in front):
    [key, header, body]
    key     ASCII, at most MAX_KEY_BYTES: ``ICANHAZ?``, ``KTHXBAI``, ``HUGZ`` or ``session/<id>``
    header  MessagePack map {v: 1, epoch, seq}, at most MAX_HEADER_BYTES, no other keys
            ``epoch`` = 32 lowercase hex digits naming one run of the server (a new one at every
            start; a client that has no state yet sends ""), ``seq`` = an integer >= 0
    body    depends on the key, at most MAX_BODY_BYTES

Messages:
    ICANHAZ?        gateway -> ROUTER  header: the gateway's epoch and last seq; body empty
    REPORT          gateway -> ROUTER  header: epoch "" and seq = the gateway's report id;
                                       body = MessagePack GatewayReport (common.receipts) of a
                                       scan a consumer will not report: spooled or interrupted
    ACK             ROUTER -> gateway  header: the server's epoch and seq = that report id;
                                       body = MessagePack map {outcome: recorded | duplicate |
                                       refused}; without an ACK the gateway sends it again
    REGISTER        gateway -> ROUTER  header: epoch "" and seq 0; body = MessagePack
                                       Registration (below): where producers reach the gateway
                                       and how many sessions it takes. Sent at start and every
                                       few seconds: it is also the gateway's heartbeat
    REGISTERED      ROUTER -> gateway  header: the server's epoch and seq 0; body = MessagePack
                                       map {accepted: bool, reason: str}
    session/<id>    ROUTER -> gateway  one snapshot entry; header seq = the snapshot's seq;
                                       body = the session's DSN document (below)
    KTHXBAI         ROUTER -> gateway  end of snapshot; header seq = the snapshot's seq;
                                       body = MessagePack map {count: entries sent}
    session/<id>    PUB                an update; header seq = previous seq + 1 within the epoch;
                                       body = the session's DSN document, or empty: a tombstone
                                       (the session ended, expired or was revoked)
    HUGZ            PUB                heartbeat; header seq = the server's current seq; body empty

A session's document is its full ``common.config.Session`` (client keys, allowed source
networks, allowed internal targets, live consumers, limits, expiry) as a MessagePack map of its
JSON form; it is validated with the same schema as a configuration file, and its id must match
the key. Updates carry whole documents, so applying one twice changes nothing.

A registration's ``server_key`` is the gateway's CURVE public key, which is also its identity to
the state service: the server refuses one that differs from the key that authenticated, so a
gateway can only hand producers its own key. Its endpoints are ``tcp://IP:PORT``, never a
wildcard (producers connect to them).

Reports are idempotent (the control plane stores a scan's report once and answers ``duplicate``
to the same report again), so a gateway resends every report until it is acknowledged.

A client resynchronises (asks for a new snapshot) when an update or heartbeat shows a different
epoch (the server restarted), when an update's seq is not last + 1 (it missed one), or when a
heartbeat's seq is ahead of its own (it missed the last update). Until the new snapshot is
complete it keeps serving its last good state.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Annotated, Final, Literal, NamedTuple, TypeVar

import msgspec
from pydantic import ValidationError

from common.config import Session
from common.errors import DsnError
from common.receipts import GatewayReport

MAX_KEY_BYTES: Final = 72
MAX_HEADER_BYTES: Final = 128
# A report with a full loss manifest (MAX_MANIFEST entries) is the largest body.
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
# As many sessions as a DSN configuration may hold: bounds snapshots and buffered updates.
MAX_SESSIONS: Final = 10_000
MAX_PENDING: Final = 10_000

ICANHAZ: Final = b"ICANHAZ?"
KTHXBAI: Final = b"KTHXBAI"
HUGZ: Final = b"HUGZ"
REPORT: Final = b"REPORT"
ACK: Final = b"ACK"
REGISTER: Final = b"REGISTER"
REGISTERED: Final = b"REGISTERED"
# The topic every gateway subscribes to; "~" is outside Z85, so no gateway key starts with it.
ALL_TOPIC: Final = b"~all"
MAX_CAPACITY: Final = MAX_SESSIONS
MAX_REASON_CHARS: Final = 200
SESSION_PREFIX: Final = b"session/"

Epoch = Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{32})?$")]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class CloneError(DsnError, ValueError):
    """A state-distribution message that breaks the wire format."""


class StateEndpoints(NamedTuple):
    """Where the state service listens: snapshots (ROUTER) and updates (PUB)."""

    snapshot: str
    updates: str


class StateServer(NamedTuple):
    """One control-plane replica's state service: where it listens and its CURVE public key."""

    endpoints: StateEndpoints
    server_key: bytes


class _Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: Literal[1]
    epoch: Epoch
    seq: Seq


class _SnapshotEnd(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    count: Annotated[int, msgspec.Meta(ge=0, le=MAX_SESSIONS)]


AckOutcome = Literal["recorded", "duplicate", "refused"]
_Endpoint = Annotated[str, msgspec.Meta(max_length=64)]
_Key = Annotated[str, msgspec.Meta(min_length=40, max_length=40)]


class Registration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a gateway announces: its ingress (CURVE), receipts and plaintext ingress as producers
    reach them, its CURVE server key (Z85) and how many sessions it takes. Bounds only here; the
    server checks the endpoints' syntax and the key."""

    endpoint: _Endpoint
    receipts_endpoint: _Endpoint
    server_key: _Key
    capacity: Annotated[int, msgspec.Meta(ge=1, le=MAX_CAPACITY)]
    plain_endpoint: _Endpoint | None = None


class _AckBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    outcome: AckOutcome


class _RegisteredBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    accepted: bool
    reason: Annotated[str, msgspec.Meta(max_length=MAX_REASON_CHARS)]


_HEADER = msgspec.msgpack.Decoder(_Header)
_REGISTRATION = msgspec.msgpack.Decoder(Registration)
_REGISTERED_BODY = msgspec.msgpack.Decoder(_RegisteredBody)
_SNAPSHOT_END = msgspec.msgpack.Decoder(_SnapshotEnd)
_ACK_BODY = msgspec.msgpack.Decoder(_AckBody)
_REPORT_BODY = msgspec.msgpack.Decoder(GatewayReport)
_ENCODER = msgspec.msgpack.Encoder()


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A snapshot entry or an update; ``session`` None is a tombstone."""

    epoch: str
    seq: int
    session_id: str
    session: Session | None


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    epoch: str
    seq: int
    count: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Report:
    """A gateway's report, named by ``report_id`` in its ACK."""

    report_id: int
    scan: GatewayReport


@dataclass(frozen=True, slots=True)
class Ack:
    epoch: str
    report_id: int
    outcome: AckOutcome


@dataclass(frozen=True, slots=True)
class Register:
    registration: Registration


@dataclass(frozen=True, slots=True)
class Registered:
    """The server's answer to a registration: accepted, or refused and why."""

    epoch: str
    accepted: bool
    reason: str = ""


Message = SnapshotRequest | Entry | SnapshotEnd | Heartbeat | Report | Ack | Register | Registered


def _header(epoch: str, seq: int) -> bytes:
    return _ENCODER.encode(_Header(1, epoch, seq))


def encode(message: Message) -> list[bytes]:
    """The three frames of ``message``."""
    if isinstance(message, Report):
        return [REPORT, _header("", message.report_id), _ENCODER.encode(message.scan)]
    if isinstance(message, Ack):
        return [ACK, _header(message.epoch, message.report_id),
                _ENCODER.encode(_AckBody(message.outcome))]
    if isinstance(message, Register):
        return [REGISTER, _header("", 0), _ENCODER.encode(message.registration)]
    if isinstance(message, Registered):
        return [REGISTERED, _header(message.epoch, 0), _ENCODER.encode(
            _RegisteredBody(message.accepted, message.reason[:MAX_REASON_CHARS]))]
    header = _header(message.epoch, message.seq)
    if isinstance(message, SnapshotRequest):
        return [ICANHAZ, header, b""]
    if isinstance(message, SnapshotEnd):
        return [KTHXBAI, header, _ENCODER.encode(_SnapshotEnd(message.count))]
    if isinstance(message, Heartbeat):
        return [HUGZ, header, b""]
    body = b"" if message.session is None else _ENCODER.encode(
        message.session.model_dump(mode="json"))
    return [SESSION_PREFIX + message.session_id.encode("ascii"), header, body]


def _check_sizes(frames: list[bytes]) -> None:
    if len(frames) != 3:
        raise CloneError(f"expected 3 frames, got {len(frames)}")
    key, header, body = frames
    if len(key) > MAX_KEY_BYTES or len(header) > MAX_HEADER_BYTES or len(body) > MAX_BODY_BYTES:
        raise CloneError("a frame exceeds its size limit")


def _session(key: bytes, body: bytes) -> tuple[str, Session | None]:
    session_id = key[len(SESSION_PREFIX):].decode("ascii", "replace")
    if not body:
        return session_id, None
    try:
        session = Session.model_validate(msgspec.msgpack.decode(body))
    except (msgspec.DecodeError, ValidationError) as exc:
        raise CloneError(f"{key!r}: invalid session document: {exc}") from None
    if session.id != session_id:
        raise CloneError(f"{key!r} carries session {session.id!r}")
    return session_id, session


_T = TypeVar("_T")


def _body(decoder: msgspec.msgpack.Decoder[_T], key: bytes, body: bytes) -> _T:
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise CloneError(f"invalid {key.decode('ascii')} body: {exc}") from None


def decode(frames: list[bytes]) -> Message:
    """Parse three frames into a message; anything malformed raises CloneError."""
    _check_sizes(frames)
    key, raw_header, body = (bytes(f) for f in frames)
    try:
        header = _HEADER.decode(raw_header)
    except msgspec.DecodeError as exc:
        raise CloneError(f"invalid header: {exc}") from None
    if key == ICANHAZ:
        if body:
            raise CloneError("ICANHAZ? carries no body")
        return SnapshotRequest(header.epoch, header.seq)
    if key == REPORT:
        return Report(header.seq, _body(_REPORT_BODY, key, body))
    if key == REGISTER:
        return Register(_body(_REGISTRATION, key, body))
    if not header.epoch:
        raise CloneError(f"{key!r} needs the server's epoch")
    if key == HUGZ:
        if body:
            raise CloneError("HUGZ carries no body")
        return Heartbeat(header.epoch, header.seq)
    if key == KTHXBAI:
        return SnapshotEnd(header.epoch, header.seq, _body(_SNAPSHOT_END, key, body).count)
    if key == ACK:
        return Ack(header.epoch, header.seq, _body(_ACK_BODY, key, body).outcome)
    if key == REGISTERED:
        answer = _body(_REGISTERED_BODY, key, body)
        return Registered(header.epoch, answer.accepted, answer.reason)
    if key.startswith(SESSION_PREFIX):
        session_id, session = _session(key, body)
        return Entry(header.epoch, header.seq, session_id, session)
    raise CloneError(f"unknown key {key[:MAX_KEY_BYTES]!r}")


def encode_update(topic: bytes, message: Message) -> list[bytes]:
    """An update's frames on the PUB socket: ``topic`` (``ALL_TOPIC`` or a gateway's Z85 key),
    then the message's three."""
    return [topic, *encode(message)]


def decode_update(frames: list[bytes]) -> Message:
    """An update as a SUB socket receives it: the topic frame (which the subscription already
    matched) dropped, the rest decoded."""
    if len(frames) != 4:
        raise CloneError(f"expected a topic and 3 frames, got {len(frames)} frames")
    return decode(frames[1:])


class Outcome(enum.Enum):
    """What applying a message did; RESYNC asks the caller for a new snapshot."""

    CHANGED = "changed"
    UNCHANGED = "unchanged"
    RESYNC = "resync"


@dataclass(slots=True)
class _Snapshot:
    """A snapshot being received, and the updates that arrived while it was."""

    entries: dict[str, Session] = field(default_factory=dict)
    pending: list[Entry] = field(default_factory=list)


class CloneState:
    """The client's view of the server's sessions. Pure: messages in, outcomes out.

    ``sessions`` is the last complete state (a snapshot plus the updates that followed it in
    order); it is replaced only when a new snapshot completes, so a client that lost its server
    keeps serving what it last knew.
    """

    def __init__(self) -> None:
        self.epoch = ""
        self.seq = 0
        self.version = 0  # bumped on every change of ``sessions``, so callers rebuild lazily
        self._sessions: dict[str, Session] = {}
        self._snapshot: _Snapshot | None = None

    @property
    def sessions(self) -> Mapping[str, Session]:
        return MappingProxyType(self._sessions)

    @property
    def synced(self) -> bool:
        """True once a snapshot completed and no resynchronisation is under way."""
        return bool(self.epoch) and self._snapshot is None

    def request(self) -> SnapshotRequest:
        """Start a (new) snapshot: forget any partial one; the last good state stays."""
        self._snapshot = _Snapshot()
        return SnapshotRequest(self.epoch, self.seq)

    def live_sessions(self, now: datetime) -> list[Session]:
        """The sessions to serve at ``now``: an expired session is dropped without an update."""
        return [s for s in self._sessions.values() if not s.expired(now)]

    def apply(self, message: Message) -> Outcome:
        if isinstance(message, Entry):
            return self._entry(message)
        if isinstance(message, SnapshotEnd):
            return self._end(message)
        if isinstance(message, Heartbeat):
            return self._heartbeat(message)
        # Requests and reports are the server's to answer; ACKs the caller's.
        return Outcome.UNCHANGED

    def apply_snapshot_entry(self, entry: Entry) -> Outcome:
        """An entry from the snapshot socket (never an update)."""
        snapshot = self._snapshot
        if snapshot is None or entry.session is None:
            return Outcome.UNCHANGED  # not asked for: a stale answer; a snapshot has no tombstones
        if len(snapshot.entries) >= MAX_SESSIONS:
            return Outcome.RESYNC
        snapshot.entries[entry.session_id] = entry.session
        return Outcome.UNCHANGED

    def _entry(self, update: Entry) -> Outcome:
        snapshot = self._snapshot
        if snapshot is not None:
            if len(snapshot.pending) >= MAX_PENDING:
                return Outcome.RESYNC
            snapshot.pending.append(update)
            return Outcome.UNCHANGED
        if not self.epoch:
            return Outcome.RESYNC
        if update.epoch != self.epoch or update.seq > self.seq + 1:
            return Outcome.RESYNC
        if update.seq <= self.seq:
            return Outcome.UNCHANGED  # already in the snapshot this state came from
        self._store(update)
        return Outcome.CHANGED

    def _store(self, update: Entry) -> None:
        self.seq = update.seq
        if update.session is None:
            self._sessions.pop(update.session_id, None)
        else:
            self._sessions[update.session_id] = update.session
        self.version += 1

    def _end(self, end: SnapshotEnd) -> Outcome:
        snapshot = self._snapshot
        if snapshot is None:
            return Outcome.UNCHANGED
        if end.count != len(snapshot.entries):
            return Outcome.RESYNC  # the server's send queue dropped some entries
        self._snapshot = None
        self.epoch, self.seq = end.epoch, end.seq
        self._sessions = dict(snapshot.entries)
        self.version += 1
        return self._replay(snapshot.pending)

    def _replay(self, pending: Iterable[Entry]) -> Outcome:
        """Apply the updates buffered during the snapshot that are newer than it."""
        for update in pending:
            if update.epoch == self.epoch and update.seq <= self.seq:
                continue
            if self._entry(update) is Outcome.RESYNC:
                return Outcome.RESYNC
        return Outcome.CHANGED

    def _heartbeat(self, beat: Heartbeat) -> Outcome:
        if self._snapshot is not None:
            return Outcome.UNCHANGED
        if beat.epoch != self.epoch or beat.seq > self.seq:
            return Outcome.RESYNC
        return Outcome.UNCHANGED
