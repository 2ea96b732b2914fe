"""The control plane on PostgreSQL: several processes sharing one database keep one audit chain,
a whole service serves from it, its URL's password stays out of errors and logs, and the dialect
layer translates what the two engines write differently. (The store's and the audit chain's own
suites run on both engines: tests/test_cp_store.py, tests/test_cp_audit.py.)"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import asyncpg
import pytest
from cp_helpers import ClientFactory, start_control_plane
from test_cp_cli import assert_one_line_error, dsn

from common.errors import InvalidSetting
from controlplane.admin.bootstrap import require_initialised
from controlplane.audit import AuditLog, AuditVerification
from controlplane.cli import load_settings, serve
from controlplane.errors import ConfigurationError, Unavailable
from controlplane.settings import Settings
from controlplane.store.audit import AuditFilter, search_audit
from controlplane.store.base import redacted
from controlplane.store.dialect import to_postgresql
from controlplane.store.engine import Store
from controlplane.store.migrations import SCHEMA_VERSION
from controlplane.store.projects import Project, create_project, list_projects

REPO = Path(__file__).resolve().parent.parent

# Another control plane process: opens its own store on the database, says so, waits for the
# word, then appends its records as requests would (many at once), and closes.
APPENDER = """
import asyncio, sys
from controlplane.audit import AuditLog
from controlplane.store.engine import Store
from controlplane.store.migrations import SCHEMA_VERSION
from controlplane.store.projects import Project, create_project, list_projects

async def main(url, count):
    store = await Store.open(url)
    audit = AuditLog(store)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for start in range(0, count, 10):
        await asyncio.gather(*(audit.record(principal="other-process", action="a", resource="r",
                                            decision="allow", rule="x", request_id=f"other-{n}")
                               for n in range(start, start + 10)))
    await store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def _append_here(audit: AuditLog, count: int) -> None:
    for start in range(0, count, 10):
        await asyncio.gather(*(audit.record(principal="this-process", action="a", resource="r",
                                            decision="deny", rule="x", request_id=f"this-{n}")
                               for n in range(start, start + 10)))


async def test_two_processes_appending_at_once_keep_one_chain(postgres_url: str) -> None:
    count = 200
    store = await Store.open(postgres_url)
    try:
        other = await asyncio.create_subprocess_exec(
            sys.executable, "-c", APPENDER, postgres_url, str(count),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert other.stdin is not None and other.stdout is not None
        assert await asyncio.wait_for(other.stdout.readline(), timeout=60) == b"ready\n"
        other.stdin.write(b"go\n")
        await other.stdin.drain()
        audit = AuditLog(store)
        await asyncio.gather(_append_here(audit, count), other.wait())
        assert other.returncode == 0
        assert await audit.verify() == AuditVerification(ok=True, records=2 * count)
        ids = [record.request_id for record in await audit.list(limit=2 * count)]
        assert sorted(ids) == sorted([f"this-{n}" for n in range(count)]
                                     + [f"other-{n}" for n in range(count)])
    finally:
        await store.close()


async def test_control_planes_starting_together_on_an_empty_database_migrate_it_once(
        postgres_url: str) -> None:
    stores = await asyncio.gather(*(Store.open(postgres_url) for _ in range(3)))
    try:
        await create_project(stores[0], Project("alpha"))
        assert [[p.name for p in await list_projects(store)] for store in stores] == [["alpha"]] * 3
        assert await stores[1].read("SELECT version FROM schema_version", ()) == [(SCHEMA_VERSION,)]
    finally:
        for store in stores:
            await store.close()


async def test_after_the_server_drops_its_connections_the_store_connects_again(
        postgres_url: str) -> None:
    store = await Store.open(postgres_url)
    try:
        await create_project(store, Project("before"))
        # The server ends the service's connections (a restart, a failover, an admin), and waits
        # (up to 10 s) for them to be gone.
        terminator = await asyncpg.connect(postgres_url)
        try:
            await terminator.execute("SELECT pg_terminate_backend(pid, 10000) "
                                     "FROM pg_stat_activity "
                                     "WHERE application_name = 'dsn-controlplane'")
        finally:
            await terminator.close()
        try:  # Unavailable if sent before the loss is noticed: never a write lost unsaid
            await create_project(store, Project("at-once"))
        except Unavailable:
            pass
        await create_project(store, Project("after"))
        assert {"before", "after"} <= {p.name for p in await list_projects(store)}
    finally:
        await store.close()


async def test_a_whole_control_plane_serves_from_postgresql(
        postgres_url: str, aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    # postgres_url first: its database is dropped after the service has stopped.
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", database_url=postgres_url)
    assert not cp.settings.database.exists()  # no SQLite file: the state is in PostgreSQL
    await cp.create_project("alpha")
    issued = await cp.project_token("alpha")
    assert (await cp.call("GET", "/api/v1/projects/alpha", issued["token"])).status == 200
    assert (await cp.admin("DELETE", f"/api/v1/tokens/{issued['jti']}")).status == 200
    assert (await cp.call("GET", "/api/v1/projects/alpha", issued["token"])).status == 401
    verification = await (await cp.admin("GET", "/api/v1/audit/verify")).json()
    assert verification["ok"] is True and verification["records"] >= 4

    # What the service wrote is in the database, where another process reads it.
    store = await Store.open(postgres_url)
    try:
        [row] = await store.read("SELECT revoked_at FROM tokens WHERE jti = ?", (issued["jti"],))
        assert row["revoked_at"] is not None
        assert (await AuditLog(store).verify()).records == verification["records"]
        # Searched as the console does: part of the principal, in any case.
        revocations = await search_audit(store, AuditFilter(principal="ADMIN:Admin#",
                                                            action="tokens:revoke"))
        assert [(r.resource, r.decision) for r in revocations] == [
            (f"token/{issued['jti']}", "allow")]
    finally:
        await store.close()


async def test_the_password_of_an_unreachable_database_stays_out_of_errors_and_logs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"postgresql://dsn:s3cret-word@/dsn?host={tmp_path}&port=1"  # no server there
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigurationError) as caught:
        await Store.open(url, busy_timeout_s=0.1)
    assert "cannot connect to the database at postgresql://dsn:***@/dsn" in str(caught.value)
    assert "s3cret" not in str(caught.value) and "s3cret" not in caplog.text
    assert "s3cret" not in repr(Settings(state_dir=tmp_path, database_url=url))


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://dsn:pw@db-host/dsn", "postgresql://dsn:***@db-host/dsn"),
    ("postgresql://dsn@/dsn?host=/run/postgresql&password=pw",
     "postgresql://dsn@/dsn?host=/run/postgresql&password=***"),
    ("postgresql://dsn@db-host:5433/dsn", "postgresql://dsn@db-host:5433/dsn"),
])
def test_a_database_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


