"""``dsn admin ...``: the click command tree.

Apart from ``init``, ``policies check`` and ``audit verify --offline``, which work on local files,
every command is one or two REST calls with the admin token (see ``client``). A refusal from the
service, or anything else the admin can act on, is one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import asyncio
import functools
import re
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from common.clitypes import (
    CONTROLPLANE_URLS_HELP,
    ControlPlaneURLs,
    OneLineError,
    template_params,
)
from common.output import cell, echo_json, show, summary
from common.privatefs import create_private_file
from common.restclient import quote
from controlplane.admin.bootstrap import (
    ADMIN_TOKEN_FILE,
    FIRST_ADMIN,
    initialize,
    verify_offline,
)
from controlplane.admin.bootstrap import join as join_database
from controlplane.admin.bootstrap import recover as recover_admin
from controlplane.admin.client import ADMIN_TOKEN_ENV, AdminClient, template_path
from controlplane.policy import lint
from controlplane.settings import DEFAULT_STATE_DIR

DEFAULT_URL = "http://127.0.0.1:8750"
_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

F = TypeVar("F", bound=Callable[..., Any])


def _client_options(func: F) -> F:
    """Add --url, --state-dir and --token-file: where the service is and where the token is."""
    func = click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
                        help=f"File with your admin token (0600). Or set ${ADMIN_TOKEN_ENV} "
                             "instead (not both: that is an error); neither: "
                             "STATE_DIR/admin.token.")(func)
    func = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=DEFAULT_STATE_DIR, show_default=True,
                        help="State directory holding admin.token.")(func)
    return click.option("--url", "urls", type=ControlPlaneURLs(), default=DEFAULT_URL,
                        show_default=True, envvar="DSN_CONTROLPLANE_URL", metavar="URL[,URL...]",
                        help=f"{CONTROLPLANE_URLS_HELP} Or set DSN_CONTROLPLANE_URL.")(func)


def _with_client(func: Callable[..., None]) -> Callable[..., None]:
    """The client options, turned into an authenticated ``client`` argument."""
    @_client_options
    @functools.wraps(func)
    def wrapper(urls: tuple[str, ...], state_dir: Path, token_file: Path | None,
                **kwargs: Any) -> None:
        func(AdminClient.found(urls, token_file, state_dir), **kwargs)
    return wrapper


def _json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print raw JSON.")(func)


def parse_duration(text: str) -> int:
    match = _DURATION.match(text.strip().lower())
    if not match or int(match.group(1)) <= 0:
        raise click.BadParameter(f"{text!r} is not a duration like 3600, 90m, 12h, 30d or 2w")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_instant(text: str) -> str:
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



@click.group()
def admin() -> None:
    """Administer the control plane: init, admins, projects, tokens, keys, policies, audit.

    Apart from 'init', 'recover', 'policies check' and 'audit verify --offline', commands talk to
    the running service (--url, default http://127.0.0.1:8750; its replicas' URLs comma-separated
    where it runs several) with your admin token from
    --token-file or $DSN_ADMIN_TOKEN (one of them, not both), else STATE_DIR/admin.token. Tokens
    are never accepted on the command line.
    """


def _policy_option(func: F) -> F:
    return click.option("--policy", "policy_path", type=click.Path(exists=True, path_type=Path),
                        help="Policy file or directory giving admin tokens their scopes and "
                             "longest lifetime (the service's). Default: the shipped "
                             "policies/.")(func)


def _database_url_option(what: str) -> Callable[[F], F]:
    return click.option("--database-url", metavar="URL", envvar="DSN_DATABASE_URL", default=None,
                        help=f"{what} A PostgreSQL URL, postgresql://USER@HOST/DB; best given as "
                             "DSN_DATABASE_URL, its password in ~/.pgpass or PGPASSWORD, never on "
                             "a command line.  [default: STATE_DIR/controlplane.sqlite3]")


def _admin_name_option(help_text: str, default: str | None = None) -> Callable[[F], F]:
    return click.option("--name", default=default, required=default is None, metavar="NAME",
                        show_default=default is not None, help=help_text)


@admin.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_STATE_DIR, show_default=True,
              help="State directory to create (0700): database, signing keys, admin.token.")
@_admin_name_option("The first admin's name (lower-case letters, digits, '-', '_'): the 'sub' "
                    "of its tokens, named in every audit record of what it does.",
                    default=FIRST_ADMIN)
@_policy_option
@_database_url_option("Initialise this PostgreSQL database (existing and empty) instead of the "
                      "SQLite file in the state directory: the one the service is then given "
                      "(dsn controlplane serve --database-url).")
@click.option("--join", is_flag=True,
              help="Make the state directory of another replica on the PostgreSQL database "
                   "--database-url, which is initialised already: its own signing key, published "
                   "there, and its own CURVE key pairs; no admin is added.")
def init(state_dir: Path, name: str, policy_path: Path | None, database_url: str | None,
         join: bool) -> None:
    """Create the state directory, the first signing key, the gateway's and the state service's
    CURVE key pairs (the local gateway allowed to subscribe) and the first admin with its token.

    The token is written to STATE_DIR/admin.token (0600) and printed once; it is not stored
    anywhere else (the database keeps only its id). Refuses an already initialised directory, and
    a database that has a signing key already, unless --join: then the database must have one,
    and the new directory gets a signing key of its own (replicas never share private keys).
    """
    if join:
        _join(state_dir, database_url)
        return
    token = asyncio.run(initialize(state_dir, name=name, policy_path=policy_path,
                                   database_url=database_url))
    click.echo(f"gateway CURVE keys in {state_dir / 'keys'} (server.key, server.key_secret)",
               err=True)
    click.echo(f"state service CURVE keys in {state_dir / 'keys'} (state.key, state.key_secret); "
               f"gateways allowed to subscribe: {state_dir / 'gateways'}/*.key", err=True)
    click.echo(f"token of admin {name!r} written to {state_dir / ADMIN_TOKEN_FILE} (0600); "
               "it is shown only this once:", err=True)
    click.echo(token)


def _join(state_dir: Path, database_url: str | None) -> None:
    if database_url is None:
        raise OneLineError("--join needs --database-url (DSN_DATABASE_URL): replicas share a "
                           "PostgreSQL database")
    kid = asyncio.run(join_database(state_dir, database_url=database_url))
    click.echo(f"signing key {kid} of {state_dir} published; gateway and state service CURVE "
               f"keys in {state_dir / 'keys'}", err=True)


@admin.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_STATE_DIR, show_default=True,
              help="The service's state directory (you need write access to it).")
@_admin_name_option("The admin to enable again (or to add) with a fresh token.")
@click.option("--out", "out_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="New file (0600) to write the token to.")
@click.option("--ttl", metavar="DURATION",
              help="Lifetime: seconds or 90m, 12h, 30d, 2w. Default and maximum: the policy's cap.")
@click.option("--revoke-others", is_flag=True,
              help="Revoke every other token of NAME too: do so if a lost token may have been "
                   "stolen. Without it they stay valid until they expire or are revoked.")
@_policy_option
@_database_url_option("The service's database, if its state is in PostgreSQL.")
def recover(state_dir: Path, name: str, out_file: Path, ttl: str | None, revoke_others: bool,
            policy_path: Path | None, database_url: str | None) -> None:
    """Offline recovery, for when every admin token is lost or expired: make admin NAME active
    again (or add it) and write a fresh token of it to --out.

    Works on STATE_DIR directly, whether the service runs or not, and needs no token: only write
    access to the state directory, which holds the signing keys anyway. The audit log records it
    as 'admin.recover' by 'offline:<your OS user>'.
    """
    claims = asyncio.run(recover_admin(state_dir, name=name, out=out_file,
                                       ttl_s=None if ttl is None else parse_duration(ttl),
                                       revoke_others=revoke_others, policy_path=policy_path,
                                       database_url=database_url))
    click.echo(f"admin {name!r} is active; token written to {out_file} (0600): jti={claims.jti} "
               f"expires_at={datetime.fromtimestamp(claims.exp, UTC):%Y-%m-%dT%H:%M:%SZ}")


@admin.command()
@_with_client
@_json_option
def whoami(client: AdminClient, as_json: bool) -> None:
    """Which admin your token belongs to, its id, when it expires, and where it was read from."""
    me = client.call("GET", "/api/v1/whoami")
    if as_json:
        echo_json({**me, "token_source": client.token_source})
        return
    click.echo(f"{cell(me.get('kind'))} {cell(me.get('subject'))}, token {cell(me.get('jti'))} "
               f"expires {cell(me.get('expires_at'))} (in {_span(me.get('expires_in'))}); "
               f"token from {client.token_source}")


def _span(seconds: object) -> str:
    """A duration for people: 29d 23h, 5h 12m, 40s."""
    if not isinstance(seconds, int):
        return "?"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {rest // 60}m" if hours else (f"{rest // 60}m" if rest >= 60 else f"{rest}s")


# admins

@admin.group()
def admins() -> None:
    """Add, list, show and remove admins, and issue or rotate their tokens.

    Admins are peers: any admin may add one, issue any admin a token and remove any admin but the
    last active one. Renew your own token before it expires ('admins token YOUR-NAME'); if every
    admin token is lost or expired, see 'dsn admin recover'.
    """


_ADMIN_COLUMNS = [("name", "NAME"), ("active", "ACTIVE"), ("live_tokens", "LIVE TOKENS"),
                  ("last_expiry", "LAST EXPIRY"), ("created_at", "CREATED"),
                  ("created_by", "CREATED BY"), ("removed_at", "REMOVED")]


def _out_option(func: F) -> F:
    return click.option("--out", "out_file", required=True,
                        type=click.Path(dir_okay=False, path_type=Path),
                        help="New file (0600) to write the token to; it is not shown.")(func)


def _ttl_option(func: F) -> F:
    return click.option("--ttl", metavar="DURATION",
                        help="Lifetime: seconds or 90m, 12h, 30d, 2w. Default and maximum: the "
                             "policy's cap.")(func)


@admins.command("add")
@click.argument("name")
@_out_option
@_ttl_option
@_with_client
def admins_add(client: AdminClient, name: str, out_file: Path, ttl: str | None) -> None:
    """Add admin NAME (or enable a removed one again) with its first token, written to --out.

    Hand the file to NAME; the token is shown nowhere else and the service keeps only its id.
    """
    body: dict[str, object] = {"name": name}
    if ttl is not None:
        body["ttl"] = parse_duration(ttl)
    _refuse_existing(out_file)
    _deliver(client.call("POST", "/api/v1/admins", body), out_file)


@admins.command("list")
@_with_client
@_json_option
def admins_list(client: AdminClient, as_json: bool) -> None:
    """List admins: active or removed, live tokens and when the last of them expires."""
    show(client.items("/api/v1/admins"), _ADMIN_COLUMNS, as_json=as_json)


@admins.command("show")
@click.argument("name")
@_with_client
@_json_option
def admins_show(client: AdminClient, name: str, as_json: bool) -> None:
    """List admin NAME's tokens: ids and metadata only (PARENT: the admin token that issued it)."""
    rows = client.items(f"/api/v1/admins/{quote(name)}/tokens")
    show(rows, [*_TOKEN_COLUMNS, ("parent_jti", "PARENT")], as_json=as_json)


