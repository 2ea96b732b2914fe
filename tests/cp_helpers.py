"""Shared helpers for control-plane tests: a manual clock, a policy file with test-sized limits,
and a running control plane (real app, real SQLite) built on a state directory that
``controlplane.admin.initialize`` prepared, exactly as ``dsn admin init`` would."""

from __future__ import annotations

import contextlib
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from common.clone import StateEndpoints
from common.ports import free_ports
from controlplane.admin.bootstrap import FIRST_ADMIN, initialize
from controlplane.app import create_app
from controlplane.middlewares import SERVICES, Services
from controlplane.settings import Settings

# The dsn console script beside this Python, as a user runs it.
DSN = str(Path(sys.executable).parent / "dsn")

SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"
CLIENT_SCOPE = "token:exchange projects:read tokens:read sessions:read sessions:write"

ClientFactory = Callable[[web.Application], Awaitable[TestClient]]


class ManualClock:
    """The time every component reads; tests move it instead of sleeping."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_policy(directory: Path, **rate_limits: str) -> Path:
    """The shipped policy with other rate limits (``per_token``, ``per_project``,
    ``unauthenticated_per_source``), as a new file."""
    document = yaml.safe_load(SHIPPED_POLICY.read_text())
    document["rate_limits"].update(rate_limits)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def free_state_endpoints() -> StateEndpoints:
    """Loopback endpoints for a state service: a fixed port would collide with any other control
    plane (another test run, a developer's service) on the machine."""
    return StateEndpoints(*(f"tcp://127.0.0.1:{port}" for port in free_ports(2)))


def sql(database: Path, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the state database from outside the service (tampering, triggers)."""
    with closing(sqlite3.connect(database)) as conn:
        rows = conn.execute(statement, params).fetchall()
        conn.commit()
        return rows


@dataclass
class ControlPlane:
    client: TestClient
    settings: Settings
    clock: ManualClock
    admin_token: str

    @property
    def services(self) -> Services:
        return self.client.app[SERVICES]

    @property
    def database(self) -> Path:
        return self.settings.database

    @property
    def url(self) -> str:
        """The loopback URL the app is served at, as an HTTP client outside the test names it."""
        return str(self.client.make_url("")).rstrip("/")

    async def call(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self.call(method, path, self.admin_token, **kwargs)

    async def create_project(self, name: str, **fields: Any) -> dict[str, Any]:
        response = await self.admin("POST", "/api/v1/projects", json={"name": name, **fields})
        assert response.status == 201, await response.text()
        return dict(await response.json())

    async def project_token(self, project: str, *, scope: str = CLIENT_SCOPE, ttl: int = 3600,
                            subject: str = "alice") -> dict[str, Any]:
        response = await self.admin("POST", f"/api/v1/projects/{project}/tokens",
                                    json={"subject": subject, "scope": scope, "ttl": ttl})
        assert response.status == 201, await response.text()
        return dict(await response.json())

    async def add_admin(self, name: str, *, by: str | None = None,
                        **body: Any) -> dict[str, Any]:
        """Admin ``name`` added (by the admin holding token ``by``, else the first admin); the
        answer carries its first token."""
        response = await self.call("POST", "/api/v1/admins", by or self.admin_token,
                                   json={"name": name, **body})
        assert response.status == 201, await response.text()
        return dict(await response.json())

    async def exchange(self, token: str, **body: Any) -> dict[str, Any]:
        response = await self.call("POST", "/api/v1/token", token, json=body)
        assert response.status == 200, await response.text()
        return dict(await response.json())

    def sign(self, payload: dict[str, Any], **header: Any) -> str:
        """A token signed with the service's real key: for claims the issuer would never write."""
        kid, key = self.services.keyring.signing_key()
        return jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": kid, **header})

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """A well-formed admin claim set of the first admin at the current time, with
        ``overrides`` applied."""
        now = int(self.clock())
        payload: dict[str, Any] = {
            "iss": self.settings.issuer, "aud": self.settings.api_audience, "sub": FIRST_ADMIN,
            "iat": now, "exp": now + 600, "jti": f"forged-{now}", "token_use": "admin",
            "project": None, "scope": "projects:read projects:write audit:read",
        }
        payload.update(overrides)
        return payload

    def audit_rows(self) -> list[tuple[Any, ...]]:
        """(seq, principal, action, resource, decision, rule, request_id) in order."""
        return sql(self.database, "SELECT seq, principal, action, resource, decision, rule, "
                                  "request_id FROM audit ORDER BY seq")


async def start_control_plane(aiohttp_client: ClientFactory, state_dir: Path, *,
                              clock: ManualClock | None = None, policy_path: Path | None = None,
                              **overrides: Any) -> ControlPlane:
    """Initialise ``state_dir`` on first use (keys, admin token), then serve it with a real app.
    Calling it again on the same directory is a restart."""
    clock = clock or ManualClock()
    policy_path = policy_path or SHIPPED_POLICY
    token_file = state_dir / "admin.token"
    if token_file.exists():
        admin_token = token_file.read_text().strip()
    else:
        admin_token = await initialize(state_dir, policy_path=policy_path, now=clock(),
                                       database_url=overrides.get("database_url"))
    overrides.setdefault("state_endpoints", free_state_endpoints())
    settings = Settings(state_dir=state_dir, clock=clock, policy_path=policy_path, **overrides)
    client = await aiohttp_client(create_app(settings))
    return ControlPlane(client, settings, clock, admin_token)


HTTP_LAYER_REFUSALS = (400, 413, 414, 431)


async def http_layer_refusal(request: Awaitable[Any]) -> int | None:
    """The status of a request aiohttp's HTTP parser refuses before the app sees it (a head over
    its size limits), or None if the server closed the connection first: it stops reading an
    oversized head at the limit, so its close may reset a client still writing the rest."""
    from aiohttp import ClientConnectionError  # the one helper here that needs the client side

    try:
        response = await request
    except ClientConnectionError:
        return None
    return int(response.status)


@contextlib.asynccontextmanager
async def served_on(port: int) -> AsyncIterator[ClientFactory]:
    """A ClientFactory serving its app on exactly ``port`` of loopback (so that jobs reach the
    control plane at ``Settings.base_url``); every server stops on leaving, and with it the
    launcher and any job still running."""
    clients: list[TestClient] = []

    async def serve(app: web.Application) -> TestClient:
        client = TestClient(TestServer(app, host="127.0.0.1", port=port))
        await client.start_server()
        clients.append(client)
        return client

    try:
        yield serve
    finally:
        for client in clients:
            await client.close()


@contextlib.contextmanager
def gateway_process(cp: ControlPlane, spool_dir: Path, metrics: str) -> Iterator[None]:
    """A gateway serving the control plane's sessions; stopped with SIGTERM, must exit 0."""
    keys = cp.settings.state_dir / "keys"
    process = subprocess.Popen(
        [DSN, "gateway", "run", "--controlplane-state", ",".join(cp.settings.state_endpoints),
         "--state-key", str(keys / "state.key"), "--key", str(keys / "server.key_secret"),
         "--ingress", cp.settings.gateway_endpoint, "--receipts", cp.settings.gateway_receipts,
         "--spool-dir", str(spool_dir),
         "--metrics", metrics, "--sync-timeout", "20"],
        stderr=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr


def metrics_text(address: str) -> str:
    """The gateway's metrics page ("" while it is not serving)."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def metric(address: str, name: str, session: str) -> float:
    """One per-session sample of the gateway's metrics (0 when absent)."""
    found = re.search(rf'^{name}{{session="{session}"}} (\S+)$', metrics_text(address),
                      re.MULTILINE)
    return float(found.group(1)) if found else 0.0
