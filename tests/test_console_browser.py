"""The console in headless Chromium: signing in and out, what the page's scripts can read, a
revoked token refused at the next request, and a forged cross-site request refused."""

from __future__ import annotations

from browser import Page, Site


def test_sign_in_shows_the_principal_and_no_token_reaches_script_readable_storage(
        page: Page, console_site: Site) -> None:
    token = console_site.admin_token
    page.sign_in(token)
    assert page.find("#principal").text == "admin alice"
    storage = page.storage()
    assert token not in str(storage)
    assert storage["cookie"] == ""  # the session cookie is HttpOnly: no script sees it
    assert storage["indexeddb"] == []
    assert token not in page.driver.page_source
    # The sign-in field was emptied once the token was sent.
    assert page.driver.execute_script("return document.querySelector('#token')") is None


def test_a_bad_token_is_refused_with_a_clear_message(page: Page) -> None:
    page.open()
    field = page.find("#token")
    page.driver.execute_script("arguments[0].value = 'not-a-token'", field)
    page.find("#sign-in button[type=submit]").click()
    assert "three base64url segments" in page.find("#sign-in-status .error").text
    assert page.find_all("#sign-out") == []


def test_sign_out_ends_the_session_and_a_reload_asks_to_sign_in_again(page: Page,
                                                                      console_site: Site) -> None:
    page.sign_in(console_site.admin_token)
    page.find("#sign-out").click()
    page.find("#sign-in")
    page.open()
    page.find("#sign-in")


def test_a_revoked_token_is_refused_at_the_next_request(page: Page, console_site: Site) -> None:
    admin = console_site.admin_token
    console_site.api("POST", "/api/v1/projects", admin, {"name": "revoked-demo"})
    issued = console_site.api("POST", "/api/v1/projects/revoked-demo/tokens", admin,
                              {"subject": "bob", "ttl": 3600})
    page.sign_in(issued["token"])
    assert page.find("#principal").text == "project bob @ revoked-demo"
    console_site.api("DELETE", f"/api/v1/tokens/{issued['jti']}", admin)
    page.go("scans")
    status = page.find("#sign-in-status")
    assert "revoked" in status.text or "sign in again" in status.text


def test_a_cross_site_request_riding_the_cookie_is_refused(page: Page,
                                                           console_site: Site) -> None:
    page.sign_in(console_site.admin_token)
    # What a forged request can do from the page's own origin without the CSRF token.
    status = page.driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/api/v1/projects', {method: 'POST', credentials: 'same-origin',
            headers: {'Content-Type': 'application/json'}, body: JSON.stringify({name: 'forged'})})
          .then((r) => r.json().then((body) => done([r.status, body.detail])));""")
    assert status[0] == 403 and "X-CSRF-Token" in status[1]
    names = [p["name"] for p in console_site.api("GET", "/api/v1/projects",
                                                 console_site.admin_token)["items"]]
    assert "forged" not in names
