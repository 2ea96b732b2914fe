"""The control plane under faults: killed mid-load, and its database locked by another process.

1. A real ``dsn controlplane serve`` process takes a mixed load (projects, project tokens, token
   exchanges, revocations, sessions, authenticated reads) from concurrent clients and is SIGKILLed
   after a seeded random number of answered requests, three times over, each time restarted on
   the same state directory. Whatever was answered 2xx before a kill must be there after the
   restart: projects, tokens (listed by jti, still accepted), revocations (still refused),
   sessions, and an allow record in the audit log for every answered request id; the audit chain
   verifies online and offline, and each restart's chain extends the previous one unchanged. No
   request may get a 5xx: a kill shows up as connection errors only.
2. Another OS process holds the database's write lock while requests arrive: each is refused with
   503 and Retry-After within a bound, nothing is done unaudited, and writes succeed once the
   lock is released.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq
from click.testing import CliRunner
from cp_helpers import (
    CLIENT_SCOPE,
    ClientFactory,
    ControlPlane,
    sql,
    start_control_plane,
    write_policy,
)
from test_cp_api import assert_problem

from common.ports import free_port
from controlplane.settings import DATABASE_NAME
from controlplane.store.engine import DEFAULT_BUSY_TIMEOUT_S
from dsn.cli import main
from dsn.errors import ProcessFailed
from dsn.processes import Child, ProcessGroup

DSN = str(Path(sys.executable).parent / "dsn")
ROUNDS = 3
WORKERS = 4
READY_S = 30.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=15)
BIND_FAILURE = re.compile(r"cannot listen on|cannot bind")


# --- the service as a real process ----------------------------------------------------------------

@dataclass
class Service:
    """``dsn controlplane serve`` on one state directory; each start is a new process and port."""

    group: ProcessGroup
    root: Path
    policy: Path
    starts: int = 0
    child: Child | None = None
    url: str = ""

    @property
    def state(self) -> Path:
        return self.root / "state"

    def start(self) -> None:
        # A port free a moment ago may be taken by another process before serve binds it: that,
        # and only that, is worth another try on other ports.
        for attempt in range(3):
            try:
                return self._start_once()
            except ProcessFailed as failure:
                if attempt == 2 or not BIND_FAILURE.search(str(failure)):
                    raise

    def _start_once(self) -> None:
        self.starts += 1
        port = free_port()
        self.child = self.group.start(
            f"controlplane-{self.starts}",
            [DSN, "controlplane", "serve", "--state-dir", str(self.state), "--port", str(port),
             "--policy", str(self.policy),
             "--state-snapshots", f"tcp://127.0.0.1:{free_port()}",
             "--state-updates", f"tcp://127.0.0.1:{free_port()}"],
            self.root / f"serve-{self.starts}.log")
        self.url = f"http://127.0.0.1:{port}"
        self.group.wait_for_log(self.child, "control plane on", READY_S)

    def kill(self) -> None:
        assert self.child is not None
        self.child.process.kill()  # SIGKILL: no shutdown handler, no final commit
        self.child.process.wait()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    policy = write_policy(tmp_path / "policy", per_token="100000/minute",
                          per_project="100000/minute",
                          unauthenticated_per_source="100000/minute")
    result = CliRunner().invoke(main, ["admin", "init", "--state-dir", str(tmp_path / "state"),
                                       "--policy", str(policy)])
    assert result.exit_code == 0, result.output
    with ProcessGroup() as group:
        yield Service(group, tmp_path, policy)


# --- what the clients were told -------------------------------------------------------------------

@dataclass
class Issued:
    project: str
    token: str


@dataclass
class Ledger:
    """Everything answered 2xx (so promised durable), and everything that went wrong."""

    projects: set[str] = field(default_factory=set)
    tokens: dict[str, Issued] = field(default_factory=dict)  # jti -> project token
    revoked: set[str] = field(default_factory=set)
    uncertain: set[str] = field(default_factory=set)  # revocations in flight at a kill
    exchanged: dict[str, str] = field(default_factory=dict)  # child jti -> parent jti
    sessions: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)  # request ids of 2xx answers
    failures: list[str] = field(default_factory=list)  # 5xx, unexpected answers or errors


class Killed(Exception):
    """The service went away under a request: the kill, not a failure."""


@dataclass
class Load:
    """Concurrent clients; the service is killed right after the ``kill_at``-th 2xx answer."""

    http: aiohttp.ClientSession
    service: Service
    ledger: Ledger
    rng: random.Random
    admin_token: str
    kill_at: int
    answers: int = 0
    killed: bool = False
    cut_off: int = 0  # requests in flight when the service died

    async def call(self, method: str, path: str, token: str, expect: int,
                   body: Any = None) -> dict[str, Any] | None:
        """The answer's JSON if its status is ``expect``; any other answer (a 5xx above all) is
        recorded as a failure and gives None."""
        request_id = f"fault-{uuid.uuid4().hex}"
        headers = {"Authorization": f"Bearer {token}", "X-Request-ID": request_id}
        try:
            async with self.http.request(method, self.service.url + path, json=body,
                                         headers=headers) as response:
                status, text = response.status, await response.text()
                payload = await response.json() if status == expect else None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            if self.killed:
                self.cut_off += 1
                raise Killed from exc
            self.ledger.failures.append(f"{method} {path}: {type(exc).__name__} before the kill")
            raise
        if status != expect:
            self.ledger.failures.append(f"{method} {path}: {status} {text[:200]}")
            return None
        self.ledger.answered.add(request_id)
        self.answers += 1
        if self.answers == self.kill_at:
            self.service.kill()
            self.killed = True
        assert isinstance(payload, dict)
        return payload


@dataclass
class Client:
    """One client's own projects and tokens: no other client revokes what it uses."""

    load: Load
    name: str
    projects: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # live jtis
    with_session: set[str] = field(default_factory=set)

    @property
    def ledger(self) -> Ledger:
        return self.load.ledger

    async def create_project(self) -> None:
        name = f"{self.name}-{len(self.projects)}"
        if await self.load.call("POST", "/api/v1/projects", self.load.admin_token, 201,
                                {"name": name}) is not None:
            self.projects.append(name)
            self.ledger.projects.add(name)

    async def issue(self) -> None:
        project = self.load.rng.choice(self.projects)
        answer = await self.load.call("POST", f"/api/v1/projects/{project}/tokens",
                                      self.load.admin_token, 201,
                                      {"subject": self.name, "scope": CLIENT_SCOPE, "ttl": 3600})
        if answer is not None:
            self.tokens.append(answer["jti"])
            self.ledger.tokens[answer["jti"]] = Issued(project, answer["token"])

    async def exchange(self) -> None:
        parent = self.load.rng.choice(self.tokens)
        answer = await self.load.call("POST", "/api/v1/token", self.ledger.tokens[parent].token,
                                      200, {"kind": "consumer"})
        if answer is not None:
            self.ledger.exchanged[answer["jti"]] = parent

    async def read(self) -> None:
        jti = self.load.rng.choice(self.tokens)
        issued = self.ledger.tokens[jti]
        await self.load.call("GET", f"/api/v1/projects/{issued.project}", issued.token, 200)

    async def revoke(self) -> None:
        jti = self.tokens.pop(self.load.rng.randrange(len(self.tokens)))
        try:
            answer = await self.load.call("DELETE", f"/api/v1/tokens/{jti}",
                                          self.load.admin_token, 200)
        except Killed:
            self.ledger.uncertain.add(jti)  # committed or not: both are correct
            raise
        if answer is not None:
            self.ledger.revoked.add(jti)

    async def open_session(self) -> None:
        jti = next(j for j in self.tokens if self.ledger.tokens[j].project not in self.with_session)
        issued = self.ledger.tokens[jti]
        self.with_session.add(issued.project)  # one per project, whatever the answer: quota
        answer = await self.load.call("POST", "/api/v1/sessions", issued.token, 201, {
            "project": issued.project, "template": "4dstem", "params": {},
            "client_key": zmq.curve_keypair()[0].decode()})
        if answer is not None:
            self.ledger.sessions.add(answer["id"])

    def next_step(self) -> Callable[[], Awaitable[None]]:
        if not self.projects:
            return self.create_project
        if not self.tokens:
            return self.issue
        steps = [self.create_project, self.issue, self.issue, self.exchange, self.read,
                 self.read, self.revoke]
        if any(self.ledger.tokens[j].project not in self.with_session for j in self.tokens):
            steps.append(self.open_session)
        return self.load.rng.choice(steps)

    async def run(self) -> None:
        while not self.load.killed:
            try:
                await self.next_step()()
            except Killed:
                return
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
                return  # recorded as a failure by Load.call


