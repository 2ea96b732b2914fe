"""``dsn producer`` and ``dsn consumer``: the endpoint commands."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dataplane.keys import KeyFileError, KeyPair, create_keypair, load_keypair, load_secret_keypair
from dataplane.producer import (
    HeaderMode,
    ProducerError,
    StreamStats,
    replay_spool,
    stream_synthetic,
)
from dataplane.synthetic import CameraSpec, StreamPlan, SyntheticCamera, SyntheticError


F = TypeVar("F", bound=Callable[..., Any])


@click.group()
def producer() -> None:
    """Stream detector data into a DSN session."""


class ShapeParam(click.ParamType):
    """``ROWSxCOLS``, e.g. ``32x32``."""

    name = "ROWSxCOLS"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", str(value))
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            self.fail(f"{value!r} is not ROWSxCOLS with two positive integers, e.g. 32x32",
                      param, ctx)
        return int(match[1]), int(match[2])


def scan_shape_option(default: str) -> Callable[[F], F]:
    """``--scan-shape ROWSxCOLS``, shared by every command that streams a scan."""
    return click.option("--scan-shape", type=ShapeParam(), default=default, show_default=True,
                        help="Scan positions as ROWSxCOLS.")


def _load_key(path: Path, option: str, secret: bool) -> KeyPair:
    try:
        return load_secret_keypair(path) if secret else load_keypair(path)
    except KeyFileError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@producer.command("stream")
@click.option("--endpoint", required=True, metavar="tcp://HOST:PORT",
              help="The gateway's producer ingress, as given when the session was opened.")
@click.option("--server-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The gateway's public CURVE key file (NAME.key).")
@click.option("--client-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="This producer's CURVE key pair (NAME.key_secret, mode 0600); its public key "
                   "must be registered with the session.")
@click.option("--scan", type=click.IntRange(0, 2**32 - 1), default=None,
              help="Scan number [default: 0, or the spooled scan's number with --spool].")
@click.option("--spool", "spool_file", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Replay this gateway spool file (as one producer) instead of streaming a "
                   "synthetic scan.")
@scan_shape_option(default="32x32")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the synthetic frames and of the loss, duplicates and reordering.")
@click.option("--loss", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="Fraction of (frame, sector) pairs never sent.")
@click.option("--duplicates", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of sent sectors sent twice.")
@click.option("--reorder", type=click.IntRange(min=0), default=0, show_default=True,
              help="Shuffle each producer's messages within windows of this many messages.")
@click.option("--header", type=click.Choice(["native", "ncem"]), default="native",
              show_default=True, help="Data header format: native DSN or the NCEM 4D Camera array.")
@click.option("--electrons", type=click.IntRange(min=0), default=40, show_default=True,
              help="Electrons planted per frame.")
@click.option("--dark", is_flag=True, help="Add per-pixel dark offsets to every frame.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=30.0,
              show_default=True, help="Seconds a send may block before the stream fails.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: only on a terminal).")
def stream(endpoint: str, server_key: Path, client_key: Path, scan: int | None,
           spool_file: Path | None, scan_shape: tuple[int, int], seed: int, loss: float,
           duplicates: float, reorder: int, header: HeaderMode, electrons: int, dark: bool,
           timeout: float, progress: bool | None) -> None:
    """Stream a synthetic 4D Camera scan into a session, one producer per sector, or replay a
    spool file."""
    if spool_file is not None:
        _refuse_synthetic_options(click.get_current_context())
    server = _load_key(server_key, "--server-key", secret=False)
    client = _load_key(client_key, "--client-key", secret=True)
    if spool_file is not None:
        try:
            stats = replay_spool(spool_file, endpoint, server.public, client, scan=scan,
                                 progress=progress, send_timeout_s=timeout)
        except ProducerError as exc:
            raise click.ClickException(str(exc)) from None
        _report(f"spool {spool_file.name}", stats)
        return
    scan = 0 if scan is None else scan
    try:
        spec = CameraSpec(scan_shape=scan_shape, seed=seed, electrons_per_frame=electrons,
                          dark=dark)
        plan = StreamPlan(spec, producers=spec.sectors, loss_rate=loss,
                          duplicate_rate=duplicates, reorder_window=reorder, seed=seed)
    except SyntheticError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        stats = stream_synthetic(endpoint, server.public, client, SyntheticCamera(spec), plan,
                                 scan, header=header, progress=progress, send_timeout_s=timeout)
    except ProducerError as exc:
        raise click.ClickException(str(exc)) from None
    _report(f"scan {scan}", stats)


_SYNTHETIC_OPTIONS = ("scan_shape", "seed", "loss", "duplicates", "reorder", "header", "electrons",
                      "dark")


def _refuse_synthetic_options(ctx: click.Context) -> None:
    # A spool carries its own geometry and data; a synthetic option beside it would be ignored.
    for name in _SYNTHETIC_OPTIONS:
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"--{name.replace('_', '-')} applies to synthetic scans, "
                                   "not to --spool")


def _report(what: str, stats: StreamStats) -> None:
    click.echo(f"{what}: {stats.messages} messages, {stats.bytes / 1e6:.1f} MB in "
               f"{stats.seconds:.2f} s ({stats.gbytes_per_s:.3f} GB/s, "
               f"{stats.messages_per_s:.0f} msg/s); lost {stats.lost}, "
               f"duplicated {stats.duplicated}")


@producer.command("keygen")
@click.option("--out", "directory", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory for NAME.key (public) and NAME.key_secret (0600).")
@click.option("--name", required=True, help="Key name, e.g. the producer host.")
def keygen(directory: Path, name: str) -> None:
    """Create a CURVE key pair for a producer and print its public key."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise click.BadParameter(f"{name!r} must be letters, digits, '_', '.' or '-'",
                                 param_hint="--name")
    existing = [p for p in (directory / f"{name}.key", directory / f"{name}.key_secret")
                if p.exists()]
    if existing:
        raise click.ClickException(f"{existing[0]} already exists; choose another --name")
    try:
        public_path, secret_path = create_keypair(directory, name)
    except OSError as exc:
        raise click.ClickException(f"cannot write keys to {directory}: {exc}") from None
    click.echo(f"public key file: {public_path}\nsecret key file: {secret_path}")
    click.echo(load_keypair(public_path).public.decode("ascii"))


