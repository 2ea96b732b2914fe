"""One scan split over two gateways (lanes), with real processes: two ``dsn gateway run --config``
processes serving the same session, a real ``mpiexec`` consumer job, CURVE producers.

Each gateway accounts for its lane alone; the consumer ranks merge the lanes and the output file
counts every sector, as if one gateway had carried the scan.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import pytest
import yaml
import zmq
from cp_helpers import DSN, ControlPlane, ManualClock, metrics_text, served_on
from cp_helpers import start_control_plane as start_cp
from test_cp_sessions_api import WORKER_SCOPE
from test_faults_gateway import GatewayProcess
from test_gateway_placement import Site, admitting_east_and_west
from test_no_silent_loss import (
    CAMERA,
    EVERY_SECTOR,
    RANKS,
    SESSION,
    StaticSite,
    _counted,
    _kill_and_see_the_break,
    contract_producer,
    ncem_message,
    send_sectors,
)
from test_sessions_end_to_end import finished, poll
from waiting import eventually, eventually_async

from common.client import Client
from common.keys import KeyPair, create_keypair, load_keypair, load_secret_keypair
from common.ports import free_port
from common.protocol import ScanBegin, ScanEnd, encode
from dataplane.producer import ProducerError, ProducerSession
from dataplane.receipts import ReceiptClient, await_report
from dataplane.spool import spool_name

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.timeout(240)]

LANES = 2


@dataclass
class Lane:
    config: Path
    endpoint: str
    receipts: str
    metrics: str
    key: Path  # the lane's gateway's public key file: each lane's gateway has its own key pair
    options: list[str]  # `dsn gateway run` flags that make the shared file's gateway this lane's

    @property
    def server(self) -> bytes:
        return load_keypair(self.key).public

    def start(self) -> GatewayProcess:
        return GatewayProcess(self.config, self.metrics, *self.options)


@dataclass
class LanedSite:
    """Two gateways of one session, and the static site of the first (for the consumer job)."""

    site: StaticSite
    lanes: list[Lane]
    keys: Path


def _lanes(directory: Path, session: dict[str, object]) -> list[Lane]:
    """One configuration file, lane 0's; lane 1's gateway takes the same file with the flags that
    give it its own key, endpoints, spool directory and NCEM lane, as an operator would start
    it."""
    path = directory / "dsn.yaml"
    keys = directory / "keys"
    lanes = []
    for index in range(LANES):
        endpoint, receipts = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        metrics, spool = f"127.0.0.1:{free_port()}", directory / f"spool{index}"
        create_keypair(keys, f"gateway{index}")
        options = [] if index == 0 else [
            "--key", str(keys / f"gateway{index}.key_secret"), "--ingress", endpoint,
            "--receipts", receipts, "--metrics", metrics, "--spool-dir", str(spool),
            "--ncem-lane", f"{index}/{LANES}"]
        lanes.append(Lane(path, endpoint, receipts, metrics, keys / f"gateway{index}.key",
                          options))
    first = lanes[0]
    config = {"version": 1,
              "gateway": {"ingress": first.endpoint, "receipts": first.receipts,
                          "metrics": first.metrics,
                          "server_secret_key_file": str(keys / "gateway0.key_secret"),
                          "spool_dir": str(directory / "spool0"),
                          # NCEM producers cannot name their lane: each gateway says its own.
                          "ncem_lane": {"lane": 0, "lanes": LANES}},
              "sessions": [session]}
    path.write_text(yaml.safe_dump(config))
    return lanes


def laned_site(directory: Path, consumers: int = RANKS) -> LanedSite:
    """Keys, and a configuration per lane: one session, the same ``consumers`` for each."""
    keys = directory / "keys"
    create_keypair(keys, "producer")
    public, secret = load_secret_keypair(keys / "producer.key_secret")
    session = {"id": SESSION, "client_keys": [public.decode()],
               "allowed_networks": ["127.0.0.0/8"], "allowed_targets": ["127.0.0.0/8"],
               "consumers": [f"tcp://127.0.0.1:{free_port()}" for _ in range(consumers)]}
    lanes = _lanes(directory, session)
    site = StaticSite(directory, lanes[0].config, lanes[0].endpoint, lanes[0].server,
                      KeyPair(public, secret), directory / "spool0")
    return LanedSite(site, lanes, keys)


@pytest.fixture
def laned(tmp_path: Path) -> LanedSite:
    return laned_site(tmp_path)


@contextmanager
def running(laned: LanedSite) -> Iterator[list[GatewayProcess]]:
    """A gateway process per lane, each serving (one that exits fails the test with its log)."""
    gateways = [lane.start() for lane in laned.lanes]
    try:
        for gateway in gateways:
            eventually(lambda g=gateway: g.alive() and metrics_text(g.metrics) != "",
                       timeout_s=30, what="a lane's gateway to serve")
        yield gateways
    finally:
        for gateway in gateways:
            gateway.kill()


@pytest.fixture
def gateways(laned: LanedSite) -> Iterator[list[GatewayProcess]]:
    with running(laned) as started:
        yield started


def stream_cli(laned: LanedSite, *args: str) -> subprocess.CompletedProcess[str]:
    """``dsn producer stream`` with this site's producer key, as a user would run it."""
    return subprocess.run(
        [DSN, "producer", "stream", "--client-key", str(laned.keys / "producer.key_secret"),
         "--no-progress", *args],
        capture_output=True, text=True, timeout=120, check=False)


