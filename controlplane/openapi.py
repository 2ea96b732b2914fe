"""The OpenAPI 3.1 document, built from the route table (so every served route is in it, once).

Request and response schemas come from the pydantic models (``model_json_schema`` with references
into ``components/schemas``); every operation also documents its problem+json answers, the headers
it reads (``If-Match``, ``If-None-Match``) and sets (``ETag``, ``Location``, ``Cache-Control``,
``Retry-After`` on 429 and 503), and its real body bound (413 beyond it). The token endpoint also
documents its RFC 8693 form: a form-encoded body, its answer, and RFC 6749 errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from controlplane.console.auth import COOKIE
from controlplane.middlewares import RouteSpec, console_caller
from controlplane.paths import PATH_PARAMETERS
from controlplane.schemas import OAuthError, Problem

OPENAPI: Final = web.AppKey("openapi", dict[str, Any])
_REF: Final = "#/components/schemas/{model}"
_PROBLEMS: Final[dict[int, str]] = {
    400: "Invalid input (field errors in `errors`)",
    401: "Missing, invalid, expired or revoked token",
    403: "The policy denies the action (403 also for another project's resources)",
    404: "No such resource",
    409: "Conflict with the current state (exists, quota reached)",
    412: "Precondition failed: the If-Match ETag is stale, or If-None-Match: * found the resource",
    413: "Request body too large",
    415: "The request body is not application/json",
    422: "The resource's contents cannot be processed (the problem says why)",
    428: "Precondition required: send If-Match with the current ETag",
    429: "Rate limit reached; see Retry-After",
    503: "Store or audit log unavailable; nothing was done",
}

# Every header an operation reads or sets, by name.
_HEADERS: Final[dict[str, dict[str, Any]]] = {
    "ETag": {"description": "The strong entity tag of the version answered",
             "schema": {"type": "string", "pattern": '^"[^"]+"$'}},
    "Location": {"description": "Path of the created resource",
                 "schema": {"type": "string", "pattern": "^/"}},
    "Cache-Control": {"description": "How long the answer may be kept (no-store for tokens)",
                      "schema": {"type": "string", "minLength": 1}},
    "Retry-After": {"description": "Seconds after which asking again may succeed",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "Set-Cookie": {"description": "The web console's session cookie (HttpOnly, SameSite=Strict)",
                   "schema": {"type": "string", "minLength": 1}},
}
_REQUEST_HEADERS: Final[dict[str, str]] = {
    "If-Match": "The ETag the change is based on (a stale one is 412; a required one absent "
                "is 428)",
    "If-None-Match": "`*` to create only if absent (412 if it exists); on GETs, a cached ETag "
                     "(304 if it still matches)",
}
_RETRY_STATUSES: Final = (429, 503)
_FORM: Final = "application/x-www-form-urlencoded"
_EVENTS: Final = "text/event-stream"


Refs = dict[tuple[Any, Any], Any]  # (model, "validation" | "serialization") -> {"$ref": ...}


def _schemas(specs: Iterable[RouteSpec]) -> tuple[Refs, dict[str, Any]]:
    models: set[tuple[type[BaseModel], JsonSchemaMode]] = {(Problem, "serialization")}
    for spec in specs:
        if spec.body is not None:
            models.add((spec.body, "validation"))
        if spec.response is not None:
            models.add((spec.response, "serialization"))
        if spec.form is not None and spec.form_response is not None:
            models |= {(spec.form, "validation"), (spec.form_response, "serialization"),
                       (OAuthError, "serialization")}
    refs, top = models_json_schema(sorted(models, key=lambda m: (m[0].__name__, m[1])),
                                   ref_template=_REF)
    return dict(refs), top.get("$defs", {})


def _headers(names: Iterable[str]) -> dict[str, Any]:
    return {name: {**_HEADERS[name], "required": True} for name in names}


def _problem_response(status: int | None, description: str, refs: Refs,
                      oauth: bool = False) -> dict[str, Any]:
    """A refusal: problem+json, and for the OAuth form an RFC 6749 error as application/json."""
    content: dict[str, Any] = {
        "application/problem+json": {"schema": refs[(Problem, "serialization")]}}
    if oauth:
        content["application/json"] = {"schema": refs[(OAuthError, "serialization")]}
    response: dict[str, Any] = {"description": description, "content": content}
    if status in _RETRY_STATUSES:
        response["headers"] = _headers(["Retry-After"])
    return response


def _header_parameters(spec: RouteSpec) -> list[dict[str, Any]]:
    return [{"name": name, "in": "header", "required": False, "description":
             _REQUEST_HEADERS[name], "schema": {"type": "string"}}
            for name in spec.request_headers]


def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = re.findall(r"{(\w+)}", path)
    unknown = [name for name in names if name not in PATH_PARAMETERS]
    if unknown:
        raise ValueError(f"path parameter {unknown[0]!r} of {path} has no declared schema")
    return [{"name": name, "in": "path", "required": True, "schema": PATH_PARAMETERS[name]}
            for name in names]


def _query_parameters(model: type[BaseModel] | None) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    return [{"name": name, "in": "query", "required": name in required, "schema": prop}
            for name, prop in schema["properties"].items()]


def _success(spec: RouteSpec, refs: Refs) -> dict[str, Any]:
    content: dict[str, Any]
    if spec.response is not None and spec.form_response is not None:
        schema: dict[str, Any] = {"anyOf": [refs[(spec.response, "serialization")],
                                            refs[(spec.form_response, "serialization")]]}
        content = {"application/json": {"schema": schema}}
    elif spec.response is not None and spec.response_content_type == _EVENTS:
        content = {_EVENTS: {"schema": _event_schema(refs[(spec.response, "serialization")])}}
    elif spec.response is not None:
        schema = refs[(spec.response, "serialization")]
        content = {"application/json": {"schema": schema}}
    elif spec.response_content_type.startswith("text/"):
        content = {spec.response_content_type: {"schema": {"type": "string"}}}
    elif spec.response_content_type.startswith("image/"):
        content = {spec.response_content_type: {"schema": {"type": "string",
                                                           "format": "binary"}}}
    else:
        content = {"application/json": {"schema": {"type": "object"}}}
    success: dict[str, Any] = {"description": spec.summary, "content": content}
    if spec.response_headers:
        success["headers"] = _headers(spec.response_headers)
    return success


def _event_schema(data: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event (before OpenAPI 3.2, ``schema`` describes each event): its name, its
    ``data`` a JSON document of the route's response model, or a ``retry`` delay alone."""
    return {"type": "object", "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
        "retry": {"type": "integer", "minimum": 0}}}


