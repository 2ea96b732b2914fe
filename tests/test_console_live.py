"""The console's live page in headless Chromium: the gateway's row, and a session opened through
the API appearing without a reload, for an admin and (its own project's only) for a project
member."""

from __future__ import annotations

from typing import Any

import zmq
from browser import Page, Site


def project_with_token(site: Site, name: str) -> str:
    site.api("POST", "/api/v1/projects", site.admin_token, {"name": name})
    issued = site.api("POST", f"/api/v1/projects/{name}/tokens", site.admin_token,
                      {"subject": "bob", "ttl": 3600})
    return str(issued["token"])


def open_session(site: Site, project: str, token: str) -> dict[str, Any]:
    return dict(site.api("POST", "/api/v1/sessions", token, {
        "project": project, "template": "4dstem", "params": {},
        "client_key": zmq.curve_keypair()[0].decode()}))


def mark(page: Page) -> None:
    """A mark on the loaded document: it survives only while the page is not reloaded."""
    page.driver.execute_script("window.liveMark = 'still here'")


def still_marked(page: Page) -> bool:
    return bool(page.driver.execute_script("return window.liveMark") == "still here")


def test_a_session_opened_through_the_api_appears_without_a_reload(page: Page,
                                                                  console_site: Site) -> None:
    token = project_with_token(console_site, "live-demo-1")
    page.sign_in(console_site.admin_token)
    page.go("live")
    gateway = page.wait_text("#gateway-table tbody", console_site.metrics)
    assert "up" in gateway.text
    mark(page)
    session = open_session(console_site, "live-demo-1", token)
    row = page.wait_text("#session-table tbody", session["id"])
    assert "live-demo-1" in row.text and "4dstem" in row.text
    assert "No consumer has registered" in page.find(f"#live-session-{session['id']}").text
    # Once the gateway has the session (from the state service) its counters show, and two
    # samples later the session's rate.
    page.wait_text(f"tr.session-row[data-session='{session['id']}']", "MB/s")
    assert still_marked(page)


def test_a_project_member_sees_only_its_own_projects_sessions(page: Page,
                                                             console_site: Site) -> None:
    own_token = project_with_token(console_site, "live-demo-2")
    other_token = project_with_token(console_site, "live-demo-3")
    other = open_session(console_site, "live-demo-3", other_token)
    page.sign_in(own_token)
    page.go("live")
    page.wait_text("#gateway-table tbody", "up")
    mark(page)
    own = open_session(console_site, "live-demo-2", own_token)
    page.wait_text("#session-table tbody", own["id"])
    assert other["id"] not in page.find("main").text
    assert still_marked(page)
