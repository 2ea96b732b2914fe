"""``dsn controlplane serve`` and ``dsn admin ...``: run the control plane and administer it.

``dsn admin init`` works on the state directory directly (it creates the store, the first signing key
and the first admin token). ``dsn admin audit verify --offline`` reads the state directory's database.
Every other admin command talks HTTP to the running service with the admin token read from a file or
the ``DSN_ADMIN_TOKEN`` environment variable, never from argv, so it cannot leak through ``ps`` or
shell history. Service errors (problem+json) become one line on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import re
import shutil
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from controlplane.audit import AuditLog
from controlplane.errors import ConfigurationError, ControlPlaneError
from controlplane.policy import PolicySet, lint, load_policies
from controlplane.settings import DEFAULT_PORT, DEFAULT_STATE_ENDPOINTS, Settings
from controlplane.signing import KeyRing
from controlplane.store import Store, TokenRecord
from controlplane.tokens import TokenKind, TokenService
from dataplane.cli import template_params
from dataplane.clone import StateEndpoints
from dataplane.keys import create_keypair
from dataplane.logs import configure as configure_logging

DEFAULT_STATE_DIR = Path(".dsn")
DEFAULT_URL = "http://127.0.0.1:8750"
ADMIN_TOKEN_FILE = "admin.token"
ADMIN_TOKEN_ENV = "DSN_ADMIN_TOKEN"
HTTP_TIMEOUT_S = 30.0
_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

F = TypeVar("F", bound=Callable[..., Any])


class AdminError(click.ClickException):
    """A failure the admin can act on: printed as one ``error: ...`` line, exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {_one_line(self.message)}", err=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- the state directory -------------------------------------------------------------------------

def _private_dir(path: Path) -> None:
    """Create ``path`` 0700; an existing directory others can read is tightened, not trusted."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o700)


def _write_secret(path: Path, text: str) -> None:
    """Write a new 0600 file; O_EXCL so an existing token is never overwritten or followed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")


def _settings(state_dir: Path, **overrides: Any) -> Settings:
    """Settings from the options the admin gave; the rest keep Settings' defaults."""
    return Settings(state_dir=state_dir,
                    **{key: value for key, value in overrides.items() if value is not None})


async def initialize(state_dir: Path, *, policy_path: Path | None = None,
                     now: float | None = None) -> str:
    """Create the state directory, store, first signing key and first admin token; return the token.

    The token is written to ``state_dir/admin.token`` (0600) and nowhere else; the store keeps its
    metadata only. ConfigurationError if the directory is already initialised.
    """
    settings = Settings(state_dir=state_dir)
    token_path = state_dir / ADMIN_TOKEN_FILE
    if token_path.exists() or settings.database.exists():
        raise ConfigurationError(f"{state_dir} is already initialised")
    policy = load_policies(policy_path or settings.policy_path)
    clock: Callable[[], float] = time.time if now is None else (lambda: now)
    await asyncio.to_thread(_private_dir, state_dir)
    store = await Store.open(settings.database)
    try:
        keyring = await KeyRing.load(state_dir, store, clock=clock)
        await keyring.create()
        await asyncio.to_thread(_gateway_keys, settings)
        await asyncio.to_thread(_state_keys, settings)
        return await _first_admin_token(settings, policy, store, keyring, clock, token_path)
    finally:
        await store.close()


def _gateway_keys(settings: Settings) -> None:
    """The gateway's CURVE key pair, handed to producers when sessions open; a gateway on another
    host replaces it with its own public key (``dsn gateway keygen``)."""
    if not settings.gateway_public_key_file.exists():
        create_keypair(settings.gateway_public_key_file.parent,
                       settings.gateway_public_key_file.name.removesuffix(".key"))


def _state_keys(settings: Settings) -> None:
    """The state service's CURVE key pair, and the local gateway's public key as the first entry
    of the gateways allowed to subscribe (the one-host default; an admin adds a remote gateway by
    copying its public ``.key`` file into ``STATE_DIR/gateways/``)."""
    if not settings.state_secret_key_file.exists():
        create_keypair(settings.state_secret_key_file.parent, "state")
    _private_dir(settings.gateways_dir)
    local = settings.gateways_dir / "local.key"
    if not local.exists():
        shutil.copyfile(settings.gateway_public_key_file, local)


