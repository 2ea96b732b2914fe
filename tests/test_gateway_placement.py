"""Several gateways: real ``dsn gateway run`` processes register with a real control plane, which
places sessions on the least loaded of them, hands producers that gateway's endpoint and key,
publishes each session to its own gateway only, and moves the sessions of a gateway killed with
SIGKILL to another once its heartbeats stop. Also the placement rule itself, the gateway's
advertised addresses, and a site with no registered gateway (as before: the configured one)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zmq
from click.testing import CliRunner
from cp_helpers import (
    CLIENT_SCOPE,
    SHIPPED_POLICY,
    ClientFactory,
    ControlPlane,
    ManualClock,
    free_state_endpoints,
)
from cp_helpers import start_control_plane as start_cp
from test_live_sessions import TINY
from waiting import eventually_async

from common.client import Client
from common.clone import Registration
from common.config import ConfigError, parse_config
from common.keys import KeyPair, create_keypair, load_keypair
from common.privatefs import create_private_file
from common.protocol import Data, RoutedScanBegin, decode_consumer_message
from controlplane import placement
from controlplane.admin.bootstrap import initialize
from controlplane.errors import Unavailable
from controlplane.placement import GatewayRecord, Load, choose
from controlplane.policy import GatewayAllowance
from controlplane.sessions.service import replace_stranded
from dataplane.producer import MoveWatch, Producer, ProducerError, ProducerSession
from dsn.facility import sessions
from gateway.cli import Announced, _registration

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

DSN = str(Path(sys.executable).parent / "dsn")
FRAME, SECTORS = (8, 4), 2
TIMEOUT_S = 5.0  # the control plane's gateway_timeout_s (judged on its manual clock)
WORKER_SCOPE = CLIENT_SCOPE + " consumers:register"
SECTOR = np.zeros((FRAME[0] // SECTORS, FRAME[1]), dtype=np.uint16)
EVERY = GatewayAllowance("alpha", ("*",))  # the shipped policy's gateways for every project


# --- the rule ------------------------------------------------------------------------------------

def _record(name: str, capacity: int, *, last_seen: float = 100.0,
            plain: str | None = None) -> GatewayRecord:
    return GatewayRecord(name=name, endpoint="tcp://127.0.0.1:1", receipts_endpoint=
                         "tcp://127.0.0.1:2", plain_endpoint=plain, server_key="k" * 40,
                         capacity=capacity, registered_at=0.0, last_seen=last_seen)


def test_three_sessions_over_capacities_1_and_4_land_least_loaded_ties_by_name() -> None:
    gateways = {"west": _record("west", 4), "east": _record("east", 1)}
    placed: dict[str, int] = {"east": 0, "west": 0}
    order = []
    for _ in range(3):
        loads = [Load(record, placed[name]) for name, record in gateways.items()]
        chosen = choose(loads, 101.0, TIMEOUT_S, EVERY, plain=False)
        assert chosen is not None
        placed[chosen.name] += 1
        order.append(chosen.name)
    # 0/1 and 0/4 tie: east by name; then east is full; then west at 1/4 is the only one left.
    assert order == ["east", "west", "west"]


def test_only_live_gateways_with_room_count_and_a_full_site_is_refused() -> None:
    silent, full = _record("a", 4, last_seen=90.0), _record("b", 1)
    assert choose([Load(silent, 0)], 100.0, TIMEOUT_S, EVERY, plain=False) is None
    with pytest.raises(Unavailable, match="every live gateway project 'alpha' may use is at its "
                                          "capacity \\(1: b\\)"):
        choose([Load(silent, 0), Load(full, 1)], 100.0, TIMEOUT_S, EVERY, plain=False)
    # A plaintext session needs a plaintext ingress; a moved session never goes back.
    plain = _record("c", 4, plain="tcp://127.0.0.1:3")
    assert choose([Load(full, 0), Load(plain, 3)], 100.0, TIMEOUT_S, EVERY, plain=True) == plain
    assert choose([Load(full, 0), Load(plain, 0)], 100.0, TIMEOUT_S, EVERY, plain=False,
                  exclude={"b"}) == plain
    # Live gateways without a plaintext ingress refuse a plaintext session: no fallback.
    with pytest.raises(Unavailable, match="no live gateway project 'alpha' may use has a "
                                          "plaintext ingress"):
        choose([Load(full, 0)], 100.0, TIMEOUT_S, EVERY, plain=True)


def test_only_the_gateways_the_project_may_use_count_and_none_live_is_refused() -> None:
    east, west = _record("east-1", 4), _record("west", 4)
    eastern = GatewayAllowance("alpha", ("east*",))
    # West is less loaded, but alpha may only use east*.
    assert choose([Load(east, 3), Load(west, 0)], 100.0, TIMEOUT_S, eastern, plain=False) == east
    with pytest.raises(Unavailable, match="every live gateway project 'alpha' may use is at its "
                                          "capacity \\(1: east-1\\)"):
        choose([Load(east, 4), Load(west, 0)], 100.0, TIMEOUT_S, eastern, plain=False)
    # Its only gateway silent while west is live: refused, naming what the policy allows.
    silent_east = _record("east-1", 4, last_seen=90.0)
    with pytest.raises(Unavailable) as refused:
        choose([Load(silent_east, 0), Load(west, 0)], 100.0, TIMEOUT_S, eastern, plain=False)
    assert refused.value.detail == ("no gateway project 'alpha' may use is live: the policy "
                                    "allows it gateways matching 'east*'")
    # A gateway the session is moved off is no candidate either, whatever the policy says.
    with pytest.raises(Unavailable, match="no gateway project 'alpha' may use is live"):
        choose([Load(east, 0), Load(west, 0)], 100.0, TIMEOUT_S, eastern, plain=False,
               exclude={"east-1"})
    nothing = GatewayAllowance("beta", ())
    with pytest.raises(Unavailable, match="the policy allows it none$"):
        choose([Load(west, 0)], 100.0, TIMEOUT_S, nothing, plain=False)
    # No gateway live at all is no refusal: the caller decides (the configured gateway).
    assert choose([Load(silent_east, 0)], 100.0, TIMEOUT_S, nothing, plain=False) is None


# --- what a gateway announces --------------------------------------------------------------------

def _config(**gateway: Any) -> Any:
    return parse_config({"version": 1, "sessions": [], "gateway": {
        "server_secret_key_file": "server.key_secret", **gateway}})


KEY = b"k" * 40
NO_FLAGS = Announced(None, None, None, None, None)


def test_a_gateway_announces_its_bound_endpoints_unless_they_are_wildcards() -> None:
    announced = _registration(_config(ingress="tcp://10.0.0.1:5555"), NO_FLAGS, KEY)
    assert announced == Registration(endpoint="tcp://10.0.0.1:5555",
                                     receipts_endpoint="tcp://10.0.0.1:5556",
                                     server_key=KEY.decode(), capacity=64)
    # A wildcard bind is no address: without --advertise the gateway does not register, and
    # the control plane hands producers its configured gateway, as on a single-gateway site.
    assert _registration(_config(ingress="tcp://*:5555"), NO_FLAGS, KEY) is None
    flags = Announced("tcp://192.0.2.7:5555", None, None, 8, None)
    announced = _registration(_config(ingress="tcp://*:5555", receipts="tcp://*:6000",
                                      plain_ingress="tcp://*:6001"), flags, KEY)
    assert announced is not None
    assert (announced.endpoint, announced.receipts_endpoint, announced.plain_endpoint,
            announced.capacity) == ("tcp://192.0.2.7:5555", "tcp://192.0.2.7:6000",
                                    "tcp://192.0.2.7:6001", 8)
    with pytest.raises(ConfigError, match="--advertise: 'tcp://\\*:1'"):
        _registration(_config(), Announced("tcp://*:1", None, None, None, None), KEY)


# --- real gateways -------------------------------------------------------------------------------

@dataclass
class GatewayProcess:
    name: str
    ingress: str
    keys: KeyPair
    metrics: str  # HOST:PORT of its metrics page
    process: subprocess.Popen[str] | None = None

    def shows(self, line: str) -> bool:
        """Whether its metrics page holds ``line``."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=2) as response:
            page = response.read().decode()
        assert line in page, f"{line!r} not on {self.name}'s metrics page"
        return True


