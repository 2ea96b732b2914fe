"""Spool files: one scan that the gateway accepted while its session had no consumer, on disk.

The gateway writes a spool; ``dsn producer stream --spool FILE`` replays it into a session later.
The format lives here, beside the wire protocol it embeds, because both sides use it: the gateway
writes it and the producer reads it (dataplane never imports gateway).

Layout (integers little-endian; every length is checked against its limit before it is read):

    file header  magic     8 bytes  b"DSNSPOOL"
                 version   u16      1
                 session   u8 length (1..64) + ASCII session id
                 scan      u32
                 begin     u16 length (1..MAX_HEADER_BYTES) + the scan_begin header (MessagePack)
    record*      kind      1 byte   b"D"
                 header    u16 length (1..MAX_HEADER_BYTES) + a native data header of this scan
                 payload   u32 length (= the scan's sector bytes) + the sector
    trailer      kind      1 byte   b"T"
                 records   u64      number of data records
                 bytes     u64      sum of their payload lengths
                 manifest  u32 length (<= MAX_CONTROL_BYTES) + MessagePack SpoolManifest:
                           {sent, dropped: {reason: count}, drops: [[frame, sector, reason], ...],
                            drops_truncated}: the producers' total ``sent`` and the scan's loss
                           manifest (messages of the scan the gateway dropped, with the reason)
                 crc32     u32      zlib.crc32 of every byte of the file before it
    end of file: nothing may follow the trailer.

The writer creates ``NAME.<unique>.partial`` (0600) in the spool directory and, once the trailer is
written and the file and directory are fsynced, links it to its final name
``{session}_scan{scan:06d}.spool`` (``-1``, ``-2``, ... appended if that name is taken, so a spool
is never overwritten). A file that never got its trailer stays ``.partial``; readers refuse it.

The reader validates a whole spool (structure, limits, counts, checksum) before handing out its
first record, and re-checks the checksum while replaying. Any defect raises SpoolError naming the
byte offset where it was found.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Self

import msgspec

from common.privatefs import open_private_file
from common.protocol import (
    MAX_CONTROL_BYTES,
    MAX_HEADER_BYTES,
    U32,
    U63,
    Data,
    ProtocolError,
    ReasonLabel,
    ScanBegin,
    ScanEnd,
    SectorIndex,
    decode_producer_header,
    is_native_header,
)
from dataplane.errors import DataPlaneError

MAGIC: Final = b"DSNSPOOL"
FORMAT_VERSION: Final = 1
SUFFIX: Final = ".spool"
PARTIAL_SUFFIX: Final = ".partial"
MAX_SESSION_BYTES: Final = 64
DATA: Final = b"D"
TRAILER: Final = b"T"
# Large enough that a sector costs one write call, small enough to bound the gateway's memory.
WRITE_BUFFER: Final = 1 << 20

_PREFIX = struct.Struct("<8sHB")
_SCAN_BEGIN = struct.Struct("<IH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_COUNTS = struct.Struct("<QQI")
# The protocol's session id (common.protocol.SessionId), which also bounds it to 64 bytes.
_SESSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class SpoolError(DataPlaneError, ValueError):
    """A spool file that cannot be used; the message names the byte offset of the defect."""

    def __init__(self, offset: int, detail: str) -> None:
        super().__init__(f"spool offset {offset}: {detail}")
        self.offset = offset


class SpoolManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The scan's totals and loss manifest, stored in the trailer."""

    sent: U63
    dropped: dict[ReasonLabel, U63]
    drops: list[tuple[U32, SectorIndex, ReasonLabel]]
    drops_truncated: bool


_manifest_decoder = msgspec.msgpack.Decoder(SpoolManifest)
_encoder = msgspec.msgpack.Encoder()


@dataclass(frozen=True, slots=True)
class SpoolInfo:
    """A validated spool's header and trailer."""

    session: str
    scan: int
    begin: ScanBegin
    records: int
    bytes: int
    manifest: SpoolManifest


def spool_name(session: str, scan: int) -> str:
    return f"{session}_scan{scan:06d}{SUFFIX}"


