"""The scans page in headless Chromium: a project member opens a session and launches its consumer
job from the console, choosing among the templates their project may use and setting each declared
parameter in a typed input; a producer streams a scan, and the scan's page shows it complete with
its pictures without a reload; another project's member is refused that page."""

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


def choose(page: Page, css: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(page.find(css)).select_by_value(value)


def options(page: Page, css: str) -> list[str]:
    page.find(f"{css} option")  # once the options are in
    return [o.get_attribute("value") for o in page.find_all(f"{css} option")]


def value(page: Page, css: str) -> str:
    return str(page.find(css).get_attribute("value"))


def attributes(page: Page, css: str, *names: str) -> list[str | None]:
    element = page.find(css)
    return [element.get_attribute(name) for name in names]


def error_at(page: Page, input_id: str) -> str:
    """The message shown beside an input ("" when it has none: the slot is then empty)."""
    (slot,) = page.find_all(f"#{input_id}-error")
    return str(slot.get_attribute("textContent"))


def templates_of(site: Site, token: str, kind: str) -> list[str]:
    listed = site.api("GET", "/api/v1/templates", token)["items"]
    return [t["name"] for t in listed if t["kind"] == kind]


def test_a_member_opens_a_session_launches_its_job_and_sees_its_scan_arrive(
        page: Page, console_site: Site, tmp_path: Path) -> None:
    token = member(console_site, "scans-flow-1", "carol")
    public, secret = create_keypair(tmp_path / "producer", "microscope")
    page.sign_in(token)
    page.go("scans")
    page.find("#session-param-hwm")  # the chosen template's parameters are in
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
    choose(page, "#job-template", "local-mpiexec")
    set_value(page, "#job-ranks", "2")
    set_value(page, "#job-param-scans", "1")
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


def test_the_forms_offer_the_projects_templates_with_typed_parameter_inputs(
        page: Page, console_site: Site) -> None:
    token = member(console_site, "scans-forms-1", "hana")
    page.sign_in(token)
    page.go("scans")
    page.find("#session-param-hwm")
    assert options(page, "#session-template") == templates_of(console_site, token, "dsn")
    assert value(page, "#session-template") == "4dstem"
    # One input per declared parameter, typed, bounded and pre-filled with its default.
    assert attributes(page, "#session-param-hwm", "type", "min", "max", "value") == [
        "number", "1", "10000", "256"]
    assert attributes(page, "#session-param-sources", "type", "value") == ["text", "127.0.0.0/8"]
    assert "(int, 1..10000)" in page.find("label[for=session-param-hwm]").text

    # Job templates: the launcher's own (""), then those the project may use, each with its own.
    assert options(page, "#job-template") == ["", *templates_of(console_site, token, "job")]
    assert attributes(page, "#job-ranks", "type", "min", "max", "value") == [
        "number", "1", "4096", "1"]
    choose(page, "#job-template", "local-mpiexec")
    assert options(page, "#job-param-kernel") == ['"vectorised"', '"stempy"']
    assert value(page, "#job-param-kernel") == '"vectorised"'
    assert attributes(page, "#job-param-scans", "type", "min", "max", "value") == [
        "number", "0", "100000", "0"]
    choose(page, "#job-template", "slurm-sbatch")
    assert attributes(page, "#job-param-account", "type", "value", "placeholder") == [
        "text", "", "e.g. lcls:xpp12345"]  # required: no default
    assert options(page, "#job-param-exclusive") == ["true", "false"]
    assert value(page, "#job-param-exclusive") == "false"
    assert value(page, "#job-param-time") == "00:30:00"
    assert page.find_all("#job-param-scans") == []


def test_a_value_out_of_bounds_is_shown_at_its_input_and_the_form_keeps_the_values(
        page: Page, console_site: Site, tmp_path: Path) -> None:
    token = member(console_site, "scans-form-1", "gina")
    public, secret = create_keypair(tmp_path / "keys", "camera")
    key = load_keypair(public).public.decode()
    page.sign_in(token)
    page.go("scans")
    set_value(page, "#session-param-hwm", "20000")
    set_value(page, "#session-param-max_producers", "8")
    set_value(page, "#session-client-key", key)
    page.find("#open-session button[type=submit]").click()
    page.wait_text("#session-param-hwm-error", "20000 is outside 1..10000")
    assert "invalid" in str(page.find("#session-param-hwm").get_attribute("class"))
    assert "params.hwm" in page.find("#session-status .error").text
    assert error_at(page, "session-param-max_producers") == ""
    assert page.find_all("#session-opened") == []
    assert [value(page, css) for css in ("#session-template", "#session-param-hwm",
                                         "#session-param-max_producers", "#session-client-key")
            ] == ["4dstem", "20000", "8", key]

    # A number the browser cannot read is named at its input, in the page.
    set_value(page, "#session-param-hwm", "e")
    page.find("#open-session button[type=submit]").click()
    page.wait_text("#session-param-hwm-error", "not a whole number")

    # Corrected, the same form opens the session, with the values typed as the template declares.
    set_value(page, "#session-param-hwm", "64")
    page.find("#open-session button[type=submit]").click()
    session = page.find("#opened-id").text
    assert error_at(page, "session-param-hwm") == ""
    params = console_site.api("GET", f"/api/v1/sessions/{session}", token)["params"]
    assert params["hwm"] == 64 and params["max_producers"] == 8
    assert params["sources"] == ["127.0.0.0/8"]

    # A job parameter out of its bounds, then ranks above the API's, each at its own input.
    choose(page, "#job-template", "local-mpiexec")
    set_value(page, "#job-param-scans", "-1")
    page.find("#launch-job button[type=submit]").click()
    page.wait_text("#job-param-scans-error", "-1 is outside 0..100000")
    assert value(page, "#job-param-scans") == "-1"
    set_value(page, "#job-param-scans", "1")
    set_value(page, "#job-ranks", "5000")
    page.find("#launch-job button[type=submit]").click()
    page.wait_text("#job-ranks-error", "4096")
    assert error_at(page, "job-param-scans") == ""
    assert console_site.api("GET", f"/api/v1/sessions/{session}/jobs", token)["items"] == []

    # A bad key is shown at the key; a secret key file is refused in the page: it is never sent.
    set_value(page, "#session-client-key", "not-a-curve-key")
    page.find("#open-session button[type=submit]").click()
    page.wait_text("#session-client-key-error", "40-character Z85 CURVE public key")
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
    # Sessions are opened with a project token: an admin gets the reason, not the forms.
    assert "sign in with a project token" in page.find("#sessions-admin-note").text
    assert page.find_all("#open-session") == [] and page.find_all("#launch-job") == []
    set_value(page, "#filter-project", "scans-admin-1")
    page.find("#scan-filters button[type=submit]").click()
    page.wait_text("#scans-table", session)
    projects = {row.text for row in page.find_all("#scans-table tbody td:nth-child(3)")}
    assert projects == {"scans-admin-1"}
    page.find("#scans-table .scan-link").click()
    page.wait_text("#scan-status", "complete")
    assert eventually(lambda: _loaded(page), timeout_s=20, what="both pictures")[0] == 6
