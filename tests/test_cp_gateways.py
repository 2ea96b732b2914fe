"""``GET /api/v1/gateways``: the per-session counters of the gateways' metrics pages, each page
served over real HTTP on loopback; what each caller may see, gateways that cannot be read listed
down with the reason, and the ``gateway_metrics`` setting's checks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cp_helpers import ClientFactory, ControlPlane
from test_cp_cli import assert_one_line_error
from test_cp_config import serve_with, settings_from, write
from test_cp_sessions_api import opened, start_control_plane

from common.errors import InvalidSetting
from common.ports import free_port
from controlplane.gateways import MAX_METRICS_BYTES
from controlplane.settings import Settings


def page_for(*sessions: str) -> str:
    """A gateway's metrics page (as gateway/metrics.py writes it) with counters for ``sessions``,
    the n-th of them having forwarded n+1 messages of 1000 bytes."""
    lines = ["# HELP dsn_gateway_messages_total Data messages forwarded",
             "# TYPE dsn_gateway_messages_total counter",
             *(f'dsn_gateway_messages_total{{session="{s}"}} {n + 1}.0'
               for n, s in enumerate(sessions)),
             "# TYPE dsn_gateway_bytes_total counter",
             *(f'dsn_gateway_bytes_total{{session="{s}"}} {(n + 1) * 1000}.0'
               for n, s in enumerate(sessions)),
             "# TYPE dsn_gateway_backpressure_waiting_seconds gauge",
             *(f'dsn_gateway_backpressure_waiting_seconds{{session="{s}"}} 0.5'
               for s in sessions),
             "# TYPE dsn_gateway_drops_total counter",
             *(f'dsn_gateway_drops_total{{reason="{r}",session="{s}"}} 2.0'
               for s in sessions for r in ("unknown_scan", "scan_closed")),
             "# TYPE dsn_gateway_connections_total counter",
             'dsn_gateway_connections_total{event="accepted"} 7.0']
    return "\n".join(lines) + "\n"


class Pages:
    """A loopback HTTP server answering ``/NAME`` with ``pages[NAME]`` (text, or a status)."""

    def __init__(self) -> None:
        self.pages: dict[str, str | int] = {}
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["name"] == "endless":
            return await self.endless(request)
        page = self.pages.get(request.match_info["name"], 404)
        if isinstance(page, int):
            return web.Response(status=page)
        return web.Response(text=page, content_type="text/plain")

    @staticmethod
    async def endless(request: web.Request) -> web.StreamResponse:
        """A page sent in chunks, announcing no length, twice as long as any page may be."""
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        line = b"# " + b"x" * 1022 + b"\n"
        try:
            for _ in range(2 * MAX_METRICS_BYTES // len(line)):
                await response.write(line)
        except ConnectionError:
            pass  # the reader stopped at its bound
        return response

    def url(self, name: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(f"/{name}"))


@pytest.fixture
async def pages() -> AsyncIterator[Pages]:
    served = Pages()
    app = web.Application()
    app.router.add_get("/{name}", served.handle)
    served.server = TestServer(app, host="127.0.0.1")
    await served.server.start_server()
    yield served
    await served.server.close()


async def gateways_cp(aiohttp_client: ClientFactory, tmp_path: Path,
                      urls: tuple[str, ...]) -> ControlPlane:
    cp = await start_control_plane(aiohttp_client, tmp_path, gateway_metrics=urls)
    await cp.create_project("alpha")
    await cp.create_project("beta")
    return cp


async def gateways(cp: ControlPlane, token: str) -> list[dict[str, Any]]:
    response = await cp.call("GET", "/api/v1/gateways", token)
    assert response.status == 200, await response.text()
    return list((await response.json())["items"])


async def test_an_admin_sees_every_sessions_counters_a_project_token_only_its_projects(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages) -> None:
    cp = await gateways_cp(aiohttp_client, tmp_path, (pages.url("edge1"),))
    alpha_token, alpha = await opened(cp, "alpha")
    beta_token, beta = await opened(cp, "beta")
    pages.pages["edge1"] = page_for(alpha["id"], beta["id"], "(ended)")

    (gateway,) = await gateways(cp, cp.admin_token)
    assert gateway["up"] and gateway["reason"] is None and gateway["url"] == pages.url("edge1")
    by_id = {s["session"]: s for s in gateway["sessions"]}
    assert set(by_id) == {alpha["id"], beta["id"], "(ended)"}
    assert by_id[beta["id"]]["project"] == "beta" and by_id["(ended)"]["project"] is None
    assert by_id[beta["id"]]["messages"] == 2 and by_id[beta["id"]]["bytes"] == 2000
    assert by_id[alpha["id"]]["backpressure_waiting_seconds"] == 0.5
    assert by_id[alpha["id"]]["drops"] == {"unknown_scan": 2, "scan_closed": 2}

    (seen_by_alpha,) = await gateways(cp, alpha_token)
    assert [s["session"] for s in seen_by_alpha["sessions"]] == [alpha["id"]]
    (seen_by_beta,) = await gateways(cp, beta_token)
    assert [s["session"] for s in seen_by_beta["sessions"]] == [beta["id"]]
    rows = [row for row in cp.audit_rows() if row[2] == "gateways:read"]
    assert [row[4] for row in rows] == ["allow"] * 3
    assert [row[3] for row in rows] == ["gateway", "gateway/alpha", "gateway/beta"]
    assert rows[1][5] == "project-members-watch-gateways"


async def test_a_session_token_and_a_token_without_sessions_read_are_refused(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages) -> None:
    cp = await gateways_cp(aiohttp_client, tmp_path, (pages.url("edge1"),))
    _token, session = await opened(cp, "alpha")
    response = await cp.call("GET", "/api/v1/gateways", session["token"])
    assert response.status == 401
    assert (await cp.call("GET", "/api/v1/gateways")).status == 401
    narrow = (await cp.project_token("alpha", scope="projects:read"))["token"]
    refused = await cp.call("GET", "/api/v1/gateways", narrow)
    assert refused.status == 403 and "sessions:read" in (await refused.json())["detail"]


async def test_a_gateway_that_cannot_be_read_is_down_with_the_reason_and_the_rest_answer(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages) -> None:
    closed = f"http://127.0.0.1:{free_port()}/metrics"
    names = ("edge1", "missing", "garbage", "binary", "huge", "endless")
    cp = await gateways_cp(aiohttp_client, tmp_path, (*(pages.url(n) for n in names), closed))
    _token, alpha = await opened(cp, "alpha")
    pages.pages.update({
        "edge1": page_for(alpha["id"]), "missing": 404,
        "garbage": "<html><body>not metrics</body></html>\n",
        "binary": "dsn_gateway_messages_total{session=\"x\"} \udcff\n".encode(
            "utf-8", "surrogateescape").decode("latin-1"),
        "huge": "# " + "x" * MAX_METRICS_BYTES + "\n"})

    listed = {g["url"].rsplit("/", 1)[-1]: g for g in await gateways(cp, cp.admin_token)}
    assert listed["edge1"]["up"] and listed["edge1"]["sessions"][0]["messages"] == 1
    down = {name: g["reason"] for name, g in listed.items() if not g["up"]}
    assert set(down) == {"missing", "garbage", "binary", "huge", "endless", "metrics"}
    assert down["missing"] == "the metrics page answered HTTP 404"
    assert down["garbage"] == "the metrics page is not a Prometheus text exposition"
    assert down["binary"] == "the metrics page is not a Prometheus text exposition"
    assert down["huge"] == f"the metrics page is larger than {MAX_METRICS_BYTES} bytes"
    assert down["endless"] == down["huge"]
    assert down["metrics"].startswith("cannot be reached")
    assert all(not g["sessions"] for g in listed.values() if not g["up"])


async def test_no_gateway_configured_is_an_empty_list(aiohttp_client: ClientFactory,
                                                      tmp_path: Path) -> None:
    cp = await gateways_cp(aiohttp_client, tmp_path, ())
    assert await gateways(cp, cp.admin_token) == []


@pytest.mark.parametrize(("url", "reason"), [
    ("gateway-host:9100", "must be an http(s) URL"),
    ("ftp://gateway-host/metrics", "must be an http(s) URL"),
    ("http:///metrics", "must be an http(s) URL"),
    ("http://user:secret@gateway-host/metrics", "no user, password"),
    ("http://gateway-host:99999/metrics", "must be an http(s) URL"),
    ("http://gateway-host/metrics#x", "must be an http(s) URL"),
])
def test_a_bad_metrics_url_is_refused_naming_it(tmp_path: Path, url: str, reason: str) -> None:
    with pytest.raises(InvalidSetting) as refused:
        Settings(state_dir=tmp_path, gateway_metrics=(url,))
    assert refused.value.key == "gateway_metrics" and reason in str(refused.value)
    assert repr(url) in str(refused.value)


def test_a_url_listed_twice_is_refused(tmp_path: Path) -> None:
    url = "http://gateway-host:9100/metrics"
    with pytest.raises(InvalidSetting, match="listed twice"):
        Settings(state_dir=tmp_path, gateway_metrics=(url, url))


def test_the_urls_come_from_the_file_or_the_repeated_option(tmp_path: Path) -> None:
    config = write(tmp_path, "gateway:\n  metrics: [http://edge1:9100/metrics, "
                             "https://edge2/metrics]\n")
    assert settings_from("--config", str(config)).gateway_metrics == (
        "http://edge1:9100/metrics", "https://edge2/metrics")
    given = settings_from("--config", str(config), "--gateway-metrics", "http://a:1/metrics",
                          "--gateway-metrics", "http://b:2/metrics")
    assert given.gateway_metrics == ("http://a:1/metrics", "http://b:2/metrics")


def test_a_bad_url_is_one_error_naming_the_file_key_or_the_option(tmp_path: Path) -> None:
    config = write(tmp_path, "gateway:\n  metrics: [edge1:9100]\n")
    assert_one_line_error(serve_with(config, "--state-dir", str(tmp_path / "none")),
                          f"error: {config}: gateway.metrics: 'edge1:9100': must be an http(s) "
                          "URL")
    good = write(tmp_path / "good", "gateway:\n  metrics: [http://edge1:9100/metrics]\n")
    assert_one_line_error(serve_with(good, "--gateway-metrics", "ftp://edge1/metrics"),
                          "error: --gateway-metrics: 'ftp://edge1/metrics': must be")
