"""Request and response bodies of the session routes, and the field types they validate."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, RootModel, StringConstraints, model_validator

from common.answers import (
    MAX_COUNT,
    ConsumerBody,
    JobBody,
    ScanBody,
    ScanCounts,
    SessionBody,
    SessionCounters,
)
from common.config import ConnectEndpoint, CurveKey
from common.protocol import MAX_LANES, MAX_MANIFEST
from common.results import ConsumerStatus, ScanResult, ScanStatus, check
from controlplane.launchers import JobState
from controlplane.schemas import (
    GatewayOut,
    Name,
    QueryParams,
    RegisteredGatewayOut,
    RequestBody,
    ResponseBody,
    Ttl,
)
from controlplane.sessions.core import LeaseState, ScanSource, SessionState
from controlplane.templates.loader import NAME_PATTERN as TEMPLATE_NAME_PATTERN

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_SCAN = MAX_COUNT


TemplateName = Annotated[str, StringConstraints(pattern=TEMPLATE_NAME_PATTERN)]
JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
SessionIdText = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]
Host = Annotated[str, StringConstraints(min_length=1, max_length=253,
                                        pattern=r"^[A-Za-z0-9]([A-Za-z0-9.:_-]*[A-Za-z0-9])?$")]
ResultPath = Annotated[str, StringConstraints(min_length=2, max_length=4096,
                                              pattern=r"^/[^\x00-\x1f\x7f]*$")]
# A loss manifest entry, [frame, sector, reason], in the wire protocol's bounds (frames are u32,
# at most 64 sectors, reasons are common.protocol.ReasonLabel).
ManifestEntry = tuple[Annotated[int, Field(ge=0, lt=2**32)], Annotated[int, Field(ge=0, lt=64)],
                      Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,40}$")]]
LossManifest = Annotated[tuple[ManifestEntry, ...], Field(max_length=MAX_MANIFEST)]
# A report's body: a manifest entry takes at most 62 bytes of JSON ([4294967295, 63, "<40
# letters>"], ), and the rest of the report fits in 64 KiB.
MAX_REPORT_BYTES = MAX_MANIFEST * 64 + 64 * 1024


class SessionOpen(RequestBody):
    """Open a session of ``project`` (the token's own) from DSN template ``template``.

    ``client_key`` is the producer's Z85 CURVE public key: the gateway admits exactly this key.
    ``ttl`` (seconds) defaults to, and is capped by, the policy's session-token lifetime and the
    project token's remaining life; the session expires with its token. ``transport`` ``plain``
    (only where the policy sets ``allow_plaintext``) also admits the producer unencrypted, on the
    gateway's plaintext ingress, with the session token as its credential. ``lanes`` above 1
    splits each scan over that many registered gateways, one per lane (``lanes`` in the answer
    names them): the producers of lane k stream to its gateway, and the consumer ranks merge
    the lanes.
    """

    project: Name
    template: TemplateName
    params: dict[str, Any] = Field(default_factory=dict)
    client_key: CurveKey
    ttl: Ttl | None = None
    transport: Literal["curve", "plain"] = "curve"
    lanes: Annotated[int, Field(ge=1, le=MAX_LANES)] = 1


class ConsumerRegister(RequestBody):
    """One MPI rank's endpoint (``tcp://IP:PORT`` inside the session's allowed targets)."""

    endpoint: ConnectEndpoint
    rank: Annotated[int, Field(ge=0, le=4095)]
    job_id: JobId
    host: Host


class JobSubmit(RequestBody):
    """A consumer job: ``template`` defaults to the launcher's own job template."""

    template: TemplateName | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    ranks: Annotated[int, Field(ge=1, le=4096)] = 1


# The fields of common.results.ScanResult but the session and scan, which the URL names; the
# model is still written out because the OpenAPI document is built from it.
class ScanReport(RequestBody, ScanCounts):
    """Rank 0's result for one scan: the HDF5 file, its SHA-256, the completeness counters and
    the loss manifest ([frame, sector, reason] per lost sector and per conflicting duplicate, in
    (frame, sector) order; the first 65,536 and ``manifest_truncated`` if there are more). A
    ``failed`` scan has no file (a full disk, say): ``path`` is where it should have been,
    ``sha256`` is empty and ``reason`` says why; other scans have a SHA-256 and no reason."""

    path: ResultPath
    sha256: Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{64})?$")]
    status: ConsumerStatus
    loss_manifest: LossManifest
    manifest_truncated: bool
    reason: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None

    @model_validator(mode="after")
    def _keeps_the_result_rule(self) -> ScanReport:
        check(self)
        return self

    def result(self, session: str, scan: int) -> ScanResult:
        """The reported result, with the session and scan the URL names."""
        return ScanResult(session=session, scan=scan, **self.model_dump())


class SessionQuery(QueryParams):
    project: Name | None = None


class ScanQuery(QueryParams):
    project: Name | None = None
    session: SessionIdText | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class ConsumerOut(ResponseBody, ConsumerBody):
    state: LeaseState


class JobOut(ResponseBody, JobBody):
    state: JobState


class JobList(ResponseBody):
    items: list[JobOut]


class ScanOut(ResponseBody, ScanBody):
    status: ScanStatus
    source: ScanSource


class ScanList(ResponseBody):
    items: list[ScanOut]


class ScanDetail(ScanOut):
    """A result with its loss manifest: [frame, sector, reason] per lost sector and per
    conflicting duplicate, the first 65,536 and ``manifest_truncated`` if there are more (a
    consumer's file, under /metadata/stream, and a gateway's spool file list them all)."""

    loss_manifest: list[tuple[int, int, str]]
    manifest_truncated: bool


class ScanDetails(ResponseBody):
    items: list[ScanDetail]


class SessionOut(ResponseBody, SessionBody):
    """A session; ``config`` is its DSN configuration with the currently live consumers."""

    state: SessionState


class SessionList(ResponseBody):
    items: list[SessionOut]


class SessionDetail(SessionOut):
    consumers: list[ConsumerOut]
    scans: list[ScanOut]
    counters: SessionCounters


class SessionOpened(SessionOut):
    """The opened session and its session token (audience: the gateway), shown this once."""

    token: str
    token_type: Literal["Bearer"] = "Bearer"
    token_expires_at: datetime



class LiveQuery(QueryParams):
    once: bool = False  # one snapshot, then the answer ends


class LiveSession(SessionDetail):
    """An open session as the live view shows it: its detail and its consumer jobs."""

    jobs: list[JobOut]


class LiveSnapshot(ResponseBody):
    """What the live view shows now: the open sessions the caller may read, newest first, the
    newest of them in detail, the gateways' counters of those sessions and, for an admin, the
    registered gateways sessions are placed on (``registered``, as ``GET /api/v1/gateways``
    answers it; empty for a project token)."""

    at: datetime
    sessions: list[SessionOut]
    inspected: list[LiveSession]
    more: int  # open sessions not inspected
    gateways: list[GatewayOut]
    registered: list[RegisteredGatewayOut]


class SignedOutEvent(ResponseBody):
    """Why a live stream ended: its caller's token or console sign-in no longer holds."""

    reason: str


class LiveEvent(RootModel[LiveSnapshot | SignedOutEvent]):
    """The data of one live event: a snapshot, or the reason the stream was signed out."""