def encode_file_header(session: str, scan: int, begin: bytes) -> bytes:
    """The file header; refuses values the reader would refuse."""
    if not _SESSION.fullmatch(session):
        raise ValueError(f"invalid session id {session!r}")
    sid = session.encode("ascii")
    if not 1 <= len(begin) <= MAX_HEADER_BYTES:
        raise ValueError(f"scan_begin header of {len(begin)} bytes")
    return (_PREFIX.pack(MAGIC, FORMAT_VERSION, len(sid)) + sid
            + _SCAN_BEGIN.pack(scan, len(begin)) + begin)


class SpoolWriter:
    """Writes one scan's spool under a temporary name; ``finish`` publishes it."""

    def __init__(self, directory: Path, session: str, scan: int, begin: bytes) -> None:
        head = encode_file_header(session, scan, begin)
        self.directory = directory
        self.name = spool_name(session, scan)
        self.partial = directory / f"{self.name}.{os.getpid()}-{id(self):x}{PARTIAL_SUFFIX}"
        self._file = os.fdopen(open_private_file(self.partial), "wb", buffering=WRITE_BUFFER)
        self._crc = 0
        self.records = 0
        self.bytes = 0
        self._write(head)

    def _write(self, chunk: bytes | memoryview) -> None:
        self._file.write(chunk)
        self._crc = zlib.crc32(chunk, self._crc)

    def write(self, header: bytes | memoryview, payload: bytes | memoryview) -> None:
        """Append one data record (header and payload as the gateway accepted them)."""
        self._write(DATA + _U16.pack(len(header)))
        self._write(header)
        self._write(_U32.pack(len(payload)))
        self._write(payload)
        self.records += 1
        self.bytes += len(payload)

    def finish(self, manifest: SpoolManifest) -> Path:
        """Write the trailer, make the file durable and give it its final name, which is
        returned."""
        body = _encoder.encode(manifest)
        self._write(TRAILER + _COUNTS.pack(self.records, self.bytes, len(body)))
        self._write(body)
        self._file.write(_U32.pack(self._crc))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._publish()
        _fsync_directory(self.directory)
        return final

    def _publish(self) -> Path:
        stem = self.name.removesuffix(SUFFIX)
        for attempt in range(10_000):
            final = self.directory / (self.name if attempt == 0 else f"{stem}-{attempt}{SUFFIX}")
            try:
                # link + unlink, not rename: rename would replace an earlier spool of the same name.
                os.link(self.partial, final)
            except FileExistsError:
                continue
            os.unlink(self.partial)
            return final
        raise FileExistsError(f"no free spool name for {self.name} in {self.directory}")

    def abandon(self) -> Path:
        """Close without a trailer (the gateway is stopping); the ``.partial`` file stays."""
        self._file.close()
        return self.partial


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Cursor:
    """Bounded reads from a stream, tracking the offset and the running checksum."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.offset = 0
        self.crc = 0

    def read(self, size: int, what: str) -> bytes:
        chunk = self._stream.read(size)
        if len(chunk) != size:
            raise SpoolError(self.offset, f"truncated {what}: {len(chunk)} of {size} bytes")
        self.offset += size
        self.crc = zlib.crc32(chunk, self.crc)
        return chunk

    def unpack(self, layout: struct.Struct, what: str) -> tuple[int, ...]:
        """The fields of ``layout``, which must all be integers."""
        return layout.unpack(self.read(layout.size, what))

    def length(self, layout: struct.Struct, low: int, high: int, what: str) -> int:
        at = self.offset
        (size,) = self.unpack(layout, f"{what} length")
        if not low <= size <= high:
            raise SpoolError(at, f"{what} length {size} outside {low}..{high}")
        return int(size)


def _read_prefix(cur: _Cursor) -> tuple[bytes, int, int]:
    """The file header's fixed part: magic, format version, session id length."""
    magic, version, sid_len = _PREFIX.unpack(cur.read(_PREFIX.size, "file header"))
    return magic, version, sid_len