@admins.command("token")
@click.argument("name")
@_out_option
@_ttl_option
@click.option("--revoke-others", is_flag=True,
              help="Revoke every other token of NAME at the same time (a rotation). Without it "
                   "they stay valid until they expire or are revoked.")
@_with_client
def admins_token(client: AdminClient, name: str, out_file: Path, ttl: str | None,
                 revoke_others: bool) -> None:
    """Issue admin NAME a new token, written to --out: renew yours before it expires, or rotate.

    With --revoke-others on your own name, the token you are using stops working: switch to the
    new file at once.
    """
    body: dict[str, object] = {"revoke_others": revoke_others}
    if ttl is not None:
        body["ttl"] = parse_duration(ttl)
    _refuse_existing(out_file)
    _deliver(client.call("POST", f"/api/v1/admins/{quote(name)}/tokens", body), out_file)


@admins.command("remove")
@click.argument("name")
@_with_client
def admins_remove(client: AdminClient, name: str) -> None:
    """Remove admin NAME and revoke all its tokens at once (the last active admin stays)."""
    client.call("DELETE", f"/api/v1/admins/{quote(name)}")
    click.echo(f"removed admin {name}; its tokens are revoked")


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
def projects_create(client: AdminClient, name: str, templates: tuple[str, ...],
                    quotas: tuple[str, ...], as_json: bool) -> None:
    """Create project NAME (lower-case letters, digits, '-' and '_')."""
    project = client.call("POST", "/api/v1/projects",
                          {"name": name, **_project_body(templates, quotas)})
    _show_projects([project], as_json=as_json, single=True)