def _problem_statuses(spec: RouteSpec) -> list[int]:
    statuses = set()
    if spec.body is not None:
        statuses |= {400, 409, 413, 415}
    if spec.query is not None:
        statuses.add(400)
    if "{" in spec.path:
        statuses.add(404)
    if not spec.public:
        statuses |= {401, 403, 429, 503}
    if spec.path == "/readyz":
        statuses.add(503)
    if "If-Match" in spec.request_headers:
        statuses |= {412, 428}
    return sorted(statuses)


def _request_body(spec: RouteSpec, refs: Refs, max_body: int) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if spec.body is not None:
        content["application/json"] = {"schema": refs[(spec.body, "validation")]}
    if spec.form is not None:
        content[_FORM] = {"schema": refs[(spec.form, "validation")]}
    return {"required": True, "content": content,
            "description": f"At most {max_body} bytes (413 beyond, from Content-Length, before "
                           "anything is read).", "x-dsn-max-body-bytes": max_body}


def _security(spec: RouteSpec) -> list[dict[str, list[str]]]:
    if spec.public:
        return []
    if spec.credentials is None:  # the usual caller: a bearer token, or the console's cookie
        return [{"bearer": []}, {"console": []}]
    if spec.credentials is console_caller:
        return [{"console": []}]
    # The OAuth form carries its credential in the body (subject_token), with no header.
    return [{"bearer": []}, {}] if spec.form is not None else [{"bearer": []}]


def _operation(spec: RouteSpec, refs: Refs, max_body: int) -> dict[str, Any]:
    oauth = spec.form is not None
    limit = max(spec.max_body or 0, max_body)
    responses: dict[str, Any] = {str(spec.status): _success(spec, refs)}
    for status in spec.extra_responses:
        if status in _PROBLEMS:
            responses[str(status)] = _problem_response(status, _PROBLEMS[status], refs, oauth)
        else:
            responses[str(status)] = {"description": "Not modified (ETag matched If-None-Match)",
                                      "headers": _headers(["ETag"])}
    for status in _problem_statuses(spec):
        description = _PROBLEMS[status]
        if status == 413:
            description = f"Request body larger than {limit} bytes"
        responses[str(status)] = _problem_response(status, description, refs, oauth)
    responses["default"] = _problem_response(None, "Any other error (problem+json)", refs, oauth)
    operation: dict[str, Any] = {
        "operationId": spec.handler.__name__, "summary": spec.summary, "tags": [spec.tag],
        "responses": responses, "security": _security(spec),
    }
    parameters = (_path_parameters(spec.path) + _query_parameters(spec.query)
                  + _header_parameters(spec))
    if parameters:
        operation["parameters"] = parameters
    if spec.body is not None or spec.form is not None:
        operation["requestBody"] = _request_body(spec, refs, limit)
    if spec.action is not None:
        operation["x-dsn-action"] = spec.action
        operation["x-dsn-token-kinds"] = sorted(kind.value for kind in spec.kinds)
    return operation


def build_document(specs: tuple[RouteSpec, ...], *, version: str, server_url: str,
                   max_body: int) -> dict[str, Any]:
    """``max_body`` is the service's body bound (``client_max_size``); a route may allow more."""
    refs, components = _schemas(specs)
    paths: dict[str, dict[str, Any]] = {}
    for spec in specs:
        paths.setdefault(spec.path, {})[spec.method.lower()] = _operation(spec, refs, max_body)
    return {
        "openapi": "3.1.0",
        "info": {"title": "DSN control plane", "version": version,
                 "description": "Projects, tokens, signing keys, policies and the audit log of a "
                                "Data Streaming Node. Errors are application/problem+json "
                                "(RFC 9457) with a request_id."},
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "console": {"type": "apiKey", "in": "cookie", "name": COOKIE,
                        "description": "A web-console sign-in (POST /ui/session), acting as its "
                                       "token; a state change also needs its X-CSRF-Token"}}},
    }
