"""A whole site losing a control-plane replica and a gateway in the middle of two scans.

Two ``dsn controlplane serve`` replicas on one PostgreSQL database, three ``dsn gateway run``
processes that register with them and follow both replicas' state services, two sessions placed on
two of the gateways, each with a consumer rank and a ``dsn producer stream`` that knows both
replicas. With both scans in flight (held mid-scan by consumers that do not read yet), the replica
that leads and the gateway of the first session are killed (SIGKILL). Then:

- the first session moves to the gateway left without a session; its producer, told so by the
  surviving replica, lists the scan it sent to the lost gateway as unconfirmed and streams it again
  there; every sector reaches its consumer, and the new gateway's receipt accounts for all of it;
- the second scan, on a gateway that followed the killed replica, completes with nothing lost
  while that gateway moves to the other replica;
- a project token revoked through the killed replica before it died is refused by the survivor, and
  a session token revoked through the survivor is refused by every gateway at once;
- the audit chain verifies, and records the move once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq
from cp_helpers import CLIENT_SCOPE, write_policy
from test_cp_cli import DSN, dsn
from test_cp_replicas import Replica, _padded, _start, stop_all
from waiting import eventually, eventually_async

from common.keys import KeyPair, create_keypair, load_keypair, load_secret_keypair
from common.ports import free_port
from common.privatefs import create_private_file
from common.protocol import Data, RoutedScanBegin, RoutedScanEnd, decode_consumer_message
from dataplane.producer import Producer, ProducerError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

GATEWAYS = ("gw1", "gw2", "gw3")
SCOPE = CLIENT_SCOPE + " consumers:register templates:read templates:render scans:read"
# The control plane's gateway.timeout_s: longer than a gateway takes to notice that the replica it
# follows is gone and to announce itself to the next (three missed state heartbeats, 3 s), so a
# gateway that changes replicas is never taken for dead.
TIMEOUT_S = 8
SCAN_SHAPE = (16, 16)
SECTORS = 4
SCAN_SECTORS = SCAN_SHAPE[0] * SCAN_SHAPE[1] * SECTORS


@dataclass
class Gateway:
    name: str
    keys: KeyPair
    key_dir: Path
    ingress: str
    metrics: str
    process: subprocess.Popen[bytes]
    log: Path

    def page(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=2) as response:
            return response.read().decode()  # type: ignore[no-any-return]

    def shows(self, pattern: str) -> bool:
        page = self.page()
        assert re.search(pattern, page), f"{pattern!r} not on {self.name}'s metrics page"
        return True

    def awaits(self, pattern: str, what: str, timeout_s: float = 30) -> None:
        eventually(lambda: self.shows(pattern), timeout_s=timeout_s, what=f"{self.name}: {what}")


@dataclass
class Site:
    a: Replica
    b: Replica
    gateways: dict[str, Gateway]
    admin_token: str
    root: Path

    async def call(self, replica: Replica, method: str, path: str, token: str,
                   **kwargs: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.request(
                method, f"{replica.url}{path}", headers={"Authorization": f"Bearer {token}"},
                **kwargs) as response:
            return response.status, await response.json(content_type=None)

    async def admin(self, replica: Replica, method: str, path: str, **kwargs: Any) -> Any:
        status, body = await self.call(replica, method, path, self.admin_token, **kwargs)
        assert status in (200, 201), body
        return body


def _start_gateway(name: str, root: Path, replicas: list[Replica]) -> Gateway:
    key_dir = root / name
    ingress, metrics = f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    following = [arg for replica in replicas for arg in (
        "--controlplane-state", ",".join(replica.state_service.endpoints),
        "--state-key", str(replica.state / "keys" / "state.key"))]
    log = root / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [DSN, "gateway", "run", *following, "--key", str(key_dir / "server.key_secret"),
             "--ingress", ingress, "--receipts", f"tcp://127.0.0.1:{free_port()}",
             "--spool-dir", str(root / "spool" / name), "--metrics", metrics,
             "--heartbeat", "0.3", "--sync-timeout", "30"],
            stdout=out, stderr=subprocess.STDOUT)
    return Gateway(name, load_secret_keypair(key_dir / "server.key_secret"), key_dir, ingress,
                   metrics, process, log)


@pytest.fixture
def site(postgres_url: str, tmp_path: Path) -> Iterator[Site]:
    env = {**os.environ, "DSN_DATABASE_URL": postgres_url}
    for name, join in (("a", ()), ("b", ("--join",))):
        made = dsn("admin", "init", *join, "--state-dir", str(tmp_path / name), env=env)
        assert made.exit_code == 0, made.output
    for name in GATEWAYS:
        public, _ = create_keypair(tmp_path / name, "server")
        for replica in ("a", "b"):  # every replica admits every gateway, under one name
            shutil.copy(public, tmp_path / replica / "gateways" / f"{name}.key")
    policy = write_policy(tmp_path / "policy", per_project="10000/hour")
    config = tmp_path / "controlplane.yaml"
    config.write_text(f"gateway:\n  timeout_s: {TIMEOUT_S}\n  fallback: false\n"
                      "audit:\n  checkpoint_s: 0.5\nlease_s: 600\n")
    options = ("--policy", str(policy), "--config", str(config))
    replicas: list[Replica] = []
    gateways: dict[str, Gateway] = {}
    try:
        replicas.append(_start("a", tmp_path / "a", tmp_path, env, *options))
        replicas.append(_start("b", tmp_path / "b", tmp_path, env, *options))
        a, b = replicas
        # gw1 and gw2 follow A first, gw3 follows B first; each knows both.
        for name, order in (("gw1", [a, b]), ("gw2", [a, b]), ("gw3", [b, a])):
            gateways[name] = _start_gateway(name, tmp_path, order)
        token = (tmp_path / "a" / "admin.token").read_text().strip()
        yield Site(a, b, gateways, token, tmp_path)
    finally:
        for gateway in gateways.values():
            if gateway.process.poll() is None:
                gateway.process.send_signal(signal.SIGTERM)
            gateway.process.wait(timeout=20)
        stop_all(replicas)


def _claims(token: str) -> dict[str, Any]:
    return dict(json.loads(base64.urlsafe_b64decode(_padded(token.split(".")[1]))))


class Consumer:
    """A consumer rank: a PULL socket the gateways connect to, read only once ``release``d."""

    def __init__(self, context: zmq.Context) -> None:
        self.socket = context.socket(zmq.PULL)
        self.socket.rcvhwm = 4
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.sectors: dict[tuple[int, int], int] = {}
        self.begins = self.ends = 0

    def drain(self, expected: int, timeout_s: float = 90) -> None:
        """Read until every one of ``expected`` sectors has come and a scan_end after them."""
        while len(self.sectors) < expected or self.ends == 0:
            assert self.socket.poll(round(timeout_s * 1000)), (
                f"{len(self.sectors)} of {expected} sectors and {self.ends} scan_end arrived")
            frames = self.socket.recv_multipart()
            message = decode_consumer_message(frames[0])
            if isinstance(message, Data):
                key = (message.frame, message.sector)
                self.sectors[key] = self.sectors.get(key, 0) + 1
            elif isinstance(message, RoutedScanBegin):
                self.begins += 1
            elif isinstance(message, RoutedScanEnd) and len(self.sectors) == expected:
                self.ends += 1


@pytest.fixture
def consumers(zmq_context: zmq.Context) -> Iterator[list[Consumer]]:
    """One consumer rank for each of the two sessions."""
    made = [Consumer(zmq_context), Consumer(zmq_context)]
    yield made
    for consumer in made:
        consumer.socket.close(linger=0)


def _stream(site: Site, urls: list[Replica], session: str, key: Path, token: Path
            ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [DSN, "producer", "stream", "--controlplane", ",".join(r.url for r in urls),
         "--project-token-file", str(token), "--session", session, "--client-key", str(key),
         "--scan-shape", "x".join(map(str, SCAN_SHAPE)), "--timeout", "10",
         "--follow-wait", "60", "--receipt-timeout", "60", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def test_a_site_loses_its_leading_replica_and_a_gateway_mid_scan_and_loses_nothing(
        site: Site, consumers: list[Consumer], tmp_path: Path) -> None:
    a, b, gw = site.a, site.b, site.gateways

    async def all_live() -> bool:
        registry = (await site.admin(b, "GET", "/api/v1/gateways"))["registered"]
        assert sorted(g["name"] for g in registry if g["live"]) == list(GATEWAYS), registry
        return True
    await eventually_async(all_live, timeout_s=60, what="three live gateways")
    assert eventually(a.leads, timeout_s=20, what="A leading")

    await site.admin(a, "POST", "/api/v1/projects", json={"name": "beam"})
    issued = await site.admin(a, "POST", "/api/v1/projects/beam/tokens",
                              json={"subject": "microscope", "scope": SCOPE, "ttl": 3600})
    token = str(issued["token"])
    token_file = tmp_path / "beam.token"
    create_private_file(token_file, token.encode())
    # A second project token, revoked through A before A dies.
    spare = await site.admin(a, "POST", "/api/v1/projects/beam/tokens",
                             json={"subject": "spare", "scope": SCOPE, "ttl": 3600})
    await site.admin(a, "DELETE", f"/api/v1/tokens/{_claims(spare['token'])['jti']}")

    # Two sessions, opened through different replicas, each with its producer key and a consumer.
    keys, sessions = [], []
    for n, (via, consumer) in enumerate(zip((a, b), consumers, strict=True)):
        public, secret = create_keypair(tmp_path / "producers", f"p{n}")
        status, opened = await site.call(via, "POST", "/api/v1/sessions", token, json={
            "project": "beam", "template": "4dstem", "params": {"hwm": 8},
            "client_key": load_keypair(public).public.decode()})
        assert status == 201, opened
        status, worker = await site.call(via, "POST", "/api/v1/token", token,
                                         json={"kind": "consumer"})
        assert status == 200, worker
        status, registered = await site.call(
            via, "POST", f"/api/v1/sessions/{opened['id']}/consumers", worker["token"],
            json={"endpoint": f"tcp://127.0.0.1:{consumer.port}", "rank": 0, "job_id": "job-1",
                  "host": "node-1"})
        assert status == 201, registered
        keys.append(secret)
        sessions.append(opened)
    first, second = sessions
    # Least loaded, ties by name.
    assert (first["gateway_name"], second["gateway_name"]) == ("gw1", "gw2")
    for opened, name in ((first, "gw1"), (second, "gw2")):
        gw[name].awaits(rf'dsn_gateway_consumers{{session="{opened["id"]}"}} 1\.0',
                        "connected to its session's consumer")

    producers = [_stream(site, [a, b], first["id"], keys[0], token_file),
                 _stream(site, [a, b], second["id"], keys[1], token_file)]
    try:
        # Both scans in flight and held: each gateway waits on its consumer.
        for opened, name in ((first, "gw1"), (second, "gw2")):
            gw[name].awaits(
                rf'dsn_gateway_backpressure_waits_total{{session="{opened["id"]}"}} [1-9]',
                "held by its consumer mid-scan")

        a.process.send_signal(signal.SIGKILL)
        gw["gw1"].process.send_signal(signal.SIGKILL)
        a.process.wait(timeout=10)
        gw["gw1"].process.wait(timeout=10)
        # The consumers read from now on: the second scan goes on through gw2, which moves
        # from A to B meanwhile; the first is streamed again through wherever it moves.
        drains = [asyncio.to_thread(c.drain, SCAN_SECTORS) for c in consumers]
        outputs = [asyncio.to_thread(p.communicate, timeout=180) for p in producers]
        results = await asyncio.gather(*drains, *outputs)
    finally:
        for process in producers:
            if process.poll() is None:
                process.kill()
                process.communicate()
    out_first, out_second = results[2][0], results[3][0]
    assert producers[0].returncode == 0, out_first
    assert producers[1].returncode == 0, out_second

    # The first session moved to the gateway with no session; its producer said so and streamed
    # the scan again; the new gateway's receipt accounts for every message of it.
    assert eventually(b.leads, timeout_s=1, what="B leading")
    detail = await site.admin(b, "GET", f"/api/v1/sessions/{first['id']}")
    assert (detail["gateway_name"], detail["previous_gateway"]) == ("gw3", "gw1")
    messages = SCAN_SECTORS
    assert (f"session {first['id']} moved from gateway gw1 to gw3 ({gw['gw3'].ingress}): every "
            f"message of scan 0 sent to {gw['gw1'].ingress} is unconfirmed") in out_first
    assert (f"gateway: scan 0 forwarded: {messages} sent, {messages} forwarded, 0 spooled, "
            "0 lost") in out_first
    # The second never left gw2.
    assert "moved" not in out_second
    assert (f"gateway: scan 0 forwarded: {messages} sent, {messages} forwarded, 0 spooled, "
            "0 lost") in out_second
    # Every sector of both scans reached its consumer; the first's partly twice (two gateways).
    for consumer in consumers:
        assert len(consumer.sectors) == SCAN_SECTORS
    assert consumers[1].begins == 1 and set(consumers[1].sectors.values()) == {1}
    assert consumers[0].begins == 2  # the first scan began at gw1, and again at gw3

    # gw2 now follows B, and B's registry sees gw1 silent.
    listed = (await site.admin(b, "GET", "/api/v1/gateways"))["registered"]
    registry = {g["name"]: g for g in listed}
    assert (registry["gw1"]["live"], registry["gw2"]["live"], registry["gw3"]["live"]) == (
        False, True, True)

    # Revocations: the spare project token (revoked through A) is refused by B; the second
    # session's token, revoked through B, is refused by its gateway, and no other admits it.
    status, _ = await site.call(b, "GET", "/api/v1/projects/beam", spare["token"])
    assert status == 401
    await site.admin(b, "DELETE", f"/api/v1/tokens/{_claims(second['token'])['jti']}")
    producer_keys = load_secret_keypair(keys[1])
    for name in ("gw2", "gw3"):
        def refused(gateway: Gateway = gw[name]) -> bool:
            with Producer(gateway.ingress, gateway.keys.public, producer_keys,
                          send_timeout_s=0.5) as producer:
                with pytest.raises(ProducerError, match="not accepted"):
                    producer.begin_scan(1, (1, 1), producers=1, frame_shape=(576, 576),
                                        sectors=SECTORS)
            return True
        await asyncio.to_thread(eventually, refused, timeout_s=10,
                                what=f"{name} refusing the revoked session's producer")

    # One chain, verified by the survivor; the move recorded once, by the leader.
    verification = await site.admin(b, "GET", "/api/v1/audit/verify")
    assert verification["ok"] is True, verification
    audit = await site.admin(b, "GET", "/api/v1/audit?action=sessions:replace")
    moves = [r for r in audit["items"] if r["action"] == "sessions:replace"]
    assert [r["rule"] for r in moves] == ["gateway-silent:gw1->gw3"], moves
