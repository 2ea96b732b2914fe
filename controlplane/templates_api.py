"""Versioned DSN and job templates over REST (SPEC §4, §5): repository, handlers and route table.

Every write appends a row to ``template_versions``; nothing is ever updated in place. The current
version of a template is its highest; DELETE appends a *tombstone* (``deleted``, empty source), so
GET answers 404 while ``/versions`` keeps the whole history, and a rollback to version N appends a
new version carrying N's source.

Concurrency (RFC 9110 conditional requests): each version has a strong ETag
``"<name>-v<version>-<sha256[:16]>"``. Writes to an existing template (PUT, DELETE, rollback) need
``If-Match`` with the latest version's ETag, else **428** (a write that names no version could
silently overwrite someone else's); a stale ETag is **412**. A new template is created with
``If-None-Match: *`` (412 if it exists). The check runs inside the store's write transaction, so two
writers holding the same ETag cannot both win.

PUT bodies are JSON ``{"source": "<template YAML>"}`` (one content type for every route, documented
in the OpenAPI document); the source must pass ``templating.check_template`` against the active
policy, so a sandbox escape or a bad parameter declaration is a 400 with field errors at save time.

The store starts empty: the shipped templates are seeded as version 1 (author ``shipped``) when the
app starts on a store that holds no template version at all, never again after that.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final

from aiohttp import web
from pydantic import Field

from controlplane import schemas as s
from controlplane.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    PreconditionRequired,
)
from controlplane.middlewares import CLAIMS, SERVICES, RouteSpec, Services, principal_label
from controlplane.policy import PolicySet, Resource
from controlplane.store.engine import Conn, Store
from controlplane.templating import (
    KIND_DIRECTORIES,
    MAX_SOURCE_BYTES,
    NAME_PATTERN,
    Template,
    check_template,
    load_templates,
    parse_template_cached,
    render,
    sample_system,
    shipped_templates_dir,
    validate_params,
    validate_system,
)
from controlplane.tokens import Claims, TokenKind
from controlplane.views import ADMIN, ADMIN_OR_PROJECT, parse_body, parse_query, reply

SHIPPED_AUTHOR: Final = "shipped"
TEMPLATES_PATH: Final = "/api/v1/templates"
TEMPLATE_PATH: Final = TEMPLATES_PATH + "/{name}"
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(r"^[1-9][0-9]{0,17}$")  # fits SQLite's INTEGER


# --- models --------------------------------------------------------------------------------------

Version = Annotated[int, Field(ge=1, le=2**63 - 1)]


class TemplateWrite(s.RequestBody):
    """A new version: the whole template document (YAML text, see ``templates/README.md``). Send
    ``If-Match: <ETag>`` to replace the current version, ``If-None-Match: *`` to create."""

    source: str = Field(min_length=1, max_length=MAX_SOURCE_BYTES)


class TemplateRollback(s.RequestBody):
    """Make a new version carrying ``version``'s source; needs ``If-Match`` with the latest ETag."""

    version: Version


class RenderRequest(s.RequestBody):
    """Parameter values for a dry run; omitted parameters take their defaults."""

    params: dict[str, Any] = Field(default_factory=dict, max_length=64)


class DiffQuery(s.QueryParams):
    from_: Version = Field(alias="from")
    to: Version


class VersionInfo(s.ResponseBody):
    name: str
    version: int
    kind: str
    sha256: str
    etag: str
    author: str
    created_at: datetime
    deleted: bool


class VersionSource(VersionInfo):
    """One version with its source text (empty for a deletion)."""

    source: str


class TemplateOut(VersionSource):
    """The current version of a template; the ``ETag`` header carries ``etag``."""

    description: str
    parameters: dict[str, Any]


class TemplateList(s.ResponseBody):
    items: list[VersionInfo]


class VersionList(s.ResponseBody):
    items: list[VersionInfo]


class TemplateDiff(s.ResponseBody):
    name: str
    from_version: int
    to_version: int
    diff: str