@dataclass
class Site:
    cp: ControlPlane
    gateways: dict[str, GatewayProcess]
    spool: Path
    free_port: Callable[[], int]
    cp_factory: ClientFactory

    def start(self, name: str, capacity: int) -> None:
        gateway = self.gateways[name]
        if gateway.process is not None:  # started again after it was killed: read its pipe out
            assert gateway.process.poll() is not None
            gateway.process.communicate(timeout=20)
        settings = self.cp.settings
        key_dir = settings.state_dir.parent / name
        receipts = f"tcp://127.0.0.1:{self.free_port()}"
        gateway.process = subprocess.Popen(
            [DSN, "gateway", "run", "--controlplane-state", ",".join(settings.state_endpoints),
             "--state-key", str(settings.state_dir / "keys" / "state.key"),
             "--key", str(key_dir / "server.key_secret"), "--ingress", gateway.ingress,
             "--receipts", receipts, "--spool-dir", str(self.spool / name),
             "--capacity", str(capacity), "--heartbeat", "0.2", "--sync-timeout", "20",
             "--metrics", gateway.metrics],
            stderr=subprocess.PIPE, text=True)

    async def registered(self, *names: str) -> None:
        async def all_in() -> bool:
            known = await placement.gateways(self.cp.services.store)
            assert set(names) <= set(known), sorted(known)
            return True
        await eventually_async(all_in, timeout_s=30, what=f"gateways {names} registered")

    async def live(self, name: str) -> None:
        async def announced_lately() -> bool:
            record = (await placement.gateways(self.cp.services.store)).get(name)
            assert record is not None and record.live(self.cp.clock(), TIMEOUT_S), record
            return True
        await eventually_async(announced_lately, timeout_s=30, what=f"gateway {name} live")

    def stop(self) -> None:
        """Stop the gateways still running, each cleanly; read every one's pipe to its end."""
        failed = []
        for gateway in self.gateways.values():
            if gateway.process is None:
                continue
            killed = gateway.process.poll() is not None
            if not killed:
                gateway.process.send_signal(signal.SIGTERM)
            _, stderr = gateway.process.communicate(timeout=20)
            if not killed and gateway.process.returncode != 0:
                failed.append(f"{gateway.name}: {stderr}")
        assert not failed, failed


