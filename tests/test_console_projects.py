"""The projects page in headless Chromium: an admin creates a project, issues a token shown once
and revokes it in two steps (the token is then refused, and a console signed in with it is signed
out at its next navigation); quotas are edited; a project member sees only their own project."""

from __future__ import annotations

import urllib.error
from typing import Any

import pytest
from browser import Page, Site


def cookies(page: Page) -> list[dict[str, Any]]:
    # Cookies are per host, not per port: a domain entry would tie them to the browser's own.
    return [{k: v for k, v in c.items() if k != "domain"} for c in page.driver.get_cookies()]


def use_cookies(page: Page, jar: list[dict[str, Any]]) -> None:
    page.driver.delete_all_cookies()
    for cookie in jar:
        page.driver.add_cookie(cookie)


def create_project(page: Page, name: str) -> None:
    page.go("projects")
    page.find("#project-name").send_keys(name)
    page.find("#project-create button[type=submit]").click()
    page.wait_text("main h1", f"Project {name}")


def issue_token(page: Page, subject: str) -> str:
    page.find("#issue-subject").send_keys(subject)
    page.find("#issue-ttl").send_keys("3600")
    page.find("#token-issue button[type=submit]").click()
    field = page.find("#issued-token")
    assert field.get_attribute("readonly") is not None
    assert "not shown again" in page.find("#issued .warning").text
    token = str(field.get_property("value"))
    assert token.count(".") == 2
    return token


def test_a_project_created_and_its_token_issued_then_revoked_from_the_console(
        page: Page, console_site: Site) -> None:
    page.sign_in(console_site.admin_token)
    create_project(page, "prj-console-1")
    token = issue_token(page, "bob")
    # Shown once: nowhere a script could read it back later.
    assert token not in str(page.storage())
    row = page.wait_text("#project-tokens tbody tr", "bob")
    assert "live" in row.text
    jti = row.get_attribute("data-jti")
    admin = cookies(page)

    # The member signs in with it and sees their project, its tokens, and no admin controls.
    page.sign_in(token)
    page.go("projects")
    page.wait_text("main h1", "Project prj-console-1")
    page.wait_text("#project-tokens", "bob")
    assert page.find_all("#token-issue, #project-edit, .revoke-token") == []
    member = cookies(page)

    # The admin revokes it: a first click only asks; the second button revokes.
    use_cookies(page, admin)
    page.open("projects/prj-console-1")
    page.driver.refresh()  # only the hash changed: load the page again, as the admin's
    page.find(f"tr[data-jti='{jti}'] .revoke-token").click()
    assert console_site.api("GET", "/api/v1/projects/prj-console-1/tokens",
                            console_site.admin_token)["items"][0]["revoked_at"] is None
    page.find(f"tr[data-jti='{jti}'] .confirm-revoke").click()
    page.wait_text(f"tr[data-jti='{jti}'] .token-status", "revoked")
    with pytest.raises(urllib.error.HTTPError) as refused:
        console_site.api("GET", "/api/v1/projects/prj-console-1", token)
    refused.value.close()
    assert refused.value.code == 401

    # The member's console, at its next navigation, is signed out.
    use_cookies(page, member)
    page.go("live")
    assert "revoked" in page.find("#sign-in-status").text


def test_quotas_and_templates_are_edited_and_a_refused_change_keeps_the_form(
        page: Page, console_site: Site) -> None:
    page.sign_in(console_site.admin_token)
    create_project(page, "prj-console-2")
    quota = page.find("#edit-quota-sessions")
    assert quota.get_attribute("placeholder") == "policy: 4"
    quota.send_keys("7")
    page.find("#edit-templates").send_keys("Bad Name")
    page.find("#project-edit button[type=submit]").click()
    assert "allowed_templates" in page.wait_text("#project-edit-status .error", "invalid").text
    assert page.find("#edit-quota-sessions").get_property("value") == "7"
    page.find("#edit-templates").clear()
    page.find("#project-edit button[type=submit]").click()
    page.wait_text("#project-detail .quotas", "sessions 7")
    project = console_site.api("GET", "/api/v1/projects/prj-console-2", console_site.admin_token)
    assert project["quotas"] == {"sessions": 7}


def test_a_member_sees_only_their_project_and_no_admin_pages(page: Page,
                                                             console_site: Site) -> None:
    admin = console_site.admin_token
    for name in ("prj-console-3", "prj-console-4"):
        console_site.api("POST", "/api/v1/projects", admin, {"name": name})
    issued = console_site.api("POST", "/api/v1/projects/prj-console-3/tokens", admin,
                              {"subject": "carol", "ttl": 3600})
    page.sign_in(issued["token"])
    links = [link.get_attribute("data-page") for link in page.find_all("#nav a")]
    assert "policies" not in links and "audit" not in links and "projects" in links
    page.go("projects/prj-console-4")
    page.wait_text("main h1", "Project prj-console-3")
    assert "prj-console-4" not in page.find("main").text
    page.wait_text("#project-tokens", "carol")
    assert page.find_all("#projects-list, #project-create, #token-issue, .revoke-token") == []
