"""The deployment files: the systemd units pass ``systemd-analyze verify`` and sandbox the
services; the gateway's example configuration loads, and a gateway started from a configuration
file alone follows the sessions of a control plane started from its own."""

from __future__ import annotations

import configparser
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from test_cp_cli import DSN, dsn
from test_cp_config import REPO, serving_config, settings_from, write
from waiting import eventually

from common.config import load_config
from common.ports import free_ports

UNITS = REPO / "deploy" / "systemd"
INSTALLED_DSN = "/opt/dsn/venv/bin/dsn"
SANDBOX = {
    "User": "dsn", "ProtectSystem": "strict", "ProtectHome": "true", "PrivateTmp": "true",
    "NoNewPrivileges": "true", "CapabilityBoundingSet": "",
    "SystemCallFilter": "@system-service", "Restart": "on-failure",
}


def _unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys keep case
    parser.read(UNITS / name)
    return parser


@pytest.mark.parametrize("name", ["dsn-controlplane.service", "dsn-gateway.service"])
def test_the_systemd_units_verify(tmp_path: Path, name: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here: the units are not verified")
    text = (UNITS / name).read_text()
    assert INSTALLED_DSN in text
    # verify checks that ExecStart's program exists: point it at this installation's dsn.
    copy = tmp_path / name
    copy.write_text(text.replace(INSTALLED_DSN, DSN))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            check=False, timeout=60)
    # Unknown or misspelt keys are only warnings: any output at all is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), result


@pytest.mark.parametrize(("name", "config", "state_dir"), [
    ("dsn-controlplane.service", "controlplane.yaml", "dsn"),
    ("dsn-gateway.service", "gateway.yaml", "dsn-gateway"),
])
def test_the_units_run_a_dedicated_user_in_a_sandbox_from_their_config_file(
        name: str, config: str, state_dir: str) -> None:
    service = _unit(name)["Service"]
    for key, value in SANDBOX.items():
        assert service.get(key) == value, key
    assert set(service["RestrictAddressFamilies"].split()) <= {"AF_UNIX", "AF_INET", "AF_INET6",
                                                               "AF_NETLINK"}
    assert (service["StateDirectory"], service["ConfigurationDirectory"]) == (state_dir, "dsn")
    assert service["ExecStart"].endswith(f"--config /etc/dsn/{config}")


def test_the_control_plane_unit_may_write_the_jobs_dir_of_the_example() -> None:
    settings = settings_from("--config", str(REPO / "deploy" / "controlplane.yaml"))
    service = _unit("dsn-controlplane.service")["Service"]
    assert str(settings.jobs_dir) in service["ReadWritePaths"].split()
    assert settings.state_dir == Path("/var/lib") / service["StateDirectory"]


def test_the_shipped_gateway_example_loads_in_control_plane_mode() -> None:
    config = load_config(REPO / "deploy" / "gateway.yaml")
    link = config.gateway.controlplane
    assert link is not None and config.sessions == []
    controlplane = settings_from("--config", str(REPO / "deploy" / "controlplane.yaml"))
    # The two examples describe one site: the gateway follows the control plane's state service
    # and listens where the control plane sends producers.
    assert (link.state_snapshots, link.state_updates) == controlplane.state_endpoints
    assert config.gateway.ingress == controlplane.gateway_endpoint
    assert config.gateway.receipts_endpoint == controlplane.gateway_receipts


@pytest.mark.timeout(90)
def test_a_gateway_follows_the_control_plane_from_its_configuration_file_alone(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert dsn("admin", "init", "--state-dir", str(state)).exit_code == 0
    port, snapshot, updates, ingress, metrics = free_ports(5)
    cp_config = write(tmp_path / "cp", f"""\
state_dir: ../state
port: {port}
gateway:
  endpoint: tcp://127.0.0.1:{ingress}
state_endpoints:
  snapshot: tcp://127.0.0.1:{snapshot}
  updates: tcp://127.0.0.1:{updates}
""")
    gw_config = write(tmp_path / "gw", f"""\
version: 1
gateway:
  ingress: tcp://127.0.0.1:{ingress}
  server_secret_key_file: ../state/keys/server.key_secret
  spool_dir: spool
  metrics: 127.0.0.1:{metrics}
  controlplane:
    state_snapshots: tcp://127.0.0.1:{snapshot}
    state_updates: tcp://127.0.0.1:{updates}
    state_key_file: ../state/keys/state.key
sessions: []
""")
    with serving_config(cp_config, tmp_path / "serve.log", f"http://127.0.0.1:{port}"):
        gateway = subprocess.Popen([DSN, "gateway", "run", "--config", str(gw_config)],
                                   stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        try:
            # Metrics answer once the first snapshot of the sessions is in and forwarding starts.
            outcome = eventually(lambda: _metrics_up(f"127.0.0.1:{metrics}", gateway), timeout_s=30,
                                 what="the gateway to sync and serve metrics")
        finally:
            gateway.send_signal(signal.SIGTERM)
            _, stderr = gateway.communicate(timeout=20)
        assert (outcome, gateway.returncode) == ("up", 0), stderr
        assert f'"ingress": "tcp://127.0.0.1:{ingress}"' in stderr
        assert (tmp_path / "gw" / "spool").is_dir()  # relative to the file, not the cwd


def _metrics_up(address: str, process: subprocess.Popen[str]) -> str | None:
    if process.poll() is not None:
        return "exited"
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=1) as answer:
        return "up" if answer.status == 200 else None


def test_a_gateway_file_naming_the_control_plane_may_hold_no_sessions(tmp_path: Path) -> None:
    config = write(tmp_path, """\
version: 1
gateway:
  server_secret_key_file: k
  controlplane: {state_snapshots: "tcp://127.0.0.1:1", state_updates: "tcp://127.0.0.1:2",
                 state_key_file: s}
sessions:
  - id: s1
    client_keys: ["rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"]
    allowed_networks: [127.0.0.0/8]
    allowed_targets: [127.0.0.0/8]
    consumers: []
""", "gateway.yaml")
    result = subprocess.run([DSN, "gateway", "run", "--config", str(config)],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2
    assert f"error: {config}: " in result.stderr
    assert "sessions come from the control plane; leave sessions empty" in result.stderr