def test_a_scan_streamed_through_two_gateways_is_counted_whole_and_each_reports_its_lane(
        laned: LanedSite, gateways: list[GatewayProcess]) -> None:
    job = laned.site.job("job", "--scans", "1")
    streamed = stream_cli(laned, *_lane_options(laned), "--scan", "1", "--scan-shape", "24x24")
    assert streamed.returncode == 0, streamed.stdout + streamed.stderr
    # Producers 0 and 2 (sectors 0 and 2) stream lane 0, producers 1 and 3 lane 1.
    half = len(EVERY_SECTOR) // 2
    for lane in range(LANES):
        assert (f"gateway: scan 1 lane {lane} of 2 forwarded: {half} sent, {half} forwarded, "
                "0 spooled, 0 lost") in streamed.stdout
    assert job.wait() == 0, job.log.read_text()[-3000:]
    [result] = job.result_lines()
    assert (result["scan"], result["status"], result["frames"]) == (1, "complete", 24 * 24)
    assert _counted(Path(str(result["path"]))) == EVERY_SECTOR
    with h5py.File(Path(str(result["path"]))) as f:
        assert int(f["metadata/stream"].attrs["lanes"]) == LANES
    assert [gateway.forwarded() for gateway in gateways] == [half, half]


def _lane_options(laned: LanedSite) -> list[str]:
    return [arg for lane in laned.lanes for arg in (
        "--endpoint", lane.endpoint, "--receipts", lane.receipts, "--server-key", str(lane.key))]


