"""``dsn sessions``, ``dsn jobs`` and ``dsn scans``: a facility user's commands, with a project
token, over the control plane's REST API (``common.client.Client``).

Every command takes ``--controlplane`` (or ``$DSN_CONTROLPLANE_URL``: one URL, or the replicas' URLs
comma-separated) and the project token from
``--project-token-file`` or ``$DSN_PROJECT_TOKEN`` (one of them; never the command line). Answers
print as aligned tables, or as JSON with ``--json``; a failure is one ``error: ...`` line and exit
status 1 (``dsn.cli.main`` reports every ``DsnError`` so).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import click
from pydantic import BaseModel

from common.client import (
    DEFAULT_TEMPLATE,
    DEFAULT_URL,
    TOKEN_ENV,
    TOKEN_FILE_OPTION,
    URL_ENV,
    Client,
    Job,
    Session,
    SessionDetail,
    WaitError,
    WaitTimeout,
)
from common.clitypes import (
    CONTROLPLANE_URLS_HELP,
    ControlPlaneURLs,
    OneLineError,
    template_params,
)
from common.keys import load_keypair
from common.output import Columns, show
from common.privatefs import create_private_file
from common.protocol import MAX_LANES

F = TypeVar("F", bound=Callable[..., Any])

# `dsn jobs wait` exit statuses beyond 0 (the awaited state came) and 1 (it never will).
EXIT_TIMEOUT: Final = 124
DEFAULT_WAIT_S: Final = 600.0

SESSION_COLUMNS: Columns = [("id", "SESSION"), ("state", "STATE"), ("template", "TEMPLATE"),
                            ("created_at", "CREATED"), ("expires_at", "EXPIRES"),
                            ("live_consumers", "CONSUMERS")]
DETAIL_COLUMNS: Columns = [*SESSION_COLUMNS, ("jobs", "JOBS"), ("scans", "SCANS"),
                           ("gateway", "GATEWAY")]
OPENED_COLUMNS: Columns = [("id", "SESSION"), ("expires_at", "EXPIRES"), ("gateway", "GATEWAY"),
                           ("server_key", "SERVER KEY")]
JOB_COLUMNS: Columns = [("id", "JOB"), ("state", "STATE"), ("template", "TEMPLATE"),
                        ("launcher", "LAUNCHER"), ("ranks", "RANKS"), ("exit_code", "EXIT"),
                        ("submitted_at", "SUBMITTED"), ("detail", "DETAIL")]
SCAN_COLUMNS: Columns = [("session", "SESSION"), ("scan", "SCAN"), ("source", "SOURCE"),
                         ("status", "STATUS"), ("frames", "FRAMES"), ("lost_sectors", "LOST"),
                         ("path", "PATH")]
SCAN_DETAIL_COLUMNS: Columns = [*SCAN_COLUMNS, ("sha256", "SHA256"), ("reason", "REASON"),
                                ("manifest", "MANIFEST")]


# --- options shared by every command -------------------------------------------------------------

def _with_client(func: Callable[..., None]) -> Callable[..., None]:
    """--controlplane, --project-token-file and --json, turned into ``client`` and ``as_json``."""
    @click.option("--controlplane", "urls", type=ControlPlaneURLs(), default=DEFAULT_URL,
                  show_default=True, envvar=URL_ENV, metavar="URL[,URL...]",
                  help=f"{CONTROLPLANE_URLS_HELP} Or set ${URL_ENV}.")
    @click.option(TOKEN_FILE_OPTION, "token_file", default=None,
                  type=click.Path(dir_okay=False, path_type=Path),
                  help=f"File (mode 0600) holding your project token. Or set ${TOKEN_ENV} "
                       "instead (not both: that is an error).")
    @click.option("--json", "as_json", is_flag=True,
                  help="Print the answer as JSON, for scripts, instead of a table.")
    @functools.wraps(func)
    def wrapper(urls: tuple[str, ...], token_file: Path | None, **kwargs: Any) -> None:
        func(Client.from_environment(urls, token_file), **kwargs)
    return wrapper


def _param_option(what: str) -> Callable[[F], F]:
    return click.option("--param", "param_pairs", multiple=True, metavar="NAME=VALUE",
                        help=f"A parameter of the {what} (repeatable); VALUE is read as JSON "
                             "where it parses (numbers, lists), else as a string.")


M = TypeVar("M", bound=BaseModel)


def _print(answers: list[M], columns: Columns, as_json: bool, *, single: bool = False,
           cells: Callable[[M], dict[str, Any]] | None = None) -> None:
    """The answers as the API gave them (``--json``), or as table rows, where ``cells`` adds the
    columns a table shows that the answer nests or leaves to be counted."""
    rows = [a.model_dump(mode="json") | (cells(a) if cells and not as_json else {})
            for a in answers]
    show(rows, columns, as_json=as_json, single=single)


# --- sessions ------------------------------------------------------------------------------------

@click.group()
def sessions() -> None:
    """Open, list, inspect and end your project's streaming sessions (project token)."""


