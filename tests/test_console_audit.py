"""The console's audit page in headless Chromium: the console's own actions listed 'via console',
a filter narrowing the list, paging back and forth, the chain verified, and the page kept from
project members."""

from __future__ import annotations

import urllib.error

import pytest
from browser import Page, Site
from waiting import eventually


def seqs(page: Page) -> list[int]:
    return [int(row.get_attribute("data-seq")) for row in page.find_all("#audit-table tbody tr")]


def test_the_console_s_own_actions_are_listed_and_a_filter_narrows_the_list(
        page: Page, console_site: Site) -> None:
    admin = console_site.admin_token
    console_site.api("POST", "/api/v1/projects", admin, {"name": "audit-demo-1"})
    token = console_site.api("POST", "/api/v1/projects/audit-demo-1/tokens", admin,
                             {"subject": "audit-zed-1", "ttl": 3600})["token"]
    with pytest.raises(urllib.error.HTTPError):  # a project token may not change its project
        console_site.api("PATCH", "/api/v1/projects/audit-demo-1", token, {"quotas": {"x": 1}})
    page.sign_in(admin)
    page.go("audit")
    page.wait_text("#audit-table tbody", "via console")

    page.driver.execute_script("arguments[0].value = 'AUDIT-ZED-1'", page.find("#audit-principal"))
    page.find("#audit-filter button[type=submit]").click()
    page.wait_text("#audit-table tbody", "projects:update")
    rows = page.find_all("#audit-table tbody tr")
    assert len(rows) == 1 and "audit-zed-1@audit-demo-1" in rows[0].text
    assert "deny" in rows[0].text and "audit-demo-1" in rows[0].text

    page.find("#audit-verify").click()
    assert "Chain intact" in page.find("#audit-chain-ok").text


def test_older_and_newer_page_through_the_log(page: Page, console_site: Site) -> None:
    for _ in range(26):  # more than one page of 25
        console_site.api("GET", "/api/v1/projects", console_site.admin_token)
    page.sign_in(console_site.admin_token)
    page.go("audit")
    page.find("#audit-table")
    page.driver.execute_script("arguments[0].value = '25'", page.find("#audit-limit"))
    page.find("#audit-filter button[type=submit]").click()
    newest = _settled(page, 25)
    assert page.find("#audit-newer").get_attribute("disabled") is not None
    page.find("#audit-older").click()
    older = _settled(page, None, below=min(newest))
    assert max(older) < min(newest)
    page.find("#audit-newer").click()
    again = _settled(page, 25, below=None, at_least=max(newest))
    assert min(again) > max(older)


def _settled(page: Page, count: int | None, below: int | None = None,
             at_least: int | None = None) -> list[int]:
    """The page's record numbers once it shows ``count`` of them (None: any) within the bounds
    given."""
    def shown() -> list[int]:
        found = seqs(page)
        assert found and (count is None or len(found) == count), found
        assert found == sorted(found, reverse=True)
        assert below is None or max(found) < below
        assert at_least is None or max(found) >= at_least
        return found
    return list(eventually(shown, timeout_s=20, what=f"{count} audit records"))


def test_a_project_member_has_no_audit_page(page: Page, console_site: Site) -> None:
    admin = console_site.admin_token
    console_site.api("POST", "/api/v1/projects", admin, {"name": "audit-demo-2"})
    token = console_site.api("POST", "/api/v1/projects/audit-demo-2/tokens", admin,
                             {"subject": "bob", "ttl": 3600})["token"]
    page.sign_in(token)
    assert page.find_all("#nav a[data-page=audit]") == []
    page.go("audit")  # an address typed by hand shows the first page instead
    page.find("#nav a.current[data-page=live]")
    assert page.find_all("#audit-table") == []
