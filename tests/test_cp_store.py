"""The control plane store against real databases, SQLite files and PostgreSQL (the tests taking
``database`` run on both): schema, persistence, locking, semantics."""

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
from databases import Database
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
async def store(database: Database) -> AsyncIterator[Store]:
    opened = await Store.open(database.location, busy_timeout_s=0.2)
    yield opened
    await opened.close()


def _token(jti: str, project: str | None = "alpha", *, issued_at: float = 100.0,
           expires_at: float = 1000.0) -> TokenRecord:
    return TokenRecord(jti=jti, project=project, kind="project", subject="alice",
                       scope="sessions:write", issued_at=issued_at, expires_at=expires_at)


async def test_open_creates_private_state_dir_wal_and_current_schema(db_path: Path) -> None:
    opened = await Store.open(db_path)
    await opened.close()
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_an_empty_database_is_brought_to_the_current_schema(store: Store,
                                                                  database: Database) -> None:
    assert await database.schema_version() == SCHEMA_VERSION
    await create_project(store, Project("alpha"))  # the tables of every step exist and work
    assert await audit_head(store) is None
    assert await unfinished_jobs(store) == []


async def test_a_second_open_finds_the_schema_current(store: Store, database: Database) -> None:
    await create_project(store, Project("kept"))
    again = await Store.open(database.location)  # migrates nothing, loses nothing
    try:
        assert [p.name for p in await list_projects(again)] == ["kept"]
    finally:
        await again.close()
    assert await database.schema_version() == SCHEMA_VERSION


async def test_existing_loose_state_dir_is_tightened(tmp_path: Path) -> None:
    state = tmp_path / "loose"
    state.mkdir(mode=0o755)
    opened = await Store.open(state / "cp.db")
    await opened.close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


async def test_old_version_database_is_migrated_keeping_its_rows(database: Database) -> None:
    await database.sql(*map(database.native, MIGRATIONS[0]),
                       "INSERT INTO projects VALUES ('old', '[]', '{}', NULL, 5.0)")
    await database.set_schema_version(1)
    opened = await Store.open(database.location)
    try:
        assert await database.schema_version() == SCHEMA_VERSION
        assert await get_project(opened, "old") == Project("old", (), {}, None, 5.0)
        assert await audit_head(opened) is None  # the audit tables of step 2 exist and work
    finally:
        await opened.close()


async def test_jobs_stored_before_job_states_are_asked_about_again_and_final_states_stay(
        database: Database) -> None:
    # With the job's session and token: PostgreSQL checks the foreign keys.
    await database.sql(*(database.native(statement) for step in MIGRATIONS[:8]
                         for statement in step),
                       "INSERT INTO tokens VALUES ('t1', 'p', 'session', 'alice', 's', 1.0, 9.0, "
                       "NULL, NULL)",
                       "INSERT INTO sessions VALUES ('s1', 'p', 'slurm-sbatch', 1, '{}', 'k', "
                       "'{}', 't1', 1.0, 9.0, NULL)",
                       "INSERT INTO jobs VALUES ('j1', 's1', 'slurm-sbatch', 1, 'slurm', '42', "
                       "'/jobs/j1', 2, 't1', 5.0)")
    await database.set_schema_version(8)
    opened = await Store.open(database.location)
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


async def test_keys_stored_before_replicas_stopped_signing_when_the_next_was_created(
        database: Database) -> None:
    replicas = next(number for number, step in enumerate(MIGRATIONS)
                    if "ALTER TABLE signing_keys ADD COLUMN stopped_at REAL" in step)
    jwk = '{"kty": "OKP", "crv": "Ed25519", "x": "x"}'
    await database.sql(*(database.native(statement) for step in MIGRATIONS[:replicas]
                         for statement in step),
                       *(f"INSERT INTO signing_keys VALUES ('{kid}', {at}, NULL, '{jwk}')"
                         for kid, at in (("k1", 1.0), ("k2", 2.0), ("k3", 3.0))))
    await database.set_schema_version(replicas)
    opened = await Store.open(database.location)
    try:
        assert [(k.kid, k.stopped_at) for k in await list_signing_keys(opened)] == [
            ("k1", 2.0), ("k2", 3.0), ("k3", None)]
    finally:
        await opened.close()


