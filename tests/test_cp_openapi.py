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
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from controlplane.middlewares import REQUEST_ID_HEADER

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
            protected = path.startswith("/api/")
            assert (operation["security"] == [{"bearer": []}]) is protected, (method, path)
            if protected:
                assert {"401", "403", "429", "503"} <= set(operation["responses"]), (method, path)


def _fuzz(document: dict[str, Any], base_url: str, token: str) -> tuple[list[str], int]:
    """Run schemathesis' generated cases for every operation; collect every failed check and
    count the cases sent."""
    schema = schemathesis.openapi.from_dict(document)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    failures: list[str] = []
    calls: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        declared = document["paths"][operation.path][operation.method.lower()]
        # Valid inputs, then (where there are inputs to break) inputs the schema forbids.
        modes = list(GenerationMode) if {"parameters", "requestBody"} & set(declared) else [
            GenerationMode.POSITIVE]
        for mode in modes:
            _run_operation(operation.as_strategy(mode), base_url, token, checks, failures, calls)
    return failures, len(calls)


def _run_operation(cases: SearchStrategy[Any], base_url: str, token: str,
                   checks: list[Callable[..., Any]], failures: list[str], calls: list[int]) -> None:
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case: Any) -> None:
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