@projects.command("list")
@_with_client
@_json_option
def projects_list(client: AdminClient, as_json: bool) -> None:
    """List every project."""
    _show_projects(client.items("/api/v1/projects"), as_json=as_json)


@projects.command("show")
@click.argument("name")
@_with_client
@_json_option
def projectsshow(client: AdminClient, name: str, as_json: bool) -> None:
    """Show project NAME."""
    project = client.call("GET", f"/api/v1/projects/{quote(name)}")
    _show_projects([project], as_json=as_json, single=True)


@projects.command("update")
@click.argument("name")
@_project_fields
@click.option("--not-before", metavar="TIME",
              help="Reject the project's tokens issued before TIME ('now' or ISO 8601 with a "
                   "zone); 'now' invalidates every existing token of the project at once.")
@_with_client
@_json_option
def projects_update(client: AdminClient, name: str, templates: tuple[str, ...],
                    quotas: tuple[str, ...], not_before: str | None, as_json: bool) -> None:
    """Change project NAME's templates, quotas or not-before time (only the options given).

    --template replaces the whole template list and --quota the whole quota map.
    """
    body = _project_body(templates, quotas)
    if not_before is not None:
        body["not_before"] = parse_instant(not_before)
    if not body:
        raise click.UsageError("nothing to update: give --template, --quota or --not-before")
    project = client.call("PATCH", f"/api/v1/projects/{quote(name)}", body)
    _show_projects([project], as_json=as_json, single=True)


