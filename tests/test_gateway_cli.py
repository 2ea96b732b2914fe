"""``dsn gateway``: keygen, clear errors for bad configurations, and a real run ended by SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
import zmq
from click.testing import CliRunner
from waiting import eventually

from common.keys import KeyPair, load_keypair
from common.protocol import Data, ScanBegin, encode
from gateway.cli import gateway

DSN = str(Path(sys.executable).parent / "dsn")


def test_keygen_writes_a_private_key_pair_and_prints_the_public_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(gateway, ["keygen", "--out", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    secret_file = tmp_path / "k" / "server.key_secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert result.output.strip() == load_keypair(secret_file).public.decode()
    again = CliRunner().invoke(gateway, ["keygen", "--out", str(tmp_path / "k")])
    assert again.exit_code == 2 and "refusing to overwrite" in again.output


def test_a_bad_configuration_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "dsn.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "sessions": [],
                                    "gateway": {"ingress": "udp://nowhere",
                                                "server_secret_key_file": "x"}}))
    result = CliRunner().invoke(gateway, ["run", "--config", str(path)])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {path}: gateway.ingress") and "udp://nowhere" in line


def _metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as response:
        return response.read().decode()  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_run_serves_metrics_logs_json_and_stops_on_sigterm(
        tmp_path: Path, zmq_context: zmq.Context, free_port: Callable[[], int],
        server_key_files: tuple[KeyPair, Path], curve_keypair: Callable[[], KeyPair]) -> None:
    server, secret_file = server_key_files
    client = curve_keypair()
    consumer = zmq_context.socket(zmq.PULL)
    port = consumer.bind_to_random_port("tcp://127.0.0.1")
    ingress, metrics = f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = tmp_path / "dsn.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "gateway": {
        "ingress": ingress, "server_secret_key_file": str(secret_file)}, "sessions": [{
            "id": "cli", "client_keys": [client.public.decode()],
            "allowed_networks": ["127.0.0.0/8"], "allowed_targets": ["127.0.0.0/8"],
            "consumers": [f"tcp://127.0.0.1:{port}"],
            "detector": {"frame_shape": [8, 4], "sectors": 2}}]}))
    process = subprocess.Popen([DSN, "gateway", "run", "--config", str(config),
                                "--metrics", metrics], stderr=subprocess.PIPE, text=True)
    producer = zmq_context.socket(zmq.PUSH)
    try:
        eventually(lambda: _metrics(metrics), timeout_s=30, what="the metrics page",
                   interval_s=0.05)
        producer.curve_publickey, producer.curve_secretkey = client.public, client.secret
        producer.curve_serverkey = server.public
        producer.connect(ingress)
        producer.send(encode(ScanBegin(v=1, scan=1, scan_shape=(2, 2), frame_shape=(8, 4),
                                       sectors=2, producers=1, dtype="uint16")))
        producer.send_multipart([encode(Data(v=1, scan=1, frame=0, sector=0, seq=0)),
                                 b"\0" * 32])
        producer.send_multipart([b"\xc1", b"\0" * 32])
        assert consumer.poll(10_000) and consumer.poll(10_000)

        def counted() -> bool:
            # The poll proves one message through, not that the gateway has counted the rest.
            text = _metrics(metrics)
            assert 'dsn_gateway_messages_total{session="cli"} 1.0' in text
            assert 'dsn_gateway_drops_total{reason="malformed_header",session="cli"} 1.0' in text
            return True

        eventually(counted, timeout_s=10, what="the message and the drop counted",
                   interval_s=0.05)
    finally:
        producer.close()
        consumer.close()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    events = [json.loads(line) for line in stderr.splitlines()]
    [start], stop = [e for e in events if e["event"] == "start"], events[-1]
    assert (start["mode"], start["sessions"]) == ("l7", 1)
    # Sessions and scans come and go in the log, with what became of each scan.
    said = [(e["event"], e.get("session"), e.get("scan")) for e in events]
    assert ("session added", "cli", None) in said and ("scan opened", "cli", 1) in said
    assert ("scan interrupted: a consumer left mid-scan", "cli", 1) in said
    assert stop["event"] == "stop"
    assert stop["counters"]["sessions"]["cli"]["messages"] == 1
    # The consumer went away (closed) while scan 1 was open: what it had been forwarded is listed.
    assert stop["counters"]["drops"] == {"cli/malformed_header": 1, "cli/consumer_gone": 1}
    assert server.secret.decode() not in stderr and client.secret.decode() not in stderr
