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

from common.config import ConfigError, load_config
from common.keys import KeyPair, create_keypair, load_keypair
from common.protocol import Data, ScanBegin, encode
from gateway.cli import Overrides, _gateway_only_config, _gateway_settings, _state_servers, gateway

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
    assert (start["mode"], start["sessions"], start["ncem_lane"]) == ("l7", 1, None)
    assert start["receipts"].startswith("tcp://127.0.0.1:")
    # Sessions and scans come and go in the log, with what became of each scan.
    said = [(e["event"], e.get("session"), e.get("scan")) for e in events]
    assert ("session added", "cli", None) in said and ("scan opened", "cli", 1) in said
    assert ("scan interrupted: a consumer left mid-scan", "cli", 1) in said
    assert stop["event"] == "stop"
    assert stop["counters"]["sessions"]["cli"]["messages"] == 1
    # The consumer went away (closed) while scan 1 was open: what it had been forwarded is listed.
    assert stop["counters"]["drops"] == {"cli/malformed_header": 1, "cli/consumer_gone": 1}
    assert server.secret.decode() not in stderr and client.secret.decode() not in stderr


def _state_key(path: Path) -> Path:
    """A state service's public key file, as a control plane writes it."""
    public, _ = create_keypair(path.parent, path.stem)
    return public


def test_each_replica_state_service_is_paired_with_its_key(tmp_path: Path) -> None:
    a, b = _state_key(tmp_path / "a.key"), _state_key(tmp_path / "b.key")
    endpoints = ("tcp://10.0.0.5:8751,tcp://10.0.0.5:8752", "tcp://10.0.0.6:8751,tcp://10.0.0.6:8752")
    servers = _state_servers(None, endpoints, (a, b))
    assert [s.endpoints.updates for s in servers] == ["tcp://10.0.0.5:8752", "tcp://10.0.0.6:8752"]
    assert [s.server_key for s in servers] == [load_keypair(a).public, load_keypair(b).public]
    # One key for all: replicas that share one state key pair.
    shared = _state_servers(None, endpoints, (a,))
    assert {s.server_key for s in shared} == {load_keypair(a).public}


def test_a_configuration_file_lists_replicas_with_keys_relative_to_it(tmp_path: Path) -> None:
    _state_key(tmp_path / "a.key"), _state_key(tmp_path / "b.key")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "sessions": [], "gateway": {
        "server_secret_key_file": "server.key_secret", "controlplane": {
            "state_snapshots": "tcp://10.0.0.5:8751", "state_updates": "tcp://10.0.0.5:8752",
            "state_key_file": "a.key", "replicas": [{
                "state_snapshots": "tcp://10.0.0.6:8751", "state_updates": "tcp://10.0.0.6:8752",
                "state_key_file": "b.key"}]}}}))
    servers = _state_servers(load_config(path).gateway.controlplane, (), ())
    assert [s.endpoints.snapshot for s in servers] == ["tcp://10.0.0.5:8751", "tcp://10.0.0.6:8751"]
    assert servers[1].server_key == load_keypair(tmp_path / "b.key").public


@pytest.mark.parametrize(("endpoints", "keys", "message"), [
    (2, 3, "2 --controlplane-state and 3 --state-key: give one key per state service"),
    (1, 0, "--controlplane-state needs --state-key"),
])
def test_state_services_and_keys_that_do_not_pair_are_one_clear_error(
        tmp_path: Path, endpoints: int, keys: int, message: str) -> None:
    args = ["run", "--key", str(tmp_path / "server.key_secret")]
    for n in range(endpoints):
        ports = (8751 + 2 * n, 8752 + 2 * n)
        args += ["--controlplane-state", ",".join(f"tcp://127.0.0.1:{p}" for p in ports)]
    for n in range(keys):
        args += ["--state-key", str(_state_key(tmp_path / f"{n}.key"))]
    result = CliRunner().invoke(gateway, args)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {message}")


def test_the_same_state_service_twice_is_refused(tmp_path: Path) -> None:
    twice = "tcp://127.0.0.1:8751,tcp://127.0.0.1:8752"
    with pytest.raises(ConfigError, match="the same state service is named twice"):
        _state_servers(None, (twice, twice), (_state_key(tmp_path / "a.key"),))