class RenderOut(s.ResponseBody):
    """A dry run: ``config`` (DSN template, as JSON) or ``script`` (job template), and the text."""

    name: str
    version: int
    kind: str
    config: dict[str, Any] | None
    script: str | None
    text: str


# --- the repository ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TemplateVersion:
    name: str
    version: int
    kind: str
    source: str
    sha256: str
    author: str
    created_at: float
    deleted: bool

    @property
    def etag(self) -> str:
        return f'"{self.name}-v{self.version}-{self.sha256[:16]}"'


@dataclass(frozen=True)
class Precondition:
    """The conditional headers of a write: the ETags of ``If-Match`` (``*`` kept as is) and
    whether ``If-None-Match: *`` was sent."""

    if_match: tuple[str, ...] | None
    if_none_match_any: bool


@dataclass(frozen=True)
class NewVersion:
    name: str
    kind: str
    source: str
    author: str
    created_at: float
    deleted: bool = False


def _row(row: sqlite3.Row) -> TemplateVersion:
    return TemplateVersion(name=row["name"], version=int(row["version"]), kind=row["kind"],
                           source=row["source"], sha256=row["sha256"], author=row["author"],
                           created_at=float(row["created_at"]), deleted=bool(row["deleted"]))


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


async def latest(store: Store, name: str) -> TemplateVersion | None:
    """The highest version of ``name``, tombstone or not; None if it never existed."""
    rows = await store.read("SELECT * FROM template_versions WHERE name = ? "
                            "ORDER BY version DESC LIMIT 1", (name,))
    return _row(rows[0]) if rows else None


async def current(store: Store, name: str) -> TemplateVersion:
    """The live current version of ``name``; NotFound if it never existed or was deleted."""
    found = await latest(store, name)
    if found is None or found.deleted:
        raise NotFound(f"template {name!r} does not exist")
    return found


async def list_current(store: Store) -> list[TemplateVersion]:
    rows = await store.read(
        "SELECT t.* FROM template_versions t JOIN (SELECT name, MAX(version) AS version "
        "FROM template_versions GROUP BY name) m ON m.name = t.name AND m.version = t.version "
        "WHERE t.deleted = 0 ORDER BY t.name")
    return [_row(row) for row in rows]


async def history(store: Store, name: str) -> list[TemplateVersion]:
    """Every version of ``name``, oldest first (tombstones included); NotFound if none."""
    rows = await store.read("SELECT * FROM template_versions WHERE name = ? ORDER BY version",
                            (name,))
    if not rows:
        raise NotFound(f"template {name!r} does not exist")
    return [_row(row) for row in rows]


async def get_version(store: Store, name: str, version: int) -> TemplateVersion:
    rows = await store.read("SELECT * FROM template_versions WHERE name = ? AND version = ?",
                            (name, version))
    if not rows:
        raise NotFound(f"template {name!r} has no version {version}")
    return _row(rows[0])


def check_precondition(pre: Precondition, found: TemplateVersion | None) -> None:
    """428 for a write to an existing template naming no version; 412 when the named one (or the
    absence ``If-None-Match: *`` asks for) is not what the store holds."""
    live = found is not None and not found.deleted
    if pre.if_none_match_any and live:
        raise PreconditionFailed("the template exists; send If-Match with its ETag to replace it")
    if pre.if_match is None:
        if live:
            raise PreconditionRequired("send If-Match with the current ETag (GET the template)")
        if not pre.if_none_match_any:
            raise PreconditionRequired("send If-None-Match: * to create a template")
        return
    if found is None or not ((live and "*" in pre.if_match) or found.etag in pre.if_match):
        raise PreconditionFailed("the template changed since that ETag (a lost update); "
                                 "GET it again and retry")


async def _latest_in(conn: Conn, name: str) -> TemplateVersion | None:
    async with conn.execute("SELECT * FROM template_versions WHERE name = ? "
                            "ORDER BY version DESC LIMIT 1", (name,)) as cursor:
        row = await cursor.fetchone()
    return None if row is None else _row(row)


