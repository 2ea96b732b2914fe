"""The control plane store against real SQLite files: schema, persistence, locking, semantics."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from waiting import eventually_async

from controlplane.errors import ConfigurationError, Conflict, NotFound, Unavailable
from controlplane.launchers import JobStatus
from controlplane.sessions.repository import unfinished_jobs, update_job_state
from controlplane.store.audit import audit_head
from controlplane.store.engine import Store
from controlplane.store.migrations import MIGRATIONS, SCHEMA_VERSION
from controlplane.store.projects import (
    Project,
    create_project,
    get_project,
    list_projects,
    update_project,
)
from controlplane.store.signing_keys import (
    SigningKeyRecord,
    add_signing_key,
    list_signing_keys,
    retire_signing_key,
)
from controlplane.store.tokens import (
    TokenRecord,
    add_token,
    get_token,
    is_revoked,
    list_tokens,
    revoke_token,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "controlplane.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(db_path, busy_timeout_s=0.2)
    yield opened
    await opened.close()


def _token(jti: str, project: str | None = "alpha", *, issued_at: float = 100.0,
           expires_at: float = 1000.0) -> TokenRecord:
    return TokenRecord(jti=jti, project=project, kind="project", subject="alice",
                       scope="sessions:write", issued_at=issued_at, expires_at=expires_at)


def _version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


async def test_open_creates_private_state_dir_wal_and_current_schema(store: Store,
                                                                     db_path: Path) -> None:
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert _version(db_path) == SCHEMA_VERSION
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_existing_loose_state_dir_is_tightened(tmp_path: Path) -> None:
    state = tmp_path / "loose"
    state.mkdir(mode=0o755)
    opened = await Store.open(state / "cp.db")
    await opened.close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


async def test_old_version_database_is_migrated_keeping_its_rows(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO projects VALUES ('old', '[]', '{}', NULL, 5.0)")
    opened = await Store.open(db_path)
    try:
        assert _version(db_path) == SCHEMA_VERSION
        assert await get_project(opened, "old") == Project("old", (), {}, None, 5.0)
        assert await audit_head(opened) is None  # the audit tables of step 2 exist and work
    finally:
        await opened.close()


async def test_jobs_stored_before_job_states_are_asked_about_again_and_final_states_stay(
        db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as conn:
        for statement in (statement for step in MIGRATIONS[:8] for statement in step):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 8")
        conn.execute("INSERT INTO jobs VALUES ('j1', 's1', 'slurm-sbatch', 1, 'slurm', '42', "
                     "'/jobs/j1', 2, 't1', 5.0)")
    opened = await Store.open(db_path)
    try:
        [job] = await unfinished_jobs(opened)
        assert (job.id, job.status()) == ("j1", JobStatus("pending", None, ""))
        await update_job_state(opened, "j1", JobStatus("succeeded", 0, "Slurm state COMPLETED"))
        await update_job_state(opened, "j1", JobStatus("running", None, "a late answer"))
        assert await unfinished_jobs(opened) == []
        [row] = await opened.read("SELECT state, exit_code, detail FROM jobs", ())
        assert tuple(row) == ("succeeded", 0, "Slurm state COMPLETED")
    finally:
        await opened.close()


async def test_newer_version_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigurationError, match="newer than this release"):
        await Store.open(db_path)


async def test_a_file_that_is_not_sqlite_is_a_configuration_error(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"definitely not a database" * 100)
    with pytest.raises(ConfigurationError, match="not a usable SQLite database"):
        await Store.open(db_path)


async def test_everything_persists_across_close_and_reopen(db_path: Path) -> None:
    first = await Store.open(db_path)
    await create_project(first, Project("alpha", ("default",), {"sessions": 2}, None, 1.0))
    await add_token(first, _token("j1"))
    await revoke_token(first, "j1", 50.0)
    key = SigningKeyRecord("kid1", 3.0, None, {"kty": "OKP", "crv": "Ed25519", "x": "abc"})
    await add_signing_key(first, key)
    await first.close()

    second = await Store.open(db_path)
    try:
        assert await get_project(second, "alpha") == Project("alpha", ("default",),
                                                            {"sessions": 2}, None, 1.0)
        assert await is_revoked(second, "j1", 50.0)
        assert await get_token(second, "j1") == replace(_token("j1"), revoked_at=50.0)
        assert await list_signing_keys(second) == [key]
    finally:
        await second.close()


async def test_project_crud(store: Store) -> None:
    await create_project(store, Project("beta", created_at=2.0))
    await create_project(store, Project("alpha", created_at=1.0))
    with pytest.raises(Conflict, match="'alpha' already exists"):
        await create_project(store, Project("alpha"))
    assert [p.name for p in await list_projects(store)] == ["alpha", "beta"]

    updated = await update_project(store, "alpha", allowed_templates=["a", "b"], not_before=7.0)
    assert updated == Project("alpha", ("a", "b"), {}, 7.0, 1.0)
    updated = await update_project(store, "alpha", quotas={"tokens": 3})
    assert updated == Project("alpha", ("a", "b"), {"tokens": 3}, 7.0, 1.0)
    with pytest.raises(NotFound):
        await update_project(store, "nope", quotas={})


async def test_tokens_revocation_is_idempotent_and_unknown_jti_is_not_found(store: Store) -> None:
    await create_project(store, Project("alpha"))
    await add_token(store, _token("j1"))
    with pytest.raises(Conflict):
        await add_token(store, _token("j1"))
    assert not await is_revoked(store, "j1", 100.0)
    assert (await revoke_token(store, "j1", 10.0)).revoked_at == 10.0
    assert (await revoke_token(store, "j1", 20.0)).revoked_at == 10.0
    assert await is_revoked(store, "j1", 10.0)
    assert not await is_revoked(store, "never-issued", 100.0)
    with pytest.raises(NotFound):
        await revoke_token(store, "never-issued", 1.0)


async def test_a_token_revoked_from_a_later_time_is_refused_from_then_and_sooner_if_revoked_again(
        store: Store) -> None:
    await create_project(store, Project("alpha"))
    await add_token(store, _token("j1"))
    await revoke_token(store, "j1", 60.0)  # as a session's end does to its jobs' tokens
    assert not await is_revoked(store, "j1", 59.9)
    assert await is_revoked(store, "j1", 60.0)
    assert (await revoke_token(store, "j1", 30.0)).revoked_at == 30.0  # an explicit revoke
    assert (await revoke_token(store, "j1", 90.0)).revoked_at == 30.0
    assert await is_revoked(store, "j1", 30.0)


async def test_parent_jti_must_name_a_stored_token(store: Store) -> None:
    await create_project(store, Project("alpha"))
    orphan = TokenRecord("child", "alpha", "session", "alice", "s", 1.0, 2.0, None, "missing")
    with pytest.raises(NotFound, match="parent token 'missing'"):
        await add_token(store, orphan)
    await add_token(store, _token("parent"))
    await add_token(store, TokenRecord("child", "alpha", "session", "alice", "s", 1.0, 2.0, None,
                                       "parent"))
    assert (await get_token(store, "child")).parent_jti == "parent"  # type: ignore[union-attr]


async def test_a_projects_token_quota_counts_its_live_tokens_only(store: Store) -> None:
    await create_project(store, Project("alpha"))
    await create_project(store, Project("other"))
    await add_token(store, _token("live", issued_at=100.0, expires_at=1000.0))
    await add_token(store, _token("expired", issued_at=100.0, expires_at=400.0))
    await add_token(store, _token("revoked", issued_at=100.0, expires_at=1000.0))
    await add_token(store, _token("elsewhere", project="other"))
    await revoke_token(store, "revoked", 200.0)
    assert [t.jti for t in await list_tokens(store, "alpha")] == ["expired", "live", "revoked"]
    # At 500 only "live" counts: a quota of 2 takes one more, then refuses.
    await add_token(store, _token("second", issued_at=500.0, expires_at=1000.0), limit=2)
    with pytest.raises(Conflict, match="quota of 2 live tokens"):
        await add_token(store, _token("third", issued_at=500.0, expires_at=1000.0), limit=2)
    await update_project(store, "alpha", not_before=250.0)  # kills "live" (issued at 100)
    await add_token(store, _token("third", issued_at=500.0, expires_at=1000.0), limit=2)


async def test_signing_keys_listing_and_retirement(store: Store) -> None:
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": "x"}
    await add_signing_key(store, SigningKeyRecord("new", 2.0, None, jwk))
    await add_signing_key(store, SigningKeyRecord("old", 1.0, None, jwk))
    with pytest.raises(Conflict):
        await add_signing_key(store, SigningKeyRecord("old", 1.0, None, jwk))
    assert [k.kid for k in await list_signing_keys(store)] == ["old", "new"]
    assert (await retire_signing_key(store, "old", 5.0)).retired_at == 5.0
    assert (await retire_signing_key(store, "old", 6.0)).retired_at == 5.0
    with pytest.raises(NotFound):
        await retire_signing_key(store, "ghost", 1.0)


async def test_write_lock_held_by_another_process_gives_unavailable_not_a_hang(
        store: Store, db_path: Path) -> None:
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(Unavailable, match="busy") as caught:
            await create_project(store, Project("alpha"))
        assert caught.value.retry_after_s == 1
        assert await get_project(store, "alpha") is None  # WAL: reads go on while locked
        other.execute("ROLLBACK")
    finally:
        other.close()
    await create_project(store, Project("alpha"))  # the store recovers once the lock is gone
    assert await get_project(store, "alpha") is not None


async def test_a_closed_store_fails_closed(db_path: Path) -> None:
    opened = await Store.open(db_path)
    await opened.close()
    with pytest.raises(Unavailable):
        await get_project(opened, "alpha")


async def test_writes_queued_together_share_a_transaction_but_fail_alone(
        store: Store, db_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A write that SQLite refuses, and one that is a domain error, in one batch with good writes.
    refuse_bad = ("CREATE TRIGGER refuse_bad BEFORE INSERT ON projects WHEN NEW.name = 'bad' "
                       "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with sqlite3.connect(db_path) as other:
        other.execute(refuse_bad)
    with caplog.at_level(logging.DEBUG, logger="controlplane.store"):
        results = await asyncio.gather(
            create_project(store, Project("alpha")), create_project(store, Project("alpha")),
            create_project(store, Project("bad")), create_project(store, Project("beta")),
            return_exceptions=True)
    assert [r.args for r in caplog.records if r.name == "controlplane.store"
            and r.levelno == logging.DEBUG] == [(4,)]  # one transaction for all four
    assert results[0] is None and results[3] is None
    assert isinstance(results[1], Conflict)
    assert isinstance(results[2], Unavailable)
    assert [p.name for p in await list_projects(store)] == ["alpha", "beta"]


async def test_a_write_is_committed_when_it_returns(store: Store, db_path: Path) -> None:
    await asyncio.gather(*(add_token(store, _token(f"j{n}")) for n in range(20)))
    await revoke_token(store, "j7", 5.0)
    with sqlite3.connect(db_path) as other:  # another process sees it at once: committed
        assert other.execute("SELECT COUNT(*) FROM tokens").fetchone()[0] == 20
        assert other.execute("SELECT revoked_at FROM tokens WHERE jti = 'j7'").fetchone()[0] == 5.0


async def test_reads_do_not_wait_behind_a_blocked_write(db_path: Path) -> None:
    opened = await Store.open(db_path, busy_timeout_s=5.0)
    began = threading.Event()

    def traced(statement: str) -> None:
        if statement.startswith("BEGIN"):
            began.set()

    # SQLite traces a statement as it starts to run, before BEGIN IMMEDIATE waits for the lock.
    await opened._conn.set_trace_callback(traced)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(create_project(opened, Project("alpha")))
        await eventually_async(began.is_set, timeout_s=5.0,
                               what="the writer to wait for the other process's lock")
        assert await asyncio.wait_for(get_project(opened, "alpha"), timeout=1.0) is None
        assert not write.done()
        other.execute("ROLLBACK")
        await asyncio.wait_for(write, timeout=5.0)
        assert await get_project(opened, "alpha") is not None
    finally:
        other.close()
        await opened.close()


async def test_close_commits_queued_writes_and_refuses_later_ones(db_path: Path) -> None:
    opened = await Store.open(db_path)
    queued = [asyncio.create_task(create_project(opened, Project(f"p{n}"))) for n in range(30)]
    await asyncio.sleep(0)  # every task has queued its write
    await asyncio.wait_for(opened.close(), timeout=5.0)
    assert [task.result() for task in queued] == [None] * 30
    with pytest.raises(Unavailable, match="closed"):
        await create_project(opened, Project("late"))

    reopened = await Store.open(db_path)
    try:
        assert len(await list_projects(reopened)) == 30
    finally:
        await reopened.close()