# --- what must hold after each restart ------------------------------------------------------------

async def _get(http: aiohttp.ClientSession, url: str, token: str) -> tuple[int, Any]:
    async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.json()


async def check_persisted(http: aiohttp.ClientSession, url: str, admin: str,
                          ledger: Ledger) -> None:
    status, projects = await _get(http, f"{url}/api/v1/projects", admin)
    assert status == 200
    assert ledger.projects <= {p["name"] for p in projects["items"]}
    listed: dict[str, dict[str, Any]] = {}
    for project in ledger.projects:
        status, tokens = await _get(http, f"{url}/api/v1/projects/{project}/tokens", admin)
        assert status == 200
        listed.update({t["jti"]: t for t in tokens["items"]})
    assert set(ledger.tokens) | set(ledger.exchanged) <= set(listed)
    assert all(listed[child]["parent_jti"] == parent for child, parent in ledger.exchanged.items())
    assert all(listed[jti]["revoked_at"] is not None for jti in ledger.revoked)
    for jti, issued in ledger.tokens.items():
        if jti in ledger.uncertain:
            continue
        status, _ = await _get(http, f"{url}/api/v1/projects/{issued.project}", issued.token)
        assert status == (401 if jti in ledger.revoked else 200), (jti, status)
    for session in ledger.sessions:
        assert (await _get(http, f"{url}/api/v1/sessions/{session}", admin))[0] == 200