def test_the_lanes_of_a_scan_without_consumers_spool_apart_and_replay_as_one_scan(
        laned: LanedSite, gateways: list[GatewayProcess], tmp_path: Path) -> None:
    unconsumed = laned_site(tmp_path / "unconsumed", consumers=0)
    with running(unconsumed):
        streamed = stream_cli(unconsumed, *_lane_options(unconsumed), "--scan", "2",
                              "--scan-shape", "24x24")
    assert streamed.returncode == 0, streamed.stdout + streamed.stderr
    half = len(EVERY_SECTOR) // 2
    spools = [unconsumed.site.directory / f"spool{lane}" / spool_name(SESSION, 2)
              for lane in range(LANES)]
    for lane, spool in enumerate(spools):
        assert (f"gateway: scan 2 lane {lane} of 2 spooled (no_consumers): {half} sent, "
                f"0 forwarded, {half} spooled, 0 lost") in streamed.stdout
        assert f"spooled to {spool}" in streamed.stdout

    # One spool alone would be half a scan; both, replayed through one gateway, are all of it.
    job = laned.site.job("job", "--scans", "1")
    replayed = stream_cli(laned, "--endpoint", laned.lanes[0].endpoint, "--receipts",
                          laned.lanes[0].receipts, "--server-key", str(laned.lanes[0].key),
                          *(f"--spool={spool}" for spool in spools))
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert (f"gateway: scan 2 forwarded: {2 * half} sent, {2 * half} forwarded, 0 spooled, "
            "0 lost") in replayed.stdout
    assert job.wait() == 0, job.log.read_text()[-3000:]
    [result] = job.result_lines()
    assert (result["scan"], result["status"]) == (2, "complete")
    assert _counted(Path(str(result["path"]))) == EVERY_SECTOR


def test_spools_of_different_scans_are_not_replayed_as_one(laned: LanedSite,
                                                          tmp_path: Path) -> None:
    unconsumed = laned_site(tmp_path / "unconsumed", consumers=0)
    with running(unconsumed):
        for scan in (4, 5):
            streamed = stream_cli(unconsumed, *_lane_options(unconsumed), "--scan", str(scan),
                                  "--scan-shape", "8x8")
            assert streamed.returncode == 0, streamed.stdout + streamed.stderr
    mixed = [unconsumed.site.directory / "spool0" / spool_name(SESSION, 4),
             unconsumed.site.directory / "spool1" / spool_name(SESSION, 5)]
    refused = stream_cli(laned, "--endpoint", laned.lanes[0].endpoint, "--server-key",
                         str(laned.lanes[0].key), *(f"--spool={spool}" for spool in mixed))
    assert refused.returncode == 1
    assert "the spools of one replay must be the lanes of one scan" in refused.stderr
    assert "Traceback" not in refused.stderr


def _lane_producer(context: zmq.Context[zmq.Socket[bytes]], laned: LanedSite,
                   lane: int) -> zmq.Socket[bytes]:
    """A producer that follows only the contract, connected to lane ``lane``'s gateway."""
    chosen = laned.lanes[lane]
    return contract_producer(context, laned.site.client, chosen.server, chosen.endpoint,
                             linger_ms=5000)


def _begin_lane(push: zmq.Socket[bytes], scan: int, lane: int) -> None:
    push.send(encode(ScanBegin(v=1, scan=scan, scan_shape=CAMERA.spec.scan_shape,
                               frame_shape=(576, 576), sectors=4, producers=1, dtype="uint16",
                               lane=lane, lanes=LANES)))


def _lane_sectors(sectors: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(frame, sector) for frame in range(CAMERA.spec.positions) for sector in sectors]


def _stream_lane(push: zmq.Socket[bytes], lane: int, sectors: tuple[int, ...]) -> None:
    """Lane ``lane`` of scan 3, whole: its scan_begin, the ``sectors`` of every frame, its end."""
    _begin_lane(push, 3, lane)
    part = _lane_sectors(sectors)
    send_sectors(push, 3, part)
    push.send(encode(ScanEnd(v=1, scan=3, sent=len(part))))


def test_a_scan_ends_at_the_consumer_only_once_every_lane_has_ended_it(
        laned: LanedSite, gateways: list[GatewayProcess]) -> None:
    job = laned.site.job("job", "--scans", "1")
    context = zmq.Context()
    try:
        first, second = (_lane_producer(context, laned, lane) for lane in range(LANES))
        _stream_lane(first, 0, (0, 1))

        def lane_ended() -> dict[str, object] | None:
            events = [json.loads(line) for line in job.log.read_text().splitlines()
                      if '"event": "lane ends"' in line]
            return events[-1] if len(events) == RANKS else None
        ended = eventually(lane_ended, timeout_s=60, what="both ranks to see lane 0 end")
        assert ended["waiting_for"] == [1]
        assert job.process.poll() is None, "the scan ended with a lane missing"

        _stream_lane(second, 1, (2, 3))
        assert job.wait() == 0, job.log.read_text()[-3000:]
    finally:
        context.destroy(linger=0)
    [result] = job.result_lines()
    assert (result["scan"], result["status"]) == (3, "complete")
    assert _counted(Path(str(result["path"]))) == EVERY_SECTOR


