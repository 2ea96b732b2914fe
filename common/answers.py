"""Parts of the control plane's REST answers that its clients read field for field: one
definition serves the service (it answers with them, and its OpenAPI document is built from them)
and ``common.client`` (it validates what it reads against them)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

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


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True)


class GatewayInfo(_Body):
    """Where a session's producers stream: ``endpoint`` (CURVE), the gateway's Z85 CURVE
    ``server_key``, its plaintext ingress for sessions with transport ``plain``, and where producers
    ask what became of their scans (``common.receipts``); ``name``: the registered gateway's
    (None: the site's one configured gateway)."""

    name: str | None = None
    endpoint: str
    server_key: str = Field(min_length=40, max_length=40, pattern=r"^[\x21-\x7e]{40}$")
    plain_endpoint: str | None = None
    receipts_endpoint: str


# The bodies below read states as plain strings, so that a client keeps reading the answers of a
# newer service that adds a state; the service's own models narrow them to the states it has.

class SessionBody(_Body):
    """A session; ``config`` is its DSN configuration with the currently live consumers."""

    id: str
    project: str
    template: str
    template_version: int
    params: dict[str, Any]
    client_key: str
    state: str
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    config: dict[str, Any]
    gateway: GatewayInfo
    # The registered gateway the session is placed on (None: the site's one configured gateway);
    # once it was moved off a gateway whose heartbeats stopped, that gateway's name and when: its
    # producers reconnect to ``gateway``.
    gateway_name: str | None = None
    previous_gateway: str | None = None
    replaced_at: datetime | None = None
    # A session whose scans are split over several gateways: each lane's, lane by lane (``gateway``
    # is lane 0's); empty for a session of one lane. Lane k's producers stream to ``lanes[k]``.
    lanes: list[GatewayInfo] = []


class ConsumerBody(_Body):
    """One registered consumer rank and its lease."""

    id: str
    session: str
    job_id: str
    rank: int
    endpoint: str
    host: str
    state: str
    registered_at: datetime
    lease_expires_at: datetime
    left_at: datetime | None
    # When the session last moved to another gateway (null: never). A consumer job holding a scan
    # begun before the move learns from its heartbeat that nothing may ever end that scan.
    session_moved_at: datetime | None = None


class JobBody(_Body):
    """A consumer job and its state as its launcher sees it."""

    id: str
    session: str
    template: str
    template_version: int
    launcher: str
    ranks: int
    state: str
    exit_code: int | None
    detail: str
    submitted_at: datetime


class ScanBody(_Body, ScanCounts):
    """A scan's recorded result: its file, checksum and counters."""

    session: str
    scan: int
    project: str
    path: str
    sha256: str
    status: str
    reported_at: datetime
    source: str
    reason: str | None
    spooled_sectors: int
    lost_by_reason: dict[str, int]
    # The lane a gateway's report covers, of a scan split over several gateways; 0 otherwise.
    lane: int = 0