async def _first_admin_token(settings: Settings, policy: PolicySet, store: Store, keyring: KeyRing,
                             clock: Callable[[], float], token_path: Path) -> str:
    kind = TokenKind.ADMIN
    service = TokenService(settings.issuer, keyring, clock=clock, leeway_s=settings.leeway_s,
                           lifetime_caps={kind: policy.lifetime_cap(kind)})
    token, claims = service.issue(kind=kind, subject="admin", project=None,
                                  scope=policy.admin_scopes(), ttl_s=policy.lifetime_cap(kind),
                                  audience=settings.api_audience)
    await store.add_token(TokenRecord(
        jti=claims.jti, project=None, kind=kind.value, subject=claims.sub,
        scope=" ".join(sorted(claims.scope)), issued_at=float(claims.iat),
        expires_at=float(claims.exp)))
    await AuditLog(store, clock=clock).record(
        principal="admin-cli", action="admin.init", resource=f"token:{claims.jti}",
        decision="allow", rule="bootstrap", request_id=f"init-{uuid.uuid4()}")
    await asyncio.to_thread(_write_secret, token_path, token)
    return token


async def _require_initialised(settings: Settings) -> None:
    """Fail closed: never serve (and so never mint an admin) from an uninitialised directory."""
    hint = f"run 'dsn admin init --state-dir {settings.state_dir}' first"
    if not settings.database.is_file():
        raise ConfigurationError(f"{settings.state_dir} is not initialised; {hint}")
    store = await Store.open(settings.database)
    try:
        if not await store.list_signing_keys():
            raise ConfigurationError(f"{settings.state_dir} has no signing key; {hint}")
    finally:
        await store.close()
    if not settings.state_secret_key_file.is_file():
        raise ConfigurationError(f"{settings.state_dir} has no state service key "
                                 f"({settings.state_secret_key_file}); it was initialised by an "
                                 "older version: create the key pair with 'dsn gateway keygen' "
                                 "and rename it to state.key / state.key_secret")


async def _verify_offline(state_dir: Path) -> dict[str, Any]:
    database = Settings(state_dir=state_dir).database
    if not database.is_file():
        raise AdminError(f"no control plane database at {database}")
    try:
        store = await Store.open(database)
    except ControlPlaneError as exc:
        raise AdminError(exc.detail) from None
    try:
        result = await AuditLog(store).verify()
    except ControlPlaneError as exc:
        raise AdminError(exc.detail) from None
    finally:
        await store.close()
    return dataclasses.asdict(result)


# --- talking to the service ----------------------------------------------------------------------

