"""Scan results as the root rank reports them: the record, a reporter protocol, JSON lines."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, TextIO

from dataplane.consumer.outcome import ScanOutcome
from dataplane.consumer.writer import WrittenScan


@dataclass(frozen=True)
class ScanResult:
    session: str
    scan: int
    path: str
    sha256: str
    frames: int
    events: int
    expected_sectors: int
    received_sectors: int
    duplicate_sectors: int
    lost_sectors: int
    incomplete_frames: int
    status: str

    @classmethod
    def of(cls, outcome: ScanOutcome, written: WrittenScan) -> ScanResult:
        totals = outcome.totals
        return cls(
            session=outcome.begin.session, scan=outcome.begin.scan, path=str(written.path),
            sha256=written.sha256, frames=int(outcome.frame_events.shape[0]), events=outcome.events,
            expected_sectors=int(totals["expected_sectors"]),
            received_sectors=int(totals["received_sectors"]),
            duplicate_sectors=int(totals["duplicate_sectors"]), lost_sectors=len(outcome.lost),
            incomplete_frames=len(outcome.incomplete_frames), status=outcome.status)


class ResultReporter(Protocol):
    def report(self, result: ScanResult) -> None: ...


class JsonLinesReporter:
    """One JSON object per line, flushed (and fsynced, for a file) as each scan is reported."""

    def __init__(self, stream: TextIO = sys.stdout, *, sync: bool = False) -> None:
        self._stream = stream
        self._sync = sync

    @classmethod
    def to_file(cls, path: Path) -> JsonLinesReporter:
        # Appending keeps the records of earlier jobs that reported into the same file.
        return cls(open(path, "a", encoding="utf-8"), sync=True)  # noqa: SIM115 - kept open

    def report(self, result: ScanResult) -> None:
        self._stream.write(json.dumps(asdict(result), sort_keys=True) + "\n")
        self._stream.flush()
        if self._sync:
            os.fsync(self._stream.fileno())

    def close(self) -> None:
        if self._stream not in (sys.stdout, sys.stderr):
            self._stream.close()