def test_a_scan_whose_other_lane_never_comes_is_closed_partial_listing_that_lanes_sectors(
        laned: LanedSite, gateways: list[GatewayProcess]) -> None:
    """Lane 0 streams whole and ends; lane 1's producers never start (their host died): once
    nothing of the scan has arrived for --gateway-lost-s, the ranks close it, keep lane 0's
    accounting, and write and report it partial, lane 1's sectors listed lane_lost."""
    job = laned.site.job("job", "--scans", "1", "--gateway-lost-s", "2")
    context = zmq.Context()
    try:
        first = _lane_producer(context, laned, 0)
        _stream_lane(first, 0, (0, 1))
        assert job.wait() == 0, job.log.read_text()[-3000:]
    finally:
        context.destroy(linger=0)
    [result] = job.result_lines()
    lane0 = _lane_sectors((0, 1))
    assert (result["scan"], result["status"], result["expected_sectors"],
            result["received_sectors"], result["lost_sectors"]) == (
        3, "partial", len(lane0), len(lane0), len(EVERY_SECTOR) - len(lane0))
    path = Path(str(result["path"]))
    assert _counted(path) == set(lane0)
    with h5py.File(path) as output:
        reasons = set(output["metadata/stream/loss_manifest/reason"][()].astype(str).tolist())
    assert reasons == {"lane_lost"}
    closed = [json.loads(line) for line in job.log.read_text().splitlines()
              if '"event": "scan closed: its gateway was lost"' in line]
    assert sorted((e["rank"], e["lanes_lost"]) for e in closed) == [(0, [1]), (1, [1])]


def test_ncem_producers_each_streaming_to_its_modules_lane_are_counted_whole(
        laned: LanedSite, gateways: list[GatewayProcess]) -> None:
    """The 4D Camera's receiving servers, a module each, as the NCEM aggregator's threads take
    them: module m streams to lane m mod 2. Each gateway closes its lane once its modules are in
    (the session's scan_idle_s is its default, 300 s: a lane closed by silence would outlast
    the job's wait)."""
    job = laned.site.job("job", "--scans", "1")
    context = zmq.Context()
    try:
        modules = [_lane_producer(context, laned, module % LANES)
                   for module in range(CAMERA.spec.sectors)]
        for frame in range(CAMERA.spec.positions):
            for module, push in enumerate(modules):
                push.send_multipart(ncem_message(6, frame, module))
        assert job.wait() == 0, job.log.read_text()[-3000:]
        # A module's sector sent to the other lane's gateway is not that lane's to count.
        modules[0].close()
        strays = _lane_producer(context, laned, 1)
        strays.send_multipart(ncem_message(8, 0, 0))
        eventually(lambda: "wrong_lane" in _metrics_text(laned.lanes[1]), timeout_s=30,
                   what="lane 1 to drop module 0's sector")
    finally:
        context.destroy(linger=0)
    [result] = job.result_lines()
    assert (result["scan"], result["status"]) == (6, "complete")
    assert _counted(Path(str(result["path"]))) == EVERY_SECTOR
    half = len(EVERY_SECTOR) // 2
    assert [gateway.forwarded() for gateway in gateways] == [half, half]


