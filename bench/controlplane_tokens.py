"""Control plane token latency: issue, verify and exchange under concurrent clients.

Initialises a fresh state directory, starts the real ``dsn controlplane serve`` on a free loopback
port and drives it with C concurrent aiohttp clients (one connection each) for N requests per case:

    issue     POST /api/v1/projects/{p}/tokens  (admin token; signs a project token, stores its jti)
    verify    GET  /api/v1/projects/{p}         (project token; signature, claims, revocation check)
    exchange  POST /api/v1/token                (project token -> session token)

Every request also runs the policy decision, the rate limiter and one audit append. The policy is
the shipped one with the bench project's rate limits raised so that the limiter never answers 429
(it still counts every request). Latency is per request (send to full body); req/s is N / wall time.
No assertions; a non-2xx answer is counted as an error and printed once.

    .venv/bin/python bench/controlplane_tokens.py [--requests 3000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.ports import free_port
from controlplane.admin.bootstrap import initialize

DSN = str(Path(sys.executable).parent / "dsn")
PROJECT = "bench"
SCOPE = "projects:read token:exchange sessions:write"
BENCH_RATE = "1000000/second"


@dataclass
class CaseResult:
    name: str
    latencies_s: list[float]
    errors: int
    wall_s: float

    def row(self) -> str:
        ok = sorted(self.latencies_s)
        p50 = statistics.median(ok) * 1e3 if ok else float("nan")
        p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))] * 1e3 if ok else float("nan")
        rate = (len(ok) + self.errors) / self.wall_s
        return (f"{self.name:<9} {len(ok) + self.errors:>8} {self.errors:>6} {p50:>9.2f} "
                f"{p99:>9.2f} {rate:>9.0f}")


Request = Callable[[aiohttp.ClientSession], Awaitable[tuple[int, str]]]


async def run_case(name: str, request: Request, *, requests: int, concurrency: int) -> CaseResult:
    """``concurrency`` workers, each its own client session, share ``requests`` requests."""
    latencies: list[float] = []
    errors = 0
    remaining = requests
    first_error: str | None = None

    async def worker() -> None:
        nonlocal remaining, errors, first_error
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            await request(session)  # warm the connection; not measured
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                status, body = await request(session)
                elapsed = time.perf_counter() - start
                if 200 <= status < 300:
                    latencies.append(elapsed)
                else:
                    errors += 1
                    first_error = first_error or f"{status} {body[:200]}"

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result = CaseResult(name, latencies, errors, time.perf_counter() - started)
    if first_error:
        print(f"{name}: first error: {first_error}", file=sys.stderr)
    return result


def _poster(url: str, token: str, body: dict[str, Any]) -> Request:
    headers = {"Authorization": f"Bearer {token}"}

    async def post(session: aiohttp.ClientSession) -> tuple[int, str]:
        async with session.post(url, json=body, headers=headers) as response:
            return response.status, await response.text()
    return post


def _getter(url: str, token: str) -> Request:
    headers = {"Authorization": f"Bearer {token}"}

    async def get(session: aiohttp.ClientSession) -> tuple[int, str]:
        async with session.get(url, headers=headers) as response:
            return response.status, await response.text()
    return get


async def _setup(base: str, admin_token: str) -> str:
    """Create the bench project (with a token quota large enough) and one project token."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(f"{base}/api/v1/projects", json={
                "name": PROJECT, "quotas": {"tokens": 1_000_000_000}}) as response:
            response.raise_for_status()
        async with session.post(f"{base}/api/v1/projects/{PROJECT}/tokens", json={
                "subject": "bench-client", "scope": SCOPE, "ttl": 3600}) as response:
            response.raise_for_status()
            return str((await response.json())["token"])


async def measure(base: str, admin_token: str, *, requests: int,
                  concurrency: int) -> list[CaseResult]:
    project_token = await _setup(base, admin_token)
    cases: list[tuple[str, Request]] = [
        ("issue", _poster(f"{base}/api/v1/projects/{PROJECT}/tokens", admin_token,
                          {"subject": "bench-client", "scope": SCOPE, "ttl": 600})),
        ("verify", _getter(f"{base}/api/v1/projects/{PROJECT}", project_token)),
        ("exchange", _poster(f"{base}/api/v1/token", project_token,
                             {"kind": "session", "scope": "sessions:write", "ttl": 300})),
    ]
    return [await run_case(name, request, requests=requests, concurrency=concurrency)
            for name, request in cases]


def write_bench_policy(shipped: Path, out_dir: Path) -> Path:
    """The shipped policy files with rate limits no bench client reaches
    (and nothing else changed)."""
    out_dir.mkdir()
    for source in sorted(shipped.glob("*.yaml")):
        document = yaml.safe_load(source.read_text())
        if "rate_limits" in document:
            document["rate_limits"] = {"per_token": BENCH_RATE, "per_project": BENCH_RATE}
        (out_dir / source.name).write_text(yaml.safe_dump(document, sort_keys=False))
    return out_dir


def _wait_ready(base: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                # Refused connections are how "not ready yet" shows; the log says why.
                raise SystemExit(
                    f"the control plane did not start; log:\n{log.read_text()}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def served_controlplane() -> Iterator[tuple[str, str]]:
    """A fresh ``dsn controlplane serve`` with the bench policy: (base URL, admin token)."""
    with tempfile.TemporaryDirectory(prefix="dsn-bench-cp-") as tmp:
        state, log = Path(tmp) / "state", Path(tmp) / "serve.log"
        policy = write_bench_policy(ROOT / "policies", Path(tmp) / "policies")
        admin_token = asyncio.run(initialize(state, policy_path=policy))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [DSN, "controlplane", "serve", "--state-dir", str(state), "--port", str(port),
                 "--policy", str(policy)], stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(base, process, log, 30)
            yield base, admin_token
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per case")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients")
    args = parser.parse_args()
    with served_controlplane() as (base, admin_token):
        results = asyncio.run(measure(base, admin_token, requests=args.requests,
                                      concurrency=args.concurrency))
    print(f"control plane tokens: {args.requests} requests per case, {args.concurrency} clients, "
          f"SQLite state, one serve process")
    print(f"{'case':<9} {'requests':>8} {'errors':>6} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>9}")
    for result in results:
        print(result.row())


if __name__ == "__main__":
    main()
