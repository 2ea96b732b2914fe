"""The scans page in headless Chromium: a project member opens a session and launches its consumer
job from the console, a producer streams a scan, and the scan's page shows it complete with its
pictures without a reload; another project's member is refused that page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zmq
from browser import Page, Site
from waiting import eventually

from common.keys import create_keypair, load_keypair

IMAGES = """return [...document.querySelectorAll('#scan-pictures img')]
    .map((image) => image.complete ? image.naturalWidth : 0)"""


def member(site: Site, project: str, subject: str) -> str:
    site.api("POST", "/api/v1/projects", site.admin_token, {"name": project})
    issued = site.api("POST", f"/api/v1/projects/{project}/tokens", site.admin_token,
                      {"subject": subject, "ttl": 3600})
    return str(issued["token"])


def live_consumers(site: Site, token: str, session: str) -> int:
    return int(site.api("GET", f"/api/v1/sessions/{session}", token)["counters"]["live_consumers"])


def set_value(page: Page, css: str, value: str) -> None:
    field = page.find(css)
    field.clear()
    field.send_keys(value)


def test_a_member_opens_a_session_launches_its_job_and_sees_its_scan_arrive(
        page: Page, console_site: Site, tmp_path: Path) -> None:
    token = member(console_site, "scans-flow-1", "carol")
    public, secret = create_keypair(tmp_path / "producer", "microscope")
    page.sign_in(token)
    page.go("scans")
    page.find("#session-client-key-file").send_keys(str(public))
    page.find("#open-session button[type=submit]").click()
    session = page.find("#opened-id").text
    assert page.find("#opened-endpoint").text == console_site.gateway_endpoint
    assert page.find("#opened-receipts").text == console_site.receipts_endpoint
    server_key = load_keypair(console_site.server_key).public.decode()
    assert page.find("#opened-server-key").text == server_key
    assert console_site.api("GET", f"/api/v1/sessions/{session}", token)["client_key"] == (
        load_keypair(public).public.decode())

    # The job form offers the session just opened.
    assert page.find("#job-session").get_attribute("value") == session
    set_value(page, "#job-template", "local-mpiexec")
    set_value(page, "#job-ranks", "2")
    set_value(page, "#job-params", "scans=1")
    page.find("#launch-job button[type=submit]").click()
    page.wait_text("#job-status", "local-mpiexec")
    eventually(lambda: live_consumers(console_site, token, session) == 2, timeout_s=30,
               what="both consumer ranks to register")
    page.wait_text("#job-state", "running")

    page.go(f"scans/{session}/0")
    page.wait_text("#scan-status", "In progress")
    page.driver.execute_script("window.notReloaded = true")
    stream = console_site.dsn(
        "producer", "stream", "--endpoint", console_site.gateway_endpoint, "--server-key",
        str(console_site.server_key), "--receipts", console_site.receipts_endpoint,
        "--client-key", str(secret), "--scan-shape", "8x8", "--no-progress", timeout_s=60)
    assert stream.returncode == 0, stream.stderr
    page.wait_text("#scan-status", "complete", timeout_s=30)
    widths = eventually(lambda: _loaded(page), timeout_s=20, what="both pictures to load")
    assert widths[0] == 8  # the virtual bright field is scan-shaped
    captions = [e.text for e in page.find_all("#scan-pictures figcaption")]
    assert captions == ["Virtual bright field", "Diffraction pattern sum"]
    assert page.driver.execute_script("return window.notReloaded") is True
    assert page.find(".loss-manifest").text == "No sector was lost."
    assert page.find(".scan-sha256").text == console_site.api(
        "GET", f"/api/v1/sessions/{session}/scans/0", token)["items"][0]["sha256"]

    page.go("scans")
    page.wait_text("#scans-table", session)


def _loaded(page: Page) -> list[Any]:
    widths = page.driver.execute_script(IMAGES)
    assert len(widths) == 2 and all(widths), widths
    return list(widths)


def test_another_projects_member_is_refused_the_scan_page(page: Page, console_site: Site) -> None:
    owner = member(console_site, "scans-owner-1", "dave")
    session = console_site.api("POST", "/api/v1/sessions", owner, {
        "project": "scans-owner-1", "template": "4dstem",
        "client_key": zmq.curve_keypair()[0].decode()})["id"]
    page.sign_in(member(console_site, "scans-other-1", "erin"))
    page.go(f"scans/{session}/0")
    refusal = page.find("#scan .error")
    assert "another project may not act here" in refusal.text
    assert page.find_all("#scan-pictures") == []


def test_a_refused_session_shows_its_field_and_line_errors_and_keeps_the_form(
        page: Page, console_site: Site, tmp_path: Path) -> None:
    page.sign_in(member(console_site, "scans-form-1", "gina"))
    page.go("scans")
    set_value(page, "#session-params", "hwm=64\nnot a pair")
    set_value(page, "#session-client-key", "not-a-curve-key")
    page.find("#open-session button[type=submit]").click()
    assert "params, line 2: expected NAME=VALUE" in page.find("#session-status .error").text

    set_value(page, "#session-params", "hwm=64")
    page.find("#open-session button[type=submit]").click()
    page.wait_text("#session-status .error", "client_key")
    assert page.find_all("#session-opened") == []
    values = [page.find(css).get_attribute("value")
              for css in ("#session-template", "#session-params", "#session-client-key")]
    assert values == ["4dstem", "hwm=64", "not-a-curve-key"]

    # A secret key file is refused in the page: it is never sent.
    _, secret = create_keypair(tmp_path / "keys", "camera")
    set_value(page, "#session-client-key", " ")
    page.find("#session-client-key-file").send_keys(str(secret))
    page.find("#open-session button[type=submit]").click()
    page.wait_text("#session-status .error", "secret key file")


def test_an_admin_finds_a_projects_scan_with_the_filters_and_sees_its_pictures(
        page: Page, console_site: Site, tmp_path: Path) -> None:
    token = member(console_site, "scans-admin-1", "frank")
    public, secret = create_keypair(tmp_path / "producer", "detector")
    session = console_site.api("POST", "/api/v1/sessions", token, {
        "project": "scans-admin-1", "template": "4dstem",
        "client_key": load_keypair(public).public.decode()})["id"]
    console_site.api("POST", f"/api/v1/sessions/{session}/jobs", token,
                     {"template": "local-mpiexec", "ranks": 1, "params": {"scans": 1}})
    eventually(lambda: live_consumers(console_site, token, session) == 1, timeout_s=30,
               what="the consumer rank to register")
    stream = console_site.dsn(
        "producer", "stream", "--endpoint", console_site.gateway_endpoint, "--server-key",
        str(console_site.server_key), "--receipts", console_site.receipts_endpoint,
        "--client-key", str(secret), "--scan-shape", "4x6", "--no-progress", timeout_s=60)
    assert stream.returncode == 0, stream.stderr
    eventually(lambda: console_site.api("GET", f"/api/v1/sessions/{session}/scans/0", token),
               timeout_s=30, what="the scan's result")

    page.sign_in(console_site.admin_token)
    page.go("scans")
    assert page.find_all("#open-session") == []  # sessions are opened with a project token
    set_value(page, "#filter-project", "scans-admin-1")
    page.find("#scan-filters button[type=submit]").click()
    page.wait_text("#scans-table", session)
    projects = {row.text for row in page.find_all("#scans-table tbody td:nth-child(3)")}
    assert projects == {"scans-admin-1"}
    page.find("#scans-table .scan-link").click()
    page.wait_text("#scan-status", "complete")
    assert eventually(lambda: _loaded(page), timeout_s=20, what="both pictures")[0] == 6
