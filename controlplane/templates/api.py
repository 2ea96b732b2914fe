"""Versioned DSN and job templates over REST (SPEC §4, §5): request and response bodies,
handlers over ``repository`` and the engine, the resource each action names, and ``ROUTES``.

Writes to an existing template (PUT, DELETE, rollback) need ``If-Match`` with the latest version's
ETag, else **428**; a stale ETag is **412**; ``If-None-Match: *`` creates (412 if it exists). See
``repository`` for the versions and the conditional-write rules.

PUT bodies are JSON ``{"source": "<template YAML>"}`` (one content type for every route, documented
in the OpenAPI document); the source must pass ``render.check_template`` against the active policy,
so a sandbox escape or a bad parameter declaration is a 400 with field errors at save time.

Admin and project tokens reach every route, so the policy decides and audits each request: a
project reads and renders the templates its project may use (any other is a 404 to it) and is
refused writes (403). A rejected source's field errors each name the ``line`` of the template
file at fault.

The store starts empty: the shipped templates are seeded as version 1 (author ``shipped``) when the
app starts on a store that holds no template version at all, never again after that.
"""

from __future__ import annotations

import asyncio
import difflib
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Final

from aiohttp import web
from pydantic import Field

from controlplane import schemas as s
from controlplane.errors import InvalidRequest, NotFound
from controlplane.middlewares import CLAIMS, SERVICES, RouteSpec, Services, principal_label
from controlplane.policy import PolicySet, Resource
from controlplane.templates.loader import (
    MAX_SOURCE_BYTES,
    NAME_PATTERN,
    Template,
    located,
    parse_template_cached,
    read_shipped,
)
from controlplane.templates.render import check_template, render, validate_params, validate_site
from controlplane.templates.repository import (
    NewVersion,
    Precondition,
    TemplateVersion,
    current,
    delete_version,
    get_version,
    has_versions,
    history,
    list_current,
    save_version,
    seed,
)
from controlplane.templates.system import sample_system, validate_system
from controlplane.tokens import Claims, TokenKind
from controlplane.views import ADMIN_OR_PROJECT, parse_body, parse_query, reply

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


# --- the service ---------------------------------------------------------------------------------

def checked_source(source: str, name: str, policy: PolicySet) -> Template:
    """``check_template`` (static sandbox check, declarations, a dry render of the examples) and
    the declared name must be the URL's; CPU-bound, so callers run it off the event loop."""
    template = check_template(source, policy)
    if template.name != name:
        raise InvalidRequest("the template's name differs from the URL's", errors=located(
            [{"field": "name", "message": f"declares {template.name!r}; the URL names {name!r}"}],
            source))
    return template


def dry_run(found: TemplateVersion, template: Template, values: Mapping[str, Any],
            policy: PolicySet) -> RenderOut:
    """Validate ``values`` (errors under ``params.<name>``) and render with sample system values;
    a failed render names its line in ``found``'s source."""
    params = validate_params(template, values, policy)
    validate_site(template, policy)
    system = validate_system(template.kind, sample_system(template.kind), policy)
    try:
        rendered = render(template, params, system)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.detail, errors=located(exc.errors, found.source)) from None
    version = found.version
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
    if not _NAME.fullmatch(name) or not _visible(request, name):  # no template can have this name
        raise NotFound(f"template {name[:64]!r} does not exist")
    return name


def _visible(request: web.Request, name: str) -> bool:
    """A project token sees the templates its project may use (the policy's ``templates``)."""
    claims = request[CLAIMS]
    return claims.kind is not TokenKind.PROJECT or claims.project is None or \
        _services(request).policies.current.may_use_template(claims.project, name)


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
    return reply(TemplateList(items=[_info(v) for v in versions if _visible(request, v.name)]))


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
    out = await asyncio.to_thread(dry_run, found, template, body.params, services.policies.current)
    return reply(out)


async def seed_shipped_templates(app: web.Application) -> None:
    """Start-up hook: seed the shipped templates into an empty store (after the services open)."""
    services = app[SERVICES]
    if await has_versions(services.store):
        return  # the common case: skip reading the shipped files
    await seed(services.store, await asyncio.to_thread(read_shipped), services.now())


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
              TemplateList, 200, "templates:read", ADMIN_OR_PROJECT, _templates, tag="templates"),
    RouteSpec("GET", TEMPLATE_PATH, get_template,
              "The current version of a template, its source and declared parameters (ETag)",
              TemplateOut, 200, "templates:read", ADMIN_OR_PROJECT, _template, tag="templates",
              response_headers=("ETag",)),
    RouteSpec("PUT", TEMPLATE_PATH, put_template,
              "Save a new version: If-Match: <ETag> to replace (428 without it, 412 if stale), "
              "If-None-Match: * to create; the source is checked against the policy",
              TemplateOut, 200, "templates:write", ADMIN_OR_PROJECT, _template, TemplateWrite,
              tag="templates", request_headers=("If-Match", "If-None-Match"),
              response_headers=("ETag",)),
    RouteSpec("DELETE", TEMPLATE_PATH, delete_template,
              "Delete a template (If-Match required): a tombstone version, the history stays",
              VersionInfo, 200, "templates:write", ADMIN_OR_PROJECT, _template, tag="templates",
              request_headers=("If-Match", "If-None-Match"), response_headers=("ETag",)),
    RouteSpec("GET", TEMPLATE_PATH + "/versions", list_versions,
              "Every version of a template, oldest first (metadata)", VersionList, 200,
              "templates:read", ADMIN_OR_PROJECT, _template, tag="templates"),
    RouteSpec("GET", TEMPLATE_PATH + "/versions/{version}", get_template_version,
              "One version of a template with its source", VersionSource, 200, "templates:read",
              ADMIN_OR_PROJECT, _template, tag="templates", response_headers=("ETag",)),
    RouteSpec("GET", TEMPLATE_PATH + "/diff", diff_versions,
              "Unified diff between two versions of a template", TemplateDiff, 200,
              "templates:read", ADMIN_OR_PROJECT, _template, query=DiffQuery, tag="templates"),
    RouteSpec("POST", TEMPLATE_PATH + "/rollback", rollback_template,
              "Save a new version carrying an earlier version's source (If-Match required)",
              TemplateOut, 200, "templates:write", ADMIN_OR_PROJECT, _template, TemplateRollback,
              tag="templates", request_headers=("If-Match",), response_headers=("ETag",)),
    RouteSpec("POST", TEMPLATE_PATH + "/render", render_template,
              "Dry-run render with parameter values: the rendered config or script, or field "
              "errors under params.<name>", RenderOut, 200, "templates:render", ADMIN_OR_PROJECT,
              _template_for_project, RenderRequest, tag="templates"),
)
