"""``dsn demo``: one synthetic 4D-STEM scan through the whole system, on loopback.

From a working directory under the state directory it initialises a control plane (SQLite, keys,
admin token), serves it, starts a gateway that takes its sessions from the control plane's state
service, creates a project and a project token over REST, opens a session from the ``4dstem``
template with a fresh producer key, launches a 2-rank ``mpiexec`` consumer job through the session's
job API, streams the scan from four producers (one per detector sector) with a little sector loss,
duplicates and reordering, waits for the job and its listed result, and checks the HDF5 file
against the camera's planted electrons. Everything it started is stopped on the way out.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from common.client import Client, Scan
from common.ports import free_ports
from common.restclient import ClientError, call_json
from controlplane.admin.bootstrap import initialize
from controlplane.errors import ControlPlaneError
from controlplane.launchers import mpi_environment
from controlplane.settings import Settings
from dataplane.producer import ProducerError, ProducerSession, StreamStats
from dataplane.synthetic import CameraSpec, StreamPlan, SyntheticCamera
from dataplane.verify import ScanCheck, verify_scan_file
from dsn.errors import DemoError
from dsn.processes import Child, ProcessGroup, log_tail

PROJECT = "demo"
SESSION_TEMPLATE = "4dstem"
JOB_TEMPLATE = "local-mpiexec"
# A project token that may open sessions, launch their jobs and read their results.
PROJECT_SCOPE = ("token:exchange projects:read tokens:read sessions:read sessions:write "
                 "templates:read templates:render scans:read consumers:register scans:report")
READY_TIMEOUT_S = 30.0
RUNNING = ("pending", "running")
POLL_S = 0.1
T = TypeVar("T")


def dsn_command(*args: str) -> list[str]:
    """The ``dsn`` command line for this installation, independent of PATH."""
    return [sys.executable, "-m", "dsn", *args]


@dataclass(frozen=True)
class DemoOptions:
    state_dir: Path
    scan_shape: tuple[int, int] = (32, 32)
    ranks: int = 2
    loss: float = 0.001
    duplicates: float = 0.001
    reorder: int = 16
    seed: int = 0
    timeout_s: float = 300.0


@dataclass(frozen=True)
class DemoSummary:
    session: str
    stream: StreamStats
    check: ScanCheck
    result: Scan


@dataclass(frozen=True)
class Loopback:
    """The demo's free loopback addresses."""

    http_port: int
    snapshots: str
    updates: str
    ingress: str
    receipts: str
    metrics: str

    @classmethod
    def free(cls) -> Loopback:
        ports = free_ports(6)
        return cls(ports[0], f"tcp://127.0.0.1:{ports[1]}", f"tcp://127.0.0.1:{ports[2]}",
                   f"tcp://127.0.0.1:{ports[3]}", f"tcp://127.0.0.1:{ports[4]}",
                   f"127.0.0.1:{ports[5]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def run_demo(options: DemoOptions, say: Callable[[str], None]) -> DemoSummary:
    workdir = _make_workdir(options.state_dir)
    state_dir = workdir / "controlplane"
    try:
        admin_token = asyncio.run(initialize(state_dir))
    except ControlPlaneError as exc:
        raise DemoError(
            f"cannot initialise the control plane in {state_dir}: {exc.detail}") from None
    settings = Settings(state_dir=state_dir)
    net = Loopback.free()
    camera = SyntheticCamera(CameraSpec(scan_shape=options.scan_shape, seed=options.seed))
    plan = StreamPlan(camera.spec, loss_rate=options.loss, duplicate_rate=options.duplicates,
                      reorder_window=options.reorder, seed=options.seed)
    with ProcessGroup() as group:
        controlplane = _start_controlplane(group, workdir, state_dir, net, say)
        gateway = _start_gateway(group, workdir, settings, net, say)
        try:
            return _run_session(group, gateway, options, settings, net, admin_token, camera, plan,
                                say)
        except ClientError as exc:
            raise controlplane.failure(f"refused or failed a request: {exc}") from None
        except ProducerError as exc:
            raise gateway.failure(f"did not take the scan: {exc}") from None


def _make_workdir(state_dir: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    workdir = state_dir.resolve() / "demo" / stamp
    try:
        workdir.mkdir(parents=True)
    except OSError as exc:
        raise DemoError(f"cannot create the demo's working directory under {state_dir}: "
                        f"{exc.strerror}") from None
    return workdir


def _start_controlplane(group: ProcessGroup, workdir: Path, state_dir: Path, net: Loopback,
                        say: Callable[[str], None]) -> Child:
    say(f"[1/7] control plane on {net.url} (SQLite in {state_dir})")
    # The control plane launches the consumer job, which inherits its environment.
    child = group.start("control plane", dsn_command(
        "controlplane", "serve", "--state-dir", str(state_dir), "--port", str(net.http_port),
        "--state-snapshots", net.snapshots, "--state-updates", net.updates,
        "--gateway-endpoint", net.ingress, "--gateway-receipts-endpoint", net.receipts),
        workdir / "controlplane.log", env=mpi_environment())
    _poll(group, "the control plane was not ready", lambda: _ready(net.url), READY_TIMEOUT_S)
    return child


def _ready(url: str) -> bool | None:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return response.status == 200 or None
    except (urllib.error.URLError, OSError):
        return None  # not listening yet, or not ready


def _start_gateway(group: ProcessGroup, workdir: Path, settings: Settings, net: Loopback,
                   say: Callable[[str], None]) -> Child:
    say(f"[2/7] gateway on {net.ingress} (CURVE, sessions from the control plane)")
    gateway = group.start("gateway", dsn_command(
        "gateway", "run", "--controlplane-state", f"{net.snapshots},{net.updates}",
        "--state-key", str(settings.state_public_key_file),
        "--key", str(settings.gateway_secret_key_file), "--ingress", net.ingress,
        "--receipts", net.receipts,
        "--spool-dir", str(workdir / "spool"), "--metrics", net.metrics), workdir / "gateway.log")
    group.wait_for_log(gateway, '"event": "start"', READY_TIMEOUT_S)
    return gateway


def _run_session(group: ProcessGroup, gateway: Child, options: DemoOptions, settings: Settings,
                 net: Loopback, admin_token: str, camera: SyntheticCamera, plan: StreamPlan,
                 say: Callable[[str], None]) -> DemoSummary:
    say(f"[3/7] project {PROJECT!r}, a project token and a session from template "
        f"{SESSION_TEMPLATE!r} with a fresh producer key")
    api = Client(net.url, _project_token(net.url, admin_token))
    producer = ProducerSession(api, template=SESSION_TEMPLATE)
    session = producer.open().id
    say(f"[4/7] session {session}: consumer job ({JOB_TEMPLATE}, {options.ranks} ranks); "
        "waiting for its ranks to register")
    launched = api.launch_job(session, JOB_TEMPLATE, {"scans": 1}, ranks=options.ranks)
    job = Job(api, session, launched.id, settings.jobs_dir)
    _await_consumers(group, net, job, options.ranks)
    rows, cols = options.scan_shape
    say(f"[5/7] streaming a {rows}x{cols} scan from {plan.producers} producers "
        f"(loss {options.loss:g}, duplicates {options.duplicates:g}, "
        f"reorder window {options.reorder})")
    stream = producer.stream_synthetic(camera, plan)
    say(f"[6/7] waiting for job {job.id} and its result")
    _await_job(group, job, options.timeout_s)
    result = _listed_result(api, session)
    say(f"[7/7] stopping the gateway, ending the session, verifying {result.path} against "
        "the planted electrons")
    # Stopped while the session is open, the gateway's stop line still holds its counters.
    if (code := group.stop(gateway)) != 0:
        raise gateway.failure(f"stopped with status {code}")
    producer.end()
    check = verify_scan_file(Path(result.path), camera, plan)
    if not check.ok:
        raise DemoError("the output file does not match the synthetic ground truth:\n  "
                        + "\n  ".join(check.problems))
    return DemoSummary(session, stream, check, result)


def _project_token(url: str, admin_token: str) -> str:
    call_json(url, admin_token, "POST", "/api/v1/projects", {"name": PROJECT})
    answer = call_json(url, admin_token, "POST", f"/api/v1/projects/{PROJECT}/tokens",
                       {"subject": "demo", "scope": PROJECT_SCOPE, "ttl": 3600})
    return str(answer["token"])


@dataclass(frozen=True)
class Job:
    """The session's consumer job, as its project token sees it."""

    api: Client
    session: str
    id: str
    jobs_dir: Path

    def state(self) -> str:
        return self.api.job(self.session, self.id).state

    def failure(self, what: str) -> DemoError:
        log = self.jobs_dir / self.id / "job.log"
        return DemoError(f"consumer job {self.id}: {what}; last lines of {log}:\n{log_tail(log)}")


def _await_consumers(group: ProcessGroup, net: Loopback, job: Job, ranks: int) -> None:
    """Until every rank is registered and the gateway routes to all of them: a scan is split
    among the members the gateway knows when it begins."""
    def registered() -> bool | None:
        if (state := job.state()) not in RUNNING:
            raise job.failure(f"{state} before its ranks registered")
        return job.api.session(job.session).counters.live_consumers == ranks or None

    _poll(group, f"did not register its {ranks} ranks", registered, READY_TIMEOUT_S,
          job)
    routed = re.compile(
        rf'^dsn_gateway_consumers{{session="{re.escape(job.session)}"}} {ranks}\.0$', re.MULTILINE)
    _poll(group, f"the gateway did not learn its {ranks} ranks",
          lambda: routed.search(_metrics(net.metrics)) is not None or None, READY_TIMEOUT_S, job)


def _metrics(address: str) -> str:
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, OSError):
        return ""  # not serving yet


def _await_job(group: ProcessGroup, job: Job, timeout_s: float) -> None:
    state = _poll(group, "did not finish",
                  lambda: None if (state := job.state()) in RUNNING else state, timeout_s, job)
    if state != "succeeded":
        raise job.failure(state)


def _listed_result(api: Client, session: str) -> Scan:
    results = [scan for scan in api.scans(PROJECT) if scan.session == session]
    if len(results) != 1:
        raise DemoError(f"expected one listed result for session {session}, found {len(results)}")
    return results[0]


def _poll(group: ProcessGroup, failure: str, probe: Callable[[], T | None], timeout_s: float,
          job: Job | None = None) -> T:
    """``probe()`` until it answers (anything but None), while every child keeps running; a
    timeout shows the consumer job's log when there is one."""
    deadline = time.monotonic() + timeout_s
    while True:
        group.check_running()
        answer = probe()
        if answer is not None:
            return answer
        if time.monotonic() > deadline:
            what = f"{failure} within {timeout_s:.0f} s"
            raise job.failure(what) if job else DemoError(what)
        time.sleep(POLL_S)


def format_summary(summary: DemoSummary) -> str:
    check, stream, result = summary.check, summary.stream, summary.result
    manifest = (f" ({stream.lost} lost sectors listed in the file's loss manifest)"
                if stream.lost else "")
    return "\n".join([
        "DSN demo: OK",
        f"  session           {summary.session} (project {PROJECT!r})",
        f"  frames            {check.frames} ({check.incomplete_frames} incomplete, flagged)",
        f"  electron events   {check.events} (all equal to the planted electrons)",
        (f"  sectors           {stream.messages} sent, {stream.lost} lost upstream, "
         f"{stream.duplicated} duplicated"),
        (f"  throughput        {stream.gbytes_per_s:.2f} GB/s, {stream.messages_per_s:,.0f} "
         "messages/s (producers -> gateway -> consumers)"),
        f"  status            {result.status}{manifest}",
        (f"  result            scan {result.scan} of session {result.session}: "
         f"{result.frames} frames, {result.events} events "
         f"(GET /api/v1/scans?project={PROJECT})"),
        f"  output            {result.path}",
    ])
