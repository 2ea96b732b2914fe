"""Sessions opened over REST reach a real ``dsn gateway run --controlplane-state`` process: a
registered producer streams to a registered consumer within a second, an unknown key is refused,
a key connecting from outside its session's source networks is refused, ending the session or
revoking its token stops it at the gateway, and a consumer that registers mid-scan joins from the
next scan; a consumer gone mid-scan interrupts it (told to the others, the rest spooled, every loss
listed in the gateway's report)."""

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
from typing import Any

import jwt
import numpy as np
import pytest
import yaml
import zmq
from cp_helpers import (
    CLIENT_SCOPE,
    SHIPPED_POLICY,
    ClientFactory,
    ControlPlane,
    start_control_plane,
)
from waiting import eventually, eventually_async, tcp_port_closed

from common.credentials import PlainCredentials
from common.keys import KeyPair, load_keypair
from common.protocol import (
    Data,
    RoutedScanAbort,
    RoutedScanBegin,
    RoutedScanEnd,
    decode_consumer_message,
)
from dataplane.producer import Producer, ProducerError
from dataplane.spool import SpoolReader

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
# TINY with the producers' source networks as a parameter (as templates/dsn/4dstem.yaml has).
SOURCED = TINY.replace("name: tiny", "name: sourced").replace("parameters: {}", """\
parameters:
  sources:
    type: cidr_list
    network: sources
    max_items: 4
    default: [127.0.0.0/8]
    description: Networks producers may connect from (inside the policy's sources).""").replace(
    "allowed_networks: [127.0.0.0/8]", "allowed_networks: {{ params.sources | yaml }}")


@pytest.fixture
def extra_sources(request: pytest.FixtureRequest) -> list[str]:
    """Source networks the control plane's policy allows besides the shipped ones (none unless a
    test parametrizes this fixture indirectly)."""
    return list(getattr(request, "param", []))


@pytest.fixture
def plaintext(request: pytest.FixtureRequest) -> bool:
    """Whether the policy allows unencrypted transport and the gateway has a plaintext ingress
    (no, unless a test parametrizes this fixture indirectly)."""
    return bool(getattr(request, "param", False))


def _policy(directory: Path, extra_sources: list[str], plaintext: bool) -> Path:
    """The shipped policy with ``extra_sources`` added and ``allow_plaintext``, as a new file."""
    document = yaml.safe_load(SHIPPED_POLICY.read_text())
    document["networks"]["sources"] += extra_sources
    document["allow_plaintext"] = plaintext
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path, free_port: Callable[[], int],
             extra_sources: list[str], plaintext: bool) -> ControlPlane:
    policy = (_policy(tmp_path / "policy", extra_sources, plaintext)
              if extra_sources or plaintext else None)
    plain = f"tcp://127.0.0.1:{free_port()}" if plaintext else None
    control_plane = await start_control_plane(
        aiohttp_client, tmp_path / "state", gateway_endpoint=f"tcp://127.0.0.1:{free_port()}",
        reconcile_s=0.2, policy_path=policy, gateway_plain_endpoint=plain)
    await control_plane.create_project("alpha")
    response = await control_plane.admin("PUT", "/api/v1/templates/tiny", json={"source": TINY},
                                         headers={"If-None-Match": "*"})
    assert response.status in (200, 201), await response.text()
    return control_plane