async def _insert(conn: Conn, new: NewVersion, version: int) -> TemplateVersion:
    record = TemplateVersion(name=new.name, version=version, kind=new.kind, source=new.source,
                             sha256=_digest(new.source), author=new.author,
                             created_at=new.created_at, deleted=new.deleted)
    await conn.execute("INSERT INTO template_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.name, record.version, record.kind, record.source, record.sha256,
                        record.author, record.created_at, int(record.deleted)))
    return record


def _check_kind(found: TemplateVersion | None, kind: str) -> None:
    if found is not None and not found.deleted and found.kind != kind:
        # Sessions and jobs look templates up by name and rely on its kind staying put.
        raise Conflict(f"template {found.name!r} is a {found.kind} template; delete it before "
                       f"saving a {kind} template under that name")


async def save_version(store: Store, new: NewVersion, pre: Precondition) -> TemplateVersion:
    """Append ``new`` as the next version if ``pre`` holds against the latest one, in one write
    transaction, so no other writer can slip in between the check and the insert."""
    async def body(conn: Conn) -> TemplateVersion:
        found = await _latest_in(conn, new.name)
        check_precondition(pre, found)
        _check_kind(found, new.kind)
        return await _insert(conn, new, 1 if found is None else found.version + 1)
    return await store.write(body)


async def delete_version(store: Store, name: str, author: str, now: float,
                         pre: Precondition) -> TemplateVersion:
    """Append a tombstone after the live current version of ``name``; NotFound if there is none."""
    async def body(conn: Conn) -> TemplateVersion:
        found = await _latest_in(conn, name)
        if found is None or found.deleted:
            raise NotFound(f"template {name!r} does not exist")
        check_precondition(pre, found)
        tombstone = NewVersion(name, found.kind, "", author, now, deleted=True)
        return await _insert(conn, tombstone, found.version + 1)
    return await store.write(body)


async def seed(store: Store, shipped: Mapping[str, tuple[str, str]], now: float) -> int:
    """Store ``shipped`` (name -> (kind, source)) as version 1 if the store holds no template
    version at all; return how many were stored (0 on every later start)."""
    async def body(conn: Conn) -> int:
        async with conn.execute("SELECT 1 FROM template_versions LIMIT 1") as cursor:
            if await cursor.fetchone() is not None:
                return 0
        for name, (kind, source) in sorted(shipped.items()):
            await _insert(conn, NewVersion(name, kind, source, SHIPPED_AUTHOR, now), 1)
        return len(shipped)
    return await store.write(body)


def read_shipped() -> dict[str, tuple[str, str]]:
    """The shipped templates' kinds and source texts (validated by ``load_templates``)."""
    root = shipped_templates_dir()
    return {name: (t.kind, (root / KIND_DIRECTORIES[t.kind] / f"{name}.yaml").read_text("utf-8"))
            for name, t in load_templates(root).items()}


async def seed_shipped_templates(app: web.Application) -> None:
    """Start-up hook: seed the shipped templates into an empty store (after the services open)."""
    services = app[SERVICES]
    if await services.store.read("SELECT 1 FROM template_versions LIMIT 1"):
        return  # the common case: skip reading the shipped files
    await seed(services.store, await asyncio.to_thread(read_shipped), services.now())




# --- the service ---------------------------------------------------------------------------------

def checked_source(source: str, name: str, policy: PolicySet) -> Template:
    """``check_template`` (static sandbox check, declarations, a dry render of the examples) and
    the declared name must be the URL's; CPU-bound, so callers run it off the event loop."""
    template = check_template(source, policy)
    if template.name != name:
        raise InvalidRequest("the template's name differs from the URL's", errors=[
            {"field": "name", "message": f"declares {template.name!r}; the URL names {name!r}"}])
    return template


