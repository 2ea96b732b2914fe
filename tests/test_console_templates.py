"""The templates page in headless Chromium: an admin edits and sees the new version in the history
and a side-by-side diff, creates a template from a copy and deletes it; a rejected edit shows each
error at its line of the template file and keeps the text; a save that lost a race says so, keeps
the text and overwrites nothing; a rollback restores the earlier source, on record as the console
user; a project member reads and dry-runs but has no edit controls, and a forced edit is refused by
the API."""

from __future__ import annotations

import urllib.error
from typing import Any

import pytest
from browser import Page, Site
from waiting import eventually

from controlplane.templates.loader import shipped_templates_dir

T = "/api/v1/templates"


def source_named(name: str) -> str:
    shipped = (shipped_templates_dir() / "dsn" / "4dstem.yaml").read_text()
    return shipped.replace("name: 4dstem", f"name: {name}", 1)


def create(site: Site, name: str) -> str:
    """A new DSN template ``name`` (the shipped 4D-STEM one, renamed); its source."""
    source = source_named(name)
    site.api("PUT", f"{T}/{name}", site.admin_token, {"source": source},
             headers={"If-None-Match": "*"})
    return source


def current(site: Site, name: str) -> Any:
    return site.api("GET", f"{T}/{name}", site.admin_token)


def put(site: Site, name: str, source: str) -> Any:
    return site.api("PUT", f"{T}/{name}", site.admin_token, {"source": source},
                    headers={"If-Match": current(site, name)["etag"]})


def line_of(source: str, text: str) -> int:
    return next(n for n, line in enumerate(source.splitlines(), 1) if text in line)


def edit_in_page(page: Page, old: str, new: str) -> str:
    """Replaces ``old`` by ``new`` in the editor as typing would (an input event); the text."""
    return str(page.driver.execute_script("""
        const area = document.querySelector('#tpl-source');
        area.value = area.value.replace(arguments[0], arguments[1]);
        area.dispatchEvent(new Event('input'));
        return area.value;""", old, new))


def editor_text(page: Page) -> str:
    return str(page.driver.execute_script("return document.querySelector('#tpl-source').value"))


def open_editor(page: Page, site: Site, name: str) -> None:
    page.sign_in(site.admin_token)
    page.open(f"templates/{name}")
    page.wait_text("#tpl-version", "")
    page.find("#tpl-source")


def test_an_admin_edits_and_sees_the_new_version_in_history_and_diff(
        page: Page, console_site: Site) -> None:
    name = "tpl-edit-1"
    create(console_site, name)
    page.sign_in(console_site.admin_token)
    page.open("templates")
    page.wait_text("#tpl-list", name)
    next(a for a in page.find_all("#tpl-list a.tpl-link") if a.text == name).click()
    assert page.find("#tpl-version").text == "1"
    assert current(console_site, name)["etag"] == page.find("#tpl-etag").text

    edit_in_page(page, "default: 256", "default: 300")
    page.find("#tpl-save").click()
    page.wait_text("#tpl-flash", "Saved as version 2")
    assert page.find("#tpl-version").text == "2"
    history = page.find("#tpl-history")
    assert [row.text.split()[0] for row in history.find_elements("css selector", "tbody tr")] \
        == ["v2", "v1"]
    assert "alice" in history.text
    assert current(console_site, name)["parameters"]["hwm"]["default"] == 300

    # Side by side: v1 on the left with the removed line, v2 on the right with the added one.
    page.find("#tpl-diff-show").click()
    page.find("#tpl-diff table.sbs")
    assert [td.text for td in page.find_all("#tpl-diff td.del")] == ["    default: 256"]
    assert [td.text for td in page.find_all("#tpl-diff td.add")] == ["    default: 300"]
    page.find(".tpl-view[data-version='1']").click()
    assert "default: 256" in page.wait_text("#tpl-version-source", "default: 256").text


def test_an_invalid_edit_shows_the_error_at_its_file_line_and_keeps_the_text(
        page: Page, console_site: Site) -> None:
    name = "tpl-invalid-1"
    create(console_site, name)
    open_editor(page, console_site, name)
    text = edit_in_page(page, "hwm: {{ params.hwm | yaml }}", "hwm: {{ params.hwm }}")
    line = line_of(text, "hwm: {{ params.hwm }}")

    page.find("#tpl-save").click()
    errors = page.wait_text("#tpl-errors", f"line {line}")
    assert "body" in errors.text and "| yaml" in errors.text
    [marked] = page.find_all("#tpl-lines li.bad")
    assert marked.get_attribute("data-line") == str(line)
    assert "hwm: {{ params.hwm }}" in marked.text
    assert editor_text(page) == text  # nothing lost
    assert current(console_site, name)["version"] == 1