def _show_projects(rows: list[dict[str, Any]], *, as_json: bool, single: bool = False) -> None:
    show(rows, _PROJECT_COLUMNS, as_json=as_json, single=single)


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
def tokens_issue(client: AdminClient, project: str, subject: str, scopes: tuple[str, ...],
                 ttl: str | None, out_file: Path | None) -> None:
    """Issue a project token for PROJECT; it is shown (or written) once and never again.

    The token goes to stdout (or --out), its id and expiry to stderr, so
    'dsn admin tokens issue ... > token' captures only the token.
    """
    body: dict[str, object] = {"subject": subject}
    if scopes:
        body["scope"] = " ".join(scopes)
    if ttl is not None:
        body["ttl"] = parse_duration(ttl)
    if out_file is not None:
        _refuse_existing(out_file)
    _deliver(client.call("POST", f"/api/v1/projects/{quote(project)}/tokens", body), out_file)


def _refuse_existing(out_file: Path) -> None:
    """Before asking for a token: a file that would refuse it must not cost a live token."""
    if out_file.exists() or out_file.is_symlink():
        raise OneLineError(f"{out_file} exists; refusing to overwrite it")
    if not out_file.parent.is_dir():
        raise OneLineError(f"{out_file.parent} is not a directory")


def _deliver(issued: dict[str, Any], out_file: Path | None) -> None:
    """An issued token to its new 0600 file (or stdout), what it is to stderr."""
    token = issued.get("token")
    if not token:
        raise OneLineError("the control plane returned no token")
    about = summary(issued, ("jti", "kind", "project", "subject", "scope", "expires_at"))
    if out_file is not None:
        create_private_file(out_file, f"{token}\n".encode())
        click.echo(f"token written to {out_file} (0600): {about}")
    else:
        click.echo(about, err=True)
        click.echo(token)


@tokens.command("list")
@click.argument("project")
@_with_client
@_json_option
def tokens_list(client: AdminClient, project: str, as_json: bool) -> None:
    """List PROJECT's tokens: ids and metadata only, never the tokens themselves."""
    rows = client.items(f"/api/v1/projects/{quote(project)}/tokens")
    show(rows, _TOKEN_COLUMNS, as_json=as_json)


@tokens.command("revoke")
@click.argument("jti")
@_with_client
def tokens_revoke(client: AdminClient, jti: str) -> None:
    """Revoke token JTI at once; revoking it again is harmless."""
    client.call("DELETE", f"/api/v1/tokens/{quote(jti)}")
    click.echo(f"revoked {jti}")


# keys

@admin.group()
def keys() -> None:
    """Manage the token signing keys (Ed25519)."""


