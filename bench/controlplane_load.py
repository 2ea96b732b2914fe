"""Control plane under load: token verify, token issue and session open at several concurrencies.

Starts the real ``dsn controlplane serve`` (SQLite state, shipped policy with rate limits no bench
client reaches) exactly as bench/controlplane_tokens.py does, and reuses its load driver: C
concurrent aiohttp clients, one connection each, share N requests per case; latency is per request
(send to full body), req/s is N / wall time. Cases:

    verify   GET  /api/v1/projects/{p}   project token: signature, claims, revocation, policy, audit
    issue    POST /api/v1/projects/{p}/tokens   admin token: signs and stores a project token
    session  POST /api/v1/sessions       project token: policy, 4dstem template render + validation,
                                         session token, store, publication to the state service

Bounded: N requests per case and concurrency, nothing else. No assertions; a non-2xx answer is an
error, counted and printed once.

    .venv/bin/python bench/controlplane_load.py [--requests 1000] [--concurrency 16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aiohttp
import zmq

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from controlplane_tokens import (
    PROJECT,
    CaseResult,
    Request,
    _getter,
    _poster,
    _setup,
    run_case,
    served_controlplane,
)

UNBOUNDED = 1_000_000_000  # the largest quota the API accepts: no case is refused by a quota


def _session_opener(base: str, token: str) -> Request:
    """POST /api/v1/sessions from the shipped template, each with a fresh client CURVE key."""
    url, headers = f"{base}/api/v1/sessions", {"Authorization": f"Bearer {token}"}

    async def post(session: aiohttp.ClientSession) -> tuple[int, str]:
        body = {"project": PROJECT, "template": "4dstem", "params": {},
                "client_key": zmq.curve_keypair()[0].decode()}
        async with session.post(url, json=body, headers=headers) as response:
            return response.status, await response.text()
    return post


async def _unbounded_quotas(base: str, admin_token: str) -> None:
    headers = {"Authorization": f"Bearer {admin_token}"}
    quotas = {"quotas": {"tokens": UNBOUNDED, "sessions": UNBOUNDED}}
    async with (aiohttp.ClientSession(headers=headers) as session,
                session.patch(f"{base}/api/v1/projects/{PROJECT}", json=quotas) as response):
        response.raise_for_status()


async def measure(base: str, admin_token: str, *, requests: int,
                  concurrencies: list[int]) -> list[tuple[int, CaseResult]]:
    project_token = await _setup(base, admin_token)
    await _unbounded_quotas(base, admin_token)
    cases: list[tuple[str, Request]] = [
        ("verify", _getter(f"{base}/api/v1/projects/{PROJECT}", project_token)),
        ("issue", _poster(f"{base}/api/v1/projects/{PROJECT}/tokens", admin_token,
                          {"subject": "bench-client", "scope": "projects:read", "ttl": 600})),
        ("session", _session_opener(base, project_token)),
    ]
    return [(concurrency, await run_case(name, request, requests=requests,
                                         concurrency=concurrency))
            for concurrency in concurrencies for name, request in cases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per case")
    parser.add_argument("--concurrency", default="16,64", help="comma-separated client counts")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with served_controlplane() as (base, admin_token):
        results = asyncio.run(measure(base, admin_token, requests=args.requests,
                                      concurrencies=concurrencies))
    print(f"control plane load: {args.requests} requests per case, SQLite state, "
          f"one serve process")
    print(f"{'clients':>7} {'case':<9} {'requests':>8} {'errors':>6} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'req/s':>9}")
    for concurrency, result in results:
        print(f"{concurrency:>7} {result.row()}")


if __name__ == "__main__":
    main()
