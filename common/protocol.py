"""DSN data-plane wire protocol, version 1.

Every message is a ZeroMQ multipart message. Part 1 is a MessagePack header; part 2, where present,
is one detector sector as raw little-endian array data in C order. Header keys are exactly those
listed (unknown keys, missing keys and duplicate keys are errors), integers are MessagePack
integers (never floats or booleans), and ``v`` is the protocol version, 1.

Producer -> gateway
    scan_begin  [header]          {v, type: "scan_begin", scan, scan_shape: [rows, cols],
                                   frame_shape: [576, 576], sectors: 4, producers, dtype: "uint16",
                                   lane, lanes}
                                  sent by every producer before its data; all must agree.
                                  ``lane`` and ``lanes`` (optional, together, lane < lanes <= 64):
                                  the scan is split over ``lanes`` gateways and this producer
                                  sends through lane ``lane``; ``producers`` then counts the
                                  producers of this lane. Absent: one lane.
    data        [header, sector]  {v, type: "data", scan, frame, sector, seq}
                                  ``frame`` = row * cols + col (flat scan position); sector k holds
                                  frame rows k*h .. k*h+h-1 with h = frame_rows / sectors;
                                  ``seq`` counts the producer's data messages from 0.
    data (NCEM) [header, sector]  header = MessagePack array of 8 unsigned ints
                                  [scan_number, frame_number, positions_per_row, rows, x_in_row,
                                   row_in_scan, thread_id, module], module = sector; translated to
                                  the native header (frame = row_in_scan * positions_per_row +
                                  x_in_row, seq = frame_number) before it is forwarded.
                                  ``frame_number`` is that same flat position (the NCEM
                                  aggregators route by it): a header where the two disagree is
                                  dropped. NCEM producers send no scan_begin or scan_end: their
                                  first message opens the scan (its number and shape from the
                                  header, the rest from the session's detector), which closes
                                  when every sector of every frame has arrived, or when it goes
                                  idle.
    scan_end    [header]          {v, type: "scan_end", scan, sent}  one per producer,
                                  ``sent`` = data messages that producer sent for the scan.

Gateway -> consumer
    scan_begin  [header]          {v, type: "scan_begin", session, scan, scan_shape, frame_shape,
                                   sectors, dtype, members, index, lane, lanes}
                                  the consumer is member ``index`` of ``members`` for this scan and
                                  receives exactly the frames with frame % members == index;
                                  ``lane``/``lanes`` as its producers said (absent: one lane).
                                  A scan of several lanes reaches the consumer from each lane's
                                  gateway: a scan_begin and a scan_end from each, to be merged.
    data        [header, sector]  the native data header and the sector, unchanged.
    scan_end    [header]          {v, type: "scan_end", scan, expected, sent, accepted, dropped,
                                   drops, drops_truncated, resumed, lane, lanes}
                                  ``expected`` = data messages forwarded to this consumer,
                                  ``sent`` = sum of the producers' ``sent``, ``accepted`` = data
                                  messages the gateway accepted for the whole scan, ``dropped`` =
                                  {reason: count} for the scan, ``drops`` = [[frame, sector,
                                  reason], ...] for this consumer's frames (at most MAX_MANIFEST
                                  entries; ``drops_truncated`` says whether some were left out);
                                  ``resumed`` (optional, default false): the gateway restarted
                                  mid-scan, so ``expected`` and ``accepted`` count only what it
                                  saw since, and the consumer's expected sectors are ``sent``.
                                  With lanes, every count is the lane's: the scan ends at the
                                  consumer once every lane's scan_end is in, counts summed.
    scan_abort  [header]          {v, type: "scan_abort", scan, reason}
                                  a member of the scan left mid-scan ("consumer_gone"): the gateway
                                  sends no more of it to any member (it spools the rest and reports
                                  the scan), so the job cannot finish it and must not wait for it.

Limits are checked before anything is allocated: a producer header longer than MAX_HEADER_BYTES is
rejected unread, scan and frame geometry are bounded, and a payload must be exactly one sector.
Every rejection raises ProtocolError with a stable ``reason`` used as a metric label:
undecodable MessagePack is ``malformed_header``; a wrong type, missing or unknown key, unsupported
version or out-of-bounds value is ``invalid_header``; a key given twice is ``duplicate_key``; a
frame or sector outside its scan is ``out_of_range``.
"""

from __future__ import annotations

