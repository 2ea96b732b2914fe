"""Sessions opened over REST reach a real ``dsn gateway run --controlplane-state`` process: a
registered producer streams to a registered consumer within a second, an unknown key is refused,
and ending the session stops it at the gateway."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from cp_helpers import CLIENT_SCOPE, ClientFactory, ControlPlane, start_control_plane

from dataplane.keys import KeyPair, load_keypair
from dataplane.producer import Producer, ProducerError
from dataplane.protocol import Data, RoutedScanBegin, decode_consumer_message

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

DSN = str(Path(sys.executable).parent / "dsn")
FRAME, SECTORS = (8, 4), 2
SECTOR = np.zeros((FRAME[0] // SECTORS, FRAME[1]), dtype=np.uint16)
WORKER_SCOPE = CLIENT_SCOPE + " consumers:register"
TINY = """\
name: tiny
kind: dsn
description: A small detector for tests.
parameters: {}
body: |
  version: 1
  gateway:
    ingress: {{ system.ingress | yaml }}
    server_secret_key_file: {{ system.server_secret_key_file | yaml }}
  sessions:
    - id: {{ system.session_id | yaml }}
      client_keys: [{{ system.client_key | yaml }}]
      allowed_networks: [127.0.0.0/8]
      allowed_targets: [127.0.0.0/8]
      consumers: {{ system.consumers | yaml }}
      expires_at: {{ system.expires_at | yaml }}
      detector: {frame_shape: [8, 4], sectors: 2, dtype: uint16}
"""


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path,
             free_port: Callable[[], int]) -> ControlPlane:
    control_plane = await start_control_plane(
        aiohttp_client, tmp_path / "state", gateway_endpoint=f"tcp://127.0.0.1:{free_port()}",
        reconcile_s=0.2)
    await control_plane.create_project("alpha")
    response = await control_plane.admin("PUT", "/api/v1/templates/tiny", json={"source": TINY},
                                         headers={"If-None-Match": "*"})
    assert response.status in (200, 201), await response.text()
    return control_plane


@pytest.fixture
def gateway(cp: ControlPlane, tmp_path: Path, free_port: Callable[[], int]) -> Iterator[str]:
    """A gateway process in control-plane mode; yields its metrics address."""
    keys, metrics = cp.settings.state_dir / "keys", f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [DSN, "gateway", "run", "--controlplane-state", ",".join(cp.settings.state_endpoints),
         "--state-key", str(keys / "state.key"), "--key", str(keys / "server.key_secret"),
         "--ingress", cp.settings.gateway_endpoint, "--spool-dir", str(tmp_path / "spool"),
         "--metrics", metrics, "--sync-timeout", "20"],
        stderr=subprocess.PIPE, text=True)
    try:
        yield metrics
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr


@pytest.fixture
def consumer(zmq_context: zmq.Context) -> Iterator[zmq.Socket]:
    """The session's one consumer rank: a PULL socket the gateway connects to."""
    with zmq_context.socket(zmq.PULL) as socket:
        yield socket


def _metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def _await_metric(address: str, line: str | re.Pattern[str], timeout_s: float) -> float:
    """Seconds until the gateway's metrics show ``line`` (a substring or a pattern)."""
    start = time.monotonic()
    pattern = line if isinstance(line, re.Pattern) else re.compile(re.escape(line))
    while True:
        try:
            if pattern.search(_metrics(address)):
                return time.monotonic() - start
        except OSError:
            pass  # not serving yet
        assert time.monotonic() - start < timeout_s, f"{line!r} not in {_metrics(address)}"
        time.sleep(0.02)


def _server_key(cp: ControlPlane) -> bytes:
    return load_keypair(cp.settings.gateway_public_key_file).public


def _producer(cp: ControlPlane, client: KeyPair, timeout_s: float) -> Producer:
    return Producer(cp.settings.gateway_endpoint, _server_key(cp), client, send_timeout_s=timeout_s)


def _begin(producer: Producer) -> None:
    producer.begin_scan(1, (1, 2), producers=1, frame_shape=FRAME, sectors=SECTORS)


def _receive(consumer: zmq.Socket, count: int) -> list[list[bytes]]:
    messages: list[list[bytes]] = []
    for _ in range(count):
        assert consumer.poll(5000), f"only {len(messages)} of {count} messages arrived"
        messages.append(consumer.recv_multipart())
    return messages


def _refused(cp: ControlPlane, client: KeyPair) -> bool:
    """Whether the gateway refuses ``client``'s connection (its first message never leaves)."""
    with _producer(cp, client, 0.5) as producer:
        try:
            _begin(producer)
        except ProducerError:
            return True
    return False


async def _open(cp: ControlPlane, client: KeyPair) -> tuple[str, str]:
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    response = await cp.call("POST", "/api/v1/sessions", token, json={
        "project": "alpha", "template": "tiny", "client_key": client.public.decode()})
    assert response.status == 201, await response.text()
    return token, str((await response.json())["id"])


async def _register(cp: ControlPlane, token: str, session: str, endpoint: str) -> None:
    worker = str((await cp.exchange(token, kind="consumer"))["token"])
    response = await cp.call("POST", f"/api/v1/sessions/{session}/consumers", worker, json={
        "endpoint": endpoint, "rank": 0, "job_id": "job-1", "host": "node-1"})
    assert response.status == 201, await response.text()


async def test_a_rest_session_is_enforced_by_the_gateway_until_it_ends(
        cp: ControlPlane, gateway: str, consumer: zmq.Socket,
        curve_keypair: Callable[[], KeyPair]) -> None:
    await asyncio.to_thread(_await_metric, gateway, "dsn_gateway_auth_decisions", 20)
    port = consumer.bind_to_random_port("tcp://127.0.0.1")
    client = curve_keypair()
    token, session = await _open(cp, client)
    await _register(cp, token, session, f"tcp://127.0.0.1:{port}")
    seen = await asyncio.to_thread(
        _await_metric, gateway, f'dsn_gateway_consumers{{session="{session}"}} 1.0', 1.0)
    assert seen < 1.0

    with _producer(cp, client, 2.0) as producer:
        _begin(producer)
        for frame in range(2):
            producer.send(frame, 0, SECTOR)
        begin, *data = await asyncio.to_thread(_receive, consumer, 3)
        routed = decode_consumer_message(begin[0])
        assert isinstance(routed, RoutedScanBegin) and routed.session == session
        headers = [decode_consumer_message(m[0]) for m in data]
        assert [h.frame for h in headers if isinstance(h, Data)] == [0, 1]
        assert await asyncio.to_thread(_refused, cp, curve_keypair())

        response = await cp.call("DELETE", f"/api/v1/sessions/{session}", token)
        assert response.status == 200, await response.text()
        ended = time.monotonic()
        # The producer's connection outlives its session; its messages must not.
        producer.send(0, 1, SECTOR)
        dropped = re.compile(rf'dsn_gateway_drops_total{{reason="(unauthenticated|'
                             rf'session_expired)",session="{session}"}}')
        await asyncio.to_thread(_await_metric, gateway, dropped, 2.0)
        assert time.monotonic() - ended < 2.0
        assert not await asyncio.to_thread(consumer.poll, 200)
    assert await asyncio.to_thread(_refused, cp, client)
