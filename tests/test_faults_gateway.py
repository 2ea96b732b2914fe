"""The gateway killed (SIGKILL) and restarted mid-scan, with real processes: a ``dsn gateway run``
process, a real ``mpiexec -n 2`` consumer job and four CURVE producers.

The producers reconnect by themselves and announce their open scan again, so the restarted gateway
forwards the rest of the scan and closes it. What was in flight when the gateway died is lost (the
producers' queues, up to their high-water mark each, and the socket buffers), and the accounting
stays exact: every sector of the scan is either counted in the output file or listed
in its loss manifest, and every frame's events equal the planted electrons of the sectors that
arrived.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import stempy.io
import yaml
import zmq
from test_consumer_mpi import RANKS, SESSION, _finish, _start
from waiting import eventually

from common.keys import KeyPair, create_keypair, load_keypair
from common.ports import free_port
from dataplane.producer import stream_synthetic
from dataplane.synthetic import CameraSpec, StreamPlan, SyntheticCamera
from dataplane.verify import expected_events

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.timeout(180)]

DSN = str(Path(sys.executable).parent / "dsn")
CAMERA = SyntheticCamera(CameraSpec(scan_shape=(24, 24), seed=11))
PLAN = StreamPlan(CAMERA.spec, producers=4, seed=11)
SECTORS = CAMERA.spec.sectors


class GatewayProcess:
    """``dsn gateway run --config`` as a child process, with its metrics address."""

    def __init__(self, config: Path, metrics: str, *options: str) -> None:
        self.metrics = metrics
        self.process = subprocess.Popen([DSN, "gateway", "run", "--config", str(config),
                                         *options], stderr=subprocess.PIPE, text=True)

    def forwarded(self) -> float:
        try:
            with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=1) as answer:
                text = answer.read().decode()
        except OSError:
            return 0.0
        found = re.search(rf'^dsn_gateway_messages_total{{session="{SESSION}"}} (\S+)$', text,
                          re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def alive(self) -> bool:
        """True while it runs; a gateway that exited fails the test with what it said."""
        if self.process.poll() is not None:
            _, stderr = self.process.communicate()
            pytest.fail(f"the gateway exited ({self.process.returncode}): {stderr[-2000:]}")
        return True

    def kill(self) -> str:
        """SIGKILL; what it had logged."""
        if self.process.poll() is None:
            self.process.kill()
        _, stderr = self.process.communicate(timeout=10)
        return stderr or ""

    def stop(self) -> dict[str, object]:
        """SIGTERM; the counters of its final log line."""
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=20)
        assert self.process.returncode == 0, stderr
        return dict(json.loads(stderr.splitlines()[-1])["counters"])


def _write_config(directory: Path, client_public: str, metrics: str) -> Path:
    config = {
        "version": 1,
        "gateway": {"ingress": f"tcp://127.0.0.1:{free_port()}",
                    "server_secret_key_file": str(directory / "keys" / "gateway.key_secret"),
                    "metrics": metrics, "spool_dir": None},
        "sessions": [{"id": SESSION, "client_keys": [client_public],
                      "allowed_networks": ["127.0.0.0/8"], "allowed_targets": ["127.0.0.0/8"],
                      "consumers": [f"tcp://127.0.0.1:{free_port()}" for _ in range(RANKS)],
                      "limits": {"hwm": 64}}],
    }
    path = directory / "dsn.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _lost_by_frame(path: Path) -> dict[int, set[int]]:
    with h5py.File(path) as f:
        pairs = f["metadata/stream/loss_manifest/frame_sector"][()]
    lost: dict[int, set[int]] = defaultdict(set)
    for frame, sector in pairs.tolist():
        lost[frame].add(sector)
    return lost


def test_a_gateway_killed_mid_scan_and_restarted_loses_only_what_was_in_flight_all_listed(
        tmp_path: Path) -> None:
    public, secret = zmq.curve_keypair()
    client = KeyPair(public, secret)
    create_keypair(tmp_path / "keys", "gateway")
    server = load_keypair(tmp_path / "keys" / "gateway.key").public
    metrics = f"127.0.0.1:{free_port()}"
    config = _write_config(tmp_path, public.decode(), metrics)
    endpoint = yaml.safe_load(config.read_text())["gateway"]["ingress"]
    results = tmp_path / "results.jsonl"
    job = _start(RANKS, config, tmp_path / "out", "--scans", "1", "--result-file", str(results))

    first = GatewayProcess(config, metrics)
    second: GatewayProcess | None = None
    try:
        with ThreadPoolExecutor(1) as pool:
            streaming = pool.submit(stream_synthetic, endpoint, server, client, CAMERA, PLAN, 1,
                                    progress=False, send_timeout_s=60)

            def a_quarter_forwarded() -> bool:
                # The consumer job starting slowly holds the stream back; one that died fails.
                if job.poll() is not None:
                    pytest.fail(f"the consumer job exited: {_finish(job, 1)[1][-2000:]}")
                return streaming.done() or (first.alive() and
                                            first.forwarded() >= PLAN.total_messages // 4)

            # A fine interval: the kill must land mid-scan, and the scan takes seconds at most.
            eventually(a_quarter_forwarded, timeout_s=90, what="a quarter of the scan forwarded",
                       interval_s=0.01)
            assert not streaming.done(), f"the stream ended early: {streaming.exception()!r}"
            first.kill()  # mid-scan: the producers block until a gateway is back
            assert not streaming.done(), "the scan ended before the gateway was killed"
            second = GatewayProcess(config, metrics)
            stats = streaming.result(timeout=60)
        try:
            code, log = _finish(job, timeout=60)
        except pytest.fail.Exception as failed:
            pytest.fail(f"{failed.msg}\nthe restarted gateway logged:\n{second.kill()[-4000:]}")
        counters = second.stop()
    finally:
        # On failure: nothing of this test outlives it (processes, pipes).
        for gateway in (first, second):
            if gateway is not None and gateway.process.returncode is None:
                gateway.kill()
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    assert code == 0, log[-3000:]

    # The restarted gateway took the scan up where the producers were, and closed it.
    [result] = [json.loads(line) for line in results.read_text().splitlines()]
    forwarded_again = counters["sessions"][SESSION]["messages"]  # type: ignore[index]
    assert 0 < forwarded_again < PLAN.total_messages
    path = Path(result["path"])
    lost = _lost_by_frame(path)
    lost_count = sum(len(s) for s in lost.values())
    # Exact: each sector is counted or listed, never both, never neither.
    assert result["received_sectors"] + lost_count == CAMERA.spec.positions * SECTORS
    assert result["lost_sectors"] == lost_count
    assert result["status"] == ("complete" if lost_count == 0 else "partial")
    print(f"gateway killed mid-scan: {CAMERA.spec.positions * SECTORS} sectors = "
          f"{result['received_sectors']} counted + {lost_count} listed lost (in flight); the "
          f"restarted gateway forwarded {forwarded_again}; 0 unaccounted")
    counted = stempy.io.load_electron_counts(str(path))
    for frame in range(CAMERA.spec.positions):
        events = np.sort(np.asarray(counted.data[frame][0], dtype=np.uint32))
        assert np.array_equal(events, expected_events(CAMERA, frame, lost.get(frame, set()))), \
            frame
    assert stats.messages == PLAN.total_messages
