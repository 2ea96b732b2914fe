"""The pure session core: session and lease states, lifetimes, stored records, admission of a
consumer and the endpoint check. No I/O: every answer follows from its arguments and the clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from common.config import parse_endpoint
from common.results import ScanResult
from controlplane.errors import Conflict
from controlplane.launchers import JobHandle, JobState, JobStatus
from controlplane.policy import PolicySet

SessionState = Literal["open", "ended", "expired"]
LeaseState = Literal["live", "expired", "left"]
# Who reported a scan: its consumer job, or the gateway that interrupted it.
ScanSource = Literal["consumer", "gateway"]


def session_state(ended_at: float | None, expires_at: float, now: float) -> SessionState:
    if ended_at is not None:
        return "ended"
    return "open" if now < expires_at else "expired"


def lease_state(left_at: float | None, lease_expires_at: float, now: float) -> LeaseState:
    if left_at is not None:
        return "left"
    return "live" if now < lease_expires_at else "expired"


def lease_until(now: float, lease_s: int, session_expires_at: float) -> float:
    """A lease never outlives its session: the gateway must forget both at the same moment."""
    return min(now + lease_s, session_expires_at)


def lifetime(requested: int | None, cap: int, *deadlines: float, now: float) -> int:
    """Seconds a new session or token may live: the request, the policy cap and every deadline
    (the parent token's expiry, the session's), whichever is first."""
    remaining = min(int(deadline - now) for deadline in deadlines)
    if remaining < 1:
        raise Conflict("the session or token expires within a second; nothing can be issued")
    return min(requested or cap, cap, remaining)


@dataclass(frozen=True)
class SessionRecord:
    id: str
    project: str
    template: str
    template_version: int
    params: dict[str, Any]
    client_key: str
    config: dict[str, Any]
    token_jti: str
    created_at: float
    expires_at: float
    ended_at: float | None
    # The registered gateway it is placed on (None: the configured single gateway), and the one
    # it was moved from when that one's heartbeats stopped. A session whose scans are split over
    # several gateways has ``gateway`` carry lane 0, and ``lane_gateways`` lanes 1 and on.
    gateway: str | None = None
    previous_gateway: str | None = None
    replaced_at: float | None = None
    lane_gateways: tuple[str, ...] = ()

    def state(self, now: float) -> SessionState:
        return session_state(self.ended_at, self.expires_at, now)

    @property
    def gateways(self) -> tuple[str, ...]:
        """The gateways of its lanes, lane by lane (none: the configured single gateway)."""
        return () if self.gateway is None else (self.gateway, *self.lane_gateways)

    @property
    def lanes(self) -> int:
        return 1 + len(self.lane_gateways)


@dataclass(frozen=True)
class ConsumerRecord:
    id: str
    session_id: str
    job_id: str
    rank: int
    endpoint: str
    host: str
    registered_at: float
    lease_expires_at: float
    left_at: float | None

    def state(self, now: float) -> LeaseState:
        return lease_state(self.left_at, self.lease_expires_at, now)


@dataclass(frozen=True)
class JobRecord:
    id: str
    session_id: str
    template: str
    template_version: int
    launcher: str
    native_id: str
    workdir: str
    ranks: int
    token_jti: str
    submitted_at: float
    # The last state the launcher reported, kept so that it survives a control-plane restart.
    state: JobState = "pending"
    exit_code: int | None = None
    detail: str = ""

    def handle(self) -> JobHandle:
        return JobHandle(self.launcher, self.id, self.native_id, Path(self.workdir))

    def status(self) -> JobStatus:
        return JobStatus(self.state, self.exit_code, self.detail)


@dataclass(frozen=True, kw_only=True)
class ScanRecord(ScanResult):
    """A scan's result as the store keeps it: the project, when it was reported and by whom.

    ``source`` ``consumer`` is rank 0's result. ``gateway`` is a scan the gateway interrupted when
    a member left (or spooled whole): no file of its own (``path`` is the spool file and there
    is no sha256), ``reason`` says what interrupted it, and the sectors spooled and the losses by
    reason come with it; one per lane of a scan split over several gateways.
    """

    project: str
    reported_at: float
    source: ScanSource = "consumer"
    spooled_sectors: int = 0
    lost_by_reason: dict[str, int] = field(default_factory=dict)
    # The lane a gateway's report covers, of a scan split over several gateways (each reports
    # its own); 0 for a scan of one lane and for the consumers' result, which merges the lanes.
    lane: int = 0

    @classmethod
    def of(cls, result: ScanResult, *, project: str, reported_at: float) -> ScanRecord:
        """A consumer's ``result``, to be stored."""
        return cls(**{f.name: getattr(result, f.name) for f in fields(result)}, project=project,
                   reported_at=reported_at)

    def same_result(self, other: ScanRecord) -> bool:
        """Whether ``other`` reports the same outcome (the time of the report aside)."""
        return replace(self, reported_at=0.0) == replace(other, reported_at=0.0)


def admission_problem(live: Sequence[ConsumerRecord], new: ConsumerRecord,
                      limit: int) -> str | None:
    """Why ``new`` may not join the session's ``live`` consumers, or None."""
    if any(c.job_id == new.job_id and c.rank == new.rank for c in live):
        return f"rank {new.rank} of job {new.job_id} is already registered"
    if any(c.endpoint == new.endpoint for c in live):
        return f"endpoint {new.endpoint} is already registered"
    if len(live) >= limit:
        return f"the session already has its quota of {limit} live consumers"
    return None


def endpoint_problem(endpoint: str, allowed_targets: Sequence[str],
                     policy: PolicySet) -> str | None:
    """Why the gateway may not connect to ``endpoint``, or None: it must lie in the session's
    allowed targets and in the policy's targets."""
    host, port = parse_endpoint(endpoint)
    if not any(_within(host, target) for target in allowed_targets):
        return f"{host} is outside the session's allowed targets {list(allowed_targets)}"
    if not policy.target_allowed(host):
        return f"{host} is outside the targets the policy allows"
    bracketed = f"[{host}]" if ":" in host else host
    if endpoint != f"tcp://{bracketed}:{port}":
        return f"write the endpoint in canonical form: tcp://{bracketed}:{port}"
    return None


def _within(host: str, target: str) -> bool:
    address = ipaddress.ip_address(host)
    network = ipaddress.ip_network(target)
    return address.version == network.version and address in network


def config_with_consumers(config: dict[str, Any], endpoints: Sequence[str]) -> dict[str, Any]:
    """The session's stored configuration naming ``endpoints`` as its consumers."""
    sessions = [{**session, "consumers": list(endpoints)} for session in config["sessions"]]
    return {**config, "sessions": sessions}

