"""Control-plane replicas on one PostgreSQL database: session opens per second through one and
through two replicas, and how long the lead takes to move when the leader is killed.

Starts a throwaway PostgreSQL server from Debian's packages (``tests/postgres_server.py``: unix
socket, ``fsync`` off, so the figures show the service, not the disk), initialises it with
``dsn admin init`` and a second state directory with ``dsn admin init --join``, and serves both
with the real ``dsn controlplane serve`` (bench policy: rate limits no client reaches, though every
request is still counted in the database). Cases, each N session opens
(``POST /api/v1/sessions``) shared by C concurrent clients (bench/controlplane_tokens.py's driver):

    one      every client on replica A (B idle)
    two      half the clients on A, half on B

Then the leader is killed (SIGKILL) and the time until the other replica's ``dsn_cp_leader`` metric
reads 1 is measured, R times (the killed replica restarted between rounds). No assertions.

    .venv/bin/python bench/controlplane_replicas.py [--requests 1000] [--concurrency 32] \
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH.parent / "tests"))

from controlplane_load import _session_opener, _unbounded_quotas
from controlplane_tokens import (
    DSN,
    ROOT,
    CaseResult,
    _setup,
    _wait_ready,
    run_case,
    write_bench_policy,
)
from postgres_server import running_server

from common.ports import free_port
from controlplane.admin.bootstrap import initialize, join


@dataclass
class Replica:
    state: Path
    base: str
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, policy: Path, env: dict[str, str]) -> None:
        port = int(self.base.rsplit(":", 1)[1])
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [DSN, "controlplane", "serve", "--state-dir", str(self.state), "--port", str(port),
                 "--policy", str(policy),
                 "--state-snapshots", f"tcp://127.0.0.1:{free_port()}",
                 "--state-updates", f"tcp://127.0.0.1:{free_port()}"],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        _wait_ready(self.base, self.process, self.log, 30)

    def leads(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/metrics", timeout=1) as response:
                return b"\ndsn_cp_leader 1.0" in response.read()
        except OSError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=15)


async def _split(bases: list[str], token: str, *, requests: int,
                 concurrency: int) -> CaseResult:
    """Session opens shared by ``concurrency`` clients spread evenly over ``bases``."""
    shares = [concurrency // len(bases) + (i < concurrency % len(bases))
              for i in range(len(bases))]
    parts = [run_case(base, _session_opener(base, token), requests=requests * share // concurrency,
                      concurrency=share) for base, share in zip(bases, shares, strict=True)]
    started = time.perf_counter()
    results = await asyncio.gather(*parts)
    return CaseResult("", [lat for r in results for lat in r.latencies_s],
                      sum(r.errors for r in results), time.perf_counter() - started)


def _takeover_s(leader: Replica, other: Replica) -> float:
    leader.kill()
    killed = time.perf_counter()
    while not other.leads():
        time.sleep(0.01)
    return time.perf_counter() - killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="session opens per case")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=3, help="leader kills")
    args = parser.parse_args()
    with running_server() as server, tempfile.TemporaryDirectory(prefix="dsn-bench-") as tmp:
        url = server.url(server.create_database())
        env = {**os.environ, "DSN_DATABASE_URL": url}
        policy = write_bench_policy(ROOT / "policies", Path(tmp) / "policies")
        admin_token = asyncio.run(initialize(Path(tmp) / "a", policy_path=policy,
                                             database_url=url))
        asyncio.run(join(Path(tmp) / "b", database_url=url))
        a, b = (Replica(Path(tmp) / name, f"http://127.0.0.1:{free_port()}",
                        Path(tmp) / f"{name}.log") for name in ("a", "b"))
        try:
            for replica in (a, b):
                replica.start(policy, env)
            token = asyncio.run(_setup(a.base, admin_token))
            asyncio.run(_unbounded_quotas(a.base, admin_token))
            one = asyncio.run(_split([a.base], token, requests=args.requests,
                                     concurrency=args.concurrency))
            two = asyncio.run(_split([a.base, b.base], token, requests=args.requests,
                                     concurrency=args.concurrency))
            takeovers = []
            for _ in range(args.rounds):
                leader, other = (a, b) if a.leads() else (b, a)
                takeovers.append(_takeover_s(leader, other))
                leader.start(policy, env)
        finally:
            a.stop()
            b.stop()
    print(f"session opens: {args.requests} per case, {args.concurrency} clients, PostgreSQL "
          "(fsync off) on this host")
    print(f"{'replicas':<9} {'requests':>8} {'errors':>6} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'req/s':>9}")
    for name, result in (("one", one), ("two", two)):
        result.name = name
        print(result.row())
    print("leader killed -> other leads: " + ", ".join(f"{s:.2f} s" for s in takeovers))


if __name__ == "__main__":
    main()
