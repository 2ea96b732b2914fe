"""Two real ``dsn controlplane serve`` replicas on one PostgreSQL database, their state directories
made by ``dsn admin init`` and ``dsn admin init --join``: tokens signed by either verify at both,
a revocation through one is refused by the other at once, rate limits and quotas are shared, and
exactly one replica leads (runs the run-once duties) until it is killed, when the other takes
over; the audit chain verifies throughout. Clients given both replicas' URLs go on through the
other when one is killed."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import zmq
from cp_helpers import free_state_endpoints, write_policy
from limits import parse
from test_cp_cli import DSN, _wait_healthy, assert_one_line_error, dsn
from waiting import eventually, eventually_async

from common.client import Client
from common.clone import StateServer
from common.keys import KeyPair, create_keypair, load_keypair, load_secret_keypair
from common.ports import free_port
from controlplane.admin.bootstrap import ADMIN_TOKEN_FILE
from controlplane.errors import Unavailable
from controlplane.leader import Duty, LeaderLock, Leadership, SoleLock, leading
from controlplane.metrics import Metrics
from controlplane.sessions.core import SessionRecord
from controlplane.sessions.repository import insert_session
from controlplane.store.base import QUOTA_LOCK
from controlplane.store.coordination import PostgresCounters, PostgresLeaderLock
from controlplane.store.engine import Conn, Store
from controlplane.store.postgresql import lock_key
from controlplane.store.projects import Project, create_project
from controlplane.store.tokens import TokenRecord
from gateway.sessions import SessionTable
from gateway.state import CloneSessionSource

PROJECT_LIMIT = 40  # requests per project per hour: far from any window's end in a test
SESSION_QUOTA = 4  # the shipped policy's default
SCOPE = "projects:read sessions:read sessions:write"
# Killing the leader: the server frees its lock with the connection, the other replica tries
# again within leader.RETRY_S (2 s); the rest is room for a loaded machine.
TAKEOVER_BOUND_S = 20.0
RECONCILE_S = 600


@dataclass
class Replica:
    name: str
    state: Path
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    state_service: StateServer

    @property
    def checkpoints(self) -> Path:
        return self.state / "audit-checkpoints.jsonl"

    def checkpoint_lines(self) -> list[str]:
        return self.checkpoints.read_text().splitlines() if self.checkpoints.exists() else []

    def leads(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as response:
            text = response.read().decode()
        (line,) = [line for line in text.splitlines() if line.startswith("dsn_cp_leader ")]
        return float(line.split()[1]) == 1.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(timeout=15) == 0, self.log.read_text()


@dataclass
class Pair:
    a: Replica
    b: Replica
    admin_token: str  # written by init on A's state directory, signed with A's key
    database_url: str
    gateway: KeyPair  # allow-listed by both replicas' state services, as gateways/edge.key

    async def call(self, replica: Replica, method: str, path: str, token: str,
                   **kwargs: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.request(
                method, f"{replica.url}{path}", headers={"Authorization": f"Bearer {token}"},
                **kwargs) as response:
            body = await response.text()
            return response.status, json.loads(body) if body else None

    async def create_project(self, via: Replica, name: str) -> None:
        status, body = await self.call(via, "POST", "/api/v1/projects", self.admin_token,
                                       json={"name": name})
        assert status == 201, body

    async def project_token(self, via: Replica, project: str) -> dict[str, Any]:
        status, body = await self.call(via, "POST", f"/api/v1/projects/{project}/tokens",
                                       self.admin_token,
                                       json={"subject": "alice", "scope": SCOPE, "ttl": 3600})
        assert status == 201, body
        return dict(body)


def _start(name: str, state: Path, root: Path, env: dict[str, str], *options: str) -> Replica:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / f"{name}.log"
    endpoints = free_state_endpoints()
    command = [DSN, "controlplane", "serve", "--state-dir", str(state), "--port", str(port),
               "--state-snapshots", endpoints.snapshot, "--state-updates", endpoints.updates,
               *options]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                   env=env)
    try:
        _wait_healthy(url, process, log, timeout_s=30)
    except BaseException:
        process.kill()
        process.wait()
        raise
    key = load_keypair(state / "keys" / "state.key").public
    return Replica(name, state, url, process, log, StateServer(endpoints, key))


@pytest.fixture
def pair(postgres_url: str, tmp_path: Path) -> Iterator[Pair]:
    env = {**os.environ, "DSN_DATABASE_URL": postgres_url}
    initialised = dsn("admin", "init", "--state-dir", str(tmp_path / "a"), env=env)
    assert initialised.exit_code == 0, initialised.output
    joined = dsn("admin", "init", "--join", "--state-dir", str(tmp_path / "b"), env=env)
    assert joined.exit_code == 0, joined.output
    policy = write_policy(tmp_path / "policy", per_project=f"{PROJECT_LIMIT}/hour")
    config = tmp_path / "controlplane.yaml"
    # Reconciles far apart: a change made through one replica can reach the other replica's
    # gateways in time only by the replicas telling each other.
    config.write_text(f"audit:\n  checkpoint_s: 0.5\nreconcile_s: {RECONCILE_S}\n")
    public, secret = create_keypair(tmp_path / "gateway", "edge")
    for name in ("a", "b"):
        shutil.copy(public, tmp_path / name / "gateways" / "edge.key")
    options = ("--policy", str(policy), "--config", str(config))
    replicas: list[Replica] = []
    try:
        for name in ("a", "b"):
            replicas.append(_start(name, tmp_path / name, tmp_path, env, *options))
        token = (tmp_path / "a" / ADMIN_TOKEN_FILE).read_text().strip()
        yield Pair(*replicas, admin_token=token, database_url=postgres_url,
                   gateway=load_secret_keypair(secret))
    finally:
        stop_all(replicas)


def stop_all(replicas: list[Replica]) -> None:
    """Stop each replica cleanly (status 0), killing it if it will not."""
    for replica in replicas:
        try:
            replica.stop()
        finally:
            replica.process.kill()
            replica.process.wait()


def _padded(part: str) -> str:
    return part + "=" * (-len(part) % 4)


def _kid(token: str) -> str:
    return str(json.loads(base64.urlsafe_b64decode(_padded(token.split(".", 1)[0])))["kid"])


def _own_kid(replica: Replica) -> str:
    (pem,) = (replica.state / "keys").glob("*.pem")
    return pem.stem


def test_joining_needs_a_database_url_and_an_initialised_database(tmp_path: Path,
                                                                 postgres_url: str) -> None:
    assert_one_line_error(dsn("admin", "init", "--join", "--state-dir", str(tmp_path / "b")),
                          "--join needs --database-url")
    env = {"DSN_DATABASE_URL": postgres_url}
    assert_one_line_error(dsn("admin", "init", "--join", "--state-dir", str(tmp_path / "c"),
                              env=env), "nothing to join")
    assert dsn("admin", "init", "--state-dir", str(tmp_path / "a"), env=env).exit_code == 0
    assert_one_line_error(dsn("admin", "init", "--state-dir", str(tmp_path / "b"), env=env),
                          "already initialised", "--join")
    joined = dsn("admin", "init", "--join", "--state-dir", str(tmp_path / "b"), env=env)
    assert joined.exit_code == 0, joined.output
    assert_one_line_error(dsn("admin", "init", "--join", "--state-dir", str(tmp_path / "b"),
                              env=env), "already initialised")
    assert_one_line_error(dsn("admin", "init", "--join", "--state-dir", str(tmp_path / "a"),
                              env=env), "already initialised")


async def test_tokens_signed_by_either_replica_verify_at_both(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert _own_kid(a) != _own_kid(b)
    assert ADMIN_TOKEN_FILE not in os.listdir(b.state)  # joining adds no admin
    # A's admin token at B, a token B signs at A.
    assert _kid(pair.admin_token) == _own_kid(a)
    await pair.create_project(b, "alpha")
    issued = await pair.project_token(b, "alpha")
    assert _kid(issued["token"]) == _own_kid(b)
    status, body = await pair.call(a, "GET", "/api/v1/projects/alpha", issued["token"])
    assert status == 200, body

    async def kids(replica: Replica) -> list[str]:
        async with aiohttp.ClientSession() as http, http.get(
                f"{replica.url}/.well-known/jwks.json") as response:
            return sorted(key["kid"] for key in (await response.json())["keys"])

    both = sorted([_own_kid(a), _own_kid(b)])
    assert await kids(a) == both and await kids(b) == both

    # B rotates its key: A's keeps signing, and A accepts B's new key's tokens at once.
    b_first = _own_kid(b)
    status, rotation = await pair.call(b, "POST", "/api/v1/keys/rotate", pair.admin_token)
    assert status == 200, rotation
    assert rotation["kid"] == _own_kid(b) != b_first
    assert sorted(rotation["published"]) == sorted([_own_kid(a), b_first, _own_kid(b)])
    fresh = await pair.project_token(b, "alpha")
    assert _kid(fresh["token"]) == _own_kid(b)
    assert (await pair.call(a, "GET", "/api/v1/projects/alpha", fresh["token"]))[0] == 200
    assert _kid((await pair.project_token(a, "alpha"))["token"]) == _own_kid(a)
    assert await kids(a) == sorted(rotation["published"])


async def test_a_token_revoked_through_one_replica_is_refused_by_the_other_at_once(
        pair: Pair) -> None:
    await pair.create_project(pair.a, "alpha")
    issued = await pair.project_token(pair.a, "alpha")
    assert (await pair.call(pair.b, "GET", "/api/v1/projects/alpha", issued["token"]))[0] == 200
    status, _ = await pair.call(pair.a, "DELETE", f"/api/v1/tokens/{issued['jti']}",
                                pair.admin_token)
    assert status == 200
    status, body = await pair.call(pair.b, "GET", "/api/v1/projects/alpha", issued["token"])
    assert status == 401, body


async def test_a_rate_limit_spent_through_one_replica_is_spent_at_the_other(pair: Pair) -> None:
    await pair.create_project(pair.a, "limited")
    token = (await pair.project_token(pair.a, "limited"))["token"]
    for replica in [pair.a, pair.b] * (PROJECT_LIMIT // 2):
        assert (await pair.call(replica, "GET", "/api/v1/projects/limited", token))[0] == 200
    for replica in (pair.b, pair.a):
        status, body = await pair.call(replica, "GET", "/api/v1/projects/limited", token)
        assert status == 429, body
        assert f"{PROJECT_LIMIT} per 1 hour" in body["detail"]


async def test_concurrent_session_opens_through_both_replicas_stay_within_the_quota(
        pair: Pair) -> None:
    await pair.create_project(pair.a, "racing")
    token = (await pair.project_token(pair.a, "racing"))["token"]

    async def open_one(replica: Replica) -> int:
        body = {"project": "racing", "template": "4dstem", "params": {},
                "client_key": zmq.curve_keypair()[0].decode()}
        status, answer = await pair.call(replica, "POST", "/api/v1/sessions", token, json=body)
        assert status in (201, 409), answer  # opened, or over the quota
        return status

    statuses = await asyncio.gather(*(open_one(replica)
                                      for replica in [pair.a, pair.b] * (3 * SESSION_QUOTA)))
    assert statuses.count(201) == SESSION_QUOTA, statuses
    status, sessions = await pair.call(pair.b, "GET", "/api/v1/sessions?project=racing", token)
    assert status == 200
    assert len([s for s in sessions["items"] if s["state"] == "open"]) == SESSION_QUOTA


async def test_concurrent_token_issues_through_both_replicas_stay_within_the_quota(
        pair: Pair) -> None:
    status, body = await pair.call(pair.a, "POST", "/api/v1/projects", pair.admin_token,
                                   json={"name": "few", "quotas": {"tokens": 3}})
    assert status == 201, body

    async def issue(replica: Replica) -> int:
        status, answer = await pair.call(
            replica, "POST", "/api/v1/projects/few/tokens", pair.admin_token,
            json={"subject": "alice", "scope": SCOPE, "ttl": 3600})
        assert status in (201, 409), answer
        return status

    statuses = await asyncio.gather(*(issue(replica) for replica in [pair.a, pair.b] * 6))
    assert statuses.count(201) == 3, statuses


async def test_one_replica_leads_and_the_other_takes_over_when_it_is_killed(pair: Pair) -> None:
    def leader() -> Replica | None:
        alive = [replica for replica in (pair.a, pair.b) if replica.process.poll() is None]
        leading = [replica for replica in alive if replica.leads()]
        assert len(leading) <= 1, "two replicas lead at once"
        return leading[0] if leading else None

    first = eventually(leader, timeout_s=10, what="a leader")
    other = pair.b if first is pair.a else pair.a
    # The chain grows through the follower; the leader checkpoints it, the follower does not.
    await pair.create_project(other, "before")
    eventually(first.checkpoint_lines, timeout_s=10, what=f"a checkpoint by {first.name}")
    assert other.checkpoint_lines() == [] and not other.leads()

    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    assert eventually(leader, timeout_s=TAKEOVER_BOUND_S, what="the other replica leading") \
        is other
    await pair.create_project(other, "after")
    eventually(other.checkpoint_lines, timeout_s=10, what=f"a checkpoint by {other.name}")

    status, verification = await pair.call(other, "GET", "/api/v1/audit/verify",
                                           pair.admin_token)
    assert status == 200 and verification["ok"] is True, verification
    # Offline, against each replica's checkpoint file: each anchors the one chain.
    for replica in (first, other):
        result = await asyncio.to_thread(dsn, "admin", "audit", "verify", "--offline",
                                         "--state-dir", str(replica.state),
                                         "--database-url", pair.database_url)
        assert result.exit_code == 0, result.output
        assert "signed checkpoints hold" in result.output


async def configured_gateway(_conn: Conn) -> tuple[str, ...]:
    """No placement: the session goes to the configured single gateway."""
    return ()


async def test_a_session_open_waits_for_the_quota_lock_another_process_holds(
        postgres_url: str) -> None:
    # What keeps the races above within the quotas, shown without a race: while another connection
    # holds the quota lock, an open waits (here past the busy timeout: 503).
    store = await Store.open(postgres_url, busy_timeout_s=0.5)
    other = await asyncpg.connect(postgres_url)
    try:
        await create_project(store, Project("racing", created_at=1.0))
        session = SessionRecord("s1", "racing", "4dstem", 1, {}, "key", {}, "j1", 10.0, 100.0,
                                None)
        token = TokenRecord("j1", "racing", "session", "alice", "sessions:write", 10.0, 100.0)
        await other.execute("SELECT pg_advisory_lock($1)", lock_key(QUOTA_LOCK))
        with pytest.raises(Unavailable, match="busy"):
            await insert_session(store, session, token, limit=SESSION_QUOTA, now=10.0,
                                 place=configured_gateway)
        await other.execute("SELECT pg_advisory_unlock_all()")
        await insert_session(store, session, token, limit=SESSION_QUOTA, now=10.0,
                             place=configured_gateway)
    finally:
        await other.close()
        await store.close()


# --- the pieces: counters, the leader lock, leadership -------------------------------------------

class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_rate_counters_are_shared_and_slide_over_the_previous_window(
        postgres_url: str) -> None:
    await (await Store.open(postgres_url)).close()  # the schema, with its rate_counters table
    clock = Clock(6000.0 + 59)  # the last second of a one-minute window
    first = await PostgresCounters.open(postgres_url, clock=clock)
    second = await PostgresCounters.open(postgres_url, clock=clock)  # another replica's
    item = parse("10/minute")
    try:
        for counters in [first, second] * 5:
            assert await counters.hit(item, "token", "t1") is None
        assert await first.hit(item, "token", "t2") is None  # another key counts apart
        assert await second.hit(item, "token", "t1") == pytest.approx(1.0)  # the 11th: refused
        # 6 s into the next window, 90 % of the previous one (11 hits) still counts: 9.9 + 1.
        clock.now = 6060.0 + 6
        assert await first.hit(item, "token", "t1") is not None
        clock.now = 6060.0 + 30  # half of it: 5.5 + the refused hit + this one
        assert await second.hit(item, "token", "t1") is None
        clock.now = 6060.0 + 180  # both windows are past reading
        assert await first.expire() == 3
        assert await first.expire() == 0
    finally:
        await first.aclose()
        await second.aclose()


async def test_the_leader_lock_is_held_by_one_connection_until_it_is_gone(
        postgres_url: str) -> None:
    first, second = PostgresLeaderLock(postgres_url), PostgresLeaderLock(postgres_url)
    try:
        assert await first.acquire() and await first.held()
        assert not await second.acquire()
        admin = await asyncpg.connect(postgres_url)
        try:  # the server ends the leader's session (a failover, an admin, a dead host)
            ended = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = "
                "'advisory' AND granted AND database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database())")
            assert ended == 1
        finally:
            await admin.close()
        assert not await first.held()
        # The server frees the lock as the ended session exits.
        await eventually_async(second.acquire, timeout_s=10, what="the lock free again")
    finally:
        await first.release()
        await second.release()


def _leadership(lock: LeaderLock, events: list[str], name: str) -> Leadership:
    async def note(what: str) -> None:
        events.append(f"{name} {what}")

    return Leadership(lock, functools.partial(note, "elected"),
                      [Duty("tick", 0.05, functools.partial(note, "duty"))],
                      functools.partial(note, "exit"), Metrics().leader)


async def test_a_sole_process_leads_from_the_start_to_the_end() -> None:
    events: list[str] = []
    async with leading(_leadership(SoleLock(), events, "one")) as leadership:
        assert events == ["one elected"] and leadership.leading  # before anything is served
        await eventually_async(lambda: "one duty" in events, timeout_s=10, what="a duty run")
    assert events[-1] == "one exit" and not leadership.leading


async def test_of_two_leaderships_one_runs_the_duties_and_the_other_takes_over_after_it(
        postgres_url: str) -> None:
    events: list[str] = []
    async with leading(_leadership(PostgresLeaderLock(postgres_url), events, "a")) as a:
        async with leading(_leadership(PostgresLeaderLock(postgres_url), events, "b")) as b:
            assert a.leading and not b.leading
            await eventually_async(lambda: "a duty" in events, timeout_s=10, what="a's duty")
            await a.stop()
            await eventually_async(lambda: b.leading, timeout_s=10, what="b leading")
            await eventually_async(lambda: "b duty" in events, timeout_s=10, what="b's duty")
    assert not any(e.startswith("b") for e in events[:events.index("a exit")])


async def test_a_session_change_through_one_replica_reaches_the_other_replicas_gateways_at_once(
        pair: Pair) -> None:
    """A gateway following B serves a session opened through A, and drops it when its token is
    revoked through A, long before B's next reconcile (RECONCILE_S): A tells B."""
    await pair.create_project(pair.a, "told")
    token = str((await pair.project_token(pair.a, "told"))["token"])
    tables: list[SessionTable] = []
    source = CloneSessionSource([pair.b.state_service], pair.gateway, tables.append)
    source.start()
    try:
        assert await asyncio.to_thread(source.wait_synced, 10)
        status, opened = await pair.call(pair.a, "POST", "/api/v1/sessions", token, json={
            "project": "told", "template": "4dstem", "params": {},
            "client_key": zmq.curve_keypair()[0].decode()})
        assert status == 201, opened
        session = opened["id"]
        await eventually_async(lambda: source.load().by_id(session) is not None, timeout_s=10,
                               what="the session at the gateway following the other replica")
        jti = json.loads(base64.urlsafe_b64decode(_padded(opened["token"].split(".")[1])))["jti"]
        status, revoked = await pair.call(pair.a, "DELETE", f"/api/v1/tokens/{jti}",
                                          pair.admin_token)
        assert status == 200, revoked
        await eventually_async(lambda: source.load().by_id(session) is None, timeout_s=10,
                               what="the revoked session gone from that gateway")
    finally:
        source.stop()


async def test_clients_given_both_replicas_go_on_through_the_other_when_one_is_killed(
        pair: Pair) -> None:
    a, b = pair.a, pair.b
    await pair.create_project(a, "alpha")
    client = Client(f"{a.url},{b.url}", (await pair.project_token(a, "alpha"))["token"])
    assert await asyncio.to_thread(client.sessions) == [] and client.url == a.url
    a.process.kill()
    a.process.wait()
    assert await asyncio.to_thread(client.sessions) == [] and client.url == b.url
    listed = dsn("admin", "projects", "list", "--url", f"{a.url},{b.url}",
                 env={"DSN_ADMIN_TOKEN": pair.admin_token})
    assert listed.exit_code == 0 and "alpha" in listed.stdout, listed.output
