"""Scan results as the root rank reports them: building the record (``common.results``) from a
scan's outcome, a reporter protocol, and the reporters: JSON lines, the control plane's
``POST .../scans/{scan}/result``, and both at once."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TextIO

from common.logs import fields
from common.protocol import MAX_MANIFEST
from common.restclient import RestError, with_retries
from common.results import FAILED, LossEntry, ScanResult, check
from dataplane.consumer.controlplane import ControlPlaneClient
from dataplane.consumer.outcome import ScanOutcome
from dataplane.consumer.writer import WrittenScan


def written_result(outcome: ScanOutcome, written: WrittenScan) -> ScanResult:
    return _result(outcome, path=str(written.path), sha256=written.sha256, status=outcome.status)


def failed_result(outcome: ScanOutcome, path: Path, reason: str) -> ScanResult:
    """A scan whose file could not be written: ``path`` is where it should have gone, and nothing
    is there; the counters still say what arrived."""
    return _result(outcome, path=str(path), sha256="", status=FAILED, reason=reason)


def _result(outcome: ScanOutcome, **result: Any) -> ScanResult:
    totals = outcome.totals
    built = ScanResult(
        session=outcome.begin.session, scan=outcome.begin.scan,
        frames=int(outcome.frame_events.shape[0]), events=outcome.events,
        expected_sectors=int(totals["expected_sectors"]),
        received_sectors=int(totals["received_sectors"]),
        duplicate_sectors=int(totals["duplicate_sectors"]),
        conflicting_duplicates=int(totals["conflicting_duplicates"]),
        lost_sectors=len(outcome.lost), incomplete_frames=len(outcome.incomplete_frames),
        loss_manifest=loss_manifest(outcome),
        manifest_truncated=len(outcome.lost) + len(outcome.conflicts) > MAX_MANIFEST, **result)
    # The control plane refuses a result that breaks the rule: a bug shows here, where it is made.
    check(built)
    return built


def loss_manifest(outcome: ScanOutcome) -> tuple[LossEntry, ...]:
    """The first MAX_MANIFEST entries of the scan's loss manifest; the file lists them all."""
    frame_sector, reasons = outcome.manifest()
    listed = zip(frame_sector[:MAX_MANIFEST].tolist(), reasons[:MAX_MANIFEST], strict=True)
    return tuple((frame, sector, reason) for (frame, sector), reason in listed)


def json_record(result: ScanResult) -> dict[str, Any]:
    """The result as a JSON object; ``reason`` only when there is one, so a written scan's
    record keeps the control plane's ScanReport fields and nothing else."""
    record = asdict(result)
    if record["reason"] is None:
        del record["reason"]
    return record


def report_body(result: ScanResult) -> dict[str, Any]:
    """The control plane's ScanReport: the session and scan are in the URL, not the body."""
    body = json_record(result)
    del body["session"], body["scan"]
    return body


class ResultReporter(Protocol):
    def report(self, result: ScanResult) -> None: ...

    def close(self) -> None: ...


class JsonLinesReporter:
    """One JSON object per line, flushed (and fsynced, for a file) as each scan is reported."""

    def __init__(self, stream: TextIO = sys.stdout, *, sync: bool = False) -> None:
        self._stream = stream
        self._sync = sync

    @classmethod
    def to_file(cls, path: Path) -> JsonLinesReporter:
        # Appending keeps the records of earlier jobs that reported into the same file.
        return cls(open(path, "a", encoding="utf-8"), sync=True)  # kept open until close()

    def report(self, result: ScanResult) -> None:
        self._stream.write(json.dumps(json_record(result), sort_keys=True) + "\n")
        self._stream.flush()
        if self._sync:
            os.fsync(self._stream.fileno())

    def close(self) -> None:
        if self._stream not in (sys.stdout, sys.stderr):
            self._stream.close()


class HttpResultReporter:
    """Records each result with the control plane, retrying while it is unavailable.

    A refusal (4xx) or a control plane that stays away is logged as an error and the scan goes on
    being served from its file: losing the record must never cost the data. A ``failed`` result
    (no file: an empty sha256 and a ``reason``) is sent too; a control plane whose ScanReport
    requires a file's SHA-256 refuses it, and that refusal is logged the same way.
    """

    def __init__(self, client: ControlPlaneClient, session: str, log: logging.Logger, *,
                 attempts: int = 4, sleep: Callable[[float], None] = time.sleep) -> None:
        self._client = client
        self._session = session
        self._log = log
        self._attempts = attempts
        self._sleep = sleep

    def report(self, result: ScanResult) -> None:
        try:
            with_retries(lambda: self._client.report(self._session, result.scan,
                                                     report_body(result)),
                         attempts=self._attempts, sleep=self._sleep)
        except RestError as exc:
            self._log.error("scan result not recorded by the control plane", extra=fields(
                scan=result.scan, path=result.path, status=exc.status, error=str(exc)))
            return
        self._log.info("scan result recorded", extra=fields(scan=result.scan))

    def close(self) -> None:
        """Nothing is held between reports."""


class Reporters:
    """Several reporters in order: a local record first, so it exists even if a later one fails."""

    def __init__(self, reporters: Sequence[ResultReporter]) -> None:
        self._reporters = tuple(reporters)

    def report(self, result: ScanResult) -> None:
        for reporter in self._reporters:
            reporter.report(result)

    def close(self) -> None:
        for reporter in self._reporters:
            reporter.close()