def test_control_plane_mode_keeps_the_files_tuning_and_takes_the_flags(tmp_path: Path) -> None:
    """The file's gateway settings (buffers, I/O threads) hold in control-plane mode too; the
    flags given override only what they name."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "sessions": [], "gateway": {
        "server_secret_key_file": "server.key_secret", "io_threads": 3,
        "ingress_buffer_bytes": 1 << 20, "egress_buffer_bytes": 4 << 20}}))
    settings = _gateway_only_config(load_config(path), path, Overrides(
        None, "tcp://127.0.0.1:16000", None, None, None, None)).gateway
    assert (settings.io_threads, settings.ingress_buffer_bytes,
            settings.egress_buffer_bytes) == (3, 1 << 20, 4 << 20)
    assert settings.ingress == "tcp://127.0.0.1:16000"



def test_a_static_configurations_gateway_settings_take_the_flags_given(tmp_path: Path) -> None:
    """One file serves several gateways of a session (its lanes): each takes its own key,
    ingress, receipts, spool directory and NCEM lane as flags, the rest from the file."""
    path = tmp_path / "dsn.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "sessions": [], "gateway": {
        "server_secret_key_file": "server.key_secret", "io_threads": 3,
        "ingress": "tcp://127.0.0.1:16000", "receipts": "tcp://127.0.0.1:16001"}}))
    file = load_config(path).gateway.model_dump(mode="json")
    settings = _gateway_settings(file, Overrides(tmp_path / "lane1.key_secret",
                                                 "tcp://127.0.0.1:16010", "tcp://127.0.0.1:16011",
                                                 None, tmp_path / "spool1", "1/2"))
    assert (settings.ingress, settings.receipts, settings.spool_dir, settings.io_threads) == (
        "tcp://127.0.0.1:16010", "tcp://127.0.0.1:16011", tmp_path / "spool1", 3)
    assert settings.server_secret_key_file == tmp_path / "lane1.key_secret"
    assert settings.ncem_lane is not None
    assert (settings.ncem_lane.lane, settings.ncem_lane.lanes) == (1, 2)
    untouched = _gateway_settings(file, Overrides(None, None, None, None, None, None))
    assert untouched.ncem_lane is None
    assert untouched.server_secret_key_file == tmp_path / "server.key_secret"


@pytest.mark.parametrize("lane, says", [
    ("1", "--ncem-lane: expected LANE/LANES such as 0/2, got '1'"),
    ("-1/2", "--ncem-lane: expected LANE/LANES"),
    ("2/2", "lanes count from 0"),
    ("0/1", "ncem_lane.lanes"),
])
def test_a_bad_ncem_lane_flag_is_one_clear_line_and_exit_2(tmp_path: Path, lane: str,
                                                           says: str) -> None:
    path = tmp_path / "dsn.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "sessions": [],
                                    "gateway": {"server_secret_key_file": "x"}}))
    result = CliRunner().invoke(gateway, ["run", "--config", str(path), "--ncem-lane", lane])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and says in line


def test_control_plane_flags_are_refused_in_static_mode(tmp_path: Path) -> None:
    path = tmp_path / "dsn.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "sessions": [],
                                    "gateway": {"server_secret_key_file": "x"}}))
    result = CliRunner().invoke(gateway, ["run", "--config", str(path), "--capacity", "3"])
    assert result.exit_code == 2
    assert "apply only in control-plane mode" in result.output


def test_an_ncem_lane_is_refused_in_control_plane_mode(tmp_path: Path) -> None:
    _, secret = create_keypair(tmp_path, "gateway")
    result = CliRunner().invoke(gateway, [
        "run", "--controlplane-state", "tcp://127.0.0.1:1,tcp://127.0.0.1:2", "--state-key",
        str(_state_key(tmp_path / "state.key")), "--key", str(secret), "--ncem-lane", "1/2"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: gateway.ncem_lane (--ncem-lane): the control plane tells each "
                           "gateway which lane of a session it carries")