async def admitting_east_and_west(state_dir: Path, clock: ManualClock,
                                  free_port: Callable[[], int]) -> dict[str, GatewayProcess]:
    """A new state directory admitting gateways ``east`` and ``west``, whose key pairs are made
    beside it; the two, not started."""
    await initialize(state_dir, policy_path=SHIPPED_POLICY, now=clock())
    gateways = {}
    for name in ("east", "west"):
        public, _ = create_keypair(state_dir.parent / name, "server")
        shutil.copyfile(public, state_dir / "gateways" / f"{name}.key")
        gateways[name] = GatewayProcess(name, f"tcp://127.0.0.1:{free_port()}",
                                        load_keypair(state_dir.parent / name / "server.key_secret"),
                                        f"127.0.0.1:{free_port()}")
    return gateways


@pytest.fixture
async def site(aiohttp_client: ClientFactory, tmp_path: Path,
               free_port: Callable[[], int]) -> AsyncIterator[Site]:
    """A control plane admitting gateways ``east`` and ``west`` (none started), with no fallback
    to a configured gateway: every session is placed on a registered one."""
    state_dir, clock = tmp_path / "state", ManualClock()
    gateways = await admitting_east_and_west(state_dir, clock, free_port)
    cp = await start_cp(aiohttp_client, state_dir, clock=clock, reconcile_s=0.2,
                        gateway_timeout_s=TIMEOUT_S, gateway_fallback=False)
    await cp.create_project("alpha", quotas={"sessions": 8})
    response = await cp.admin("PUT", "/api/v1/templates/tiny", json={"source": TINY},
                              headers={"If-None-Match": "*"})
    assert response.status in (200, 201), await response.text()
    running = Site(cp, gateways, tmp_path / "spool", free_port, aiohttp_client)
    try:
        yield running
    finally:
        running.stop()


async def _open(cp: ControlPlane, client: KeyPair, project: str = "alpha"
                ) -> tuple[str, dict[str, Any]]:
    token, response = await _try_open(cp, client, project)
    assert response.status == 201, await response.text()
    return token, dict(await response.json())


async def _try_open(cp: ControlPlane, client: KeyPair, project: str) -> tuple[str, Any]:
    token = str((await cp.project_token(project, scope=WORKER_SCOPE))["token"])
    return token, await cp.call("POST", "/api/v1/sessions", token, json={
        "project": project, "template": "tiny", "client_key": client.public.decode()})


def _admitted(endpoint: str, server_key: bytes, client: KeyPair) -> bool:
    """Whether the gateway at ``endpoint`` takes ``client``'s first message (a scan begin)."""
    with Producer(endpoint, server_key, client, send_timeout_s=0.5) as producer:
        try:
            producer.begin_scan(1, (1, 2), producers=1, frame_shape=FRAME, sectors=SECTORS)
        except ProducerError:
            return False
    return True


