"""Shared fixtures: free loopback ports, a ZeroMQ context whose sockets never linger, key pairs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import browser
import pytest
import zmq
from cp_helpers import gateway_process, served_on, start_control_plane
from databases import Database, PostgresDatabase, SqliteDatabase
from postgres_server import PostgresServer, running_server
from postgres_server import missing as postgres_missing
from slurm_cluster import Cluster, missing, running_cluster

from common.keys import KeyPair, create_keypair, load_keypair
from common.ports import free_port as dataplane_free_port


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a loopback TCP port that was free a moment ago."""
    return dataplane_free_port


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context]:
    """A fresh context; sockets default to linger 0 and everything is closed at teardown."""
    context = zmq.Context()
    context.linger = 0
    yield context
    context.destroy(linger=0)


@pytest.fixture
def curve_keypair() -> Callable[[], KeyPair]:
    """A function returning a fresh in-memory CURVE key pair (Z85 public and secret)."""
    def make() -> KeyPair:
        public, secret = zmq.curve_keypair()
        return KeyPair(public, secret)
    return make


@pytest.fixture
def server_key_files(tmp_path: Path) -> tuple[KeyPair, Path]:
    """A server key pair written as certificate files: (the pair, the 0600 secret file)."""
    _public_file, secret_file = create_keypair(tmp_path / "keys", "server")
    return load_keypair(secret_file), secret_file


@pytest.fixture
async def served(tmp_path: Path, free_port: Callable[[], int]) -> Any:
    """A control plane on a real port (jobs reach it at its base URL) and a live gateway."""
    port = free_port()
    async with served_on(port) as serve:
        cp = await start_control_plane(
            serve, tmp_path / "state", port=port, reconcile_s=0.2,
            gateway_endpoint=f"tcp://127.0.0.1:{free_port()}",
            gateway_receipts_endpoint=f"tcp://127.0.0.1:{free_port()}")
        metrics = f"127.0.0.1:{free_port()}"
        with gateway_process(cp, tmp_path / "spool", metrics):
            yield cp, metrics, tmp_path / "spool"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One real Slurm cluster (munged, slurmctld, slurmd on loopback) shared by the whole run;
    skipped, saying why, where the packages are missing or the tests do not run as root."""
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    with running_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def console_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[browser.Site]:
    """One control plane and gateway, served as a facility runs them, for the browser tests."""
    reason = browser.missing()
    if reason:
        pytest.skip(f"browser tests: {reason}")
    with browser.running_site(tmp_path_factory.mktemp("console")) as site:
        yield site


@pytest.fixture(scope="session")
def chromium(console_site: browser.Site) -> Iterator[Any]:
    """One headless Chromium for the whole run (starting one takes seconds)."""
    driver = browser.start_chromium()
    yield driver
    driver.quit()


@pytest.fixture
def page(chromium: Any, console_site: browser.Site) -> browser.Page:
    """The browser on the console, signed out (no cookie left from another test)."""
    chromium.delete_all_cookies()
    return browser.Page(chromium, console_site)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (each test gets a database of its own)."""
    if (reason := postgres_missing()) is not None:
        pytest.skip(reason)
    try:
        with running_server() as server:
            yield server
    except RuntimeError as exc:
        pytest.skip(f"PostgreSQL would not start here: {exc}")


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database, dropped after the test."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """The store's database on each engine: the SQLite file in a fresh state directory, or a
    fresh PostgreSQL database."""
    if request.param == "sqlite":
        return SqliteDatabase(tmp_path / "state" / "controlplane.sqlite3")
    return PostgresDatabase(request.getfixturevalue("postgres_url"))