def test_a_save_that_lost_the_race_keeps_the_text_and_overwrites_nothing(
        page: Page, console_site: Site) -> None:
    name = "tpl-conflict-1"
    source = create(console_site, name)
    open_editor(page, console_site, name)  # the page holds version 1's ETag
    put(console_site, name, source.replace("default: 256", "default: 400"))  # another admin

    mine = edit_in_page(page, "default: 256", "default: 500")
    page.find("#tpl-save").click()
    page.wait_text("#tpl-conflict", "changed by someone else since you opened it")
    assert editor_text(page) == mine
    latest = current(console_site, name)
    assert latest["version"] == 2 and latest["parameters"]["hwm"]["default"] == 400

    page.find("#tpl-conflict-diff").click()
    page.find("#tpl-conflict-diff-box table.sbs")
    assert [td.text for td in page.find_all("#tpl-conflict-diff-box td.add")] == [
        "    default: 400"]
    assert editor_text(page) == mine

    # Reloading the latest is the user's choice, and shows version 2.
    page.find("#tpl-conflict-reload").click()
    page.wait_text("#tpl-version", "2")
    assert "default: 400" in editor_text(page)


def audit_records(site: Site) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    while True:
        after = records[-1]["seq"] if records else 0
        page = site.api("GET", f"/api/v1/audit?after={after}&limit=1000", site.admin_token)
        records += page["items"]
        if len(page["items"]) < 1000:
            return records


def test_rollback_restores_the_earlier_source_on_record_as_the_console_user(
        page: Page, console_site: Site) -> None:
    name = "tpl-rollback-1"
    original = create(console_site, name)
    put(console_site, name, original.replace("default: 256", "default: 128"))
    open_editor(page, console_site, name)
    assert page.find("#tpl-version").text == "2"

    page.find(".tpl-rollback[data-version='1']").click()
    page.wait_text("#tpl-flash", "Rolled back")
    latest = current(console_site, name)
    assert latest["version"] == 3 and latest["source"] == original
    assert page.find("#tpl-version").text == "3" and editor_text(page) == original
    writes = [r for r in audit_records(console_site)
              if r["action"] == "templates:write" and r["resource"] == f"template/{name}"
              and r["principal"].endswith(" via console")]
    assert [(r["decision"], "alice" in r["principal"]) for r in writes] == [("allow", True)]


def test_a_project_member_reads_and_renders_but_cannot_edit(page: Page,
                                                           console_site: Site) -> None:
    name = "tpl-member-1"
    create(console_site, name)
    admin = console_site.admin_token
    console_site.api("POST", "/api/v1/projects", admin, {"name": "tpl-demo-1"})
    member = console_site.api("POST", "/api/v1/projects/tpl-demo-1/tokens", admin,
                              {"subject": "bob", "ttl": 3600})["token"]
    page.sign_in(member)
    page.open("templates")
    page.wait_text("#tpl-list", name)
    page.open(f"templates/{name}")
    assert "name: tpl-member-1" in page.find("#tpl-source-view").text
    assert page.find_all("#tpl-source") == [] and page.find_all("#tpl-save") == []
    assert page.find_all(".tpl-rollback") == []
    assert page.find_all("#tpl-history .tpl-view")

    # A dry run: a bad value is shown at its field; a good one renders.
    hwm = page.find("#tpl-param-hwm")
    hwm.clear()
    hwm.send_keys("0")
    page.find("#tpl-render-submit").click()
    assert page.wait_text("#tpl-param-hwm-error", "1").text
    assert "invalid" in (hwm.get_attribute("class") or "")
    hwm.clear()
    hwm.send_keys("64")
    page.find("#tpl-render-submit").click()
    assert "hwm: 64" in page.wait_text("#tpl-render-text", "hwm: 64").text

    # An edit forced through the session (CSRF token and all) is refused by the policy.
    etag = current(console_site, name)["etag"]
    status = page.driver.execute_async_script("""
        const [name, etag, done] = arguments;
        fetch('/ui/session').then((r) => r.json()).then((session) => fetch(
            '/api/v1/templates/' + name, {method: 'PUT', credentials: 'same-origin',
             headers: {'Content-Type': 'application/json', 'If-Match': etag,
                       'X-CSRF-Token': session.csrf_token},
             body: JSON.stringify({source: 'name: x'})}))
          .then((r) => done(r.status));""", name, etag)
    assert status == 403
    with pytest.raises(urllib.error.HTTPError) as refused:
        console_site.api("PUT", f"{T}/{name}", member, {"source": source_named(name)},
                         headers={"If-Match": etag})
    refused.value.close()
    assert refused.value.code == 403
    assert current(console_site, name)["version"] == 1


def test_an_admin_creates_a_template_from_a_copy_and_deletes_it(page: Page,
                                                               console_site: Site) -> None:
    from selenium.webdriver.support.ui import Select  # the browser tests skip without selenium

    name = "tpl-created-1"
    page.sign_in(console_site.admin_token)
    page.open("templates")
    page.find("#tpl-new-name").send_keys(name)
    Select(page.find("#tpl-new-from")).select_by_visible_text("4dstem")
    page.find("#tpl-new-copy").click()
    eventually(lambda: f"name: {name}\n" in str(page.driver.execute_script(
        "return document.querySelector('#tpl-new-source').value")), timeout_s=10,
        what="the copy in the editor")
    page.find("#tpl-new-create").click()
    page.wait_text("#tpl-flash", f"Created {name} as version 1")
    assert current(console_site, name)["source"] == source_named(name)

    page.find("#tpl-delete").click()
    page.find("#tpl-delete-confirm").click()
    page.wait_text("#tpl-flash", f"Deleted {name}")
    assert name not in page.find("#tpl-list").text
    with pytest.raises(urllib.error.HTTPError) as gone:
        current(console_site, name)
    gone.value.close()
    assert gone.value.code == 404
