"""What a scan produced: the one record rank 0 reports and the control plane keeps.

A consumer job's rank 0 builds a ``ScanResult`` once the scan's file is written (or could not be),
logs it as a JSON line and reports it to the control plane, which validates the HTTP body against
the same fields and stores the record with who reported it and when.

``status`` is ``complete`` only when nothing is missing, ``partial`` otherwise, and ``failed`` when
the scan's file could not be written: ``path`` is then where it should have been, ``sha256`` is
empty and ``reason`` says why, while the counters still say what arrived. A scan with a
conflicting duplicate (a sector that came again with other content) is never ``complete``. The
loss manifest lists every lost sector and every conflicting duplicate, or the first
``MAX_MANIFEST`` of them and says it was cut short; the scan's file holds the whole list. ``check``
is that rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from common.errors import DsnError
from common.protocol import MAX_MANIFEST

# What a consumer job reports of a scan.
ConsumerStatus = Literal["complete", "partial", "failed"]
# What a scan's record may say: a consumer's status, or ``spooled``, which only a gateway reports.
ScanStatus = Literal["complete", "partial", "failed", "spooled"]
COMPLETE: Final = "complete"
PARTIAL: Final = "partial"
# The scan's data arrived but its file could not be written (the disk filled up, say).
FAILED: Final = "failed"
# No consumer could take the scan: the gateway spooled it whole, to be replayed (only the
# gateway reports it; no consumer result is ever ``spooled``).
SPOOLED: Final = "spooled"

# One lost sector, (frame, sector, reason), the reason a drop reason or ``not_received``; or one
# conflicting duplicate, (frame, sector, "conflicting_duplicate").
LossEntry = tuple[int, int, str]


class ResultError(DsnError, ValueError):
    """A scan result that breaks the rule every consumer's result keeps; the message says which.

    A ValueError too, so a pydantic validator that calls ``check`` reports it as a field error.
    """


@dataclass(frozen=True, kw_only=True)
class ScanResult:
    """One scan's result: its file (``path``, ``sha256``) and how complete it is.

    ``expected_sectors``: data messages the gateway forwarded, duplicates included;
    ``received_sectors``: distinct sectors stored; ``duplicate_sectors``: copies dropped because
    their sector was stored before, of which ``conflicting_duplicates`` differed from it;
    ``lost_sectors``: sectors not in the file; ``incomplete_frames``: frames counted with a
    zero-filled sector; ``loss_manifest``: the lost sectors and the conflicting duplicates in
    (frame, sector) order, all of them unless ``manifest_truncated``.
    """

    session: str
    scan: int
    path: str
    sha256: str
    frames: int
    events: int
    expected_sectors: int
    received_sectors: int
    duplicate_sectors: int
    conflicting_duplicates: int
    lost_sectors: int
    incomplete_frames: int
    status: ScanStatus
    loss_manifest: tuple[LossEntry, ...]
    manifest_truncated: bool
    reason: str | None = None  # why a failed scan has no file; None otherwise


class Outcome(Protocol):
    """The fields ``check`` reads: a ScanResult has them, and so has the HTTP body of one."""

    @property
    def status(self) -> ScanStatus: ...

    @property
    def sha256(self) -> str: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def conflicting_duplicates(self) -> int: ...

    @property
    def lost_sectors(self) -> int: ...

    @property
    def incomplete_frames(self) -> int: ...

    @property
    def loss_manifest(self) -> Sequence[LossEntry]: ...

    @property
    def manifest_truncated(self) -> bool: ...


def check(result: Outcome) -> None:
    """Raise ResultError unless a ``complete`` result misses and doubts nothing, only a ``failed``
    one has no sha256 and a reason, and the loss manifest lists every lost sector and conflicting
    duplicate or says it was cut short."""
    if result.status == COMPLETE and (result.lost_sectors or result.incomplete_frames
                                      or result.conflicting_duplicates):
        raise ResultError("a scan with lost sectors, incomplete frames or conflicting duplicates "
                          "is not complete")
    failed = result.status == FAILED
    if failed != (result.sha256 == "") or failed != (result.reason is not None):
        raise ResultError("a failed scan has no sha256 and a reason; any other has a sha256 "
                          "and no reason")
    listed, due = len(result.loss_manifest), result.lost_sectors + result.conflicting_duplicates
    if listed > min(due, MAX_MANIFEST) or result.manifest_truncated != (listed < due):
        raise ResultError(f"the loss manifest lists {listed} of {due} lost sectors and "
                          f"conflicting duplicates: it lists all of them, or up to {MAX_MANIFEST} "
                          "with manifest_truncated")
