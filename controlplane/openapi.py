"""The OpenAPI 3.1 document, built from the route table (so every served route is in it, once).

Request and response schemas come from the pydantic models (``model_json_schema`` with references
into ``components/schemas``); every operation also documents its problem+json answers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from controlplane.paths import PATH_PARAMETERS
from controlplane.schemas import Problem

if TYPE_CHECKING:
    from controlplane.middlewares import RouteSpec

OPENAPI: Final = web.AppKey("openapi", dict[str, Any])
_REF: Final = "#/components/schemas/{model}"
_PROBLEMS: Final[dict[int, str]] = {
    400: "Invalid input (field errors in `errors`)",
    401: "Missing, invalid, expired or revoked token",
    403: "The policy denies the action (403 also for another project's resources)",
    404: "No such resource",
    409: "Conflict with the current state (exists, quota reached)",
    413: "Request body too large",
    415: "The request body is not application/json",
    429: "Rate limit reached; see Retry-After",
    503: "Store or audit log unavailable; nothing was done",
}


Refs = dict[tuple[Any, Any], Any]  # (model, "validation" | "serialization") -> {"$ref": ...}


def _schemas(specs: Iterable[RouteSpec]) -> tuple[Refs, dict[str, Any]]:
    models: set[tuple[type[BaseModel], JsonSchemaMode]] = {(Problem, "serialization")}
    for spec in specs:
        if spec.body is not None:
            models.add((spec.body, "validation"))
        if spec.response is not None:
            models.add((spec.response, "serialization"))
    refs, top = models_json_schema(sorted(models, key=lambda m: (m[0].__name__, m[1])),
                                   ref_template=_REF)
    return dict(refs), top.get("$defs", {})


def _problem_response(description: str, ref: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": ref}}}


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
    if spec.response is not None:
        schema = refs[(spec.response, "serialization")]
        content = {"application/json": {"schema": schema}}
    elif spec.response_content_type == "text/plain":
        content = {"text/plain": {"schema": {"type": "string"}}}
    else:
        content = {"application/json": {"schema": {"type": "object"}}}
    return {"description": spec.summary, "content": content}


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
    return sorted(statuses)


def _operation(spec: RouteSpec, refs: Refs) -> dict[str, Any]:
    problem_ref = refs[(Problem, "serialization")]
    responses: dict[str, Any] = {str(spec.status): _success(spec, refs)}
    for status in spec.extra_responses:
        responses[str(status)] = {"description": "Not modified (ETag matched If-None-Match)"}
    for status in _problem_statuses(spec):
        responses[str(status)] = _problem_response(_PROBLEMS[status], problem_ref)
    responses["default"] = _problem_response("Any other error (problem+json)", problem_ref)
    operation: dict[str, Any] = {
        "operationId": spec.handler.__name__, "summary": spec.summary, "tags": [spec.tag],
        "responses": responses, "security": [] if spec.public else [{"bearer": []}],
    }
    parameters = _path_parameters(spec.path) + _query_parameters(spec.query)
    if parameters:
        operation["parameters"] = parameters
    if spec.body is not None:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": refs[(spec.body, "validation")]}}}
    if spec.action is not None:
        operation["x-dsn-action"] = spec.action
        operation["x-dsn-token-kinds"] = sorted(kind.value for kind in spec.kinds)
    return operation


def build_document(specs: tuple[RouteSpec, ...], *, version: str,
                   server_url: str) -> dict[str, Any]:
    refs, components = _schemas(specs)
    paths: dict[str, dict[str, Any]] = {}
    for spec in specs:
        paths.setdefault(spec.path, {})[spec.method.lower()] = _operation(spec, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "DSN control plane", "version": version,
                 "description": "Projects, tokens, signing keys, policies and the audit log of a "
                                "Data Streaming Node. Errors are application/problem+json "
                                "(RFC 9457) with a request_id."},
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
    }