@keys.command("rotate")
@_with_client
@_json_option
def keys_rotate(client: AdminClient, as_json: bool) -> None:
    """Create a new signing key; it signs from now on, older published keys still verify.

    With several replicas on one database, the new key replaces the key of the replica that
    serves the request only; the others keep theirs (rotate through each to renew them all)."""
    result = client.call("POST", "/api/v1/keys/rotate")
    if as_json:
        echo_json(result)
    else:
        click.echo(f"new signing key {cell(result.get('kid'))}; published: "
                   f"{cell(result.get('published'))}; retired: {cell(result.get('retired'))}")


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
            click.echo(' '.join(problem.split()), err=True)
        raise OneLineError(f"{file}: {len(problems)} problem(s)")
    click.echo(f"{file}: ok")


@policies.command("show")
@_with_client
def policiesshow(client: AdminClient) -> None:
    """Print the service's active policy set as JSON."""
    echo_json(client.call("GET", "/api/v1/policies"))


@policies.command("reload")
@_with_client
def policies_reload(client: AdminClient) -> None:
    """Make the service re-read its policy file; an invalid file is refused and the old set
    stays."""
    result = client.call("POST", "/api/v1/policies/reload")
    if not result.get("ok"):
        for problem in result.get("problems") or []:
            click.echo(f"policy: {' '.join(problem.split())}", err=True)
        raise OneLineError("reload refused; the previous policy set stays active")
    click.echo(f"policies reloaded from {cell(result.get('sources'))}")


# audit

@admin.group()
def audit() -> None:
    """Read and verify the hash-chained audit log."""


_AUDIT_COLUMNS = [("seq", "SEQ"), ("ts", "TIME"), ("principal", "PRINCIPAL"),
                  ("action", "ACTION"), ("resource", "RESOURCE"), ("decision", "DECISION"),
                  ("rule", "RULE/REASON"), ("count", "COUNT"), ("request_id", "REQUEST")]


@audit.command("show")
@click.option("--after", "after_seq", type=click.IntRange(0), default=0, show_default=True,
              help="Show records after this sequence number.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="At most this many records.")
@_with_client
@_json_option
def auditshow(client: AdminClient, after_seq: int, limit: int, as_json: bool) -> None:
    """Show audit records, oldest first."""
    query = urllib.parse.urlencode({"after": after_seq, "limit": limit})
    rows = client.items(f"/api/v1/audit?{query}")
    show(rows, _AUDIT_COLUMNS, as_json=as_json)


@audit.command("verify")
@click.option("--offline", is_flag=True,
              help="Check STATE_DIR's database directly, without the service or a token.")
@click.option("--checkpoints", type=click.Path(dir_okay=False, path_type=Path),
              help="With --offline: the signed checkpoint file to check the chain against (the "
                   "service's --audit-checkpoints).  [default: STATE_DIR/audit-checkpoints.jsonl]")
@_database_url_option("With --offline: the service's database, if its state is in PostgreSQL.")
@_client_options
def audit_verify(urls: tuple[str, ...], state_dir: Path, token_file: Path | None, offline: bool,
                 checkpoints: Path | None, database_url: str | None) -> None:
    """Check the hash chain and the signed checkpoints kept outside the database: an edited,
    inserted or deleted record, or a tail cut off up to the last checkpoint, makes this exit 1."""
    if checkpoints is not None and not offline:
        raise click.UsageError("--checkpoints goes with --offline (the service reads its own)")
    if offline:
        result = asyncio.run(verify_offline(state_dir, checkpoints, database_url))
    else:
        result = AdminClient.found(urls, token_file, state_dir).call("GET",
                                                                     "/api/v1/audit/verify")
    if not result.get("ok"):
        where = result.get("first_bad_seq")
        at = f" at record {where}" if where is not None else ""
        raise OneLineError(f"audit chain broken{at}: {cell(result.get('problem'))}")
    signed = result.get("checkpoints") or 0
    anchored = (f", {signed} signed checkpoints hold" if signed
                else "; no signed checkpoint to check it against")
    click.echo(f"audit chain ok: {result.get('records')} records{anchored}")


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


def _latest_etag(client: AdminClient, name: str) -> str:
    """The latest version's ETag, a deletion included (so a deleted template can be rolled back)."""
    versions = client.items(template_path(name, "/versions"))
    return str(versions[-1]["etag"])


_TEMPLATE_COLUMNS = [("name", "NAME"), ("kind", "KIND"), ("version", "VERSION"),
                     ("author", "AUTHOR"), ("created_at", "CREATED"), ("etag", "ETAG")]
_VERSION_COLUMNS = [("version", "VERSION"), ("kind", "KIND"), ("deleted", "DELETED"),
                    ("author", "AUTHOR"), ("created_at", "CREATED"), ("etag", "ETAG")]


@templates.command("list")
@_with_client
@_json_option
def templates_list(client: AdminClient, as_json: bool) -> None:
    """List the current templates."""
    show(client.items("/api/v1/templates"), _TEMPLATE_COLUMNS,
          as_json=as_json)


@templates.command("show")
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(1), help="An earlier version.")
@_with_client
@_json_option
def templatesshow(client: AdminClient, name: str, version: int | None, as_json: bool) -> None:
    """Print template NAME's source (the current version unless --version); ETag on stderr."""
    path = template_path(name, "" if version is None else f"/versions/{version}")
    found = client.call("GET", path)
    if as_json:
        echo_json(found)
        return
    click.echo(f"{name} v{found['version']} {found['etag']}", err=True)
    click.echo(found["source"], nl=False)