async def test_sessions_are_placed_least_loaded_and_each_gateway_admits_only_its_own(
        site: Site, curve_keypair: Callable[[], KeyPair]) -> None:
    site.start("east", capacity=1)
    site.start("west", capacity=4)
    await site.registered("east", "west")
    opened = []
    for _ in range(3):
        client = curve_keypair()
        _, session = await _open(site.cp, client)
        opened.append((client, session))
    assert [s["gateway_name"] for _, s in opened] == ["east", "west", "west"]
    for client, session in opened:
        mine = site.gateways[session["gateway_name"]]
        other = site.gateways["west" if mine.name == "east" else "east"]
        assert session["gateway"]["endpoint"] == mine.ingress
        assert session["gateway"]["server_key"] == mine.keys.public.decode()
        response = await site.cp.admin("GET", f"/api/v1/sessions/{session['id']}")
        assert (await response.json())["gateway_name"] == mine.name

        async def admitted_by_its_own(mine: GatewayProcess = mine, client: KeyPair = client
                                      ) -> bool:
            assert await asyncio.to_thread(_admitted, mine.ingress, mine.keys.public, client)
            return True

        await eventually_async(admitted_by_its_own, timeout_s=10,
                               what=f"{mine.name} admitting its session's producer")
        # The other gateway never heard of the session: its producer is refused there.
        assert not await asyncio.to_thread(_admitted, other.ingress, other.keys.public, client)
    # An admin sees the registry: both live, with the sessions placed on each.
    listed = await (await site.cp.admin("GET", "/api/v1/gateways")).json()
    assert [(g["name"], g["live"], g["sessions"], g["capacity"], g["endpoint"])
            for g in listed["registered"]] == [("east", True, 1, 1, site.gateways["east"].ingress),
                                               ("west", True, 2, 4, site.gateways["west"].ingress)]
    token = str((await site.cp.project_token("alpha"))["token"])
    listed = await (await site.cp.call("GET", "/api/v1/gateways", token)).json()
    assert listed["registered"] == []  # loads count other projects' sessions: an admin's
    # East is full and west has room for two more: the site takes exactly two.
    for _ in range(2):
        await _open(site.cp, curve_keypair())
    response = await site.cp.call("POST", "/api/v1/sessions", token, json={
        "project": "alpha", "template": "tiny", "client_key": curve_keypair().public.decode()})
    assert response.status == 503, await response.text()
    assert "every live gateway project 'alpha' may use is at its capacity" in \
        (await response.json())["detail"]