import enum
from typing import Annotated, Final, Literal, TypeVar

import msgspec

from common.errors import DsnError

VERSION: Final = 1
MAX_HEADER_BYTES: Final = 512
MAX_CONTROL_BYTES: Final = 16 * 1024 * 1024
MAX_MANIFEST: Final = 65_536
DTYPES: Final = {"uint16": 2}

U32 = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
MAX_U63 = 2**63 - 1
U63 = Annotated[int, msgspec.Meta(ge=0, le=MAX_U63)]
SectorIndex = Annotated[int, msgspec.Meta(ge=0, lt=64)]
ScanDim = Annotated[int, msgspec.Meta(ge=1, le=65_535)]
FrameDim = Annotated[int, msgspec.Meta(ge=1, le=8_192)]
Sectors = Annotated[int, msgspec.Meta(ge=1, le=64)]
Producers = Annotated[int, msgspec.Meta(ge=1, le=1_024)]
Members = Annotated[int, msgspec.Meta(ge=1, le=65_535)]
MAX_LANES: Final = 64
Lane = Annotated[int, msgspec.Meta(ge=0, lt=MAX_LANES)]
Lanes = Annotated[int, msgspec.Meta(ge=1, le=MAX_LANES)]
SessionId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
# A drop reason as manifests and reports carry it: checked for its shape only, never against
# DropReason, so a label the reader does not know still decodes.
ReasonLabel = Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,40}$")]


@enum.unique
class DropReason(enum.StrEnum):
    """Why a message was not forwarded; the value is its label in metrics and loss manifests."""

    # The protocol's: a message that breaks the wire format.
    OVERSIZED_HEADER = "oversized_header"
    MALFORMED_HEADER = "malformed_header"
    INVALID_HEADER = "invalid_header"
    DUPLICATE_KEY = "duplicate_key"
    WRONG_PART_COUNT = "wrong_part_count"
    WRONG_PAYLOAD_SIZE = "wrong_payload_size"
    OUT_OF_RANGE = "out_of_range"
    # The gateway's: a message its session, its scan or its consumers could not take.
    UNAUTHENTICATED = "unauthenticated"
    SESSION_EXPIRED = "session_expired"
    GEOMETRY_MISMATCH = "geometry_mismatch"
    POSITION_MISMATCH = "position_mismatch"  # an NCEM frame_number that is not its x, y
    SCAN_TOO_LARGE = "scan_too_large"
    SCAN_MISMATCH = "scan_mismatch"
    TOO_MANY_PRODUCERS = "too_many_producers"
    TOO_MANY_SCANS = "too_many_scans"
    UNKNOWN_SCAN = "unknown_scan"
    SCAN_CLOSED = "scan_closed"
    NO_CONSUMERS = "no_consumers"
    SPOOL_FAILED = "spool_failed"
    UNDELIVERED = "undelivered"
    CONSUMER_GONE = "consumer_gone"
    # An NCEM sector of a module another gateway's lane carries, or a scan_begin naming another
    # lane than the one the control plane placed on this gateway.
    WRONG_LANE = "wrong_lane"
    NO_LANES = "no_lanes"  # a scan_begin naming lanes where its session has one gateway