@pytest.fixture
def gateway(cp: ControlPlane, tmp_path: Path, free_port: Callable[[], int]) -> Iterator[str]:
    """A gateway process in control-plane mode; yields its metrics address."""
    keys, metrics = cp.settings.state_dir / "keys", f"127.0.0.1:{free_port()}"
    plain = cp.settings.gateway_plain_endpoint
    process = subprocess.Popen(
        [DSN, "gateway", "run", "--controlplane-state", ",".join(cp.settings.state_endpoints),
         "--state-key", str(keys / "state.key"), "--key", str(keys / "server.key_secret"),
         "--ingress", cp.settings.gateway_endpoint, "--spool-dir", str(tmp_path / "spool"),
         "--metrics", metrics, "--sync-timeout", "20",
         *(["--plain-ingress", plain] if plain else [])],
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

    def shown() -> bool:
        text = _metrics(address)  # raises while the gateway is not serving yet
        assert pattern.search(text), f"{line!r} not in {text}"
        return True

    eventually(shown, timeout_s=timeout_s, what=f"{line!r} in the gateway's metrics")
    return time.monotonic() - start


def _metric_sum(address: str, pattern: re.Pattern[str]) -> float:
    """The sum of every sample whose name and labels match ``pattern`` (0 when none does)."""
    return sum(float(m.group(1)) for m in
               re.finditer(pattern.pattern + r" (\S+)$", _metrics(address), re.MULTILINE))


def _drops(address: str, session: str) -> float:
    return _metric_sum(address, re.compile(
        rf'dsn_gateway_drops_total{{reason="(?:unauthenticated|session_expired)",'
        rf'session="{session}"}}'))


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
    token, opened = await _open_session(cp, client)
    return token, str(opened["id"])


async def _open_session(cp: ControlPlane, client: KeyPair, template: str = "tiny",
                        **params: Any) -> tuple[str, dict[str, Any]]:
    """The project token and the opened session (with its session token, shown this once)."""
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    response = await cp.call("POST", "/api/v1/sessions", token, json={
        "project": "alpha", "template": template, "params": params,
        "client_key": client.public.decode()})
    assert response.status == 201, await response.text()
    return token, dict(await response.json())


async def _register(cp: ControlPlane, token: str, session: str, endpoint: str,
                    rank: int = 0) -> tuple[str, str]:
    """Register a rank of job-1; its consumer token and consumer id, for heartbeats."""
    worker = str((await cp.exchange(token, kind="consumer"))["token"])
    response = await cp.call("POST", f"/api/v1/sessions/{session}/consumers", worker, json={
        "endpoint": endpoint, "rank": rank, "job_id": "job-1", "host": "node-1"})
    assert response.status == 201, await response.text()
    return worker, str((await response.json())["id"])


def _decoded(messages: list[list[bytes]]) -> list[RoutedScanBegin | Data | RoutedScanEnd]:
    return [decode_consumer_message(message[0]) for message in messages]


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


async def test_revoking_the_session_token_mid_stream_stops_forwarding_within_2_s(
        cp: ControlPlane, gateway: str, consumer: zmq.Socket,
        curve_keypair: Callable[[], KeyPair]) -> None:
    await asyncio.to_thread(_await_metric, gateway, "dsn_gateway_auth_decisions", 20)
    port = consumer.bind_to_random_port("tcp://127.0.0.1")
    client = curve_keypair()
    token, opened = await _open_session(cp, client)
    session = str(opened["id"])
    jti = jwt.decode(opened["token"], options={"verify_signature": False})["jti"]
    await _register(cp, token, session, f"tcp://127.0.0.1:{port}")
    await asyncio.to_thread(
        _await_metric, gateway, f'dsn_gateway_consumers{{session="{session}"}} 1.0', 2.0)
    positions = 256

    with _producer(cp, client, 2.0) as producer:
        producer.begin_scan(1, (1, positions), producers=1, frame_shape=FRAME, sectors=SECTORS)
        for frame in range(2):
            producer.send(frame, 0, SECTOR)
        begin, *data = _decoded(await asyncio.to_thread(_receive, consumer, 3))
        assert isinstance(begin, RoutedScanBegin) and begin.session == session
        assert [h.frame for h in data if isinstance(h, Data)] == [0, 1]

        response = await cp.admin("DELETE", f"/api/v1/tokens/{jti}")
        assert response.status == 200, await response.text()
        assert (await response.json())["revoked_at"] is not None
        revoked = time.monotonic()
        # Keep streaming on the connection ZAP admitted before the revocation; the gateway must
        # start dropping its messages within 2 s.
        frame = 2
        while not await asyncio.to_thread(_drops, gateway, session):
            assert time.monotonic() - revoked < 2.0, "still forwarding 2 s after the revocation"
            assert frame < positions // 2, "ran out of frames before the gateway reacted"
            producer.send(frame, 0, SECTOR)
            frame += 1
            await asyncio.sleep(0.02)  # paces the stream, which goes on until the gateway reacts
        cut = frame
        # From now on nothing is forwarded: frames at or above ``after`` must all be dropped.
        after = positions // 2
        for late in range(after, after + 3):
            producer.send(late, 0, SECTOR)
        sent = (cut - 2) + 3

        # Every message sent after the revocation is either delivered (before the gateway heard
        # of it) or counted as dropped: no silent loss, and nothing sent after the cut arrives.
        received: list[Any] = []

        def accounted() -> tuple[list[Any], float]:
            while consumer.poll(0):
                received.append(decode_consumer_message(consumer.recv_multipart()[0]))
            dropped = _drops(gateway, session)
            assert len(received) + dropped == sent, (received, dropped, sent)
            return received, dropped  # a pair: true even when nothing was dropped

        _, dropped = await asyncio.to_thread(
            eventually, accounted, timeout_s=3.0,
            what="every message after the revocation delivered or dropped")
        assert all(isinstance(h, Data) for h in received), received
        delivered = [h.frame for h in received]
        assert all(f < cut for f in delivered), delivered
        assert dropped >= 3
        assert not await asyncio.to_thread(consumer.poll, 200)

    deny = re.compile(r'dsn_gateway_auth_decisions_total{decision="deny",reason="unknown_key"}')
    denied = await asyncio.to_thread(_metric_sum, gateway, deny)
    assert await asyncio.to_thread(_refused, cp, client)
    assert await asyncio.to_thread(_metric_sum, gateway, deny) > denied
    assert not await asyncio.to_thread(consumer.poll, 200)


async def test_a_consumer_registered_mid_scan_joins_from_the_next_scan(
        cp: ControlPlane, gateway: str, zmq_context: zmq.Context,
        curve_keypair: Callable[[], KeyPair]) -> None:
    client = curve_keypair()
    with zmq_context.socket(zmq.PULL) as first, zmq_context.socket(zmq.PULL) as second:
        await asyncio.to_thread(_await_metric, gateway, "dsn_gateway_auth_decisions", 20)
        token, session = await _open(cp, client)
        port = first.bind_to_random_port("tcp://127.0.0.1")
        await _register(cp, token, session, f"tcp://127.0.0.1:{port}", rank=0)
        await asyncio.to_thread(
            _await_metric, gateway, f'dsn_gateway_consumers{{session="{session}"}} 1.0', 2.0)
        frames = 4

        with _producer(cp, client, 2.0) as producer:
            producer.begin_scan(1, (1, frames), producers=1, frame_shape=FRAME, sectors=SECTORS)
            for frame in range(2):
                for sector in range(SECTORS):
                    producer.send(frame, sector, SECTOR)
            begin, *data = _decoded(await asyncio.to_thread(_receive, first, 1 + 2 * SECTORS))
            assert isinstance(begin, RoutedScanBegin)
            assert (begin.scan, begin.members, begin.index) == (1, 1, 0)

            # A second consumer job registers while scan 1 is open.
            port = second.bind_to_random_port("tcp://127.0.0.1")
            await _register(cp, token, session, f"tcp://127.0.0.1:{port}", rank=1)
            await asyncio.to_thread(
                _await_metric, gateway, f'dsn_gateway_consumers{{session="{session}"}} 2.0', 2.0)
            for frame in range(2, frames):
                for sector in range(SECTORS):
                    producer.send(frame, sector, SECTOR)
            assert producer.end_scan() == frames * SECTORS
            *data2, end = _decoded(await asyncio.to_thread(_receive, first, 2 * SECTORS + 1))
            data += data2
            # Scan 1's member list was fixed at its scan_begin: all of it went to the first.
            assert sorted((h.frame, h.sector) for h in data if isinstance(h, Data)) == [
                (f, s) for f in range(frames) for s in range(SECTORS)]
            assert isinstance(end, RoutedScanEnd)
            assert (end.scan, end.expected, end.sent) == (1, frames * SECTORS, frames * SECTORS)
            assert not await asyncio.to_thread(second.poll, 200)

            # Scan 2 has both members, ranked as registered: frame f goes to member f % 2.
            producer.begin_scan(2, (1, frames), producers=1, frame_shape=FRAME, sectors=SECTORS)
            for frame in range(frames):
                for sector in range(SECTORS):
                    producer.send(frame, sector, SECTOR)
            assert producer.end_scan() == frames * SECTORS
            share = frames // 2 * SECTORS
            for index, socket in enumerate((first, second)):
                begin, *data, end = _decoded(await asyncio.to_thread(_receive, socket, share + 2))
                assert isinstance(begin, RoutedScanBegin) and begin.session == session
                assert (begin.scan, begin.members, begin.index) == (2, 2, index)
                assert sorted((h.frame, h.sector) for h in data if isinstance(h, Data)) == [
                    (f, s) for f in range(index, frames, 2) for s in range(SECTORS)]
                assert isinstance(end, RoutedScanEnd)
                assert (end.scan, end.expected, end.sent) == (2, share, frames * SECTORS)
                assert not await asyncio.to_thread(socket.poll, 100)


@pytest.mark.parametrize("extra_sources", [["10.0.0.0/8"]], indirect=True, ids=["10/8"])
async def test_a_key_from_a_disallowed_network_is_refused(
        cp: ControlPlane, gateway: str, zmq_context: zmq.Context,
        curve_keypair: Callable[[], KeyPair]) -> None:
    await asyncio.to_thread(_await_metric, gateway, "dsn_gateway_auth_decisions", 20)
    response = await cp.admin("PUT", "/api/v1/templates/sourced", json={"source": SOURCED},
                              headers={"If-None-Match": "*"})
    assert response.status in (200, 201), await response.text()
    remote, local = curve_keypair(), curve_keypair()
    with zmq_context.socket(zmq.PULL) as far, zmq_context.socket(zmq.PULL) as near:
        # One session admits producers from 10.0.0.0/8 only, the other from loopback.
        sessions = []
        for client, socket, sources in ((remote, far, "10.0.0.0/8"), (local, near, "127.0.0.0/8")):
            token, opened = await _open_session(cp, client, "sourced", sources=[sources])
            session = str(opened["id"])
            port = socket.bind_to_random_port("tcp://127.0.0.1")
            await _register(cp, token, session, f"tcp://127.0.0.1:{port}")
            sessions.append(session)
        # Both sessions are in the gateway's table before anyone connects.
        for session in sessions:
            await asyncio.to_thread(
                _await_metric, gateway, f'dsn_gateway_consumers{{session="{session}"}} 1.0', 2.0)

        # The key is known, but 127.0.0.1 lies outside its session's networks.
        network = re.compile(r'dsn_gateway_auth_decisions_total{decision="deny",reason="network"}')
        assert await asyncio.to_thread(_metric_sum, gateway, network) == 0
        assert await asyncio.to_thread(_refused, cp, remote)
        await eventually_async(lambda: asyncio.to_thread(_metric_sum, gateway, network),
                               timeout_s=2.0, what="a deny for the network")
        unknown = re.compile(r'dsn_gateway_auth_decisions_total{decision="deny",'
                             r'reason="unknown_key"}')
        assert await asyncio.to_thread(_metric_sum, gateway, unknown) == 0

        # The same gateway admits a loopback session's key from the same address.
        with _producer(cp, local, 2.0) as producer:
            _begin(producer)
            for frame in range(2):
                producer.send(frame, 0, SECTOR)
            begin, *data = _decoded(await asyncio.to_thread(_receive, near, 3))
            assert isinstance(begin, RoutedScanBegin) and begin.session == sessions[1]
            assert [h.frame for h in data if isinstance(h, Data)] == [0, 1]
        assert not await asyncio.to_thread(far.poll, 200)


def _drain(socket: zmq.Socket) -> list[RoutedScanBegin | Data | RoutedScanEnd | RoutedScanAbort]:
    messages = []
    while socket.poll(300):
        messages.append(decode_consumer_message(socket.recv_multipart()[0]))
    return messages


async def test_a_consumer_gone_mid_scan_interrupts_it_the_rest_is_spooled_and_every_loss_listed(
        cp: ControlPlane, gateway: str, zmq_context: zmq.Context, tmp_path: Path,
        curve_keypair: Callable[[], KeyPair]) -> None:
    await asyncio.to_thread(_await_metric, gateway, "dsn_gateway_auth_decisions", 20)
    client = curve_keypair()
    token, session = await _open(cp, client)
    survivor, victim = zmq_context.socket(zmq.PULL), zmq_context.socket(zmq.PULL)
    ports = [s.bind_to_random_port("tcp://127.0.0.1") for s in (survivor, victim)]
    worker, first = await _register(cp, token, session, f"tcp://127.0.0.1:{ports[0]}", 0)
    await _register(cp, token, session, f"tcp://127.0.0.1:{ports[1]}", 1)
    await asyncio.to_thread(
        _await_metric, gateway, f'dsn_gateway_consumers{{session="{session}"}} 2.0', 2.0)
    frames = 1024  # enough that the victim's queue fills and the gateway waits for it
    everything = {(f, s) for f in range(frames) for s in range(SECTORS)}

    with _producer(cp, client, 30.0) as producer:
        producer.begin_scan(1, (1, frames), producers=1, frame_shape=FRAME, sectors=SECTORS)
        for frame in range(100):
            for sector in range(SECTORS):
                producer.send(frame, sector, SECTOR)
        delivered = _decoded(await asyncio.to_thread(_receive, victim, 101))
        victim.close(linger=0)  # the rank dies: the gateway's queue to it fills, then waits
        # Once its connection is gone (not merely unread), only the gateway's queue takes more.
        await eventually_async(lambda: tcp_port_closed(ports[1]), timeout_s=5.0,
                               what="the gateway's connection to the dead rank to close")

        def stream_the_rest() -> int:
            for frame in range(100, frames):
                for sector in range(SECTORS):
                    producer.send(frame, sector, SECTOR)
            return producer.end_scan()

        rest = asyncio.create_task(asyncio.to_thread(stream_the_rest))
        # Backpressure from the dead rank holds up the whole scan: the survivor's share stalls.
        received = await asyncio.to_thread(_drain, survivor)
        assert len(received) < 1 + frames // 2 * SECTORS, "the gateway did not wait"
        # The survivor keeps its lease; the victim's runs out.
        cp.clock.advance(cp.settings.lease_s - 1)
        response = await cp.call("PUT", f"/api/v1/sessions/{session}/consumers/{first}", worker)
        assert response.status == 200, await response.text()
        cp.clock.advance(2)
        assert await asyncio.wait_for(rest, 20) == frames * SECTORS
    received += await asyncio.to_thread(_drain, survivor)
    survivor.close(linger=0)

    path = f"/api/v1/sessions/{session}/scans/1"

    async def reported() -> Any:
        response = await cp.admin("GET", path)
        return response if response.status != 404 else None

    response = await eventually_async(reported, timeout_s=10, what="the gateway's report",
                                      interval_s=0.1)
    assert response.status == 200, await response.text()
    [result] = (await response.json())["items"]
    assert (result["source"], result["status"]) == ("gateway", "partial")
    lost = {(f, s) for f, s, reason in result["loss_manifest"]}
    assert {reason for *_, reason in result["loss_manifest"]} == {"consumer_gone"}
    assert not result["manifest_truncated"]

    # The survivor was told, after the share it was sent (all of which is listed as lost).
    assert isinstance(received[0], RoutedScanBegin)
    assert received[-1] == RoutedScanAbort(v=1, scan=1, reason="consumer_gone")
    to_survivor = {(m.frame, m.sector) for m in received if isinstance(m, Data)}
    to_victim = {(m.frame, m.sector) for m in delivered if isinstance(m, Data)}
    assert to_survivor | to_victim <= lost

    # Every sector is in exactly one place: the loss manifest or the spool.
    with SpoolReader(Path(result["path"])) as spool:
        spooled = [(msg.frame, msg.sector) for msg, _ in spool.records()]
        manifest = spool.info.manifest
    assert len(spooled) == len(set(spooled)) == result["spooled_sectors"]
    assert lost.isdisjoint(spooled) and lost | set(spooled) == everything
    assert result["lost_sectors"] == len(lost) and result["lost_by_reason"] == {
        "consumer_gone": len(lost)}
    assert result["expected_sectors"] == frames * SECTORS  # everything was accepted
    assert sorted(map(tuple, result["loss_manifest"])) == sorted(manifest.drops)
    assert manifest.sent == frames * SECTORS

    listed = await (await cp.admin("GET", f"/api/v1/scans?session={session}")).json()
    assert [(r["source"], r["status"]) for r in listed["items"]] == [("gateway", "partial")]
    exposition = await (await cp.call("GET", "/metrics")).text()
    assert 'dsn_cp_gateway_scan_reports_total{outcome="recorded"} 1.0' in exposition
    assert re.search(rf'dsn_gateway_scans_interrupted_total{{session="{session}"}} 1\.0',
                     await asyncio.to_thread(_metrics, gateway))


@pytest.mark.parametrize("plaintext", [True], indirect=True, ids=["allow_plaintext"])
async def test_where_policy_allows_it_a_session_streams_unencrypted_with_its_token(
        cp: ControlPlane, gateway: str, consumer: zmq.Socket,
        curve_keypair: Callable[[], KeyPair]) -> None:
    await asyncio.to_thread(_await_metric, gateway, "dsn_gateway_auth_decisions", 20)
    port = consumer.bind_to_random_port("tcp://127.0.0.1")
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    response = await cp.call("POST", "/api/v1/sessions", token, json={
        "project": "alpha", "template": "tiny", "params": {},
        "client_key": curve_keypair().public.decode(), "transport": "plain"})
    assert response.status == 201, await response.text()
    opened = await response.json()
    session, plain = str(opened["id"]), opened["gateway"]["plain_endpoint"]
    assert plain == cp.settings.gateway_plain_endpoint
    await _register(cp, token, session, f"tcp://127.0.0.1:{port}")
    await asyncio.to_thread(
        _await_metric, gateway, f'dsn_gateway_consumers{{session="{session}"}} 1.0', 2.0)

    def plain_producer(credentials: PlainCredentials) -> Producer:
        return Producer(plain, None, None, plain=credentials, send_timeout_s=0.5)

    with plain_producer(PlainCredentials.of(session, opened["token"])) as producer:
        _begin(producer)
        producer.send(0, 0, SECTOR)
        begin, data = _decoded(await asyncio.to_thread(_receive, consumer, 2))
        assert isinstance(begin, RoutedScanBegin) and begin.session == session
        assert isinstance(data, Data) and (data.frame, data.sector) == (0, 0)

    wrong = re.compile(r'dsn_gateway_auth_decisions_total{decision="deny",reason="bad_password"}')
    for credentials in (PlainCredentials(session, "not-the-signature"),
                        PlainCredentials.of(session, token)):  # another token's signature
        with plain_producer(credentials) as producer, pytest.raises(ProducerError):
            _begin(producer)
    assert await asyncio.to_thread(_metric_sum, gateway, wrong) >= 2

    # Revoking the session token ends the session everywhere, PLAIN included.
    jti = jwt.decode(opened["token"], options={"verify_signature": False})["jti"]
    assert (await cp.admin("DELETE", f"/api/v1/tokens/{jti}")).status == 200

    def refused() -> bool:
        with plain_producer(PlainCredentials.of(session, opened["token"])) as producer:
            try:
                _begin(producer)
            except ProducerError:
                return True
        return False

    await asyncio.to_thread(eventually, refused, timeout_s=2.0,
                            what="the revoked session to refuse its producer")


async def test_unencrypted_transport_is_refused_where_the_policy_does_not_allow_it(
        cp: ControlPlane, curve_keypair: Callable[[], KeyPair]) -> None:
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    response = await cp.call("POST", "/api/v1/sessions", token, json={
        "project": "alpha", "template": "tiny", "params": {},
        "client_key": curve_keypair().public.decode(), "transport": "plain"})
    assert response.status == 403, await response.text()
    assert "allow_plaintext" in (await response.json())["detail"]
    listed = await (await cp.admin("GET", "/api/v1/sessions?project=alpha")).json()
    assert listed["items"] == []  # nothing was opened
