"""The policies page in headless Chromium: the active set as an admin reads it, a policy file
checked before it is put in place (each problem with its line, nothing activated), and the active
set's decision on a sample request."""

from __future__ import annotations

from pathlib import Path

from browser import WAIT_S, Page, Site
from selenium.webdriver.support.ui import Select
from waiting import eventually

SHIPPED = Path(__file__).parent.parent / "policies" / "default.yaml"


def test_the_active_set_shows_rules_roles_and_digest(page: Page, console_site: Site) -> None:
    page.sign_in(console_site.admin_token)
    page.go("policies")
    digest = console_site.api("GET", "/api/v1/policies", console_site.admin_token)["digest"]
    assert page.find("#policy-digest").text == digest
    assert "administration-is-for-admins" in page.find("#policy-rules").text
    assert "administrator" in page.find("#policy-roles").text
    assert "90d" in page.find("#policy-tokens").text
    assert "every project (defaults) *" in page.find("#policy-gateways").text
    # Reloading the configured file (unchanged here) keeps the same set in force.
    page.find("#policy-reload").click()
    assert "default.yaml" in page.wait_text("#policy-reload-status .ok", "Reloaded").text
    assert page.find("#policy-digest").text == digest


def test_a_broken_file_shows_each_problem_s_line_and_a_good_one_is_valid(
        page: Page, console_site: Site, tmp_path: Path) -> None:
    page.sign_in(console_site.admin_token)
    page.go("policies")
    broken = SHIPPED.read_text().replace("effect: deny", "effect: refuse", 1)
    line = broken.splitlines().index("    effect: refuse") + 1
    file = tmp_path / "broken.yaml"
    file.write_text(broken)
    page.find("#policy-file").send_keys(str(file))
    text = page.find("#policy-text")
    eventually(lambda: "effect: refuse" in text.get_property("value"), timeout_s=WAIT_S,
               what="the file's text")
    page.find("#policy-check button[type=submit]").click()
    problem = page.wait_text("#policy-check-result .error", f"line {line}")
    assert "effect" in problem.text and "problem(s)" in problem.text
    # A good document pasted instead: valid, and recognised as the active set.
    page.driver.execute_script("arguments[0].value = arguments[1]", page.find("#policy-text"),
                               SHIPPED.read_text())
    page.find("#policy-file").clear()
    page.find("#policy-check button[type=submit]").click()
    assert "(the active set)" in page.wait_text("#policy-check-result .ok", "valid").text


def test_a_sample_decision_names_the_rule(page: Page, console_site: Site) -> None:
    page.sign_in(console_site.admin_token)
    page.go("policies")
    Select(page.find("#decide-kind")).select_by_value("project")
    page.find("#decide-project").send_keys("pol-alpha")
    Select(page.find("#decide-action")).select_by_value("sessions:read")
    assert Select(page.find("#decide-resource-kind")).first_selected_option.text == "session"
    page.find("#decide-resource-project").send_keys("pol-beta")
    page.find("#policy-decide button[type=submit]").click()
    assert page.wait_text("#decision .verdict", "Denied")
    assert page.find("#decision .rule").text == "cross-project"
    resource = page.find("#decide-resource-project")
    resource.clear()
    resource.send_keys("pol-alpha")
    page.find("#policy-decide button[type=submit]").click()
    assert page.wait_text("#decision .rule", "clients-work-in-their-project")
    assert page.find("#decision .verdict").text == "Allowed"