@pytest.fixture
def consumer(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> Iterator[zmq.Socket[bytes]]:
    with zmq_context.socket(zmq.PULL) as socket:
        yield socket


async def test_a_killed_gateways_sessions_move_to_another_and_its_producer_streams_there(
        site: Site, curve_keypair: Callable[[], KeyPair], consumer: zmq.Socket[bytes]) -> None:
    site.start("east", capacity=4)
    site.start("west", capacity=4)
    await site.registered("east", "west")
    client = curve_keypair()
    token = str((await site.cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    producing = ProducerSession(Client(site.cp.url, token), template="tiny", client=client)
    session = await asyncio.to_thread(producing.open)
    session_id = session.id
    assert session.gateway_name == "east"  # a tie, by name
    assert not await asyncio.to_thread(producing.follow_gateway)
    east, west = site.gateways["east"], site.gateways["west"]
    assert east.process is not None
    east.process.send_signal(signal.SIGKILL)
    east.process.wait(timeout=10)
    # Past the timeout on the control plane's clock: west announces itself again, east cannot.
    site.cp.clock.advance(TIMEOUT_S + 1)

    async def moved() -> dict[str, Any]:
        response = await site.cp.call("GET", f"/api/v1/sessions/{session_id}", token)
        body = dict(await response.json())
        assert body["gateway_name"] == "west", body["gateway_name"]
        return body

    body = await eventually_async(moved, timeout_s=20, what="the session moved to west")
    assert body["previous_gateway"] == "east" and body["replaced_at"] is not None
    assert body["gateway"]["endpoint"] == west.ingress
    assert body["gateway"]["server_key"] == west.keys.public.decode()
    moves = [row for row in site.cp.audit_rows() if row[2] == "sessions:replace"]
    assert len(moves) == 1 and moves[0][3] == f"session/alpha/{session_id}"
    assert moves[0][5] == "gateway-silent:east->west"
    # What a user sees of it.
    shown = await asyncio.to_thread(
        CliRunner().invoke, sessions, ["show", session_id, "--controlplane", site.cp.url],
        env={"DSN_PROJECT_TOKEN": token})
    assert shown.exit_code == 0, shown.output
    assert f"{west.ingress} (west, moved from east)" in shown.output

    # A consumer registers now; the producer streams through west to it.
    port = consumer.bind_to_random_port("tcp://127.0.0.1")
    worker = str((await site.cp.exchange(token, kind="consumer"))["token"])
    response = await site.cp.call("POST", f"/api/v1/sessions/{session_id}/consumers", worker,
                                  json={"endpoint": f"tcp://127.0.0.1:{port}", "rank": 0,
                                        "job_id": "job-1", "host": "node-1"})
    assert response.status == 201, await response.text()

    # The producer asks where its session went, and streams there.
    assert await asyncio.to_thread(producing.follow_gateway)
    assert producing.gateway().endpoint == west.ingress
    assert producing.session.previous_gateway == "east"

    consumers = f'dsn_gateway_consumers{{session="{session_id}"}} 1.0'
    await eventually_async(lambda: asyncio.to_thread(west.shows, consumers), timeout_s=20,
                           what="west serving the moved session with its consumer")

    def streamed() -> list[Any]:
        with producing.producer(send_timeout_s=10) as producer:
            producer.begin_scan(1, (1, 1), producers=1, frame_shape=FRAME, sectors=SECTORS)
            producer.send(0, 0, SECTOR)
        received: list[Any] = []
        while len(received) < 2 and consumer.poll(10_000):
            received.append(decode_consumer_message(consumer.recv_multipart()[0]))
        return received

    begin, data = await asyncio.to_thread(streamed)
    assert isinstance(begin, RoutedScanBegin) and begin.session == session_id
    assert isinstance(data, Data) and (data.frame, data.sector) == (0, 0)

    # East comes back: it serves the sessions placed on it from now on, never the moved one.
    site.start("east", capacity=4)
    await site.live("east")
    newcomer = curve_keypair()
    _, fresh = await _open(site.cp, newcomer)  # east 0/4 against west 1/4

    async def east_admits_its_new_session() -> bool:
        assert await asyncio.to_thread(_admitted, east.ingress, east.keys.public, newcomer)
        return True

    assert fresh["gateway_name"] == "east"
    await eventually_async(east_admits_its_new_session, timeout_s=20,
                           what="the restarted east serving its new session")
    assert not await asyncio.to_thread(_admitted, east.ingress, east.keys.public, client)


async def test_with_no_live_gateway_a_site_without_fallback_refuses_to_open_sessions(
        site: Site, curve_keypair: Callable[[], KeyPair]) -> None:
    token = str((await site.cp.project_token("alpha"))["token"])
    response = await site.cp.call("POST", "/api/v1/sessions", token, json={
        "project": "alpha", "template": "tiny", "client_key": curve_keypair().public.decode()})
    assert response.status == 503, await response.text()
    assert "no gateway is live" in (await response.json())["detail"]


def _announcement(keys: KeyPair, port: int, capacity: int = 4) -> Registration:
    return Registration(endpoint=f"tcp://127.0.0.1:{port}",
                        receipts_endpoint=f"tcp://127.0.0.1:{port + 1}",
                        server_key=keys.public.decode(), capacity=capacity)


async def test_a_restarted_control_plane_knows_the_gateways_and_moves_nothing_before_they_call(
        site: Site, curve_keypair: Callable[[], KeyPair]) -> None:
    cp, east, west = site.cp, site.gateways["east"], site.gateways["west"]
    store = cp.services.store
    assert await placement.register(store, "east", _announcement(east.keys, 7000), cp.clock())
    # A heartbeat that repeats the announcement is not news; a new capacity is.
    assert not await placement.register(store, "east", _announcement(east.keys, 7000), cp.clock())
    assert await placement.register(store, "east", _announcement(east.keys, 7000, 5), cp.clock())
    _, session = await _open(cp, curve_keypair())
    assert session["gateway_name"] == "east"
    assert session["gateway"]["endpoint"] == "tcp://127.0.0.1:7000"

    await cp.client.close()
    # Restarted: the registry is in the store. East has not called since, but the control plane
    # gives it one timeout to do so before its sessions move; nowhere to move them to anyway.
    restarted = await start_cp(site.cp_factory, cp.settings.state_dir, clock=cp.clock,
                               reconcile_s=0.2, gateway_timeout_s=TIMEOUT_S,
                               gateway_fallback=False,
                               state_endpoints=free_state_endpoints())
    services = restarted.services
    started = cp.clock()
    assert set(await placement.gateways(services.store)) == {"east"}
    cp.clock.advance(TIMEOUT_S + 1)
    assert await replace_stranded(services, started + 1) == 0  # within the grace after start
    assert await replace_stranded(services, started) == 0  # east silent, but no other gateway
    await placement.register(services.store, "west", _announcement(west.keys, 7100),
                             cp.clock())
    assert await replace_stranded(services, started) == 1
    response = await restarted.admin("GET", f"/api/v1/sessions/{session['id']}")
    body = await response.json()
    assert (body["gateway_name"], body["previous_gateway"]) == ("west", "east")
    assert body["gateway"]["endpoint"] == "tcp://127.0.0.1:7100"
    assert services.state.placement(session["id"]) == ("west",)


async def _stream_to_a_dead_gateway(site: Site, tmp_path: Path, *options: str
                                    ) -> tuple[asyncio.subprocess.Process, int, dict[str, Any]]:
    """``dsn producer stream --controlplane`` with ``options``, its session placed on east, which
    announced itself and died before anything connected (nothing listens at its address); the
    process, east's dead port and the session."""
    cp, east = site.cp, site.gateways["east"]
    site.start("west", capacity=4)
    await site.registered("west")
    dead = site.free_port()
    await placement.register(cp.services.store, "east", _announcement(east.keys, dead),
                             cp.clock())
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    create_private_file(tmp_path / "project.token", token.encode())
    producer = await asyncio.create_subprocess_exec(
        DSN, "producer", "stream", "--controlplane", cp.url, "--project", "alpha",
        "--project-token-file", str(tmp_path / "project.token"), "--scan-shape", "8x8",
        *options, "--no-progress", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    async def opened() -> dict[str, Any]:
        items = (await (await cp.admin("GET", "/api/v1/sessions")).json())["items"]
        assert items, "no session yet"
        return dict(items[0])

    session = await eventually_async(opened, timeout_s=30, what="the producer's session")
    assert session["gateway_name"] == "east"  # a tie with west, by name
    return producer, dead, session


def _followed_to_west(site: Site, out: str, dead: int, session: dict[str, Any]) -> None:
    """The producer said its session moved to west and streamed the whole scan again there."""
    assert (f"session {session['id']} moved from gateway east to west "
            f"({site.gateways['west'].ingress}): every message of scan 0 sent to "
            f"tcp://127.0.0.1:{dead} is unconfirmed; streaming it again there") in out
    # West has no consumer for the session: it spools the whole scan, and its receipt says so.
    assert ("gateway: scan 0 spooled (no_consumers): 256 sent, 0 forwarded, 256 spooled, "
            "0 lost") in out


async def test_a_producer_whose_gateway_fails_follows_its_session_and_streams_the_scan_again(
        site: Site, tmp_path: Path) -> None:
    producer, dead, session = await _stream_to_a_dead_gateway(
        site, tmp_path, "--timeout", "1", "--follow-wait", "60")
    # The stream to east fails within its 1-s send timeout, long before the control plane moves
    # the session: the producer waits for the move rather than giving up.
    assert producer.stdout is not None
    lines: list[str] = []
    while not lines or "waiting up to" not in lines[-1]:
        line = await asyncio.wait_for(producer.stdout.readline(), timeout=30)
        assert line, "".join(lines)
        lines.append(line.decode())
    assert lines[-1] == (f"waiting up to 60 s for the control plane to move session "
                         f"{session['id']} to another gateway\n")
    assert lines[-2].startswith(f"gateway tcp://127.0.0.1:{dead} failed: scan_begin of scan 0 "
                                "not accepted")
    site.cp.clock.advance(TIMEOUT_S + 1)  # east's last announcement is now too old
    stdout, stderr = await asyncio.wait_for(producer.communicate(), timeout=60)
    out = "".join(lines) + stdout.decode()
    assert producer.returncode == 0, out + stderr.decode()
    _followed_to_west(site, out, dead, session)


@pytest.mark.parametrize("header", ["native", "ncem"])
async def test_a_producer_blocked_on_a_lost_gateway_gives_it_up_once_its_session_has_moved(
        site: Site, tmp_path: Path, header: str) -> None:
    # A send timeout far beyond the test's own: only the move can end the blocked send. With the
    # 4D Camera's own data headers (NCEM) the scan is streamed again just the same.
    producer, dead, session = await _stream_to_a_dead_gateway(
        site, tmp_path, "--timeout", "600", "--header", header)
    site.cp.clock.advance(TIMEOUT_S + 1)  # east's last announcement is now too old
    stdout, stderr = await asyncio.wait_for(producer.communicate(), timeout=60)
    out = stdout.decode()
    assert producer.returncode == 0, out + stderr.decode()
    assert (f"gateway tcp://127.0.0.1:{dead} failed: scan_begin of scan 0 not accepted by "
            f"tcp://127.0.0.1:{dead}, given up: the control plane moved the session to gateway "
            "west") in out
    assert "waiting up to" not in out
    _followed_to_west(site, out, dead, session)


# --- the policy's gateways -----------------------------------------------------------------------

GATEWAYS = ("east-1", "east-2", "north", "west")


@dataclass
class PolicedSite:
    """A control plane whose policy lets project alpha use gateways ``east*`` only, gamma
    ``north`` only, and beta (the defaults) any; with the fallback to the configured gateway on.
    The gateways register through its store, as the state service stores their announcements."""

    cp: ControlPlane
    keys: dict[str, KeyPair]

    async def announce(self, *names: str, at: float | None = None) -> None:
        for index, name in enumerate(GATEWAYS):
            if name in names:
                await placement.register(self.cp.services.store, name, _announcement(
                    self.keys[name], 7200 + 2 * index), self.cp.clock() if at is None else at)

    async def silence(self, *names: str) -> None:
        """Time passes beyond the timeout: the other gateways have announced themselves in it
        (beforehand, so the upkeep never sees them silent), ``names`` have not."""
        later = self.cp.clock() + TIMEOUT_S + 1
        await self.announce(*(name for name in GATEWAYS if name not in names), at=later)
        self.cp.clock.advance(TIMEOUT_S + 1)

    async def placed(self, session_id: str) -> dict[str, Any]:
        return dict(await (await self.cp.admin("GET", f"/api/v1/sessions/{session_id}")).json())


@pytest.fixture
async def policed(aiohttp_client: ClientFactory, tmp_path: Path,
                  curve_keypair: Callable[[], KeyPair]) -> PolicedSite:
    document = yaml.safe_load(SHIPPED_POLICY.read_text())
    document["gateways"] = {"defaults": ["*"], "projects": {"alpha": ["east*"],
                                                             "gamma": ["north"]}}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(document))
    cp = await start_cp(aiohttp_client, tmp_path / "state", clock=ManualClock(),
                        policy_path=policy, reconcile_s=0.2, gateway_timeout_s=TIMEOUT_S)
    for project in ("alpha", "beta", "gamma"):
        await cp.create_project(project, quotas={"sessions": 8})
    response = await cp.admin("PUT", "/api/v1/templates/tiny", json={"source": TINY},
                              headers={"If-None-Match": "*"})
    assert response.status in (200, 201), await response.text()
    site = PolicedSite(cp, {name: curve_keypair() for name in GATEWAYS})
    await site.announce(*GATEWAYS)
    return site


async def test_each_project_is_placed_on_the_least_loaded_gateway_its_policy_allows(
        policed: PolicedSite, curve_keypair: Callable[[], KeyPair],
        caplog: pytest.LogCaptureFixture) -> None:
    cp = policed.cp
    opened = []
    for project in ("beta", "beta", "beta", "alpha", "beta", "gamma"):
        _, session = await _open(cp, curve_keypair(), project)
        opened.append(session["gateway_name"])
    # Beta, with the defaults, fills the gateways least loaded first (ties by name); alpha goes
    # to east-1 (1 of 4) while west is empty; gamma to north, the most loaded, its only one.
    assert opened == ["east-1", "east-2", "north", "east-1", "west", "north"]

    # North falls silent while the others are live: gamma is refused, not placed elsewhere nor
    # on the configured gateway; the refusal names the policy's answer and is logged.
    await policed.silence("north")
    with caplog.at_level(logging.WARNING, logger="dsn.controlplane.http"):
        _, refused = await _try_open(cp, curve_keypair(), "gamma")
    assert refused.status == 503, await refused.text()
    detail = ("no gateway project 'gamma' may use is live: the policy allows it gateways "
              "matching 'north'")
    assert (await refused.json())["detail"] == detail
    assert f"refused: {detail}" in caplog.messages
    _, session = await _open(cp, curve_keypair(), "beta")
    assert session["gateway_name"] != "north"

    # No gateway live at all: the configured gateway, as on a site without registration.
    policed.cp.clock.advance(TIMEOUT_S + 1)
    _, session = await _open(cp, curve_keypair(), "gamma")
    assert session["gateway_name"] is None
    assert session["gateway"]["endpoint"] == cp.settings.gateway_endpoint


async def test_a_silent_gateways_sessions_move_only_where_their_projects_may_go(
        policed: PolicedSite, curve_keypair: Callable[[], KeyPair],
        caplog: pytest.LogCaptureFixture) -> None:
    cp = policed.cp
    sessions = {}
    for name, project in (("alpha", "alpha"), ("beta-1", "beta"), ("beta-2", "beta"),
                          ("gamma", "gamma")):
        _, session = await _open(cp, curve_keypair(), project)
        sessions[name] = session["id"]
        assert session["gateway_name"] == {"alpha": "east-1", "beta-1": "east-2",
                                           "beta-2": "north", "gamma": "north"}[name]
    caplog.set_level(logging.WARNING, logger="dsn.controlplane.sessions")
    await policed.silence("east-1", "north")

    # Oldest first: alpha's goes to east-2 (1 of 4) though west is empty; beta's to west.
    async def moved() -> bool:
        where = {name: (await policed.placed(sessions[name]))["gateway_name"]
                 for name in ("alpha", "beta-2")}
        assert where == {"alpha": "east-2", "beta-2": "west"}, where
        return True

    await eventually_async(moved, timeout_s=20, what="alpha's and beta's sessions moved")
    stays = (f"session {sessions['gamma']} stays on silent gateway north: no gateway project "
             "'gamma' may use is live: the policy allows it gateways matching 'north'")
    await eventually_async(lambda: stays in caplog.messages, timeout_s=20,
                           what="the log saying gamma's session stays")
    gamma = await policed.placed(sessions["gamma"])
    assert (gamma["gateway_name"], gamma["previous_gateway"]) == ("north", None)
    moves = sorted(row[5] for row in cp.audit_rows() if row[2] == "sessions:replace")
    assert moves == ["gateway-silent:east-1->east-2", "gateway-silent:north->west"]


# --- sessions split over several gateways (lanes) -------------------------------------------------

async def _open_lanes(cp: ControlPlane, client: KeyPair, project: str, lanes: int) -> Any:
    token = str((await cp.project_token(project, scope=WORKER_SCOPE))["token"])
    return await cp.call("POST", "/api/v1/sessions", token, json={
        "project": project, "template": "tiny", "client_key": client.public.decode(),
        "lanes": lanes})


def _lanes_of(session: dict[str, Any]) -> list[str]:
    return [lane["name"] for lane in session["lanes"]]


async def test_a_session_of_lanes_takes_one_gateway_per_lane_each_counting_it(
        policed: PolicedSite, curve_keypair: Callable[[], KeyPair]) -> None:
    cp = policed.cp
    response = await _open_lanes(cp, curve_keypair(), "beta", 3)
    assert response.status == 201, await response.text()
    session = await response.json()
    # Least loaded first, ties by name, each lane on another gateway; lane 0 is the gateway.
    assert _lanes_of(session) == ["east-1", "east-2", "north"]
    assert session["gateway_name"] == "east-1"
    assert [lane["server_key"] for lane in session["lanes"]] == [
        policed.keys[name].public.decode() for name in ("east-1", "east-2", "north")]
    # A lane is a session to its gateway: the next session goes to the one left empty.
    _, one = await _open(cp, curve_keypair(), "beta")
    assert (one["gateway_name"], one["lanes"]) == ("west", [])
    listed = await (await cp.admin("GET", "/api/v1/gateways")).json()
    assert {g["name"]: g["sessions"] for g in listed["registered"]} == {
        "east-1": 1, "east-2": 1, "north": 1, "west": 1}
    # Published lane by lane (each gateway is told the lane it carries: test_state_service).
    assert cp.services.state.placement(session["id"]) == ("east-1", "east-2", "north")


async def test_a_session_of_more_lanes_than_its_project_may_use_gateways_is_refused(
        policed: PolicedSite, curve_keypair: Callable[[], KeyPair]) -> None:
    cp = policed.cp
    # Alpha may use east-1 and east-2 only; gamma north only.
    response = await _open_lanes(cp, curve_keypair(), "alpha", 3)
    assert response.status == 503, await response.text()
    assert (await response.json())["detail"] == (
        "a session of 3 lanes needs 3 gateways project 'alpha' may use, live and with room; 2 can "
        "take it (east-1, east-2)")
    response = await _open_lanes(cp, curve_keypair(), "gamma", 2)
    assert response.status == 503, await response.text()
    assert "2 lanes needs 2 gateways project 'gamma' may use" in (await response.json())["detail"]
    response = await _open_lanes(cp, curve_keypair(), "beta", 65)
    assert response.status == 400, await response.text()
    # Nothing was placed by the refused opens.
    listed = await (await cp.admin("GET", "/api/v1/gateways")).json()
    assert {g["sessions"] for g in listed["registered"]} == {0}
    # No gateway live at all: a session of one lane falls back to the configured gateway; one of
    # several lanes cannot.
    cp.clock.advance(TIMEOUT_S + 1)
    response = await _open_lanes(cp, curve_keypair(), "beta", 2)
    assert response.status == 503, await response.text()
    assert (await response.json())["detail"].endswith(", and 2 lanes need as many")
    _, session = await _open(cp, curve_keypair(), "beta")
    assert session["gateway_name"] is None


async def test_a_silent_gateways_lane_moves_to_a_gateway_carrying_no_other_lane(
        policed: PolicedSite, curve_keypair: Callable[[], KeyPair]) -> None:
    cp = policed.cp
    token = str((await cp.project_token("beta", scope=WORKER_SCOPE))["token"])
    producing = ProducerSession(Client(cp.url, token), template="tiny", client=curve_keypair(),
                                lanes=2)
    opened = await asyncio.to_thread(producing.open)
    session = opened.model_dump(mode="json")
    assert _lanes_of(session) == ["east-1", "east-2"]
    assert [target.server_public for target in producing.gateways()] == [
        policed.keys[name].public for name in ("east-1", "east-2")]
    watch = MoveWatch(producing, every_s=0)
    assert await asyncio.to_thread(watch) is None
    await policed.silence("east-2")

    async def moved() -> dict[str, Any]:
        body = await policed.placed(session["id"])
        assert _lanes_of(body) == ["east-1", "north"], _lanes_of(body)
        return body

    body = await eventually_async(moved, timeout_s=20, what="lane 1 moved off east-2")
    assert (body["gateway_name"], body["previous_gateway"]) == ("east-1", "east-2")
    # A stream blocked on the lost lane gives up, naming where the lane went; the producer
    # learns each lane's gateway anew.
    assert await asyncio.to_thread(watch) == "the control plane moved the session to gateway north"
    assert await asyncio.to_thread(producing.follow_gateway)
    assert [target.server_public for target in producing.gateways()] == [
        policed.keys[name].public for name in ("east-1", "north")]
    assert cp.services.state.placement(session["id"]) == ("east-1", "north")
    moves = [row[5] for row in cp.audit_rows() if row[2] == "sessions:replace"]
    assert moves == ["gateway-silent:east-2->north"]
    # Lane 0's gateway falls silent too: it moves to the one gateway carrying neither lane.
    await policed.silence("east-1", "east-2")

    async def moved_again() -> bool:
        assert _lanes_of(await policed.placed(session["id"])) == ["west", "north"]
        return True

    await eventually_async(moved_again, timeout_s=20, what="lane 0 moved off east-1")