def _metrics_text(lane: Lane) -> str:
    with urllib.request.urlopen(f"http://{lane.metrics}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def test_a_lane_whose_gateway_restarted_mid_scan_still_ends_the_scan_every_sector_accounted(
        laned: LanedSite, gateways: list[GatewayProcess]) -> None:
    """Lane 0's gateway is killed mid-lane and restarted (its journal restores the lane, and
    announces it to the ranks again); lane 1's carries on. Contract-only producers."""
    job = laned.site.job("job", "--scans", "1")
    context = zmq.Context()
    restarted = None
    try:
        first, second = (_lane_producer(context, laned, lane) for lane in range(LANES))
        for lane, push in enumerate((first, second)):
            _begin_lane(push, 7, lane)
        lane0, lane1 = _lane_sectors((0, 1)), _lane_sectors((2, 3))
        cut = len(lane0) * 3 // 10
        send_sectors(first, 7, lane0[:cut])
        eventually(lambda: gateways[0].forwarded() >= cut, timeout_s=60, what="30% of lane 0")
        _kill_and_see_the_break(gateways[0], first)
        restarted = laned.lanes[0].start()
        send_sectors(first, 7, lane0[cut:], cut)
        first.send(encode(ScanEnd(v=1, scan=7, sent=len(lane0))))
        send_sectors(second, 7, lane1)
        second.send(encode(ScanEnd(v=1, scan=7, sent=len(lane1))))
        assert job.wait() == 0, job.log.read_text()[-3000:]
    finally:
        context.destroy(linger=0)
        if restarted is not None:
            restarted.kill()
    [result] = job.result_lines()
    counted = _counted(Path(str(result["path"])))
    # What lane 0's first gateway held when it died is missing, and listed; the rest is counted.
    assert counted >= set(lane1)
    assert result["received_sectors"] == len(counted)
    assert result["received_sectors"] + result["lost_sectors"] == len(EVERY_SECTOR)
    assert result["expected_sectors"] == len(EVERY_SECTOR)
    assert result["status"] == ("complete" if counted == EVERY_SECTOR else "partial")


async def test_a_scan_naming_lanes_is_refused_in_a_session_the_control_plane_opened(
        served: tuple[ControlPlane, str, Path], tmp_path: Path) -> None:
    """The control plane places a session on one gateway: a scan there naming lanes would leave
    the ranks waiting for lanes nothing carries, so its gateway refuses it, and says why."""
    cp, metrics, _ = served
    await cp.create_project("alpha")
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    await eventually_async(lambda: "dsn_gateway_consumers" in metrics_text(metrics),
                           timeout_s=60, what="the gateway to serve")
    _, secret_file = create_keypair(tmp_path / "producer", "cam")

    def stream() -> None:
        with ProducerSession(Client(cp.settings.base_url, token), client=secret_file,
                             end_on_exit=True) as session:
            target = session.gateway()
            assert target.receipts is not None
            with session.producer(send_timeout_s=30) as producer:
                producer.begin_scan(1, (2, 2), 1, lane=(0, 2))
                producer.end_scan()
            with ReceiptClient(target.receipts, target.server_public, target.client) as receipts:
                with pytest.raises(ProducerError, match=r"refused scan 1 \(no_lanes\)"):
                    await_report(receipts, 1, timeout_s=30)
    await asyncio.to_thread(stream)


@pytest.fixture
async def two_gateways(tmp_path: Path, free_port: Callable[[], int]) -> AsyncIterator[Site]:
    """A control plane on a real port (jobs reach it) admitting gateways ``east`` and ``west``,
    both running, with no configured gateway to fall back to."""
    port = free_port()
    state_dir, clock = tmp_path / "state", ManualClock()
    gateways = await admitting_east_and_west(state_dir, clock, free_port)
    async with served_on(port) as serve:
        cp = await start_cp(serve, state_dir, clock=clock, port=port, reconcile_s=0.2,
                            gateway_fallback=False)
        site = Site(cp, gateways, tmp_path / "spool", free_port, serve)
        try:
            for name in gateways:
                site.start(name, capacity=4)
            await site.registered(*gateways)
            yield site
        finally:
            site.stop()


