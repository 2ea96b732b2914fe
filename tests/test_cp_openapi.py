"""The served OpenAPI document: valid, complete, and true to the running service (schemathesis)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import schemathesis
from aiohttp.web_urldispatcher import SystemRoute
from cp_helpers import (
    HTTP_LAYER_REFUSALS,
    ClientFactory,
    ControlPlane,
    start_control_plane,
    write_policy,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.strategies import SearchStrategy
from openapi_spec_validator import validate
from pydantic import ValidationError
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from controlplane.live import LIVE_PATH
from controlplane.middlewares import REQUEST_ID_HEADER
from controlplane.sessions.models import LiveQuery

EXAMPLES_PER_OPERATION = 40
# The promise is "thousands of generated cases in CI": the run fails if it sent fewer.
MIN_CASES = 2000


async def _served_document(cp: ControlPlane) -> dict[str, Any]:
    response = await cp.client.get("/openapi.json")
    assert response.status == 200
    return dict(await response.json())


async def test_openapi_document_validates(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state")
    document = await _served_document(cp)
    validate(document)
    assert document["openapi"].startswith("3.")


async def test_openapi_covers_every_served_route(aiohttp_client: ClientFactory,
                                                 tmp_path: Path) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state")
    paths = (await _served_document(cp))["paths"]
    served = {(route.method.lower(), route.resource.canonical)
              for route in cp.client.app.router.routes()
              if route.resource is not None and not isinstance(route, SystemRoute)}
    documented = {(method, path) for path, item in paths.items() for method in item}
    assert served == documented
    assert len(served) >= 18


async def test_protected_operations_document_their_security(aiohttp_client: ClientFactory,
                                                            tmp_path: Path) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state")
    paths = (await _served_document(cp))["paths"]
    for path, item in paths.items():
        for method, operation in item.items():
            protected = path.startswith("/api/") or path == "/ui/session"
            # The token endpoint's RFC 8693 form carries its credential as subject_token; the
            # console signs in with a bearer token and then acts by its cookie alone.
            expected = {"/api/v1/token": [{"bearer": []}, {}]}.get(
                path, [{"bearer": []}, {"console": []}])
            if path == "/ui/session":
                expected = [{"bearer": []}] if method == "post" else [{"console": []}]
            assert (operation["security"] == expected) is protected, (method, path)
            if protected:
                assert {"401", "403", "429", "503"} <= set(operation["responses"]), (method, path)


async def test_openapi_declares_conditional_requests_headers_and_body_limits(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", client_max_size=32768)
    paths = (await _served_document(cp))["paths"]
    put = paths["/api/v1/templates/{name}"]["put"]
    assert {p["name"] for p in put["parameters"] if p["in"] == "header"} == {
        "If-Match", "If-None-Match"}
    for status in ("412", "428"):
        assert "application/problem+json" in put["responses"][status]["content"]
    assert put["responses"]["200"]["headers"]["ETag"]["required"] is True
    rollback = paths["/api/v1/templates/{name}/rollback"]["post"]
    assert {"412", "428"} <= set(rollback["responses"])
    assert "ETag" in paths["/api/v1/templates/{name}"]["get"]["responses"]["200"]["headers"]
    jwks = paths["/.well-known/jwks.json"]["get"]["responses"]
    assert {"ETag", "Cache-Control"} <= set(jwks["200"]["headers"]) and "ETag" in jwks["304"][
        "headers"]
    created = paths["/api/v1/projects"]["post"]["responses"]["201"]
    assert "Location" in created["headers"]
    for path, item in paths.items():
        for method, operation in item.items():
            responses = operation["responses"]
            for status in ("429", "503"):
                if status in responses:
                    assert "Retry-After" in responses[status]["headers"], (method, path, status)
            if "requestBody" in operation:
                limit = operation["requestBody"]["x-dsn-max-body-bytes"]
                assert str(limit) in responses["413"]["description"], (method, path)
    report = paths["/api/v1/sessions/{session}/scans/{scan}/result"]["post"]
    assert report["requestBody"]["x-dsn-max-body-bytes"] > 32768
    assert paths["/api/v1/projects"]["post"]["requestBody"]["x-dsn-max-body-bytes"] == 32768


async def test_openapi_declares_the_rfc_8693_form_of_the_token_endpoint(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state")
    document = await _served_document(cp)
    operation = document["paths"]["/api/v1/token"]["post"]
    assert set(operation["requestBody"]["content"]) == {
        "application/json", "application/x-www-form-urlencoded"}
    success = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert {ref["$ref"].rsplit("/", 1)[-1] for ref in success["anyOf"]} == {
        "IssuedToken", "TokenResponse"}
    assert operation["responses"]["200"]["headers"]["Cache-Control"]["required"] is True
    refusal = operation["responses"]["400"]["content"]
    assert refusal["application/json"]["schema"]["$ref"].endswith("/OAuthError")
    metadata = document["paths"]["/.well-known/oauth-authorization-server"]["get"]
    assert metadata["security"] == []


def _fuzz(document: dict[str, Any], base_url: str, token: str) -> tuple[list[str], int]:
    """Run schemathesis' generated cases for every operation; collect every failed check and
    count the cases sent."""
    schema = schemathesis.openapi.from_dict(document)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, response_headers_conformance]
    failures: list[str] = []
    calls: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        declared = document["paths"][operation.path][operation.method.lower()]
        # Valid inputs, then (where there are inputs to break) inputs the schema forbids; a
        # header declared as any string has no invalid value to send.
        breakable = "requestBody" in declared or any(
            parameter["in"] != "header" for parameter in declared.get("parameters", []))
        modes = list(GenerationMode) if breakable else [GenerationMode.POSITIVE]
        for mode in modes:
            _run_operation(operation.as_strategy(mode), base_url, token, checks, failures, calls)
    return failures, len(calls)


def _run_operation(cases: SearchStrategy[Any], base_url: str, token: str,
                   checks: list[Callable[..., Any]], failures: list[str], calls: list[int]) -> None:
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case: Any) -> None:
        _one_snapshot(case)
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {token}"})
        calls.append(response.status_code)
        if REQUEST_ID_HEADER.lower() not in {name.lower() for name in response.headers}:
            # Refused by the HTTP layer before the app saw it (a URL or header beyond aiohttp's
            # limits): no operation documents that answer, but it must be a client error.
            if response.status_code not in HTTP_LAYER_REFUSALS:
                failures.append(f"{case.operation.label} -> {response.status_code}: "
                                "not a client error from the HTTP layer")
            return
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:
            failures.extend(f"{case.operation.label} -> {response.status_code}: {failure.title}"
                            for failure in group.exceptions)

    run()


def _one_snapshot(case: Any) -> None:
    """A live stream answers for minutes: where the generated query would open one, it asks for
    one snapshot instead (once=true; the rest of the query is kept), so the run never waits."""
    if case.operation.path != LIVE_PATH:
        return
    query = dict(case.query or {})
    as_sent = {name: str(value).lower() if isinstance(value, bool) else value
               for name, value in query.items()}
    try:
        streams = not LiveQuery.model_validate(as_sent).once
    except ValidationError:
        return  # refused with 400 before anything is streamed
    if streams:
        case.query = {**query, "once": True}


async def test_schemathesis_finds_no_server_error(aiohttp_client: ClientFactory,
                                                  tmp_path: Path) -> None:
    # Limits the fuzzer cannot reach, so it explores the routes rather than the 429 answer.
    policy = write_policy(tmp_path / "policy", per_token="100000/minute",
                          per_project="100000/minute")
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", policy_path=policy)
    await cp.create_project("alpha")
    document = await _served_document(cp)
    base_url = str(cp.client.make_url("")).rstrip("/")
    # schemathesis calls synchronously: run it on a thread while this loop serves the requests.
    failures, cases = await asyncio.to_thread(_fuzz, document, base_url, cp.admin_token)
    print(f"schemathesis: {cases} cases")
    assert cases >= MIN_CASES
    assert failures == []
