"""The console in a real browser: headless Chromium from the system's packages driven through its
WebDriver (``chromedriver``, Debian's ``chromium-driver``), against a real control plane and
gateway run as a user runs them (``dsn controlplane serve``, ``dsn gateway run``).

``Site`` is that deployment: one state directory made by ``dsn admin init``, the services as
subprocesses on free loopback ports. ``Page`` wraps the driver with the few moves the tests make
(sign in, go to a page, wait for an element or a text), each wait bounded.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cp_helpers import DSN
from waiting import eventually

from common.ports import free_port

WAIT_S = 20.0
WIDTH, HEIGHT = 1400, 1000


def missing() -> str | None:
    """Why this machine cannot run the browser tests, or None."""
    absent = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if absent:
        return (f"{' and '.join(absent)} not installed (Debian packages chromium and "
                "chromium-driver; scripts/install-test-deps.sh installs them as root)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[test]')"
    return None


@dataclass
class Site:
    """A control plane and a gateway serving one state directory, as a facility runs them."""

    root: Path
    url: str
    gateway_endpoint: str
    receipts_endpoint: str
    metrics: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def admin_token(self) -> str:
        return (self.state_dir / "admin.token").read_text().strip()

    @property
    def server_key(self) -> Path:
        return self.state_dir / "keys" / "server.key"

    def api(self, method: str, path: str, token: str, body: Any = None,
            headers: dict[str, str] | None = None) -> Any:
        """One REST call with a bearer token, as a script would make it; the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {token}", **(headers or {}),
                     **({"Content-Type": "application/json"} if data else {})})
        with urllib.request.urlopen(request, timeout=30) as answer:
            text = answer.read()
        return json.loads(text) if text else None

    def dsn(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DSN, *args], capture_output=True, text=True, timeout=timeout_s,
                              cwd=self.root, check=False)


def _serve(site: Site, args: list[str], log: Path) -> None:
    output = log.open("w")
    process = subprocess.Popen([DSN, *args], stdout=output, stderr=subprocess.STDOUT, text=True,
                               cwd=site.root)
    output.close()
    site.processes.append(process)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/readyz", timeout=2) as answer:
        return bool(answer.status == 200)


@contextmanager
def running_site(root: Path) -> Iterator[Site]:
    """``dsn admin init`` in ``root/state``, then the control plane and a gateway following it."""
    root.mkdir(parents=True, exist_ok=True)
    port, snapshots, updates = free_port(), free_port(), free_port()
    ingress, receipts = free_port(), free_port()
    site = Site(root, f"http://127.0.0.1:{port}", f"tcp://127.0.0.1:{ingress}",
                f"tcp://127.0.0.1:{receipts}", f"127.0.0.1:{free_port()}")
    init = site.dsn("admin", "init", "--state-dir", str(site.state_dir), "--name", "alice")
    assert init.returncode == 0, init.stderr
    state = [f"tcp://127.0.0.1:{snapshots}", f"tcp://127.0.0.1:{updates}"]
    with ExitStack() as stack:
        _serve(site, ["controlplane", "serve", "--state-dir", str(site.state_dir), "--port",
                      str(port), "--state-snapshots", state[0], "--state-updates", state[1],
                      "--gateway-endpoint", site.gateway_endpoint,
                      "--gateway-receipts-endpoint", site.receipts_endpoint,
                      "--jobs-dir", str(root / "jobs"),
                      "--gateway-metrics", f"http://{site.metrics}/metrics"],
               root / "controlplane.log")
        stack.callback(_stop, site.processes[-1])
        eventually(lambda: _healthy(site.url), timeout_s=30, what="the control plane to serve")
        keys = site.state_dir / "keys"
        _serve(site, ["gateway", "run", "--controlplane-state", ",".join(state),
                      "--state-key", str(keys / "state.key"),
                      "--key", str(keys / "server.key_secret"), "--ingress",
                      site.gateway_endpoint, "--receipts", site.receipts_endpoint,
                      "--spool-dir", str(root / "spool"), "--metrics", site.metrics],
               root / "gateway.log")
        stack.callback(_stop, site.processes[-1])
        yield site


def start_chromium() -> Any:
    """Headless Chromium under its WebDriver, both from the system's packages (never fetched)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in ("--headless=new", f"--window-size={WIDTH},{HEIGHT}", "--disable-dev-shm-usage",
                     "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    service = Service(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


class Page:
    """The browser on the console of ``site``."""

    def __init__(self, driver: Any, site: Site) -> None:
        self.driver = driver
        self.site = site

    def open(self, hash_: str = "") -> None:
        self.driver.get(f"{self.site.url}/ui{'#/' + hash_ if hash_ else ''}")

    def go(self, hash_: str) -> None:
        """Another page of the console, without reloading it."""
        self.driver.execute_script("location.hash = arguments[0]", f"#/{hash_}")

    def find(self, css: str, *, timeout_s: float = WAIT_S) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout_s).until(
            ec.visibility_of_element_located((By.CSS_SELECTOR, css)),
            f"no visible {css!r} on {self.driver.current_url}")

    def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def wait_text(self, css: str, text: str, *, timeout_s: float = WAIT_S) -> Any:
        """The element ``css`` once its text contains ``text``."""
        return eventually(lambda: self._with_text(css, text), timeout_s=timeout_s,
                          what=f"{text!r} in {css!r}")

    def _with_text(self, css: str, text: str) -> Any:
        element = self.find(css, timeout_s=1)
        assert text in element.text, element.text
        return element

    def sign_in(self, token: str) -> None:
        self.driver.delete_all_cookies()
        self.open()
        field_ = self.find("#token")
        self.driver.execute_script("arguments[0].value = arguments[1]", field_, token)
        self.find("#sign-in button[type=submit]").click()
        self.find("#sign-out")

    def storage(self) -> dict[str, Any]:
        """What scripts of the page can read: both web storages, the cookies and IndexedDB's
        database names."""
        return dict(self.driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const names = indexedDB.databases ? indexedDB.databases() : Promise.resolve([]);
            names.then((dbs) => done({
                local: JSON.stringify(Object.entries(localStorage)),
                session: JSON.stringify(Object.entries(sessionStorage)),
                cookie: document.cookie,
                indexeddb: dbs.map((db) => db.name),
            }));"""))

    def screenshot(self, path: Path) -> None:
        """The whole page, below the window's fold too (up to 4,000 pixels), as a PNG file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        height = min(int(self.driver.execute_script(
            "return document.documentElement.scrollHeight")), 4000)
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": WIDTH, "height": max(height, HEIGHT), "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