def dry_run(template: Template, version: int, values: Mapping[str, Any],
            policy: PolicySet) -> RenderOut:
    """Validate ``values`` (errors under ``params.<name>``) and render with sample system values."""
    params = validate_params(template, values, policy)
    system = validate_system(template.kind, sample_system(template, params), policy)
    rendered = render(template, params, system)
    config = None if rendered.config is None else rendered.config.model_dump(mode="json")
    return RenderOut(name=template.name, version=version, kind=template.kind, config=config,
                     script=rendered.text if template.kind == "job" else None, text=rendered.text)


def unified_diff(old: TemplateVersion, new: TemplateVersion) -> str:
    return "".join(difflib.unified_diff(
        old.source.splitlines(keepends=True), new.source.splitlines(keepends=True),
        fromfile=f"{old.name}@v{old.version}", tofile=f"{new.name}@v{new.version}"))


# --- request and response helpers ----------------------------------------------------------------

def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not _NAME.fullmatch(name):  # no template can have this name
        raise NotFound(f"template {name[:64]!r} does not exist")
    return name


def _version(request: web.Request) -> int:
    text = request.match_info["version"]
    if not _VERSION.fullmatch(text):
        raise NotFound(f"version {text[:20]!r} does not exist")
    return int(text)


def _precondition(request: web.Request) -> Precondition:
    header = request.headers.get("If-Match")
    tags = None if header is None else tuple(t.strip() for t in header.split(",") if t.strip())
    return Precondition(tags, request.headers.get("If-None-Match", "").strip() == "*")


def _author(request: web.Request) -> str:
    return principal_label(request[CLAIMS])


def _info(v: TemplateVersion) -> VersionInfo:
    return VersionInfo(name=v.name, version=v.version, kind=v.kind, sha256=v.sha256, etag=v.etag,
                       author=v.author, created_at=s.utc(v.created_at), deleted=v.deleted)


def _source_out(v: TemplateVersion) -> VersionSource:
    return VersionSource(**_info(v).model_dump(), source=v.source)


def _template_out(v: TemplateVersion, template: Template) -> TemplateOut:
    parameters = {name: p.model_dump(mode="json", exclude_unset=True)
                  for name, p in template.parameters.items()}
    return TemplateOut(**_source_out(v).model_dump(), description=template.description,
                       parameters=parameters)


def _tagged(model: s.ResponseBody, v: TemplateVersion) -> web.Response:
    return reply(model, headers={"ETag": v.etag})


async def _parsed(source: str) -> Template:
    return await asyncio.to_thread(parse_template_cached, source)


async def _save(request: web.Request, source: str) -> web.Response:
    """Check ``source`` against the active policy and append it as the next version."""
    services, name = _services(request), _name(request)
    template = await asyncio.to_thread(checked_source, source, name, services.policies.current)
    saved = await save_version(
        services.store, NewVersion(name, template.kind, source, _author(request), services.now()),
        _precondition(request))
    return _tagged(_template_out(saved, template), saved)


# --- handlers ------------------------------------------------------------------------------------

async def list_templates(request: web.Request) -> web.Response:
    versions = await list_current(_services(request).store)
    return reply(TemplateList(items=[_info(v) for v in versions]))


async def get_template(request: web.Request) -> web.Response:
    found = await current(_services(request).store, _name(request))
    return _tagged(_template_out(found, await _parsed(found.source)), found)


async def put_template(request: web.Request) -> web.Response:
    body = await parse_body(request, TemplateWrite)
    return await _save(request, body.source)


async def delete_template(request: web.Request) -> web.Response:
    services = _services(request)
    tombstone = await delete_version(services.store, _name(request), _author(request),
                                     services.now(), _precondition(request))
    return _tagged(_info(tombstone), tombstone)


async def list_versions(request: web.Request) -> web.Response:
    versions = await history(_services(request).store, _name(request))
    return reply(VersionList(items=[_info(v) for v in versions]))


async def get_template_version(request: web.Request) -> web.Response:
    found = await get_version(_services(request).store, _name(request), _version(request))
    return _tagged(_source_out(found), found)


