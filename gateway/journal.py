"""The gateway's journal of open scans, so that a restarted gateway carries them to their end.

A producer that follows only the contract sends its scan_begin once. If the gateway restarts
mid-scan, the restarted one must still know the scan, its geometry and its member list, or it
drops the rest as ``unknown_scan`` and leaves the scan open on its consumers forever. So each scan
the router opens or closes is appended here, and fsynced, before the decision takes effect; at
start the journal is read back, scans still open are restored (``Router.restore``), and the file
is rewritten with what is still needed: the open scans, the scan_ends each has had, and each
session's newest closed scan numbers (a scan number a session used before the restart stays used).
A scan closes at its ``producers``-th scan_end; a producer that finished before the restart does
not send its scan_end again, so the ends a scan has had are journaled too, or it would wait for
``scan_idle_s``.

File ``scans.journal`` in the gateway's spool directory, owner-only. Records, each a 4-byte
big-endian length and a MessagePack map:
    {type: "open", session, scan, begin, members, spool_reason, every_sector}
        ``begin``: the scan's scan_begin (canonical encoding); ``members``: its consumer endpoints
        in member order (none: spooled, ``spool_reason`` says why); ``every_sector``: opened by
        NCEM headers, it ends when every sector has arrived
    {type: "end", session, scan, sent}
        one producer's scan_end of a scan still open after it (``sent``: its data messages)
    {type: "close", session, scan}
A record cut short by a crash ends the journal; nothing after it is read.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Final

import msgspec

from common.privatefs import replace_private_file
from common.protocol import U32, U63, SessionId

log = logging.getLogger("dsn.gateway.journal")

NAME: Final = "scans.journal"
_LENGTH: Final = struct.Struct(">I")
MAX_RECORD_BYTES: Final = 1024 * 1024
MAX_ENDPOINT: Final = 300


class Opened(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="open",
             tag_field="type"):
    session: SessionId
    scan: U32
    begin: bytes
    members: list[Annotated[str, msgspec.Meta(max_length=MAX_ENDPOINT)]]
    spool_reason: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{0,40}$")]
    every_sector: bool


class Closed(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="close",
             tag_field="type"):
    session: SessionId
    scan: U32


class Ended(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="end",
            tag_field="type"):
    session: SessionId
    scan: U32
    sent: U63


Record = Opened | Ended | Closed
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(Record)


@dataclass(frozen=True)
class Recovered:
    """What a journal held at start: the scans still open, the ``sent`` of each scan_end they
    have had, and each session's closed scans."""

    open: list[Opened]
    closed: dict[str, list[int]]
    ends: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    def ended(self, opened: Opened) -> list[Ended]:
        return [Ended(session=opened.session, scan=opened.scan, sent=sent)
                for sent in self.ends.get((opened.session, opened.scan), [])]


def _frame(record: Record) -> bytes:
    body = _ENCODER.encode(record)
    return _LENGTH.pack(len(body)) + body


def _records(data: bytes) -> list[Record]:
    records, offset = [], 0
    while offset + _LENGTH.size <= len(data):
        (size,) = _LENGTH.unpack_from(data, offset)
        end = offset + _LENGTH.size + size
        if size > MAX_RECORD_BYTES or end > len(data):
            break  # cut short by a crash mid-append
        try:
            records.append(_DECODER.decode(data[offset + _LENGTH.size:end]))
        except msgspec.DecodeError:
            break
        offset = end
    return records


def recover(records: list[Record], closed_kept: int) -> Recovered:
    """Replay ``records``: the scans opened and not closed, in order, with their scan_ends, and
    the newest ``closed_kept`` closed scan numbers of each session."""
    opened: OrderedDict[tuple[str, int], Opened] = OrderedDict()
    ends: dict[tuple[str, int], list[int]] = {}
    closed: defaultdict[str, deque[int]] = defaultdict(lambda: deque(maxlen=closed_kept))
    for record in records:
        key = (record.session, record.scan)
        if isinstance(record, Opened):
            opened[key] = record
            ends.pop(key, None)
        elif isinstance(record, Ended):
            if key in opened:
                ends.setdefault(key, []).append(record.sent)
        else:
            opened.pop(key, None)
            ends.pop(key, None)
            if record.scan not in closed[record.session]:
                closed[record.session].append(record.scan)
    return Recovered(list(opened.values()), {s: list(ids) for s, ids in closed.items()}, ends)


def read(path: Path, closed_kept: int) -> Recovered:
    """What the journal file at ``path`` holds (nothing, if there is none)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    return recover(_records(data), closed_kept)


class ScanJournal:
    """The journal file of one gateway: read back and compacted on open, appended to after."""

    def __init__(self, directory: Path, closed_kept: int) -> None:
        self.path = directory / NAME
        self.recovered = read(self.path, closed_kept)
        compacted: list[Record] = [
            Closed(session=s, scan=n) for s, ids in self.recovered.closed.items() for n in ids]
        for scan in self.recovered.open:
            compacted.append(scan)
            compacted.extend(self.recovered.ended(scan))
        replace_private_file(self.path, b"".join(_frame(r) for r in compacted))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def opened(self, record: Opened) -> None:
        self._append(record)

    def ended(self, session: str, scan: int, sent: int) -> None:
        self._append(Ended(session=session, scan=scan, sent=sent))

    def closed(self, session: str, scan: int) -> None:
        self._append(Closed(session=session, scan=scan))

    def _append(self, record: Record) -> None:
        try:
            os.write(self._fd, _frame(record))
            os.fsync(self._fd)
        except OSError as exc:
            # The scan goes on; only a restart before it ends would lose track of it.
            log.error("scan journal not written", extra={"fields": {
                "journal": str(self.path), "error": exc.strerror}})

    def close(self) -> None:
        os.close(self._fd)

