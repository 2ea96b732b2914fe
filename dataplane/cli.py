"""``dsn producer`` and ``dsn consumer``: the endpoint commands."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dataplane.keys import KeyFileError, KeyPair, create_keypair, load_keypair, load_secret_keypair
from dataplane.producer import (
    GatewayTarget,
    HeaderMode,
    ProducerError,
    ProducerSession,
    StreamStats,
    replay_spool,
    stream_synthetic,
)
from dataplane.restclient import RestError, TokenFileError, read_token
from dataplane.sessions import DEFAULT_TEMPLATE, Transport
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
@click.option("--controlplane", "controlplane_url", default=None, metavar="URL",
              help="Open the session at this control plane (http(s)://HOST:PORT) and stream into "
                   "the gateway it names. Needs --project-token-file and --project.")
@click.option("--project-token-file", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="With --controlplane: file holding the project token, mode 0600.")
@click.option("--project", default=None, help="With --controlplane: the session's project.")
@click.option("--template", default=DEFAULT_TEMPLATE, show_default=True,
              help="With --controlplane: the DSN template the session is rendered from.")
@click.option("--param", "param_pairs", multiple=True, metavar="NAME=VALUE",
              help="With --controlplane: a template parameter, JSON where it parses "
                   "(hwm=64, sources='[\"10.0.0.0/8\"]'), else a string. Repeatable.")
@click.option("--ttl", type=click.IntRange(min=1), default=None,
              help="With --controlplane: session lifetime in seconds [default: the policy's].")
@click.option("--end-session", is_flag=True,
              help="With --controlplane: end the session when the stream is over (or failed).")
@click.option("--transport", type=click.Choice(["curve", "plain"]), default="curve",
              show_default=True,
              help="With --controlplane: 'plain' streams unencrypted to the gateway's plaintext "
                   "ingress (PLAIN: session id and session token signature); refused unless the "
                   "policy allows unencrypted transport.")
@click.option("--endpoint", default=None, metavar="tcp://HOST:PORT",
              help="Without --controlplane: the gateway's producer ingress, as given when the "
                   "session was opened.")
@click.option("--server-key", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Without --controlplane: the gateway's public CURVE key file (NAME.key).")
@click.option("--client-key", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="This producer's CURVE key pair (NAME.key_secret, mode 0600). Without "
                   "--controlplane it must already be registered with the session; with it, it "
                   "is registered when the session opens [default there: a fresh in-memory pair].")
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
def stream(controlplane_url: str | None, project_token_file: Path | None, project: str | None,
           template: str, param_pairs: tuple[str, ...], ttl: int | None, end_session: bool,
           transport: Transport, endpoint: str | None, server_key: Path | None, client_key: Path | None,
           scan: int | None, spool_file: Path | None, scan_shape: tuple[int, int], seed: int,
           loss: float, duplicates: float, reorder: int, header: HeaderMode, electrons: int,
           dark: bool, timeout: float, progress: bool | None) -> None:
    """Stream a synthetic 4D Camera scan into a session, one producer per sector, or replay a
    spool file.

    Two modes: with --controlplane, open the session there with a project token (registering
    this producer's CURVE key) and stream into the gateway it names; without it, stream into a
    session opened elsewhere, given its --endpoint, --server-key and a registered --client-key.
    """
    ctx = click.get_current_context()
    if spool_file is not None:
        _refuse_options(ctx, _SYNTHETIC_OPTIONS, "applies to synthetic scans, not to --spool")
        work = _spool_work(spool_file, scan, progress, timeout)
    else:
        work = _synthetic_work(0 if scan is None else scan, scan_shape, seed, loss, duplicates,
                               reorder, header, electrons, dark, progress, timeout)
    if controlplane_url is None:
        _refuse_options(ctx, _CONTROLPLANE_OPTIONS, "needs --controlplane")
        _report(*_run(work, _direct_target(endpoint, server_key, client_key)))
        return
    _refuse_options(ctx, _DIRECT_OPTIONS, "is the gateway's own; with --controlplane the "
                                          "control plane names it")
    if project_token_file is None or project is None:
        raise click.UsageError("--controlplane needs --project-token-file and --project")
    session = ProducerSession(
        controlplane_url, _read_project_token(project_token_file), project=project,
        template=template, params=template_params(param_pairs), ttl=ttl, end_on_exit=end_session,
        client=None if client_key is None else _load_key(client_key, "--client-key", secret=True),
        transport=transport)
    _stream_in_session(session, work)


# What a stream does once it knows where to go: (label for the report, the statistics).
Work = Callable[[GatewayTarget], tuple[str, StreamStats]]

_CONTROLPLANE_OPTIONS = ("project_token_file", "project", "template", "param_pairs", "ttl",
                         "end_session", "transport")
_DIRECT_OPTIONS = ("endpoint", "server_key")


def _spool_work(spool_file: Path, scan: int | None, progress: bool | None,
                timeout: float) -> Work:
    def work(target: GatewayTarget) -> tuple[str, StreamStats]:
        return f"spool {spool_file.name}", replay_spool(
            spool_file, target.endpoint, target.server_public, target.client, scan=scan,
            progress=progress, send_timeout_s=timeout, plain=target.plain)
    return work


def _synthetic_work(scan: int, scan_shape: tuple[int, int], seed: int, loss: float,
                    duplicates: float, reorder: int, header: HeaderMode, electrons: int,
                    dark: bool, progress: bool | None, timeout: float) -> Work:
    # The scan is checked here, before any session is opened for it.
    try:
        spec = CameraSpec(scan_shape=scan_shape, seed=seed, electrons_per_frame=electrons,
                          dark=dark)
        plan = StreamPlan(spec, producers=spec.sectors, loss_rate=loss,
                          duplicate_rate=duplicates, reorder_window=reorder, seed=seed)
    except SyntheticError as exc:
        raise click.UsageError(str(exc)) from None

    def work(target: GatewayTarget) -> tuple[str, StreamStats]:
        return f"scan {scan}", stream_synthetic(
            target.endpoint, target.server_public, target.client, SyntheticCamera(spec), plan,
            scan, header=header, progress=progress, send_timeout_s=timeout, plain=target.plain)
    return work


def _run(work: Work, target: GatewayTarget) -> tuple[str, StreamStats]:
    try:
        return work(target)
    except ProducerError as exc:
        raise click.ClickException(str(exc)) from None


def _direct_target(endpoint: str | None, server_key: Path | None,
                   client_key: Path | None) -> GatewayTarget:
    missing = [option for option, value in (("--endpoint", endpoint), ("--server-key", server_key),
                                            ("--client-key", client_key)) if value is None]
    if missing:
        raise click.UsageError(f"without --controlplane, {', '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} required")
    assert endpoint is not None and server_key is not None and client_key is not None
    server = _load_key(server_key, "--server-key", secret=False)
    return GatewayTarget(endpoint, server.public,
                         _load_key(client_key, "--client-key", secret=True))


def _read_project_token(path: Path) -> str:
    try:
        return read_token(path)
    except TokenFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--project-token-file") from None


def template_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--param NAME=VALUE`` pairs; a value is JSON where it parses (64, true, ["10.0.0.0/8"]),
    else the plain string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--param")
        try:
            params[name] = json.loads(text)
        except ValueError:
            params[name] = text
    return params


def _stream_in_session(session: ProducerSession, work: Work) -> None:
    try:
        with session:
            opened = session.session
            target = session.gateway()
            click.echo(f"session {opened.id} (expires {opened.expires_at.isoformat()}), "
                       f"gateway {target.endpoint}"
                       f"{' (plain, unencrypted)' if target.plain is not None else ''}")
            _report(*_run(work, target))
    except (RestError, ProducerError) as exc:
        raise click.ClickException(str(exc)) from None
    if session.end_on_exit:
        click.echo(f"session {opened.id} ended")


_SYNTHETIC_OPTIONS = ("scan_shape", "seed", "loss", "duplicates", "reorder", "header", "electrons",
                      "dark")


def _refuse_options(ctx: click.Context, names: tuple[str, ...], reason: str) -> None:
    # An option the chosen mode does not use would be silently ignored: refuse it instead.
    for name in names:
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            option = next(p for p in ctx.command.params if p.name == name)
            raise click.UsageError(f"{option.opts[0]} {reason}")


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