async def diff_versions(request: web.Request) -> web.Response:
    query = parse_query(request, DiffQuery)
    store, name = _services(request).store, _name(request)
    old, new = await get_version(store, name, query.from_), await get_version(store, name, query.to)
    return reply(TemplateDiff(name=name, from_version=old.version, to_version=new.version,
                              diff=unified_diff(old, new)))


async def rollback_template(request: web.Request) -> web.Response:
    body = await parse_body(request, TemplateRollback)
    target = await get_version(_services(request).store, _name(request), body.version)
    if target.deleted:
        raise InvalidRequest("that version is a deletion", errors=[
            {"field": "version", "message": f"version {target.version} deleted the template"}])
    return await _save(request, target.source)


async def render_template(request: web.Request) -> web.Response:
    body = await parse_body(request, RenderRequest)
    services = _services(request)
    found = await current(services.store, _name(request))
    template = await _parsed(found.source)
    out = await asyncio.to_thread(dry_run, template, found.version, body.params,
                                  services.policies.current)
    return reply(out)


# --- resources and routes ------------------------------------------------------------------------

def _templates(request: web.Request, claims: Claims | None) -> Resource:
    return Resource(kind="template", project=None, name=None)


def _template(request: web.Request, claims: Claims | None) -> Resource:
    return Resource(kind="template", project=None, name=request.match_info["name"])


def _template_for_project(request: web.Request, claims: Claims | None) -> Resource:
    # A project token renders on behalf of its project: the policy checks may_use_template.
    project = claims.project if claims is not None and claims.kind is TokenKind.PROJECT else None
    return Resource(kind="template", project=project, name=request.match_info["name"])


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("GET", TEMPLATES_PATH, list_templates, "List the current templates (no sources)",
              TemplateList, 200, "templates:read", ADMIN, _templates, tag="templates"),
    RouteSpec("GET", TEMPLATE_PATH, get_template,
              "The current version of a template, its source and declared parameters (ETag)",
              TemplateOut, 200, "templates:read", ADMIN, _template, tag="templates"),
    RouteSpec("PUT", TEMPLATE_PATH, put_template,
              "Save a new version: If-Match: <ETag> to replace (428 without it, 412 if stale), "
              "If-None-Match: * to create; the source is checked against the policy",
              TemplateOut, 200, "templates:write", ADMIN, _template, TemplateWrite,
              tag="templates"),
    RouteSpec("DELETE", TEMPLATE_PATH, delete_template,
              "Delete a template (If-Match required): a tombstone version, the history stays",
              VersionInfo, 200, "templates:write", ADMIN, _template, tag="templates"),
    RouteSpec("GET", TEMPLATE_PATH + "/versions", list_versions,
              "Every version of a template, oldest first (metadata)", VersionList, 200,
              "templates:read", ADMIN, _template, tag="templates"),
    RouteSpec("GET", TEMPLATE_PATH + "/versions/{version}", get_template_version,
              "One version of a template with its source", VersionSource, 200, "templates:read",
              ADMIN, _template, tag="templates"),
    RouteSpec("GET", TEMPLATE_PATH + "/diff", diff_versions,
              "Unified diff between two versions of a template", TemplateDiff, 200,
              "templates:read", ADMIN, _template, query=DiffQuery, tag="templates"),
    RouteSpec("POST", TEMPLATE_PATH + "/rollback", rollback_template,
              "Save a new version carrying an earlier version's source (If-Match required)",
              TemplateOut, 200, "templates:write", ADMIN, _template, TemplateRollback,
              tag="templates"),
    RouteSpec("POST", TEMPLATE_PATH + "/render", render_template,
              "Dry-run render with parameter values: the rendered config or script, or field "
              "errors under params.<name>", RenderOut, 200, "templates:render", ADMIN_OR_PROJECT,
              _template_for_project, RenderRequest, tag="templates"),
)