class ApiClient:
    """A small synchronous JSON client: one admin command is one or two requests."""

    def __init__(self, url: str, token: str, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> Any:
        """``method path`` with ``body`` as JSON and any extra ``headers`` (If-Match ...)."""
        data = None if body is None else json.dumps(body).encode()
        sent = {"Authorization": f"Bearer {self._token}", "Accept": "application/json",
                **(headers or {})}
        if data is not None:
            sent["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            with exc:  # closes the error response's socket
                raise AdminError(_problem_message(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"cannot reach the control plane at {self.url}: {reason}") from None
        return json.loads(raw) if raw else None


def _problem_message(exc: urllib.error.HTTPError) -> str:
    """One line from an RFC 9457 problem: status, title, detail, field errors and the request id."""
    try:
        problem = json.loads(exc.read() or b"{}")
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    line = f"{exc.code} {problem.get('title') or exc.reason}"
    detail = problem.get("detail")
    if detail and detail != problem.get("title"):
        line += f": {detail}"
    fields = [f"{e.get('field', '?')}: {e.get('message', '')}" for e in problem.get("errors") or []
              if isinstance(e, dict)]
    if fields:
        line += " (" + "; ".join(fields) + ")"
    if problem.get("request_id"):
        line += f" [request {problem['request_id']}]"
    return line


def _admin_token(token_file: Path | None, state_dir: Path) -> str:
    """The admin token: ``--token-file``, else $DSN_ADMIN_TOKEN, else STATE_DIR/admin.token."""
    if token_file is None and os.environ.get(ADMIN_TOKEN_ENV, "").strip():
        return os.environ[ADMIN_TOKEN_ENV].strip()
    path = token_file or state_dir / ADMIN_TOKEN_FILE
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text().strip()
    except FileNotFoundError:
        raise AdminError(f"no admin token: {path} does not exist (run 'dsn admin init', pass "
                         f"--token-file or set {ADMIN_TOKEN_ENV})") from None
    except OSError as exc:
        raise AdminError(f"cannot read the admin token file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise AdminError(f"{path} is readable by others (mode {mode:04o}); chmod 600 it first")
    if not text:
        raise AdminError(f"the admin token file {path} is empty")
    return text


def _client_options(func: F) -> F:
    """Add --url, --state-dir and --token-file: where the service is and where the token is."""
    func = click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
                        help=f"File with the admin token (0600). Default: ${ADMIN_TOKEN_ENV}, "
                             "else STATE_DIR/admin.token.")(func)
    func = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=DEFAULT_STATE_DIR, show_default=True,
                        help="State directory holding admin.token.")(func)
    return click.option("--url", default=DEFAULT_URL, show_default=True,
                        envvar="DSN_CONTROLPLANE_URL",
                        help="Control plane base URL (env DSN_CONTROLPLANE_URL).")(func)


def _with_client(func: F) -> F:
    """The client options, turned into an authenticated ``client`` argument."""
    @_client_options
    @functools.wraps(func)
    def wrapper(url: str, state_dir: Path, token_file: Path | None, **kwargs: Any) -> Any:
        return func(ApiClient(url, _admin_token(token_file, state_dir)), **kwargs)
    return wrapper  # type: ignore[return-value]


def _json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print raw JSON.")(func)


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


# --- output --------------------------------------------------------------------------------------

def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def _show(rows: list[dict[str, Any]], columns: list[tuple[str, str]], *, as_json: bool,
          single: bool = False) -> None:
    """Rows as JSON (one object when ``single``) or as a table."""
    if as_json:
        _echo_json(rows[0] if single else rows)
    else:
        _table(rows, columns)


def _table(rows: Iterable[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    """Print ``rows`` as aligned columns ``(key, header)``; missing values print as '-'."""
    cells = [[header for _key, header in columns]]
    cells += [[_cell(row.get(key)) for key, _header in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


def _items(payload: Any, key: str) -> list[dict[str, Any]]:
    """A list response, whether the service sends a bare list or ``{key: [...]}``."""
    if isinstance(payload, dict):
        payload = payload.get(key, payload.get("items", []))
    return list(payload or [])


def _parse_duration(text: str) -> int:
    match = _DURATION.match(text.strip().lower())
    if not match or int(match.group(1)) <= 0:
        raise click.BadParameter(f"{text!r} is not a duration like 3600, 90m, 12h, 30d or 2w")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _parse_instant(text: str) -> str:
    """``now`` or an ISO 8601 time, sent as UTC ISO 8601."""
    if text.strip().lower() == "now":
        return datetime.now(UTC).isoformat(timespec="seconds")
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not 'now' or an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise click.BadParameter(f"{text!r} has no time zone; add Z or +00:00")
    return moment.astimezone(UTC).isoformat(timespec="seconds")


# --- dsn controlplane serve ----------------------------------------------------------------------

@click.group(name="controlplane")
def controlplane_group() -> None:
    """Run the control plane: the REST service for projects, tokens, policies and audit."""


@controlplane_group.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_STATE_DIR, show_default=True,
              help="State directory made by 'dsn admin init' (database, signing keys).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port to listen on.")
@click.option("--policy", "policy_path", type=click.Path(exists=True, path_type=Path),
              help="Policy file, or directory of *.yaml policy files; reloads re-read it. "
                   "Default: the shipped policies/.")
@click.option("--state-snapshots", metavar="tcp://IP:PORT", default=None,
              help="Where gateways fetch session snapshots.  [default: tcp://127.0.0.1:8751]")
@click.option("--state-updates", metavar="tcp://IP:PORT", default=None,
              help="Where gateways subscribe to session updates.  [default: tcp://127.0.0.1:8752]")
@click.option("--gateway-endpoint", metavar="tcp://IP:PORT", default=None,
              help="The gateway ingress handed to producers when sessions open.  "
                   "[default: tcp://127.0.0.1:5555]")
@click.option("--gateway-plain-endpoint", metavar="tcp://IP:PORT", default=None,
              help="The gateway's plaintext ingress (its --plain-ingress), handed to producers "
                   "of sessions opened with transport 'plain'; only where the policy sets "
                   "allow_plaintext.  [default: none]")
def serve(state_dir: Path, host: str, port: int, policy_path: Path | None,
          state_snapshots: str | None, state_updates: str | None,
          gateway_endpoint: str | None, gateway_plain_endpoint: str | None) -> None:
    """Serve the REST API until SIGINT or SIGTERM.

    Refuses to start on a state directory that 'dsn admin init' has not initialised: the service
    never creates keys or an admin token by itself.
    """
    from aiohttp import web  # the web stack loads only for the command that serves

    from controlplane.app import create_app
    from controlplane.middlewares import AccessLogger, quiet_protocol_errors

    try:
        endpoints = StateEndpoints(state_snapshots or DEFAULT_STATE_ENDPOINTS.snapshot,
                                   state_updates or DEFAULT_STATE_ENDPOINTS.updates)
        settings = _settings(state_dir, host=host, port=port, policy_path=policy_path,
                             state_endpoints=endpoints, gateway_endpoint=gateway_endpoint,
                             gateway_plain_endpoint=gateway_plain_endpoint)
        asyncio.run(_require_initialised(settings))
        app = create_app(settings)
    except ControlPlaneError as exc:
        raise AdminError(exc.detail) from None

    def announce(_message: str) -> None:  # called once the socket is bound
        click.echo(f"control plane on {settings.base_url} (state {state_dir})", err=True)

    # JSON lines on stderr. Tokens travel only in the Authorization header, which is not logged;
    # the access log names the path without its query string, where a client might put one.
    configure_logging("dsn")
    configure_logging("aiohttp.access")
    configure_logging("aiohttp.server")
    quiet_protocol_errors()
    try:
        web.run_app(app, host=host, port=port, print=announce, handle_signals=True,
                    access_log_class=AccessLogger)
    except OSError as exc:
        raise AdminError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except ControlPlaneError as exc:
        raise AdminError(exc.detail) from None


# --- dsn admin -----------------------------------------------------------------------------------

@click.group()
def admin() -> None:
    """Administer the control plane: init, projects, tokens, keys, policies, audit.

    Apart from 'init', 'policies check' and 'audit verify --offline', commands talk to the running
    service (--url, default http://127.0.0.1:8750) with the admin token from --token-file,
    $DSN_ADMIN_TOKEN or STATE_DIR/admin.token. Tokens are never accepted on the command line.
    """


@admin.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_STATE_DIR, show_default=True,
              help="State directory to create (0700): database, signing keys, admin.token.")
@click.option("--policy", "policy_path", type=click.Path(exists=True, path_type=Path),
              help="Policy file or directory giving the admin token's scopes and lifetime. "
                   "Default: the shipped policies/.")
def init(state_dir: Path, policy_path: Path | None) -> None:
    """Create the state directory, the first signing key, the gateway's and the state service's
    CURVE key pairs (the local gateway allowed to subscribe) and the first admin token.

    The token is written to STATE_DIR/admin.token (0600) and printed once; it is not stored
    anywhere else (the database keeps only its id). Refuses an already initialised directory.
    """
    try:
        token = asyncio.run(initialize(state_dir, policy_path=policy_path))
    except ControlPlaneError as exc:
        raise AdminError(exc.detail) from None
    click.echo(f"gateway CURVE keys in {state_dir / 'keys'} (server.key, server.key_secret)",
               err=True)
    click.echo(f"state service CURVE keys in {state_dir / 'keys'} (state.key, state.key_secret); "
               f"gateways allowed to subscribe: {state_dir / 'gateways'}/*.key", err=True)
    click.echo(f"admin token written to {state_dir / ADMIN_TOKEN_FILE} (0600); "
               "it is shown only this once:", err=True)
    click.echo(token)


# projects

@admin.group()
def projects() -> None:
    """Create, list, show and update projects."""


def _project_fields(func: F) -> F:
    func = click.option("--template", "templates", multiple=True, metavar="NAME",
                        help="A DSN template the project may use (repeatable).")(func)
    return click.option("--quota", "quotas", multiple=True, metavar="KEY=N",
                        help="A quota, e.g. sessions=4 (repeatable).")(func)


def _quotas(pairs: tuple[str, ...]) -> dict[str, int]:
    quotas: dict[str, int] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value.isdigit():
            raise click.BadParameter(f"{pair!r} is not KEY=N", param_hint="--quota")
        quotas[key] = int(value)
    return quotas


def _project_body(templates: tuple[str, ...], quotas: tuple[str, ...]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if templates:
        body["allowed_templates"] = list(templates)
    if quotas:
        body["quotas"] = _quotas(quotas)
    return body


_PROJECT_COLUMNS = [("name", "NAME"), ("allowed_templates", "TEMPLATES"), ("quotas", "QUOTAS"),
                    ("not_before", "NOT BEFORE"), ("created_at", "CREATED")]


@projects.command("create")
@click.argument("name")
@_project_fields
@_with_client
@_json_option
def projects_create(client: ApiClient, name: str, templates: tuple[str, ...],
                    quotas: tuple[str, ...], as_json: bool) -> None:
    """Create project NAME (lower-case letters, digits, '-' and '_')."""
    project = client.call("POST", "/api/v1/projects",
                          {"name": name, **_project_body(templates, quotas)})
    _show_projects([project], as_json=as_json, single=True)


@projects.command("list")
@_with_client
@_json_option
def projects_list(client: ApiClient, as_json: bool) -> None:
    """List every project."""
    _show_projects(_items(client.call("GET", "/api/v1/projects"), "projects"), as_json=as_json)


@projects.command("show")
@click.argument("name")
@_with_client
@_json_option
def projects_show(client: ApiClient, name: str, as_json: bool) -> None:
    """Show project NAME."""
    project = client.call("GET", f"/api/v1/projects/{_quote(name)}")
    _show_projects([project], as_json=as_json, single=True)


@projects.command("update")
@click.argument("name")
@_project_fields
@click.option("--not-before", metavar="TIME",
              help="Reject the project's tokens issued before TIME ('now' or ISO 8601 with a "
                   "zone); 'now' invalidates every existing token of the project at once.")
@_with_client
@_json_option
def projects_update(client: ApiClient, name: str, templates: tuple[str, ...],
                    quotas: tuple[str, ...], not_before: str | None, as_json: bool) -> None:
    """Change project NAME's templates, quotas or not-before time (only the options given).

    --template replaces the whole template list and --quota the whole quota map.
    """
    body = _project_body(templates, quotas)
    if not_before is not None:
        body["not_before"] = _parse_instant(not_before)
    if not body:
        raise click.UsageError("nothing to update: give --template, --quota or --not-before")
    project = client.call("PATCH", f"/api/v1/projects/{_quote(name)}", body)
    _show_projects([project], as_json=as_json, single=True)


def _show_projects(rows: list[dict[str, Any]], *, as_json: bool, single: bool = False) -> None:
    _show(rows, _PROJECT_COLUMNS, as_json=as_json, single=single)


# tokens

@admin.group()
def tokens() -> None:
    """Issue, list and revoke project tokens."""


_TOKEN_COLUMNS = [("jti", "JTI"), ("subject", "SUBJECT"), ("kind", "KIND"), ("scope", "SCOPE"),
                  ("issued_at", "ISSUED"), ("expires_at", "EXPIRES"), ("revoked_at", "REVOKED")]


@tokens.command("issue")
@click.argument("project")
@click.option("--subject", required=True, help="Who holds the token (a client, script or person).")
@click.option("--scope", "scopes", multiple=True, metavar="SCOPE",
              help="A scope granted, e.g. sessions:write (repeatable). Default: every scope the "
                   "policy grants project tokens.")
@click.option("--ttl", metavar="DURATION",
              help="Lifetime: seconds or 90m, 12h, 30d, 2w. Default and maximum: the policy's cap.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the token to this new 0600 file instead of stdout.")
@_with_client
def tokens_issue(client: ApiClient, project: str, subject: str, scopes: tuple[str, ...],
                 ttl: str | None, out_file: Path | None) -> None:
    """Issue a project token for PROJECT; it is shown (or written) once and never again.

    The token goes to stdout (or --out), its id and expiry to stderr, so
    'dsn admin tokens issue ... > token' captures only the token.
    """
    body: dict[str, object] = {"subject": subject}
    if scopes:
        body["scope"] = " ".join(scopes)
    if ttl is not None:
        body["ttl"] = _parse_duration(ttl)
    if out_file is not None and out_file.exists():
        raise AdminError(f"{out_file} exists; refusing to overwrite it")
    issued = client.call("POST", f"/api/v1/projects/{_quote(project)}/tokens", body)
    token = issued.get("token") if isinstance(issued, dict) else None
    if not token:
        raise AdminError("the control plane returned no token")
    summary = {k: v for k, v in issued.items() if k != "token"}
    if out_file is not None:
        _write_secret(out_file, token)
        click.echo(f"token written to {out_file} (0600): {_summary(summary)}")
    else:
        click.echo(_summary(summary), err=True)
        click.echo(token)


def _summary(fields: dict[str, Any]) -> str:
    keys = ("jti", "project", "subject", "scope", "expires_at")
    return " ".join(f"{k}={_cell(fields[k])}" for k in keys if k in fields)


@tokens.command("list")
@click.argument("project")
@_with_client
@_json_option
def tokens_list(client: ApiClient, project: str, as_json: bool) -> None:
    """List PROJECT's tokens: ids and metadata only, never the tokens themselves."""
    rows = _items(client.call("GET", f"/api/v1/projects/{_quote(project)}/tokens"), "tokens")
    _show(rows, _TOKEN_COLUMNS, as_json=as_json)


@tokens.command("revoke")
@click.argument("jti")
@_with_client
def tokens_revoke(client: ApiClient, jti: str) -> None:
    """Revoke token JTI at once; revoking it again is harmless."""
    client.call("DELETE", f"/api/v1/tokens/{_quote(jti)}")
    click.echo(f"revoked {jti}")


# keys

@admin.group()
def keys() -> None:
    """Manage the token signing keys (Ed25519)."""


@keys.command("rotate")
@_with_client
@_json_option
def keys_rotate(client: ApiClient, as_json: bool) -> None:
    """Create a new signing key; it signs from now on, older published keys still verify."""
    result = client.call("POST", "/api/v1/keys/rotate")
    if as_json:
        _echo_json(result)
    else:
        click.echo(f"new signing key {_cell(result.get('kid'))}; published: "
                   f"{_cell(result.get('published'))}; retired: {_cell(result.get('retired'))}")


# policies

@admin.group()
def policies() -> None:
    """Check a policy file locally, show or reload the service's active policy set."""


@policies.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def policies_check(file: Path) -> None:
    """Lint policy FILE without a running service; exit 1 listing every problem."""
    problems = lint(file)
    if problems:
        for problem in problems:  # each already names the file (and section) at fault
            click.echo(_one_line(problem), err=True)
        raise AdminError(f"{file}: {len(problems)} problem(s)")
    click.echo(f"{file}: ok")


@policies.command("show")
@_with_client
def policies_show(client: ApiClient) -> None:
    """Print the service's active policy set as JSON."""
    _echo_json(client.call("GET", "/api/v1/policies"))


@policies.command("reload")
@_with_client
def policies_reload(client: ApiClient) -> None:
    """Make the service re-read its policy file; an invalid file is refused and the old set stays."""
    result = client.call("POST", "/api/v1/policies/reload")
    if not result.get("ok"):
        for problem in result.get("problems") or []:
            click.echo(f"policy: {_one_line(problem)}", err=True)
        raise AdminError("reload refused; the previous policy set stays active")
    click.echo(f"policies reloaded from {_cell(result.get('sources'))}")


# audit

@admin.group()
def audit() -> None:
    """Read and verify the hash-chained audit log."""


_AUDIT_COLUMNS = [("seq", "SEQ"), ("ts", "TIME"), ("principal", "PRINCIPAL"),
                  ("action", "ACTION"), ("resource", "RESOURCE"), ("decision", "DECISION"),
                  ("rule", "RULE/REASON"), ("request_id", "REQUEST")]


@audit.command("show")
@click.option("--after", "after_seq", type=click.IntRange(0), default=0, show_default=True,
              help="Show records after this sequence number.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="At most this many records.")
@_with_client
@_json_option
def audit_show(client: ApiClient, after_seq: int, limit: int, as_json: bool) -> None:
    """Show audit records, oldest first."""
    query = urllib.parse.urlencode({"after": after_seq, "limit": limit})
    rows = _items(client.call("GET", f"/api/v1/audit?{query}"), "records")
    _show(rows, _AUDIT_COLUMNS, as_json=as_json)


@audit.command("verify")
@click.option("--offline", is_flag=True,
              help="Check STATE_DIR's database directly, without the service or a token.")
@_client_options
def audit_verify(url: str, state_dir: Path, token_file: Path | None, offline: bool) -> None:
    """Check the hash chain: any edited, inserted or deleted record makes this exit 1."""
    if offline:
        result = asyncio.run(_verify_offline(state_dir))
    else:
        result = ApiClient(url, _admin_token(token_file, state_dir)).call(
            "GET", "/api/v1/audit/verify")
    if not result.get("ok"):
        raise AdminError(f"audit chain broken at record {_cell(result.get('first_bad_seq'))}: "
                         f"{_cell(result.get('problem'))}")
    click.echo(f"audit chain ok: {result.get('records')} records")


# templates

@admin.group()
def templates() -> None:
    """List, show, edit, render, diff and roll back the versioned DSN and job templates.

    Every save makes a new version. 'edit' and 'rollback' send If-Match with the latest ETag the
    service holds unless --if-match names the one your edit started from (safer: a change made
    meanwhile is then refused with 412 instead of overwritten).
    """


def _if_match_option(func: F) -> F:
    return click.option("--if-match", "if_match", metavar="ETAG",
                        help="The ETag your change is based on (default: the latest version's; "
                             "see 'templates history').")(func)


def _template_path(name: str, suffix: str = "") -> str:
    return f"/api/v1/templates/{_quote(name)}{suffix}"


def _latest_etag(client: ApiClient, name: str) -> str:
    """The latest version's ETag, a deletion included (so a deleted template can be rolled back)."""
    versions = _items(client.call("GET", _template_path(name, "/versions")), "versions")
    return str(versions[-1]["etag"])


_TEMPLATE_COLUMNS = [("name", "NAME"), ("kind", "KIND"), ("version", "VERSION"),
                     ("author", "AUTHOR"), ("created_at", "CREATED"), ("etag", "ETAG")]
_VERSION_COLUMNS = [("version", "VERSION"), ("kind", "KIND"), ("deleted", "DELETED"),
                    ("author", "AUTHOR"), ("created_at", "CREATED"), ("etag", "ETAG")]


@templates.command("list")
@_with_client
@_json_option
def templates_list(client: ApiClient, as_json: bool) -> None:
    """List the current templates."""
    _show(_items(client.call("GET", "/api/v1/templates"), "templates"), _TEMPLATE_COLUMNS,
          as_json=as_json)


@templates.command("show")
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(1), help="An earlier version.")
@_with_client
@_json_option
def templates_show(client: ApiClient, name: str, version: int | None, as_json: bool) -> None:
    """Print template NAME's source (the current version unless --version); ETag on stderr."""
    path = _template_path(name, "" if version is None else f"/versions/{version}")
    found = client.call("GET", path)
    if as_json:
        _echo_json(found)
        return
    click.echo(f"{name} v{found['version']} {found['etag']}", err=True)
    click.echo(found["source"], nl=False)


@templates.command("edit")
@click.argument("name")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@_if_match_option
@click.option("--create", is_flag=True, help="Create a new template (If-None-Match: *).")
@_with_client
def templates_edit(client: ApiClient, name: str, file: IO[str], if_match: str | None,
                   create: bool) -> None:
    """Save FILE (template YAML; '-' for stdin) as the next version of template NAME."""
    if create and if_match:
        raise click.UsageError("--create and --if-match exclude each other")
    headers = ({"If-None-Match": "*"} if create
               else {"If-Match": if_match or _latest_etag(client, name)})
    saved = client.call("PUT", _template_path(name), {"source": file.read()}, headers)
    click.echo(f"saved {name} v{saved['version']} {saved['etag']}")


@templates.command("delete")
@click.argument("name")
@_if_match_option
@_with_client
def templates_delete(client: ApiClient, name: str, if_match: str | None) -> None:
    """Delete template NAME (its history stays; 'rollback' restores it)."""
    tombstone = client.call("DELETE", _template_path(name), None,
                            {"If-Match": if_match or _latest_etag(client, name)})
    click.echo(f"deleted {name} (v{tombstone['version']})")


@templates.command("render")
@click.argument("name")
@click.option("--param", "pairs", multiple=True, metavar="NAME=VALUE",
              help="A parameter value, JSON where it parses: hwm=64, "
                   "'sources=[\"10.0.0.0/8\"]' (repeatable).")
@_with_client
@_json_option
def templates_render(client: ApiClient, name: str, pairs: tuple[str, ...], as_json: bool) -> None:
    """Dry-run template NAME with sample system values; print the rendered text."""
    body = {"params": template_params(pairs)}
    rendered = client.call("POST", _template_path(name, "/render"), body)
    if as_json:
        _echo_json(rendered)
    else:
        click.echo(rendered["text"], nl=False)


@templates.command("history")
@click.argument("name")
@_with_client
@_json_option
def templates_history(client: ApiClient, name: str, as_json: bool) -> None:
    """List every version of template NAME, oldest first."""
    _show(_items(client.call("GET", _template_path(name, "/versions")), "versions"),
          _VERSION_COLUMNS, as_json=as_json)


@templates.command("diff")
@click.argument("name")
@click.argument("old", type=click.IntRange(1))
@click.argument("new", type=click.IntRange(1))
@_with_client
def templates_diff(client: ApiClient, name: str, old: int, new: int) -> None:
    """Print the unified diff of template NAME from version OLD to version NEW."""
    query = urllib.parse.urlencode({"from": old, "to": new})
    click.echo(client.call("GET", _template_path(name, f"/diff?{query}"))["diff"], nl=False)


@templates.command("rollback")
@click.argument("name")
@click.argument("version", type=click.IntRange(1))
@_if_match_option
@_with_client
def templates_rollback(client: ApiClient, name: str, version: int,
                       if_match: str | None) -> None:
    """Save VERSION's source as the next version of template NAME."""
    saved = client.call("POST", _template_path(name, "/rollback"), {"version": version},
                        {"If-Match": if_match or _latest_etag(client, name)})
    click.echo(f"rolled {name} back to v{version}'s source as v{saved['version']} {saved['etag']}")