@templates.command("edit")
@click.argument("name")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@_if_match_option
@click.option("--create", is_flag=True, help="Create a new template (If-None-Match: *).")
@_with_client
def templates_edit(client: AdminClient, name: str, file: IO[str], if_match: str | None,
                   create: bool) -> None:
    """Save FILE (template YAML; '-' for stdin) as the next version of template NAME."""
    if create and if_match:
        raise click.UsageError("--create and --if-match exclude each other")
    headers = ({"If-None-Match": "*"} if create
               else {"If-Match": if_match or _latest_etag(client, name)})
    saved = client.call("PUT", template_path(name), {"source": file.read()}, headers)
    click.echo(f"saved {name} v{saved['version']} {saved['etag']}")


@templates.command("delete")
@click.argument("name")
@_if_match_option
@_with_client
def templates_delete(client: AdminClient, name: str, if_match: str | None) -> None:
    """Delete template NAME (its history stays; 'rollback' restores it)."""
    tombstone = client.call("DELETE", template_path(name), None,
                            {"If-Match": if_match or _latest_etag(client, name)})
    click.echo(f"deleted {name} (v{tombstone['version']})")


@templates.command("render")
@click.argument("name")
@click.option("--param", "pairs", multiple=True, metavar="NAME=VALUE",
              help="A parameter value, JSON where it parses: hwm=64, "
                   "'sources=[\"10.0.0.0/8\"]' (repeatable).")
@_with_client
@_json_option
def templates_render(client: AdminClient, name: str, pairs: tuple[str, ...], as_json: bool) -> None:
    """Dry-run template NAME with sample system values; print the rendered text."""
    body = {"params": template_params(pairs)}
    rendered = client.call("POST", template_path(name, "/render"), body)
    if as_json:
        echo_json(rendered)
    else:
        click.echo(rendered["text"], nl=False)


@templates.command("history")
@click.argument("name")
@_with_client
@_json_option
def templates_history(client: AdminClient, name: str, as_json: bool) -> None:
    """List every version of template NAME, oldest first."""
    show(client.items(template_path(name, "/versions")),
          _VERSION_COLUMNS, as_json=as_json)


@templates.command("diff")
@click.argument("name")
@click.argument("old", type=click.IntRange(1))
@click.argument("new", type=click.IntRange(1))
@_with_client
def templates_diff(client: AdminClient, name: str, old: int, new: int) -> None:
    """Print the unified diff of template NAME from version OLD to version NEW."""
    query = urllib.parse.urlencode({"from": old, "to": new})
    click.echo(client.call("GET", template_path(name, f"/diff?{query}"))["diff"], nl=False)


@templates.command("rollback")
@click.argument("name")
@click.argument("version", type=click.IntRange(1))
@_if_match_option
@_with_client
def templates_rollback(client: AdminClient, name: str, version: int,
                       if_match: str | None) -> None:
    """Save VERSION's source as the next version of template NAME."""
    saved = client.call("POST", template_path(name, "/rollback"), {"version": version},
                        {"If-Match": if_match or _latest_etag(client, name)})
    click.echo(f"rolled {name} back to v{version}'s source as v{saved['version']} {saved['etag']}")