async def check_audit(http: aiohttp.ClientSession, url: str, admin: str, database: Path,
                      ledger: Ledger, before: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The chain verifies, has no gaps, keeps every earlier record and holds an allow record for
    every answered request; returns the chain for the next round."""
    status, verification = await _get(http, f"{url}/api/v1/audit/verify", admin)
    assert status == 200 and verification["ok"] is True, verification
    chain = sql(database, "SELECT seq, hash FROM audit ORDER BY seq")
    assert [seq for seq, _ in chain] == list(range(1, len(chain) + 1))
    assert chain[:len(before)] == before
    allowed = {row[0] for row in sql(database, "SELECT request_id FROM audit "
                                               "WHERE decision = 'allow'")}
    assert ledger.answered <= allowed
    return chain


def verify_offline(state: Path) -> str:
    result = CliRunner().invoke(main, ["admin", "audit", "verify", "--offline",
                                       "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_sigkill_under_mixed_load_loses_nothing_answered(service: Service) -> None:
    seed = int(os.environ.get("DSN_FAULT_SEED", random.randrange(2**32)))
    print(f"fault injection seed: {seed} (DSN_FAULT_SEED={seed} repeats the choices)")
    rng = random.Random(seed)
    admin = (service.state / "admin.token").read_text().strip()
    ledger, chain = Ledger(), list[tuple[Any, ...]]()
    started = time.monotonic()
    await asyncio.to_thread(service.start)
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
        for round_ in range(ROUNDS):
            load = Load(http, service, ledger, rng, admin, kill_at=rng.randint(40, 160))
            clients = [Client(load, f"r{round_}-c{n}") for n in range(WORKERS)]
            await asyncio.gather(*(client.run() for client in clients))
            assert load.killed and ledger.failures == [], ledger.failures
            print(f"round {round_}: killed after {load.answers} answers, "
                  f"{load.cut_off} requests cut off")
            assert "audit chain ok" in await asyncio.to_thread(verify_offline, service.state)
            await asyncio.to_thread(service.start)
            await check_persisted(http, service.url, admin, ledger)
            chain = await check_audit(http, service.url, admin,
                                      service.state / DATABASE_NAME, ledger, chain)
    print(f"{ROUNDS} kills, {len(ledger.answered)} answered requests, {len(ledger.projects)} "
          f"projects, {len(ledger.tokens)} tokens ({len(ledger.revoked)} revoked), "
          f"{len(ledger.sessions)} sessions, {len(ledger.uncertain)} revocations cut off, "
          f"in {time.monotonic() - started:.1f} s")


# --- the database locked by another process -------------------------------------------------------

LOCK_HOLDER = """\
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""
# A write batch waits the store's busy timeout before it gives up, and whatever queued meanwhile is
# answered with it: a request waits about one busy timeout (a loaded CPU adds some), never a hang.
ANSWER_BOUND_S = 2 * DEFAULT_BUSY_TIMEOUT_S + 1


@pytest.fixture
async def locked_database(aiohttp_client: ClientFactory,
                          tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, Callable[[], Any]]]:
    """A running control plane, and another process holding its database's write lock until the
    returned function releases it."""
    cp = await start_control_plane(aiohttp_client, tmp_path / "state")
    await cp.create_project("alpha")
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOCK_HOLDER, str(cp.database),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert holder.stdin is not None and holder.stdout is not None
    assert await asyncio.wait_for(holder.stdout.readline(), 10) == b"locked\n"

    async def release() -> None:
        assert holder.stdin is not None
        holder.stdin.write(b"\n")
        await holder.stdin.drain()
        assert await asyncio.wait_for(holder.wait(), 10) == 0

    try:
        yield cp, release
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def _timed(request: Awaitable[Any]) -> tuple[Any, float]:
    started = time.monotonic()
    response = await asyncio.wait_for(request, ANSWER_BOUND_S + 5)
    return response, time.monotonic() - started