@sessions.command("open")
@_with_client
@click.option("--client-key", "client_key", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The producer's public CURVE key file (NAME.key, from 'dsn producer keygen'): "
                   "the gateway admits the producer holding its secret.")
@click.option("--template", default=DEFAULT_TEMPLATE, show_default=True,
              help="The DSN template the session's configuration is rendered from.")
@_param_option("DSN template")
@click.option("--ttl", type=click.IntRange(1), default=None,
              help="Seconds the session lives. [default and maximum: the policy's]")
@click.option("--transport", type=click.Choice(["curve", "plain"]), default="curve",
              show_default=True,
              help="plain: also admit the session's PLAIN credentials on the gateway's "
                   "unencrypted ingress (only where the policy allows it).")
@click.option("--project", default=None, help="The session's project. [default: the token's]")
@click.option("--lanes", type=click.IntRange(1, MAX_LANES), default=1, show_default=True,
              help="Split each scan over this many registered gateways, one per lane: lane k's "
                   "producers stream to the k-th gateway listed, and the consumer ranks merge the "
                   "lanes.")
@click.option("--token-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="New file (created 0600, never overwritten) for the session token, which the "
                   "control plane returns only this once. [default: not kept]")
def open_command(client: Client, as_json: bool, client_key: Path, template: str,
                 param_pairs: tuple[str, ...], ttl: int | None, transport: str,
                 project: str | None, lanes: int, token_out: Path | None) -> None:
    """Open a streaming session and print where its producer streams.

    The session's configuration is rendered from --template with the --param values; the
    gateway then admits the producer whose public key is --client-key. Stream into it with
    'dsn producer stream --endpoint GATEWAY --server-key ...', or let 'dsn producer stream
    --controlplane' open its own session instead.
    """
    if token_out is not None and token_out.exists():
        raise OneLineError(f"{token_out} exists; refusing to overwrite it")
    opened = client.open_session(template, template_params(param_pairs),
                                 client_key=load_keypair(client_key).public, ttl=ttl,
                                 transport="plain" if transport == "plain" else "curve",
                                 project=project, lanes=lanes)
    if token_out is not None:
        create_private_file(token_out, f"{opened.token}\n".encode())
    _print([opened], OPENED_COLUMNS, as_json, single=True,
           cells=lambda s: {"gateway": _gateway_cell(s), "server_key": "; ".join(
               gateway.server_key for gateway in s.lanes or [s.gateway])})


@sessions.command("list")
@_with_client
@click.option("--project", default=None, help="The project to list. [default: the token's]")
@click.option("--open", "only_open", is_flag=True, help="Only the sessions still open.")
def list_sessions(client: Client, as_json: bool, project: str | None, only_open: bool) -> None:
    """List the project's sessions, oldest first, with their states and live consumers."""
    listed = [s for s in client.sessions(project) if not only_open or s.state == "open"]
    _print(listed, SESSION_COLUMNS, as_json,
           cells=lambda s: {"live_consumers": len(s.consumer_endpoints)})


@sessions.command("show")
@_with_client
@click.argument("session")
def show_session(client: Client, as_json: bool, session: str) -> None:
    """Show one session: state, expiry, gateway, counters (--json: its consumers and scans too)."""
    _print([client.session(session)], DETAIL_COLUMNS, as_json, single=True, cells=_detail_cells)


@sessions.command("end")
@_with_client
@click.argument("session")
def end_session(client: Client, as_json: bool, session: str) -> None:
    """End a session (ending an ended one is no error): its tokens are revoked, its consumer
    jobs cancelled, and the gateway stops admitting its producer at once."""
    _print([client.end_session(session)], DETAIL_COLUMNS, as_json, single=True,
           cells=_detail_cells)


def _detail_cells(detail: SessionDetail) -> dict[str, Any]:
    counters = detail.counters
    return {"live_consumers": counters.live_consumers, "jobs": counters.jobs,
            "scans": counters.scans, "gateway": _gateway_cell(detail)}


def _gateway_cell(session: Session) -> str:
    """Where the session's producers stream: the endpoint, and on a site of several gateways the
    gateway's name and the one it was moved from; each lane's, for a session of several."""
    if session.gateway_name is None:
        return session.gateway.endpoint
    moved = f", moved from {session.previous_gateway}" if session.previous_gateway else ""
    if not session.lanes:
        return f"{session.gateway.endpoint} ({session.gateway_name}{moved})"
    lanes = "; ".join(f"lane {lane}: {gateway.endpoint} ({gateway.name})"
                      for lane, gateway in enumerate(session.lanes))
    return f"{lanes}{moved}"


