"""A throwaway PostgreSQL server from Debian's packages, for the store's tests on PostgreSQL.

One server per test session (``running_server``), in a temporary directory, listening on a unix
socket there only (its port number names the socket); a fresh database per test
(``create_database`` / ``drop_database``). The server refuses to run as root, so as root initdb and
pg_ctl run as the ``postgres`` user the package creates, owning the directory. Durability is
switched off (``fsync``): these tests check what the store does, not the disk.
``missing()`` says why no server can run here, so that the tests skip with that reason.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.ports import free_port

UNPRIVILEGED = "postgres"


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda path: int(Path(path).parent.parent.name))
    return Path(found[-1]).parent if found else None


def missing() -> str | None:
    """Why no PostgreSQL server can be started here, or None."""
    if _bindir() is None:
        return "PostgreSQL is not installed (sh scripts/install-test-deps.sh installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(UNPRIVILEGED)
        except KeyError:
            return f"running as root, and there is no {UNPRIVILEGED!r} user to run PostgreSQL as"
    return None


@dataclass(frozen=True)
class PostgresServer:
    bindir: Path
    socket_dir: Path
    port: int

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def _client(self, tool: str, *args: str) -> None:
        subprocess.run([str(self.bindir / tool), "-h", str(self.socket_dir), "-p", str(self.port),
                        "-U", "postgres", *args], check=True, capture_output=True, timeout=60)

    def create_database(self) -> str:
        name = f"test_{uuid.uuid4().hex[:16]}"
        self._client("createdb", name)
        return name

    def drop_database(self, name: str) -> None:
        self._client("dropdb", "--force", name)


def _as_server_user(command: list[str], log: Path | None = None) -> None:
    user = UNPRIVILEGED if os.geteuid() == 0 else None
    result = subprocess.run(command, user=user, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
        raise RuntimeError(f"{Path(command[0]).name} failed: {result.stderr.strip()} {tail}")


@contextmanager
def running_server() -> Iterator[PostgresServer]:
    """A fresh server for as long as the context lasts; RuntimeError if it does not start."""
    bindir = _bindir()
    assert bindir is not None, missing()
    # In /tmp, not under pytest's root-only directory: the server user must reach it.
    root = Path(tempfile.mkdtemp(prefix="dsn-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(root, UNPRIVILEGED, UNPRIVILEGED)
    data, log = root / "data", root / "server.log"
    try:
        _as_server_user([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                         "-E", "UTF8", "--no-sync", "--no-instructions"])
        port = free_port()
        options = (f"-k {root} -p {port} -c listen_addresses='' -c fsync=off "
                   "-c full_page_writes=off -c max_connections=200")
        _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                         "-w", "-t", "60", "start"], log)
        try:
            yield PostgresServer(bindir, root, port)
        finally:
            _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                             "stop"], log)
    finally:
        shutil.rmtree(root, ignore_errors=True)