@click.group()
def consumer() -> None:
    """Receive, count and store a session's data on HPC nodes (run under mpiexec or srun)."""


@consumer.command("run")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="DSN configuration file (YAML).")
@click.option("--session", required=True, help="Session id in the configuration.")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the per-scan HDF5 files (written by rank 0).")
@click.option("--scans", type=click.IntRange(min=1), default=None,
              help="Exit after this many scans [default: run until SIGTERM/SIGINT].")
@click.option("--dark", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Dark reference: a frame-shaped float32 .npy file.")
@click.option("--samples", type=click.IntRange(min=1), default=40, show_default=True,
              help="Sample frames per scan for the thresholds, across all ranks.")
@click.option("--background-sigma", type=float, default=4.0, show_default=True,
              help="Background threshold in standard deviations.")
@click.option("--xray-sigma", type=float, default=10.0, show_default=True,
              help="X-ray threshold in standard deviations.")
@click.option("--kernel", type=click.Choice(["vectorised", "stempy"]), default="vectorised",
              show_default=True, help="Electron-counting kernel.")
@click.option("--result-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append scan results as JSON lines here [default: stdout without a control "
                   "plane, none with one].")
@click.option("--controlplane", "controlplane_url", envvar="DSN_CONTROLPLANE_URL", default=None,
              metavar="URL",
              help="Register with this control plane (env DSN_CONTROLPLANE_URL): each rank binds "
                   "an ephemeral port, registers it and reports results there. Without it, rank "
                   "r binds the session's consumer endpoint r from --config.")
@click.option("--token-file", envvar="DSN_CONSUMER_TOKEN_FILE", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the consumer token, mode 0600 (env DSN_CONSUMER_TOKEN_FILE); "
                   "needed with --controlplane.")
@click.option("--bind-host", default="127.0.0.1", show_default=True, metavar="IP",
              help="With --controlplane: the address ranks listen on, as the gateway reaches it.")
@click.option("--job-id", envvar=["DSN_JOB_ID", "SLURM_JOB_ID"], default=None,
              help="With --controlplane: the job id ranks register under (env DSN_JOB_ID or "
                   "SLURM_JOB_ID) [default: a new id shared by all ranks].")
def consumer_run(config_path: Path, session: str, output_dir: Path, scans: int | None,
                 dark: Path | None, samples: int, background_sigma: float, xray_sigma: float,
                 kernel: str, result_file: Path | None, controlplane_url: str | None,
                 token_file: Path | None, bind_host: str, job_id: str | None) -> None:
    """Receive, count and write a session's scans; one rank per consumer endpoint."""
    # Imported here so that other dsn commands never initialise MPI.
    from dataplane.consumer.registration import RegistrationArguments
    from dataplane.consumer.runner import JobArguments, run_job

    registration = None
    if controlplane_url is not None:
        if token_file is None:
            raise click.UsageError("--controlplane needs --token-file (or DSN_CONSUMER_TOKEN_FILE)")
        registration = RegistrationArguments(controlplane_url=controlplane_url,
                                             token_file=token_file, bind_host=bind_host,
                                             job_id=job_id)
    code = run_job(JobArguments(
        config=config_path, session=session, output_dir=output_dir, scans=scans, dark=dark,
        samples=samples, background_sigma=background_sigma, xray_sigma=xray_sigma, kernel=kernel,
        result_file=result_file, registration=registration))
    sys.exit(code)
