"""A real OpenID Connect provider for the federated-login tests: Glewlwyd (Debian's ``glewlwyd``,
installed by ``scripts/install-test-deps.sh``), started as its own process on loopback.

``Glewlwyd.start`` lays out a private SQLite database from the package's schema, writes a config
from the package's own, starts the server, and configures it through its admin API as a facility
would: an OIDC plugin signing RS256 ID tokens with a key this helper generates (``kid`` ``k1``), a
confidential client (``dsn-cli``) and users. ``id_token`` logs a user in with the password grant
and returns the ID token the provider issued; ``rotate_key`` replaces the signing key, as an
operator rotating keys would; ``stop`` takes the provider (and so its JWKS) away.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import shutil
import sqlite3
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from waiting import eventually

SCHEMA = Path("/usr/share/dbconfig-common/data/glewlwyd/install/sqlite3")
PACKAGE_CONFIG = Path("/etc/glewlwyd/glewlwyd.conf")
CLIENT_ID = "dsn-cli"
CLIENT_SECRET = "dsn-cli-secret"
ADMIN_PASSWORD = "password"  # the schema's initial admin; the server listens on loopback only


def unavailable() -> str | None:
    """Why the provider cannot run here, or None."""
    if shutil.which("glewlwyd") is None:
        return "glewlwyd is not installed (scripts/install-test-deps.sh installs it as root)"
    if not SCHEMA.exists() or not PACKAGE_CONFIG.exists():
        return "the glewlwyd package's schema or configuration is missing"
    return None


def rsa_jwk(kid: str) -> tuple[dict[str, Any], rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    jwk.update(kid=kid, alg="RS256")
    return jwk, key


@dataclass
class Glewlwyd:
    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    jwks: list[dict[str, Any]] = field(default_factory=list)
    _opener: urllib.request.OpenerDirector | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def issuer(self) -> str:
        return f"{self.api}/oidc"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    # -- process --

    def _configure_files(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        database = self.directory / "glewlwyd.sqlite3"
        with sqlite3.connect(database) as conn:
            conn.executescript(SCHEMA.read_text())
        config = PACKAGE_CONFIG.read_text()
        for name, value in (("port", str(self.port)),
                            ("external_url", f'"http://127.0.0.1:{self.port}"'),
                            ("bind_address", '"127.0.0.1"'), ("log_mode", '"console"'),
                            ("log_level", '"WARNING"')):
            config, found = re.subn(rf"(?m)^#?\s*{name}\s*=.*$", f"{name}={value}", config)
            if not found:
                config += f"\n{name}={value}\n"
        config = config.replace('@include "/etc/glewlwyd/glewlwyd-db.conf"',
                                f'database = {{ type = "sqlite3"\n path = "{database}" }};')
        path = self.directory / "glewlwyd.conf"
        path.write_text(config)
        return path

    def start(self) -> None:
        config = self.directory / "glewlwyd.conf"
        first = not config.exists()
        if first:
            config = self._configure_files()
        log = (self.directory / "glewlwyd.log").open("ab")
        self.process = subprocess.Popen(["glewlwyd", f"--config-file={config}"], stdout=log,
                                        stderr=subprocess.STDOUT)
        log.close()
        try:
            eventually(self._serving, timeout_s=20, what="glewlwyd serving")
        except AssertionError:
            self.stop()
            raise
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self._call("POST", "/auth/", {"username": "admin", "password": ADMIN_PASSWORD})
        if first:
            self._provision()

    def _serving(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:  # never wait on another server holding the port
            log = (self.directory / "glewlwyd.log").read_text(errors="replace")[-500:]
            raise RuntimeError(f"glewlwyd exited: {log}")
        try:
            with urllib.request.urlopen(f"{self.api}/auth/scheme/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # it answers
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None

    # -- admin API --

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        assert self._opener is not None
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.api + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with self._opener.open(request, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def _plugin(self) -> dict[str, Any]:
        return {"module": "oidc", "name": "oidc", "display_name": "facility login",
                "enabled": True, "parameters": {
                    "iss": self.issuer, "jwks-private": json.dumps({"keys": self.jwks}),
                    "default-kid": self.jwks[0]["kid"], "code-duration": 600,
                    "refresh-token-duration": 3600, "access-token-duration": 3600,
                    # the password grant is a non-OIDC grant that still returns an ID token
                    "allow-non-oidc": True, "auth-type-password-enabled": True,
                    "auth-type-code-enabled": True, "auth-type-refresh-enabled": True,
                    "auth-type-client-enabled": False, "auth-type-token-enabled": False,
                    "auth-type-implicit-enabled": False, "auth-type-device-enabled": False,
                    "email-claim": "mandatory", "name-claim": "mandatory", "scope-claim": "no"}}

    def _provision(self) -> None:
        self.jwks = [rsa_jwk("k1")[0]]
        self._call("POST", "/mod/plugin/", self._plugin())
        self._call("POST", "/scope/", {"name": "dsn", "display_name": "DSN",
                                       "description": "DSN", "password_required": False,
                                       "password_max_age": 0, "scheme": {}})
        self._call("POST", "/client/", {
            "client_id": CLIENT_ID, "name": "dsn command line", "confidential": True,
            "client_secret": CLIENT_SECRET, "enabled": True, "scope": ["openid", "dsn"],
            "token_endpoint_auth_method": ["client_secret_post"], "authorization_type":
                ["password", "code", "refresh_token"], "redirect_uri": ["http://127.0.0.1/"]})

    def add_user(self, username: str, email: str, password: str = "facility-pass") -> None:
        self._call("POST", "/user/", {"username": username, "name": username.title(),
                                      "email": email, "password": password,
                                      "scope": ["openid", "dsn"], "enabled": True})

    def rotate_key(self, kid: str) -> None:
        """A new signing key; the old one leaves the JWKS (the strictest rotation)."""
        self.jwks = [rsa_jwk(kid)[0]]
        self._call("PUT", "/mod/plugin/oidc", self._plugin())
        self._call("PUT", "/mod/plugin/oidc/reset")

    # -- a user --

    def id_token(self, username: str, password: str = "facility-pass") -> str:
        form = urllib.parse.urlencode({
            "grant_type": "password", "username": username, "password": password,
            "scope": "openid dsn", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
        request = urllib.request.Request(f"{self.issuer}/token", data=form.encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.loads(response.read())["id_token"])
