"""``dsn demo``: one synthetic 4D-STEM scan through a real gateway into a real MPI consumer job.

Everything runs on loopback from a working directory under the state directory: CURVE keys for the
gateway and the producers, a DSN configuration with one session, a gateway process, an ``mpiexec``
consumer job, four producers (one per detector sector) with a little sector loss, duplicates and
reordering, then a check of the HDF5 file against the camera's planted electrons.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from controlplane.launchers import dsn_command, mpi_environment, mpiexec_command
from controlplane.processes import ProcessGroup
from dataplane import strictyaml
from dataplane.keys import create_keypair, load_keypair, load_secret_keypair
from dataplane.producer import StreamStats, stream_synthetic
from dataplane.synthetic import CameraSpec, StreamPlan, SyntheticCamera
from dataplane.verify import ScanCheck, verify_scan_file

SESSION = "demo"
READY_TIMEOUT_S = 30.0
CONTROLPLANE_VARIABLES = ("DSN_CONTROLPLANE_URL", "DSN_CONSUMER_TOKEN_FILE")


class DemoError(RuntimeError):
    """The demo could not complete; the message says which step failed and why."""


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
    stream: StreamStats
    check: ScanCheck
    result: dict[str, object]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(workdir: Path, ranks: int) -> tuple[Path, str]:
    """Keys and a one-session DSN configuration on loopback; returns its path and the ingress."""
    keys = workdir / "keys"
    create_keypair(keys, "gateway")
    create_keypair(keys, "producer")
    ingress = f"tcp://127.0.0.1:{_free_port()}"
    config = {
        "version": 1,
        "gateway": {"ingress": ingress, "server_secret_key_file": str(keys / "gateway.key_secret")},
        "sessions": [{
            "id": SESSION,
            "client_keys": [load_keypair(keys / "producer.key").public.decode()],
            "allowed_networks": ["127.0.0.0/8"],
            "allowed_targets": ["127.0.0.0/8"],
            "consumers": [f"tcp://127.0.0.1:{_free_port()}" for _ in range(ranks)],
            "expires_at": (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat(),
        }],
    }
    path = workdir / "dsn.yaml"
    path.write_text(strictyaml.dump(config))
    return path, ingress


def run_demo(options: DemoOptions, say: Callable[[str], None]) -> DemoSummary:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    workdir = options.state_dir.resolve() / "demo" / stamp
    output_dir = workdir / "output"
    try:
        output_dir.mkdir(parents=True)
    except OSError as exc:
        raise DemoError(f"cannot create the demo's working directory under {options.state_dir}: "
                        f"{exc.strerror}") from None
    result_file = workdir / "result.jsonl"
    config, ingress = write_config(workdir, options.ranks)
    camera = SyntheticCamera(CameraSpec(scan_shape=options.scan_shape, seed=options.seed))
    plan = StreamPlan(camera.spec, loss_rate=options.loss, duplicate_rate=options.duplicates,
                      reorder_window=options.reorder, seed=options.seed)
    keys = workdir / "keys"

    with ProcessGroup() as group:
        say(f"[1/4] gateway on {ingress} (CURVE, session {SESSION!r})")
        gateway = group.start("gateway", dsn_command("gateway", "run", "--config", str(config)),
                              workdir / "gateway.log")
        group.wait_for_log(gateway, '"event": "start"', READY_TIMEOUT_S)
        say(f"[2/4] consumer job: mpiexec -n {options.ranks} dsn consumer run")
        job = group.start(
            "consumer job",
            mpiexec_command(options.ranks, dsn_command(
                "consumer", "run", "--config", str(config), "--session", SESSION,
                "--output-dir", str(output_dir), "--scans", "1", "--result-file", str(result_file))),
            workdir / "consumers.log", env=_job_environment())
        rows, cols = options.scan_shape
        say(f"[3/4] streaming a {rows}x{cols} scan from {plan.producers} producers "
            f"(loss {options.loss:g}, duplicates {options.duplicates:g}, reorder window {options.reorder})")
        stream = stream_synthetic(ingress, load_keypair(keys / "gateway.key").public,
                                  load_secret_keypair(keys / "producer.key_secret"), camera, plan)
        group.check_running()
        group.wait(job, options.timeout_s)
    result = _read_result(result_file)
    say(f"[4/4] verifying {result['path']} against the planted electrons")
    check = verify_scan_file(Path(str(result["path"])), camera, plan)
    if not check.ok:
        raise DemoError("the output file does not match the synthetic ground truth:\n  "
                        + "\n  ".join(check.problems))
    return DemoSummary(stream, check, result)


def _job_environment() -> dict[str, str]:
    """This shell's environment for the consumer job, without settings that would point it at a
    control plane: the demo's job reads its session from the static configuration."""
    inherited = {k: v for k, v in os.environ.items() if k not in CONTROLPLANE_VARIABLES}
    return mpi_environment(inherited)


def _read_result(path: Path) -> dict[str, object]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DemoError(f"the consumer job wrote no result record ({path}: {exc.strerror})") from None
    if not lines:
        raise DemoError(f"the consumer job's result file {path} is empty")
    result: dict[str, object] = json.loads(lines[-1])
    return result


def format_summary(summary: DemoSummary) -> str:
    check, stream = summary.check, summary.stream
    return "\n".join([
        "DSN demo: OK",
        f"  frames            {check.frames} ({check.incomplete_frames} incomplete, flagged)",
        f"  electron events   {check.events} (all equal to the planted electrons)",
        f"  sectors           {stream.messages} sent, {stream.lost} lost upstream, "
        f"{stream.duplicated} duplicated",
        f"  throughput        {stream.gbytes_per_s:.2f} GB/s, {stream.messages_per_s:,.0f} messages/s "
        "(producers -> gateway -> consumers)",
        f"  status            {summary.result['status']}"
        + (f" ({stream.lost} lost sectors listed in the file's loss manifest)" if stream.lost else ""),
        f"  output            {summary.result['path']}",
    ])