@pytest.mark.parametrize("url", ["mysql://dsn@db/dsn", "postgresql://dsn:pw@db-host/",
                                 "postgresql://dsn@db host/dsn"])
def test_a_database_url_that_is_not_postgresql_naming_a_database_is_refused(
        tmp_path: Path, url: str) -> None:
    with pytest.raises(InvalidSetting, match="must be a PostgreSQL URL naming its database") as e:
        Settings(state_dir=tmp_path, database_url=url)
    assert ":pw@" not in str(e.value)


@pytest.mark.parametrize(("sqlite", "postgresql"), [
    ("SELECT * FROM t WHERE a = ? AND b = ?", "SELECT * FROM t WHERE a = $1 AND b = $2"),
    ("UPDATE t SET a = ?2 WHERE b = ?1 OR c = ?2", "UPDATE t SET a = $2 WHERE b = $1 OR c = $2"),
    ("SELECT '?', \"a?\" FROM t WHERE a = ?", "SELECT '?', \"a?\" FROM t WHERE a = $1"),
    ("CREATE TABLE t (a INTEGER NOT NULL, b REAL, c BLOB, d TEXT DEFAULT 'REAL')",
     "CREATE TABLE t (a BIGINT NOT NULL, b DOUBLE PRECISION, c BYTEA, d TEXT DEFAULT 'REAL',\n"
     "    rowid BIGINT GENERATED ALWAYS AS IDENTITY)"),
    ("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, a TEXT)",
     "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, a TEXT,\n"
     "    rowid BIGINT GENERATED ALWAYS AS IDENTITY)"),
    ("ALTER TABLE t ADD COLUMN n INTEGER NOT NULL DEFAULT 1",
     "ALTER TABLE t ADD COLUMN n BIGINT NOT NULL DEFAULT 1"),
    ("SELECT CAST(a AS INTEGER) FROM t", "SELECT CAST(a AS INTEGER) FROM t"),  # not a definition
    ("INSERT OR IGNORE INTO t VALUES (?, ?)",
     "INSERT INTO t VALUES ($1, $2) ON CONFLICT DO NOTHING"),
    ("INSERT OR IGNORE INTO t VALUES (?) RETURNING *",
     "INSERT INTO t VALUES ($1) ON CONFLICT DO NOTHING RETURNING *"),
    ("SELECT 1 FROM t WHERE instr(lower(p), lower(?)) > 0",
     "SELECT 1 FROM t WHERE strpos(lower(p), lower($1)) > 0"),
])
def test_the_dialect_layer_translates_what_sqlite_writes_otherwise(sqlite: str,
                                                                   postgresql: str) -> None:
    assert to_postgresql(sqlite) == postgresql


def test_admin_commands_and_serve_take_the_database_url_from_the_environment(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("DSN_DATABASE_URL", postgres_url)
    result = dsn("admin", "init", "--state-dir", str(state))
    assert result.exit_code == 0, result.output
    assert not (state / "controlplane.sqlite3").exists()
    ctx = serve.make_context("serve", ["--state-dir", str(state)])
    settings = load_settings(ctx, None)
    assert settings.database_url == postgres_url
    asyncio.run(require_initialised(settings))  # the service would start on it
    # What works on the state without the service works on the database too.
    recovered = dsn("admin", "recover", "--state-dir", str(state), "--name", "admin",
                    "--out", str(tmp_path / "recovered.token"))
    assert recovered.exit_code == 0, recovered.output
    verified = dsn("admin", "audit", "verify", "--offline", "--state-dir", str(state))
    assert verified.exit_code == 0, verified.output
    assert "audit chain ok: 2 records" in verified.output  # the init and the recovery
    # The database has its signing key: a second state directory cannot initialise it again.
    assert_one_line_error(dsn("admin", "init", "--state-dir", str(tmp_path / "other")),
                          "is already initialised (it has signing keys)")


def test_a_bad_database_url_option_is_one_error_without_its_password(tmp_path: Path) -> None:
    result = dsn("controlplane", "serve", "--state-dir", str(tmp_path),
                 "--database-url", "mysql://dsn:s3cret@db/dsn")
    assert_one_line_error(result,
                          "--database-url: 'mysql://dsn:***@db/dsn': must be a PostgreSQL")
    assert "s3cret" not in result.output


async def test_a_store_location_given_as_text_must_be_a_postgresql_url() -> None:
    with pytest.raises(ConfigurationError, match="'mysql://dsn:\\*\\*\\*@db/dsn' is not a "
                                                 "PostgreSQL URL"):
        await Store.open("mysql://dsn:pw@db/dsn")