class ProtocolError(DsnError, ValueError):
    """A message that breaks the wire protocol; ``reason`` says how."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


# msgspec passes frozen=True on to subclasses; they restate it because type checkers do not.
class _Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False, tag_field="type"):
    v: Literal[1]


def _check_lanes(lane: int | None, lanes: int | None) -> None:
    if (lane is None) != (lanes is None):
        raise ValueError("lane and lanes go together")
    if lane is not None and lanes is not None and lane >= lanes:
        raise ValueError("lane must be below lanes")


class ScanBegin(_Header, tag="scan_begin", frozen=True, omit_defaults=True):
    scan: U32
    scan_shape: tuple[ScanDim, ScanDim]
    frame_shape: tuple[FrameDim, FrameDim]
    sectors: Sectors
    producers: Producers
    dtype: Literal["uint16"]
    # Absent (None) for a scan of one lane: the header is then the one-lane contract's exactly.
    lane: Lane | None = None
    lanes: Lanes | None = None

    def __post_init__(self) -> None:
        if self.frame_shape[0] % self.sectors:
            raise ValueError("frame_shape[0] must be a multiple of sectors")
        _check_lanes(self.lane, self.lanes)

    @property
    def geometry(self) -> ScanGeometry:
        return ScanGeometry(self.scan_shape, self.frame_shape, self.sectors, self.dtype)


class Data(_Header, tag="data", frozen=True):
    scan: U32
    frame: U32
    sector: SectorIndex
    seq: U63


class ScanEnd(_Header, tag="scan_end", frozen=True):
    scan: U32
    sent: U63


class NcemHeader(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True,
                 gc=False):
    """The NCEM 4D Camera header: a MessagePack array of 8 unsigned ints."""

    scan_number: U32
    frame_number: U32
    positions_per_row: ScanDim
    rows: ScanDim
    x_in_row: U32
    row_in_scan: U32
    thread_id: U32
    module: SectorIndex

    def __post_init__(self) -> None:
        if self.x_in_row >= self.positions_per_row or self.row_in_scan >= self.rows:
            raise ValueError("scan position outside the scan")

    def to_data(self) -> Data:
        frame = self.row_in_scan * self.positions_per_row + self.x_in_row
        return Data(v=VERSION, scan=self.scan_number, frame=frame, sector=self.module,
                    seq=self.frame_number)


class RoutedScanBegin(_Header, tag="scan_begin", frozen=True, omit_defaults=True):
    session: SessionId
    scan: U32
    scan_shape: tuple[ScanDim, ScanDim]
    frame_shape: tuple[FrameDim, FrameDim]
    sectors: Sectors
    dtype: Literal["uint16"]
    members: Members
    index: Annotated[int, msgspec.Meta(ge=0, lt=65_535)]
    lane: Lane | None = None
    lanes: Lanes | None = None

    def __post_init__(self) -> None:
        if self.index >= self.members:
            raise ValueError("index must be below members")
        if self.frame_shape[0] % self.sectors:
            raise ValueError("frame_shape[0] must be a multiple of sectors")
        _check_lanes(self.lane, self.lanes)

    @property
    def geometry(self) -> ScanGeometry:
        return ScanGeometry(self.scan_shape, self.frame_shape, self.sectors, self.dtype)


class RoutedScanEnd(_Header, tag="scan_end", frozen=True, omit_defaults=True):
    scan: U32
    expected: U63
    sent: U63
    accepted: U63
    dropped: dict[ReasonLabel, U63]
    drops: list[tuple[U32, SectorIndex, ReasonLabel]]
    drops_truncated: bool
    # The gateway restarted mid-scan: ``expected`` counts only what it forwarded since. Optional
    # (absent: false); a gateway sends it always.
    resumed: bool | None = None
    lane: Lane | None = None
    lanes: Lanes | None = None

    def __post_init__(self) -> None:
        _check_lanes(self.lane, self.lanes)


class RoutedScanAbort(_Header, tag="scan_abort", frozen=True):
    scan: U32
    reason: ReasonLabel


ProducerMessage = ScanBegin | Data | ScanEnd
ConsumerMessage = RoutedScanBegin | Data | RoutedScanEnd | RoutedScanAbort
_M = TypeVar("_M", ProducerMessage, ConsumerMessage)


class ScanGeometry(msgspec.Struct, frozen=True, gc=False):
    """Shape of one scan, and the checks a data message must pass against it."""

    scan_shape: tuple[int, int]
    frame_shape: tuple[int, int]
    sectors: int
    dtype: str = "uint16"

    @property
    def positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def sector_shape(self) -> tuple[int, int]:
        return (self.frame_shape[0] // self.sectors, self.frame_shape[1])

    @property
    def sector_bytes(self) -> int:
        rows, cols = self.sector_shape
        return rows * cols * DTYPES[self.dtype]

    def check(self, msg: Data, payload_bytes: int) -> None:
        """Raise ProtocolError unless ``msg`` and its payload fit this scan."""
        if msg.frame >= self.positions or msg.sector >= self.sectors:
            raise ProtocolError(DropReason.OUT_OF_RANGE,
                                f"frame {msg.frame} sector {msg.sector} outside the scan")
        if payload_bytes != self.sector_bytes:
            raise ProtocolError(DropReason.WRONG_PAYLOAD_SIZE,
                                f"{payload_bytes} bytes, expected {self.sector_bytes}")


_producer_decoder = msgspec.msgpack.Decoder(ProducerMessage)
_ncem_decoder = msgspec.msgpack.Decoder(NcemHeader)
_consumer_decoder = msgspec.msgpack.Decoder(ConsumerMessage)
_encoder = msgspec.msgpack.Encoder()
_FIELD_COUNT: dict[type[msgspec.Struct], int] = {cls: len(cls.__struct_fields__) + 1 for cls in
                (ScanBegin, Data, ScanEnd, RoutedScanBegin, RoutedScanEnd, RoutedScanAbort)}
# Optional keys that are absent when None (never sent as nil): each None one is a key fewer.
_NONE_WHEN_ABSENT: dict[type[msgspec.Struct], tuple[str, ...]] = {
    ScanBegin: ("lane", "lanes"), RoutedScanBegin: ("lane", "lanes"),
    RoutedScanEnd: ("resumed", "lane", "lanes")}


def _map_length(buf: bytes | memoryview) -> int:
    """Number of entries in the MessagePack map starting ``buf`` (-1 if it is not a map)."""
    first = buf[0]
    if 0x80 <= first <= 0x8F:
        return first & 0x0F
    if first == 0xDE and len(buf) >= 3:
        return int.from_bytes(buf[1:3], "big")
    if first == 0xDF and len(buf) >= 5:
        return int.from_bytes(buf[1:5], "big")
    return -1


def _is_array(first: int) -> bool:
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def _decode(decoder: msgspec.msgpack.Decoder[_M], buf: bytes | memoryview) -> _M:
    try:
        msg = decoder.decode(buf)
    except msgspec.ValidationError as exc:
        raise ProtocolError(DropReason.INVALID_HEADER, str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec reports a string that is not UTF-8 as UnicodeDecodeError, not as a DecodeError.
        raise ProtocolError(DropReason.MALFORMED_HEADER, str(exc)) from None
    # Unknown keys are refused, so a map with more entries than the message has fields present
    # can only hold a key twice (msgspec keeps the last one silently). Inline: every data
    # message passes here.
    cls = type(msg)
    entries = _FIELD_COUNT[cls]
    optional = _NONE_WHEN_ABSENT.get(cls)
    if optional is not None:
        entries -= sum(getattr(msg, name) is None for name in optional)
    if _map_length(buf) > entries:
        raise ProtocolError(DropReason.DUPLICATE_KEY,
                            "a header key appears twice (or an optional key is nil)")
    return msg


def decode_producer_header(buf: bytes | memoryview) -> ScanBegin | Data | ScanEnd:
    """Decode a producer header (native map or NCEM array) into a native message."""
    if len(buf) > MAX_HEADER_BYTES:
        raise ProtocolError(DropReason.OVERSIZED_HEADER, f"{len(buf)} bytes > {MAX_HEADER_BYTES}")
    if not len(buf):
        raise ProtocolError(DropReason.MALFORMED_HEADER, "empty header")
    if _is_array(buf[0]):
        return decode_ncem_header(buf).to_data()
    return _decode(_producer_decoder, buf)


def decode_ncem_header(buf: bytes | memoryview) -> NcemHeader:
    if len(buf) > MAX_HEADER_BYTES:
        raise ProtocolError(DropReason.OVERSIZED_HEADER, f"{len(buf)} bytes > {MAX_HEADER_BYTES}")
    try:
        return _ncem_decoder.decode(buf)
    except msgspec.ValidationError as exc:
        raise ProtocolError(DropReason.INVALID_HEADER, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(DropReason.MALFORMED_HEADER, str(exc)) from None


def is_native_header(buf: bytes | memoryview) -> bool:
    """True if ``buf`` is a native (map) header, which the gateway forwards byte for byte."""
    return len(buf) > 0 and not _is_array(buf[0])


def decode_consumer_message(
        buf: bytes | memoryview) -> RoutedScanBegin | Data | RoutedScanEnd | RoutedScanAbort:
    """Decode a gateway -> consumer header."""
    if len(buf) > MAX_CONTROL_BYTES:
        raise ProtocolError(DropReason.OVERSIZED_HEADER, f"{len(buf)} bytes > {MAX_CONTROL_BYTES}")
    if not len(buf):
        raise ProtocolError(DropReason.MALFORMED_HEADER, "empty header")
    return _decode(_consumer_decoder, buf)


def encode(msg: msgspec.Struct) -> bytes:
    """Encode any header of this module to MessagePack."""
    return _encoder.encode(msg)


def encode_ncem(header: NcemHeader) -> bytes:
    return _encoder.encode(header)