def _facility(token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A ``dsn`` command with the project token in the environment, as a user runs it."""
    return subprocess.run([DSN, *args], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "DSN_PROJECT_TOKEN": token})


def _refused_off_its_lane(lane: dict[str, Any], client: KeyPair) -> None:
    server = lane["server_key"].encode()
    context = zmq.Context()
    try:
        push = contract_producer(context, client, server, lane["endpoint"], linger_ms=5000)
        with ReceiptClient(lane["receipts_endpoint"], server, client) as receipts:
            for scan, named in ((7, {}), (8, {"lane": 0, "lanes": LANES})):
                push.send(encode(ScanBegin(v=1, scan=scan, scan_shape=(4, 4),
                                           frame_shape=(576, 576), sectors=4, producers=1,
                                           dtype="uint16", **named)))
                with pytest.raises(ProducerError, match=rf"refused scan {scan} \(wrong_lane\)"):
                    await_report(receipts, scan, timeout_s=30)
        push.close()
    finally:
        context.destroy(linger=0)


async def test_a_session_the_control_plane_splits_over_two_gateways_is_counted_whole(
        two_gateways: Site, tmp_path: Path) -> None:
    """``dsn sessions open --lanes 2``: the control plane places lane 0 on east and lane 1 on
    west, each told its lane; a consumer job registers once and both gateways connect to its
    ranks; ``dsn producer stream --session`` streams each producer to its lane's gateway (SDK and
    NCEM headers alike), each gateway's receipt accounts for its lane, and the ranks write each
    scan counting every sector (and report it once)."""
    site = two_gateways
    cp = site.cp
    await cp.create_project("alpha")
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    public, secret = create_keypair(tmp_path / "producer", "cam")
    opened = await asyncio.to_thread(_facility, token, "sessions", "open", "--controlplane",
                                     cp.url, "--client-key", str(public), "--lanes", "2",
                                     "--json")
    assert opened.returncode == 0, opened.stderr
    session = json.loads(opened.stdout)
    east, west = site.gateways["east"], site.gateways["west"]
    assert [(lane["name"], lane["endpoint"]) for lane in session["lanes"]] == [
        ("east", east.ingress), ("west", west.ingress)]
    other, _ = create_keypair(tmp_path / "producer", "other")
    table = await asyncio.to_thread(_facility, token, "sessions", "open", "--controlplane",
                                    cp.url, "--client-key", str(other), "--lanes", "2")
    assert f"{east.keys.public.decode()}; {west.keys.public.decode()}" in table.stdout, \
        table.stdout + table.stderr
    shown = await asyncio.to_thread(_facility, token, "sessions", "show", session["id"],
                                    "--controlplane", cp.url)
    assert f"lane 0: {east.ingress} (east); lane 1: {west.ingress} (west)" in shown.stdout, \
        shown.stdout + shown.stderr
    base = f"/api/v1/sessions/{session['id']}"
    response = await cp.call("POST", f"{base}/jobs", token, json={
        "template": "local-mpiexec", "ranks": RANKS, "params": {"scans": 2}})
    assert response.status == 202, await response.text()
    job_path = response.headers["Location"]
    job_log = cp.settings.jobs_dir / (await response.json())["id"] / "job.log"
    await poll(cp, token, base, lambda s: s["counters"]["live_consumers"] == RANKS)
    serving = f'dsn_gateway_consumers{{session="{session["id"]}"}} {float(RANKS)}'
    for gateway in (east, west):
        await eventually_async(lambda g=gateway: asyncio.to_thread(g.shows, serving),
                               timeout_s=30, what=f"{gateway.name} serving the session's ranks")

    # The SDK's producers, then the camera's NCEM module streams, which name no lane: each
    # gateway opens its NCEM scans as the lane the control plane told it it carries.
    for scan, header in ((1, "native"), (2, "ncem")):
        streamed = await asyncio.to_thread(
            _facility, token, "producer", "stream", "--controlplane", cp.url, "--session",
            session["id"], "--client-key", str(secret), "--scan", str(scan), "--scan-shape",
            "4x4", "--header", header, "--no-progress")
        assert streamed.returncode == 0, streamed.stdout + streamed.stderr
        assert f"2 lanes: gateways {east.ingress}, {west.ingress}" in streamed.stdout
        for lane in range(LANES):
            assert f"gateway: scan {scan} lane {lane} of 2 forwarded: 32 sent, 32 forwarded, " \
                   "0 spooled, 0 lost" in streamed.stdout, streamed.stdout

    # A producer that follows only the contract, sending lane 1's gateway a scan_begin that
    # names no lane (or lane 0's): refused, and its receipt says why; the job is not disturbed.
    await asyncio.to_thread(_refused_off_its_lane, session["lanes"][1],
                            load_secret_keypair(secret))

    await finished(cp, token, job_path, job_log)
    listed = await (await cp.call("GET", f"/api/v1/scans?session={session['id']}", token)).json()
    assert sorted((r["scan"], r["status"], r["frames"], r["expected_sectors"],
                   r["received_sectors"], r["lost_sectors"], r["lane"])
                  for r in listed["items"]) == [
        (scan, "complete", 16, 64, 64, 0, 0) for scan in (1, 2)]
    for result in listed["items"]:
        with h5py.File(result["path"]) as output:
            assert output["metadata/stream"].attrs["lanes"] == 2


async def test_each_lane_of_a_scan_without_consumers_is_spooled_and_reported_by_its_gateway(
        two_gateways: Site, tmp_path: Path) -> None:
    """No consumer yet: each lane's gateway spools its part and reports it to the control plane,
    which records both (one result per lane); the spools are replayed as one scan, but not into
    a session of several lanes."""
    site = two_gateways
    cp = site.cp
    await cp.create_project("alpha")
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    _, secret = create_keypair(tmp_path / "producer", "cam")
    streamed = await asyncio.to_thread(
        _facility, token, "producer", "stream", "--controlplane", cp.url, "--lanes", "2",
        "--client-key", str(secret), "--scan", "2", "--scan-shape", "2x2", "--no-progress")
    assert streamed.returncode == 0, streamed.stdout + streamed.stderr
    spools = re.findall(r"gateway: spooled to (\S+);", streamed.stdout)
    assert len(spools) == LANES, streamed.stdout
    session = re.search(r"^session (s[0-9a-f]+) ", streamed.stdout, re.MULTILINE)
    assert session is not None, streamed.stdout

    async def reported() -> list[Any]:
        listed = await (await cp.call("GET", f"/api/v1/scans?session={session.group(1)}",
                                      token)).json()
        assert len(listed["items"]) == LANES, listed
        return list(listed["items"])

    results = await eventually_async(reported, timeout_s=30, what="both lanes' reports")
    assert sorted((r["lane"], r["source"], r["status"], r["spooled_sectors"], r["path"])
                  for r in results) == [
        (lane, "gateway", "spooled", 8, path) for lane, path in enumerate(spools)]

    replayed = await asyncio.to_thread(
        _facility, token, "producer", "stream", "--controlplane", cp.url, "--session",
        session.group(1), "--client-key", str(secret), "--spool", spools[0], "--spool",
        spools[1], "--no-progress")
    assert replayed.returncode == 1
    assert "the session has 2 lanes; a spool is replayed as one lane" in replayed.stderr
    # Into a session of one lane (opened by the command) both lanes' spools go as one scan.
    _, other = create_keypair(tmp_path / "producer", "replayer")
    replayed = await asyncio.to_thread(
        _facility, token, "producer", "stream", "--controlplane", cp.url, "--client-key",
        str(other), "--spool", spools[0], "--spool", spools[1], "--no-progress")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert re.search(r"gateway: scan 2 spooled \(no_consumers\): 16 sent, 0 forwarded, 16 spooled",
                     replayed.stdout), replayed.stdout
