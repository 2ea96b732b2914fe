"""Parts of the control plane's REST answers that its clients read field for field: one
definition serves the service (it answers with them, and its OpenAPI document is built from them)
and ``common.client`` (it validates what it reads against them)."""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field

MAX_COUNT: Final = 2**63 - 1  # SQLite INTEGER range
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class ScanCounts(BaseModel):
    """A scan result's counters, as reported and as listed."""

    frames: Count
    events: Count
    expected_sectors: Count
    received_sectors: Count
    duplicate_sectors: Count
    conflicting_duplicates: Count
    lost_sectors: Count
    incomplete_frames: Count


class SessionCounters(BaseModel):
    """A session's consumers (live now, and ever registered), jobs, recorded and complete scans,
    and the frames and electron events of its results."""

    model_config = ConfigDict(frozen=True)

    live_consumers: int
    consumers: int
    jobs: int
    scans: int
    complete_scans: int
    frames: int
    events: int