async def test_newer_version_database_is_refused(database: Database) -> None:
    await database.set_schema_version(SCHEMA_VERSION + 1)
    with pytest.raises(ConfigurationError, match=f"schema version {SCHEMA_VERSION + 1}, newer "
                                                 "than this release supports"):
        await Store.open(database.location)


async def test_a_file_that_is_not_sqlite_is_a_configuration_error(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"definitely not a database" * 100)
    with pytest.raises(ConfigurationError, match="not a usable SQLite database"):
        await Store.open(db_path)


async def test_everything_persists_across_close_and_reopen(database: Database) -> None:
    first = await Store.open(database.location)
    await create_project(first, Project("alpha", ("default",), {"sessions": 2}, None, 1.0))
    await add_token(first, _token("j1"))
    await revoke_token(first, "j1", 50.0)
    key = SigningKeyRecord("kid1", 3.0, None, {"kty": "OKP", "crv": "Ed25519", "x": "abc"})
    await add_signing_key(first, key)
    await first.close()

    second = await Store.open(database.location)
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
    await add_signing_key(store, SigningKeyRecord("b-same-time", 3.0, None, jwk))
    await add_signing_key(store, SigningKeyRecord("a-same-time", 3.0, None, jwk))
    await retire_signing_key(store, "b-same-time", 4.0)  # an update moves no row in the order
    # One clock reading: in the order they were added (the newest signs).
    assert [k.kid for k in await list_signing_keys(store)][2:] == ["b-same-time", "a-same-time"]
    assert (await retire_signing_key(store, "old", 5.0)).retired_at == 5.0
    assert (await retire_signing_key(store, "old", 6.0)).retired_at == 5.0
    with pytest.raises(NotFound):
        await retire_signing_key(store, "ghost", 1.0)


async def test_write_lock_held_by_another_process_gives_unavailable_not_a_hang(
        store: Store, database: Database) -> None:
    async with database.write_locked(["projects"]):
        with pytest.raises(Unavailable, match="busy") as caught:
            await create_project(store, Project("alpha"))
        assert caught.value.retry_after_s == 1
        assert await get_project(store, "alpha") is None  # reads go on while locked
    await create_project(store, Project("alpha"))  # the store recovers once the lock is gone
    assert await get_project(store, "alpha") is not None


async def test_a_closed_store_fails_closed(database: Database) -> None:
    opened = await Store.open(database.location)
    await opened.close()
    with pytest.raises(Unavailable):
        await get_project(opened, "alpha")


async def test_writes_queued_together_share_a_transaction_but_fail_alone(
        store: Store, database: Database, caplog: pytest.LogCaptureFixture) -> None:
    # A write the database refuses, and one that is a domain error, in one batch with good writes.
    await database.fail_writes("refuse_bad", "BEFORE INSERT ON projects", "NEW.name = 'bad'")
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


async def test_a_write_is_committed_when_it_returns(store: Store, database: Database) -> None:
    await asyncio.gather(*(add_token(store, _token(f"j{n}")) for n in range(20)))
    await revoke_token(store, "j7", 5.0)
    # Another process sees it at once: committed.
    assert await database.sql("SELECT COUNT(*) FROM tokens") == [(20,)]
    assert await database.sql("SELECT revoked_at FROM tokens WHERE jti = 'j7'") == [(5.0,)]


async def test_reads_do_not_wait_behind_a_blocked_write(db_path: Path) -> None:
    opened = await Store.open(db_path, busy_timeout_s=5.0)
    began = threading.Event()

    def traced(statement: str) -> None:
        if statement.startswith("BEGIN"):
            began.set()

    # SQLite traces a statement as it starts to run, before BEGIN IMMEDIATE waits for the lock.
    await opened._backend._writer.set_trace_callback(traced)  # type: ignore[attr-defined]
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


async def test_close_commits_queued_writes_and_refuses_later_ones(database: Database) -> None:
    opened = await Store.open(database.location)
    queued = [asyncio.create_task(create_project(opened, Project(f"p{n}"))) for n in range(30)]
    await asyncio.sleep(0)  # every task has queued its write
    await asyncio.wait_for(opened.close(), timeout=5.0)
    assert [task.result() for task in queued] == [None] * 30
    with pytest.raises(Unavailable, match="closed"):
        await create_project(opened, Project("late"))

    reopened = await Store.open(database.location)
    try:
        assert len(await list_projects(reopened)) == 30
    finally:
        await reopened.close()