# --- jobs ----------------------------------------------------------------------------------------

@click.group()
def jobs() -> None:
    """Launch, list, inspect, cancel and wait for a session's consumer jobs (project token)."""


@jobs.command("launch")
@_with_client
@click.argument("session")
@click.option("--template", default=None,
              help="The job template to render. [default: the control plane's launcher's own: "
                   "local-mpiexec or slurm-sbatch]")
@_param_option("job template")
@click.option("--ranks", type=click.IntRange(1), default=1, show_default=True,
              help="MPI ranks of the consumer job: one consumer each.")
def launch(client: Client, as_json: bool, session: str, template: str | None,
           param_pairs: tuple[str, ...], ranks: int) -> None:
    """Submit a consumer job for SESSION; its ranks register with the session as they start."""
    job = client.launch_job(session, template, template_params(param_pairs), ranks=ranks)
    _print([job], JOB_COLUMNS, as_json, single=True)


@jobs.command("list")
@_with_client
@click.argument("session")
def list_jobs(client: Client, as_json: bool, session: str) -> None:
    """List SESSION's consumer jobs, oldest first, with their launcher states."""
    _print(client.jobs(session), JOB_COLUMNS, as_json)


def _job_command(name: str, doc: str, call: Callable[[Client, str, str], Job]) -> None:
    """``dsn jobs NAME SESSION JOB``: print what ``call`` answers for that job."""
    @jobs.command(name, help=doc)
    @_with_client
    @click.argument("session")
    @click.argument("job")
    def command(client: Client, as_json: bool, session: str, job: str) -> None:
        _print([call(client, session, job)], JOB_COLUMNS, as_json, single=True)


_job_command("show", "Show one job: state (pending, running, succeeded, failed, cancelled, "
                     "lost), exit code.", Client.job)
_job_command("cancel", "Cancel a job (cancelling a finished one is no error); the session stays "
                       "open.", Client.cancel_job)


@jobs.command("wait")
@_with_client
@click.argument("session")
@click.argument("job")
@click.option("--registered", is_flag=True,
              help="Wait only until all the job's ranks have registered as live consumers (then "
                   "the session is ready to stream), not until the job ends.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0, min_open=True),
              default=DEFAULT_WAIT_S, show_default=True, help="Seconds to wait at most.")
def wait(client: Client, as_json: bool, session: str, job: str, registered: bool,
         timeout_s: float) -> None:
    """Wait until JOB has finished (or, with --registered, its ranks are live), then print it.

    Exit status: 0 when the job succeeded (with --registered: when its ranks are live); 1 when it
    failed, was cancelled or lost (with --registered: it ended, or the session did, before its
    ranks registered); 124 when --timeout ran out first.
    """
    try:
        if registered:
            client.wait_registered(session, job, timeout_s)
            seen = client.job(session, job)
        else:
            seen = client.wait_job(session, job, timeout_s)
    except WaitTimeout as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_TIMEOUT) from None
    except WaitError as exc:
        _print_job(exc.last, as_json)
        raise OneLineError(str(exc)) from None
    _print_job(seen, as_json)
    if not registered and seen.state != "succeeded":
        raise OneLineError(f"job {job} {seen.state}"
                           + ("" if seen.detail == seen.state else f": {seen.detail}"))


def _print_job(job: object, as_json: bool) -> None:
    if isinstance(job, Job):
        _print([job], JOB_COLUMNS, as_json, single=True)


# --- scans ---------------------------------------------------------------------------------------

@click.group()
def scans() -> None:
    """List and inspect recorded scan results: output file, checksum, counters (project token)."""


@scans.command("list")
@_with_client
@click.option("--project", default=None, help="The project to list. [default: the token's]")
@click.option("--session", default=None, help="Only this session's results.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="At most this many results, oldest first.")
def list_scans(client: Client, as_json: bool, project: str | None, session: str | None,
               limit: int) -> None:
    """List recorded scan results, oldest first: the project's, or one session's."""
    found = client.scans(project, session=session, limit=limit)
    _print(found, SCAN_COLUMNS, as_json)


@scans.command("show")
@_with_client
@click.argument("session")
@click.argument("scan", type=click.IntRange(0))
def show_scan(client: Client, as_json: bool, session: str, scan: int) -> None:
    """Show every result of one scan: the consumer job's and, if it spooled or interrupted the
    scan, the gateway's; with the output file, its SHA-256 and the sectors lost (--json: the
    loss manifest itself)."""
    _print(client.scan_results(session, scan), SCAN_DETAIL_COLUMNS, as_json,
           cells=lambda r: {"manifest": _manifest(r.loss_manifest, r.manifest_truncated)})


def _manifest(entries: tuple[tuple[int, int, str], ...], truncated: bool) -> str:
    return f"{len(entries)} entries{' (truncated)' if truncated else ''}"
