"""The DSN configuration schema: a valid file loads, and every bad value is named in the error."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq

from common.config import MAX_DEFAULT_IO_THREADS, ConfigError, load_config, parse_config

CLIENT_KEY = zmq.curve_keypair()[0].decode()


def _config() -> dict[str, Any]:
    return {
        "version": 1,
        "gateway": {"ingress": "tcp://127.0.0.1:5555",
                    "server_secret_key_file": "server.key_secret"},
        "sessions": [{
            "id": "scan-42",
            "client_keys": [CLIENT_KEY],
            "allowed_networks": ["127.0.0.0/8", "::1/128"],
            "allowed_targets": ["127.0.0.0/8"],
            "consumers": ["tcp://127.0.0.1:6001", "tcp://127.0.0.1:6002"],
            "expires_at": "2030-01-01T00:00:00Z",
        }],
    }


def _error(change: Any) -> str:
    data = _config()
    change(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_valid_config_loads_with_defaults_and_resolves_key_path(tmp_path: Path) -> None:
    path = tmp_path / "dsn.yaml"
    path.write_text(yaml.safe_dump(_config()))
    config = load_config(path)
    session = config.session("scan-42")
    assert session.detector.frame_shape == (576, 576) and session.detector.sector_bytes == 165_888
    assert session.limits.hwm >= 1
    assert config.gateway.server_secret_key_file == tmp_path / "server.key_secret"
    assert session.admits("127.0.0.9") and session.admits("::ffff:127.0.0.1")
    assert not session.admits("10.0.0.1") and not session.admits("not-an-ip")


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["sessions"][0].update(allowed_networks=["127.0.0.1/8"]), "host bits set"),
    (lambda d: d["sessions"][0].update(allowed_networks=["::ffff:10.0.0.0/104"]), "IPv4-mapped"),
    (lambda d: d["sessions"][0].update(allowed_networks=[2130706432]), "allowed_networks.0"),
    (lambda d: d["sessions"][0].update(allowed_targets=["10.0.0.0/8"]), "outside allowed_targets"),
    (lambda d: d["sessions"][0].update(consumers=["tcp://127.0.0.1:0"]), "port 0"),
    (lambda d: d["sessions"][0].update(consumers=["tcp://127.0.0.1:65536"]), "port 65536"),
    (lambda d: d["sessions"][0].update(consumers=["tcp://node01:6001"]), "an IP literal"),
    (lambda d: d["sessions"][0].update(consumers=["tcp://*:6001"]), "wildcard"),
    (lambda d: d["sessions"][0].update(consumers=["tcp://127.0.0.1:1", "tcp://127.0.0.1:1"]),
     "twice"),
    (lambda d: d["sessions"][0].update(client_keys=["short"]), "Z85"),
    (lambda d: d["sessions"][0].update(id="../etc"), "sessions.0.id"),
    (lambda d: d["sessions"][0].update(limits={"hwm": 0}), "limits.hwm"),
    (lambda d: d["sessions"][0].update(limits={"hwm": "10"}), "limits.hwm"),
    (lambda d: d["sessions"][0].update(detector={"sectors": 5}), "not a multiple"),
    (lambda d: d["sessions"][0].update(expires_at="2030-01-01T00:00:00"), "expires_at"),
    (lambda d: d["sessions"][0].update(surprise=1), "sessions.0.surprise"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["sessions"].append(copy.deepcopy(d["sessions"][0])), "share an id"),
])
def test_bad_values_are_named(change: Any, expected: str) -> None:
    assert expected in _error(change)


def test_a_client_key_cannot_serve_two_sessions() -> None:
    def change(d: dict[str, Any]) -> None:
        other = copy.deepcopy(d["sessions"][0])
        other["id"] = "other"
        d["sessions"].append(other)
    assert "more than one session" in _error(change)


def test_unreadable_oversized_and_non_yaml_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(ConfigError, match="limit"):
        load_config(big)
    bad = tmp_path / "bad.yaml"
    bad.write_text("sessions: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("!!python/object/apply:os.system ['true']")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(unsafe)


@pytest.mark.parametrize("network, expected", [
    ("fe80::%eth0/64", "scoped IPv6"),
    ("10.0.0.0/255.0.0.0", "canonical form: 10.0.0.0/8"),
    ("10.0.0.0/0.255.255.255", "canonical form: 10.0.0.0/8"),
    ("10.0.0.1", "canonical form: 10.0.0.1/32"),
])
def test_networks_must_be_written_in_canonical_prefix_form(network: str, expected: str) -> None:
    assert expected in _error(lambda d: d["sessions"][0].update(allowed_networks=[network]))


def test_an_endpoint_with_a_trailing_newline_is_refused() -> None:
    assert "tcp://IP:PORT" in _error(
        lambda d: d["sessions"][0].update(consumers=["tcp://127.0.0.1:6001\n"]))


def test_a_session_may_start_without_consumers() -> None:
    data = _config()
    data["sessions"][0]["consumers"] = []
    assert parse_config(data).sessions[0].consumers == []


@pytest.mark.parametrize("text, expected", [
    ("version: 1\nversion: 1\n", "duplicate key 'version'"),
    ("a: &x [1]\nb: *x\n", "aliases are not allowed"),
])
def test_config_files_refuse_repeated_keys_and_aliases(tmp_path: Path, text: str,
                                                       expected: str) -> None:
    path = tmp_path / "dsn.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_the_gateway_decrypts_on_one_io_thread_per_core_unless_told(tmp_path: Path) -> None:
    base = {"version": 1, "sessions": [],
            "gateway": {"server_secret_key_file": str(tmp_path / "k")}}
    default = parse_config(base).gateway
    assert default.io_threads is None
    assert default.io_thread_count == min(os.cpu_count() or 1, MAX_DEFAULT_IO_THREADS)
    told = parse_config({**base, "gateway": {**base["gateway"], "io_threads": 3}}).gateway
    assert told.io_thread_count == 3
    for bad in (0, 65, "4"):
        with pytest.raises(ConfigError, match="io_threads"):
            parse_config({**base, "gateway": {**base["gateway"], "io_threads": bad}})


@pytest.mark.parametrize("setting", ["ingress_buffer_bytes", "egress_buffer_bytes"])
def test_socket_buffers_are_the_kernels_unless_set_within_bounds(tmp_path: Path,
                                                                 setting: str) -> None:
    base = {"version": 1, "sessions": [],
            "gateway": {"server_secret_key_file": str(tmp_path / "k")}}
    assert getattr(parse_config(base).gateway, setting) is None
    told = parse_config({**base, "gateway": {**base["gateway"], setting: 4 << 20}}).gateway
    assert getattr(told, setting) == 4 << 20
    for bad in (4096, (1 << 30) + 1, "4194304", 1.5):
        with pytest.raises(ConfigError, match=setting):
            parse_config({**base, "gateway": {**base["gateway"], setting: bad}})


def test_a_gateways_lane_of_ncem_scans_is_none_unless_a_lane_below_its_count(
        tmp_path: Path) -> None:
    base = {"version": 1, "sessions": [],
            "gateway": {"server_secret_key_file": str(tmp_path / "k")}}
    assert parse_config(base).gateway.ncem_lane is None
    lane = parse_config({**base, "gateway": {**base["gateway"],
                                             "ncem_lane": {"lane": 1, "lanes": 4}}}).gateway
    assert lane.ncem_lane is not None and (lane.ncem_lane.lane, lane.ncem_lane.lanes) == (1, 4)
    for bad, says in (({"lane": 2, "lanes": 2}, "lanes count from 0"),
                      ({"lane": 0, "lanes": 1}, "lanes"), ({"lane": 0, "lanes": 65}, "lanes"),
                      ({"lane": -1, "lanes": 2}, "lane"), ({"lane": 0}, "lanes"),
                      ({"lane": 0, "lanes": 2, "modules": [0]}, "modules")):
        with pytest.raises(ConfigError, match=says):
            parse_config({**base, "gateway": {**base["gateway"], "ncem_lane": bad}})