def _read_file_header(cur: _Cursor) -> tuple[str, int, ScanBegin]:
    magic, version, sid_len = _read_prefix(cur)
    if magic != MAGIC:
        raise SpoolError(0, f"not a spool file (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise SpoolError(8, f"unsupported spool format version {version}")
    if not 1 <= sid_len <= MAX_SESSION_BYTES:
        raise SpoolError(10, f"session length {sid_len} outside 1..{MAX_SESSION_BYTES}")
    at = cur.offset
    session = cur.read(sid_len, "session").decode("latin-1")
    if not _SESSION.fullmatch(session):
        raise SpoolError(at, f"invalid session id {session!r}")
    scan, begin_len = cur.unpack(_SCAN_BEGIN, "scan")
    if not 1 <= begin_len <= MAX_HEADER_BYTES:
        raise SpoolError(cur.offset - 2,
                         f"scan_begin length {begin_len} outside 1..{MAX_HEADER_BYTES}")
    at = cur.offset
    begin = _decode(cur.read(begin_len, "scan_begin header"), at)
    if not isinstance(begin, ScanBegin) or begin.scan != scan:
        raise SpoolError(at, f"the scan_begin header does not begin scan {scan}")
    return session, scan, begin


def _decode(header: bytes, at: int) -> ScanBegin | Data | ScanEnd:
    try:
        return decode_producer_header(header)
    except ProtocolError as exc:
        raise SpoolError(at, f"invalid header: {exc}") from None


def _read_data(cur: _Cursor, begin: ScanBegin) -> tuple[Data, bytes]:
    at = cur.offset
    header = cur.read(cur.length(_U16, 1, MAX_HEADER_BYTES, "data header"), "data header")
    msg = _decode(header, at)
    if not is_native_header(header) or not isinstance(msg, Data) or msg.scan != begin.scan:
        raise SpoolError(at, f"record is not a native data header of scan {begin.scan}")
    geometry = begin.geometry
    size = cur.length(_U32, geometry.sector_bytes, geometry.sector_bytes, "payload")
    try:
        geometry.check(msg, size)
    except ProtocolError as exc:
        raise SpoolError(at, str(exc)) from None
    return msg, cur.read(size, "payload")


def _read_trailer(cur: _Cursor, records: int, volume: int) -> SpoolManifest:
    at = cur.offset
    counted_records, counted_bytes, body_len = cur.unpack(_COUNTS, "trailer")
    if (counted_records, counted_bytes) != (records, volume):
        raise SpoolError(at, f"trailer counts {counted_records} records, {counted_bytes} bytes; "
                             f"the file holds {records} records, {volume} bytes")
    if body_len > MAX_CONTROL_BYTES:
        raise SpoolError(at + 16, f"manifest length {body_len} > {MAX_CONTROL_BYTES}")
    at = cur.offset
    body = cur.read(body_len, "manifest")
    try:
        manifest = _manifest_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise SpoolError(at, f"invalid manifest: {exc}") from None
    expected, at = cur.crc, cur.offset
    (stored,) = cur.unpack(_U32, "checksum")
    if stored != expected:
        raise SpoolError(at, f"checksum {stored:08x} != {expected:08x} computed")
    return manifest


def _walk(stream: BinaryIO) -> Generator[tuple[Data, bytes], None, SpoolInfo]:
    """Yield every record, return the SpoolInfo; raises SpoolError at the first defect."""
    cur = _Cursor(stream)
    session, scan, begin = _read_file_header(cur)
    records = volume = 0
    while True:
        at = cur.offset
        kind = cur.read(1, "record kind")
        if kind == TRAILER:
            break
        if kind != DATA:
            raise SpoolError(at, f"unknown record kind {kind!r}")
        msg, payload = _read_data(cur, begin)
        records += 1
        volume += len(payload)
        yield msg, payload
    manifest = _read_trailer(cur, records, volume)
    if stream.read(1):
        raise SpoolError(cur.offset, "bytes after the trailer")
    return SpoolInfo(session, scan, begin, records, volume, manifest)


def verify_spool(stream: BinaryIO) -> SpoolInfo:
    """Validate a whole spool from the stream's start, keeping one record in memory at a time."""
    walk = _walk(stream)
    while True:
        try:
            next(walk)
        except StopIteration as done:
            info: SpoolInfo = done.value  # untyped in StopIteration; _walk returns a SpoolInfo
            return info


class SpoolReader:
    """A spool file, validated on open; ``records()`` replays its data records in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("rb")
        try:
            self.info = verify_spool(self._file)
        except BaseException:
            self._file.close()
            raise

    def records(self) -> Iterator[tuple[Data, bytes]]:
        """Data records in spooled order; a file changed since open raises SpoolError."""
        self._file.seek(0)
        info = yield from _walk(self._file)
        if info != self.info:
            raise SpoolError(0, "the spool file changed while it was replayed")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
