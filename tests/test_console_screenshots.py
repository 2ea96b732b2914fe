"""Every page of the console renders for an admin without an error, on the site the other browser
tests filled (projects, templates, sessions, a scan with its pictures), and is photographed.

The photographs go to ``DSN_CONSOLE_SCREENSHOTS`` when it names a directory (docs/console.md's
are made so: ``DSN_CONSOLE_SCREENSHOTS=docs/console .venv/bin/python -m pytest
tests/test_console_*.py``), else to the test's temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser import Page, Site
from PIL import Image
from waiting import eventually

PAGES = ("live", "scans", "templates", "projects", "policies", "audit")
LOADED = """return [...document.querySelectorAll('#scan-pictures img')]
    .map((image) => image.complete && image.naturalWidth > 0)"""


def _target(tmp_path: Path) -> Path:
    chosen = os.environ.get("DSN_CONSOLE_SCREENSHOTS")
    return Path(chosen) if chosen else tmp_path


def _photograph(page: Page, directory: Path, name: str) -> None:
    path = directory / f"{name}.png"
    page.screenshot(path)
    with Image.open(path) as image:
        # A page drawn, not a blank window: more than a handful of colours.
        colours = image.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 16
        small = image.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)  # a fifth of the size, for the docs


def _no_error(page: Page) -> None:
    errors = [e.text for e in page.find_all(".error") if e.is_displayed()]
    assert errors == [], errors


@pytest.mark.parametrize("name", PAGES)
def test_each_page_renders_for_an_admin_without_an_error(page: Page, console_site: Site,
                                                         tmp_path: Path, name: str) -> None:
    page.sign_in(console_site.admin_token)
    page.go(name)
    page.wait_text("main h1", name.capitalize())
    page.find("main h2, main table, main form")
    _no_error(page)
    _photograph(page, _target(tmp_path), name)


def test_a_finished_scan_is_photographed_with_its_pictures(page: Page, console_site: Site,
                                                          tmp_path: Path) -> None:
    scans = console_site.api("GET", "/api/v1/scans", console_site.admin_token)["items"]
    done = [s for s in scans if s["status"] == "complete" and s["source"] == "consumer"]
    if not done:
        pytest.skip("no complete scan on the site: run with tests/test_console_scans.py")
    scan = done[-1]
    page.sign_in(console_site.admin_token)
    page.go(f"scans/{scan['session']}/{scan['scan']}")
    page.find("#scan-pictures img")
    eventually(lambda: all(page.driver.execute_script(LOADED)), timeout_s=20,
               what="both pictures to load")
    _no_error(page)
    _photograph(page, _target(tmp_path), "scan")
