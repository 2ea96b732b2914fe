"""Observability (SPEC §8): both services' Prometheus metrics exist as docs/observability.md lists
them and move with real traffic, and no log line, audit record or stored row ever holds a token.

The gateway is scraped over HTTP from its real exporter (gateway.metrics.serve_metrics, what
``dsn gateway run --metrics HOST:PORT`` starts) during a small real CURVE stream; the control
plane is a real app on real SQLite, scraped at GET /metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import test_gateway_proxy
import zmq
from aiohttp.test_utils import TestServer
from cp_helpers import (
    CLIENT_SCOPE,
    ClientFactory,
    ControlPlane,
    http_layer_refusal,
    start_control_plane,
)
from prometheus_client.parser import text_string_to_metric_families
from test_gateway_proxy import SMALL_SECTOR, Rig, begin, data, end, receive
from waiting import eventually

from common.keys import KeyPair
from common.logs import JsonLines
from controlplane.middlewares import AccessLogger, quiet_protocol_errors
from gateway.metrics import serve_metrics

rig = test_gateway_proxy.rig  # the gateway rig fixture, shared

DOC = Path(__file__).resolve().parent.parent / "docs" / "observability.md"
LOG_FIELDS = {"ts", "level", "logger", "event"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --- reading metrics and the documented catalogue ---------------------------------------------

@dataclass(frozen=True)
class Family:
    type: str
    labels: frozenset[str]


def documented(prefix: str) -> dict[str, Family]:
    """The metric table of docs/observability.md: | `name` | type | `label`, ... | meaning |."""
    rows = re.findall(r"^\| `(dsn_\w+)` \| (\w+) \| ([^|]*) \|", DOC.read_text(), re.MULTILINE)
    return {name: Family(kind, frozenset(re.findall(r"`(\w+)`", labels)))
            for name, kind, labels in rows if name.startswith(prefix)}


def parse(text: str) -> tuple[dict[str, Family], Samples]:
    """Families as documented (counters named with ``_total``) and every sample by name+labels."""
    families: dict[str, Family] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        if family.type == "gauge" and family.name.endswith("_created"):
            continue  # prometheus-client's creation timestamps of the counters and histogram
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {label for s in family.samples for label in s.labels if label != "le"}
        families[name] = Family(family.type, frozenset(labels))
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_matches_doc(exposed: dict[str, Family], prefix: str) -> None:
    doc = documented(prefix)
    assert doc, f"docs/observability.md documents no {prefix}* metric"
    assert set(exposed) == set(doc), "documented and exposed metric families differ"
    for name, family in exposed.items():
        assert family.type == doc[name].type, name
        # A family with no sample yet shows no labels; every label seen must be documented.
        assert family.labels <= doc[name].labels, name


# --- gateway ---------------------------------------------------------------------------------

@pytest.fixture
def gateway_metrics(free_port: Callable[[], int]) -> Iterator[Callable[[Rig], Callable[[], str]]]:
    """Serve a rig's gateway metrics over HTTP; returns a scrape function."""
    servers = []

    def serve(r: Rig) -> Callable[[], str]:
        address = f"127.0.0.1:{free_port()}"
        servers.append(serve_metrics(address, r.gateway))

        def scrape() -> str:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
                return response.read().decode()  # type: ignore[no-any-return]
        return scrape

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(30)
def test_gateway_metrics_are_the_documented_families_and_follow_a_real_stream(
        rig: Callable[..., Rig], gateway_metrics: Callable[[Rig], Callable[[], str]],
        curve_keypair: Callable[[], KeyPair]) -> None:
    r = rig(consumers=2)
    scrape = gateway_metrics(r)
    _, before = parse(scrape())
    assert value(before, "dsn_gateway_consumers", session="s1") == 2
    assert value(before, "dsn_gateway_messages_total", session="s1") == 0

    producer = r.producer()
    producer.send_multipart(begin(scan=1, shape=(3, 4)))
    for seq in range(24):
        producer.send_multipart(data(1, seq // 2, seq % 2, seq=seq))
    producer.send_multipart(data(1, 0, 0, size=SMALL_SECTOR - 2))  # wrong_payload_size
    with contextlib.suppress(zmq.Again):  # refused at once, the key may never get a pipe
        r.producer(client=curve_keypair()).send_multipart(begin(scan=9), flags=zmq.NOBLOCK)
    for pull in r.consumers:
        receive(pull, 1 + 12)
    eventually(lambda: ("deny", "unknown_key") in r.gateway.auth_decisions(), timeout_s=5.0,
               what="deny/unknown_key")

    families, during = parse(scrape())
    assert_matches_doc(families, "dsn_gateway_")
    for thread in ("forwarding", "io"):  # the loop and the I/O threads did the work, apart
        assert value(during, "dsn_gateway_thread_cpu_seconds_total", thread=thread) > value(
            before, "dsn_gateway_thread_cpu_seconds_total", thread=thread)
    assert value(during, "dsn_gateway_messages_total", session="s1") == 24
    assert value(during, "dsn_gateway_bytes_total", session="s1") == 24 * SMALL_SECTOR
    assert value(during, "dsn_gateway_drops_total", session="s1",
                 reason="wrong_payload_size") == 1
    assert value(during, "dsn_gateway_scans_open", session="s1") == 1
    assert value(during, "dsn_gateway_auth_decisions_total", decision="allow",
                 reason="session") == 1
    assert value(during, "dsn_gateway_auth_decisions_total", decision="deny",
                 reason="unknown_key") == 1

    producer.send_multipart(end(scan=1, sent=25))
    for pull in r.consumers:
        receive(pull, 1)
    _, after = parse(scrape())
    assert value(after, "dsn_gateway_scans_open", session="s1") == 0
    assert value(after, "dsn_gateway_messages_total", session="s1") == 24


@pytest.mark.timeout(30)
def test_l4_gateway_shows_its_forwarding_and_io_threads_cpu_too(
        rig: Callable[..., Rig], gateway_metrics: Callable[[Rig], Callable[[], str]]) -> None:
    r = rig(consumers=1, mode="l4")
    scrape = gateway_metrics(r)
    _, before = parse(scrape())
    producer = r.producer()
    for seq in range(24):
        producer.send_multipart(data(1, seq // 2, seq % 2, seq=seq))
    receive(r.consumers[0], 24)
    _, after = parse(scrape())
    for thread in ("forwarding", "io"):  # zmq.proxy runs in the named thread as L7's loop does
        assert value(after, "dsn_gateway_thread_cpu_seconds_total", thread=thread) > value(
            before, "dsn_gateway_thread_cpu_seconds_total", thread=thread)


# --- control plane: one flow that issues, exchanges, uses, abuses and revokes tokens ------------

FLOW_SCOPE = CLIENT_SCOPE + " consumers:register"


@dataclass
class Flow:
    tokens: list[str]  # every token the service issued or was shown in this flow
    refused: int       # requests answered 401


async def token_flow(cp: ControlPlane) -> Flow:
    tokens = [cp.admin_token]
    statuses: list[int] = []

    async def call(method: str, path: str, token: str | None, **kwargs: Any) -> Any:
        response = await cp.call(method, path, token, **kwargs)
        statuses.append(response.status)
        return response

    await cp.create_project("obs")
    issued = await cp.project_token("obs", scope=FLOW_SCOPE)
    project = issued["token"]
    session = (await cp.exchange(project, kind="session"))["token"]
    consumer = (await cp.exchange(project, kind="consumer"))["token"]
    tokens += [project, session, consumer]
    assert (await call("GET", "/api/v1/projects/obs", project)).status == 200
    opened = await call("POST", "/api/v1/sessions", project, json={
        "project": "obs", "template": "4dstem", "params": {},
        "client_key": zmq.curve_keypair()[0].decode()})
    assert opened.status == 201, await opened.text()
    body = await opened.json()
    tokens.append(body["token"])
    registered = await call("POST", f"/api/v1/sessions/{body['id']}/consumers", consumer, json={
        "endpoint": "tcp://127.0.0.1:6001", "rank": 0, "job_id": "job-1", "host": "node-1"})
    assert registered.status == 201, await registered.text()

    forged = project[:-4] + ("AAAA" if not project.endswith("AAAA") else "BBBB")
    for bad in (forged, "not.a.token", f"{project}x"):
        assert (await call("GET", "/api/v1/projects/obs", bad)).status == 401
    basic = await call("GET", "/api/v1/projects/obs", None,
                       headers={"Authorization": f"Basic {project}"})
    assert basic.status == 401
    assert (await cp.admin("DELETE", f"/api/v1/tokens/{issued['jti']}")).status in (200, 204)
    assert (await call("GET", "/api/v1/projects/obs", project)).status == 401  # revoked
    cp.clock.advance(13 * 3600)  # past the session token's 12 h cap
    assert (await call("GET", "/api/v1/sessions", session)).status == 401  # expired
    return Flow(tokens, statuses.count(401))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: dict[int, logging.LogRecord] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.records[id(record)] = record  # a record seen at two loggers counts once


@pytest.fixture
def all_logs() -> Iterator[Callable[[], list[str]]]:
    """Every record any logger emits, at DEBUG and up, formatted as the services' JSON lines.
    The handler sits on the root logger and on the loggers ``dsn`` processes stop propagating
    (common.logs.configure), so no record escapes it."""
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in ("", "dsn", "aiohttp.access")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(collect)
        logger.setLevel(logging.DEBUG)
    formatter = JsonLines({})
    # A copy first (one step under the GIL): store and logging threads may still add records.
    yield lambda: [formatter.format(record) for record in collect.records.copy().values()]
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(collect)
        logger.setLevel(level)


def secrets_of(tokens: list[str]) -> list[str]:
    """Each token and its signature segment: the header and claims are no secret (base64 of
    what the audit log names anyway), so the signature is what makes a leaked token usable."""
    return [piece for token in tokens for piece in (token, token.rsplit(".", 1)[-1])]


def database_text(path: Path) -> str:
    with closing(sqlite3.connect(path)) as conn:
        return "\n".join(conn.iterdump())


@pytest.mark.timeout(60)
async def test_no_token_reaches_any_log_line_audit_record_or_stored_row(
        aiohttp_client: ClientFactory, tmp_path: Path,
        all_logs: Callable[[], list[str]]) -> None:
    async def served(app: Any) -> Any:  # with the access logger `dsn controlplane serve` uses
        server = TestServer(app)
        await server.start_server(access_log_class=AccessLogger)
        return await aiohttp_client(server)

    quiet_protocol_errors()  # as `dsn controlplane serve` does
    cp = await start_control_plane(served, tmp_path / "state")
    flow = await token_flow(cp)
    # A client that puts its token in the query string: refused, and the token is not logged.
    leaked = await cp.call("GET", f"/api/v1/projects/obs?access_token={flow.tokens[1]}")
    assert leaked.status == 401
    # A header too long to parse: the HTTP layer refuses it and logs no byte of it.
    bomb = {"Authorization": f"Bearer {flow.tokens[1]}{'x' * 9000}"}
    assert await http_layer_refusal(cp.call("GET", "/api/v1/projects/obs", headers=bomb))
    # A token pasted into the path: in a revocation, a project name, a path no route serves. It
    # is no token id or project name: 404 before anything looks it up or audits it.
    pasted = flow.tokens[2]
    assert (await cp.admin("DELETE", f"/api/v1/tokens/{pasted}")).status == 404
    assert (await cp.admin("GET", f"/api/v1/projects/{pasted}")).status == 404
    assert (await cp.call("GET", f"/{pasted}")).status == 404
    audit = await (await cp.admin("GET", "/api/v1/audit")).text()
    lines = all_logs()
    assert flow.refused == 6 and len(flow.tokens) == 5
    loggers = {json.loads(line)["logger"] for line in lines}
    assert {"aiohttp.access", "controlplane.store"} <= loggers, "the capture is not working"
    access = [entry for entry in map(json.loads, lines) if entry["logger"] == "aiohttp.access"]
    assert sum(entry["status"] == 401 for entry in access) == flow.refused + 1  # all logged
    assert sum(entry["path"].endswith("(redacted)") for entry in access) == 3
    assert "/api/v1/projects/obs" in {entry["path"] for entry in access}
    assert len(cp.audit_rows()) > 10 and "token:" in audit  # denials are audited by reason
    haystacks = {"log": "\n".join(lines), "audit API": audit,
                 "state database": database_text(cp.database)}
    for where, text in haystacks.items():
        for secret in secrets_of(flow.tokens):
            assert secret not in text, f"a token (or its signature) appears in the {where}"
    for line in lines:
        assert LOG_FIELDS <= set(json.loads(line)), line
        assert "Bearer" not in line, line


@pytest.mark.timeout(60)
async def test_control_plane_metrics_are_the_documented_families_and_count_token_decisions(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state")
    flow = await token_flow(cp)
    response = await cp.client.get("/metrics")
    assert response.status == 200
    families, samples = parse(await response.text())
    assert_matches_doc(families, "dsn_cp_")
    assert {kind: value(samples, "dsn_cp_tokens_issued_total", kind=kind)
            for kind in ("project", "session", "consumer")} == {
        "project": 1, "session": 2, "consumer": 1}
    token_denials: dict[str, float] = {}
    for (name, labels), count in samples.items():
        reason = dict(labels).get("reason", "")
        if name == "dsn_cp_authz_decisions_total" and reason.startswith("token:"):
            token_denials[reason] = token_denials.get(reason, 0) + count
    # forged, garbage and altered tokens fail their signature or shape; Basic is no bearer token
    assert sum(token_denials.values()) == flow.refused
    assert token_denials["token:revoked"] == 1 and token_denials["token:signature"] == 1
    assert value(samples, "dsn_cp_authz_decisions_total", action="sessions:open",
                 decision="allow", reason="clients-work-in-their-project") == 1
    refused = sum(v for (name, labels), v in samples.items()
                  if name == "dsn_cp_http_requests_total" and ("status", "401") in labels)
    assert refused == flow.refused
    assert value(samples, "dsn_cp_http_request_seconds_count",
                 route="/api/v1/sessions") >= 1