async def test_a_database_locked_by_another_process_gives_503_then_recovers(
        locked_database: tuple[ControlPlane, Callable[[], Awaitable[None]]]) -> None:
    cp, release = locked_database
    seq_before = len(cp.audit_rows())
    requests = [cp.admin("POST", "/api/v1/projects", json={"name": f"locked-{n}"})
                for n in range(3)]
    requests += [cp.admin("PATCH", "/api/v1/projects/alpha", json={"quotas": {"tokens": 7}}),
                 cp.admin("POST", "/api/v1/projects/alpha/tokens", json={"subject": "s"}),
                 cp.admin("GET", "/api/v1/projects")]  # a read needs its audit record too
    answers = await asyncio.gather(*(_timed(request) for request in requests))
    for response, elapsed in answers:
        await assert_problem(response, 503)
        assert int(response.headers["Retry-After"]) >= 1
        assert elapsed < ANSWER_BOUND_S, elapsed
    assert (await cp.client.get("/healthz")).status == 200  # the service itself stays up
    assert (await cp.client.get("/readyz")).status == 503  # but it cannot serve requests

    await release()
    assert (await cp.client.get("/readyz")).status == 200
    assert len(cp.audit_rows()) == seq_before  # nothing was decided unaudited
    assert sql(cp.database, "SELECT name FROM projects ORDER BY name") == [("alpha",)]
    assert sql(cp.database, "SELECT quotas FROM projects") == [("{}",)]
    await cp.create_project("after")
    verification = await (await cp.admin("GET", "/api/v1/audit/verify")).json()
    assert verification["ok"] is True
