"""``dsn controlplane serve --config FILE``: the service's settings from a YAML file, checked key
by key, under the options given and over the defaults; the shipped example for a site loads."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from click.testing import Result
from test_cp_cli import DSN, assert_one_line_error, dsn, running
from test_cp_sessions_api import TINY_JOB
from waiting import eventually

from common.ports import free_ports
from controlplane.cli import load_settings, serve
from controlplane.settings import DEFAULT_PORT, FILE_LAYOUT, Settings

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "controlplane.yaml"

GOOD = """\
state_dir: state
host: 127.0.0.2
port: 9000
public_url: https://dsn.facility.example
policy_path: policies
launcher:
  name: slurm
  slurm:
    timeout_s: 45
    sbatch_args: ["--partition=dsn", "--qos=high"]
  local:
    grace_s: 3
jobs_dir: /shared/dsn/jobs
lease_s: 12
drain_s: 90
gateway:
  endpoint: tcp://198.51.100.10:6555
  key_file: keys/gateway.key
state_endpoints:
  snapshot: tcp://10.0.0.5:8761
  updates: tcp://10.0.0.5:8762
audit:
  checkpoint_file: ../audit/checkpoints.jsonl
  checkpoint_s: 2.5
"""


def settings_from(*args: str) -> Settings:
    """The Settings ``dsn controlplane serve ARGS`` would serve with."""
    ctx = serve.make_context("serve", list(args))
    return load_settings(ctx, ctx.params["config_path"])


def write(directory: Path, text: str, name: str = "controlplane.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def serve_with(config: Path, *options: str) -> Result:
    return dsn("controlplane", "serve", "--config", str(config), *options)


def test_a_good_file_sets_every_kind_of_setting_with_paths_read_from_its_directory(
        tmp_path: Path) -> None:
    config = write(tmp_path / "etc", GOOD)
    settings = settings_from("--config", str(config))
    etc = (tmp_path / "etc").resolve()
    assert (settings.state_dir, settings.host, settings.port) == (etc / "state", "127.0.0.2", 9000)
    assert settings.public_base_url == "https://dsn.facility.example"
    assert settings.policy_path == etc / "policies"
    assert settings.launcher == "slurm"
    assert settings.launcher_options == {"timeout_s": 45, "sbatch_args": ("--partition=dsn",
                                                                           "--qos=high")}
    assert settings.local_grace_s == 3
    assert settings.jobs_dir == Path("/shared/dsn/jobs")
    assert (settings.lease_s, settings.drain_s) == (12, 90)
    assert settings.gateway_endpoint == "tcp://198.51.100.10:6555"
    assert settings.gateway_receipts == "tcp://198.51.100.10:6556"
    assert settings.gateway_public_key_file == etc / "keys" / "gateway.key"
    assert settings.state_endpoints == ("tcp://10.0.0.5:8761", "tcp://10.0.0.5:8762")
    assert settings.audit_checkpoints == tmp_path.resolve() / "audit" / "checkpoints.jsonl"
    assert settings.audit_checkpoint_s == 2.5


def test_options_override_the_file_and_the_file_overrides_the_defaults(tmp_path: Path) -> None:
    config = write(tmp_path, GOOD)
    defaults = settings_from()
    assert (defaults.port, defaults.launcher, defaults.lease_s, defaults.drain_s) == (
        DEFAULT_PORT, "local", 30, 60)
    assert defaults.jobs_dir == (Path(".dsn") / "jobs").resolve()

    given = settings_from("--config", str(config), "--port", "9100", "--launcher", "local",
                          "--lease-s", "5", "--drain-s", "0", "--jobs-dir", "elsewhere",
                          "--state-updates",
                          "tcp://10.0.0.5:9999", "--gateway-key-file", "/keys/gw.key")
    assert (given.port, given.launcher, given.lease_s, given.drain_s) == (9100, "local", 5, 0)
    assert given.jobs_dir == Path("elsewhere").resolve()  # an option's path: from the cwd
    assert given.gateway_public_key_file == Path("/keys/gw.key")
    # One half of the state endpoints from an option, the other still from the file.
    assert given.state_endpoints == ("tcp://10.0.0.5:8761", "tcp://10.0.0.5:9999")
    # The launcher named by the option gets its own settings from the file.
    assert given.launcher_options == {"grace_s": 3}
    # What the options leave alone still comes from the file.
    assert (given.host, given.public_url) == ("127.0.0.2", "https://dsn.facility.example")


def test_help_says_how_options_file_and_defaults_combine() -> None:
    text = " ".join(dsn("controlplane", "serve", "--help").stdout.split())
    assert "Settings come from the options given, then the --config file, then the defaults" \
        in text
    for option in ("--config", "--launcher", "--lease-s", "--gateway-key-file", "--jobs-dir",
                   "--public-url"):
        assert option in text


@pytest.mark.parametrize(("text", "fragments"), [
    ("launcher:\n  name: slrum\n", ["launcher.name: 'slrum': unknown launcher; known: local, "
                                    "slurm"]),
    ("lease_s: 30\nlaese_s: 31\n", ["laese_s: unknown key"]),
    ("launcher:\n  slurm:\n    partition: x\n", ["launcher.slurm.partition: unknown key"]),
    ("lease_s: '30'\n", ["lease_s: Input should be a valid integer", "'30'"]),
    ("port: true\n", ["port: Input should be a valid integer"]),
    ("launcher:\n  slurm:\n    sbatch_args: --partition=x\n",
     ["launcher.slurm.sbatch_args: Input should be a valid array"]),
    ("lease_s: 0\n", ["lease_s: 0: must be at least 1 and at most 3600"]),
    ("drain_s: -1\n", ["drain_s: -1: must be at least 0 and at most 3600"]),
    ("port: 70000\n", ["port: 70000: must be at least 1 and at most 65535"]),
    ("launcher:\n  slurm:\n    timeout_s: -1\n", ["launcher.slurm.timeout_s: -1", "more than 0"]),
    ("launcher:\n  slurm:\n    sbatch_args: ['--partition=a --time=5']\n",
     ["launcher.slurm.sbatch_args: '--partition=a --time=5': each is one sbatch option"]),
    ("gateway:\n  endpoint: tcp://0.0.0.0:5555\n", ["gateway.endpoint", "not a wildcard"]),
    ("state_endpoints:\n  snapshot: tcp://10.0.0.5:8751\n", ["state_endpoints.updates"]),
    ("public_url: ftp://dsn.example\n", ["public_url: 'ftp://dsn.example': must be an http(s)"]),
    ("replica_urls: [http://a.example:8750, 'http://A.example:8750/']\n",
     ["replica_urls", "'http://A.example:8750' is listed twice"]),
    ("replica_urls: [http://0.0.0.0:8750]\n", ["replica_urls: 'http://0.0.0.0:8750'",
                                               "not a wildcard"]),
    ("replica_urls: ['http://a.example:8750,http://b.example:8750']\n",
     ["replica_urls", "is not http(s)://HOST:PORT"]),
    ("replica_urls: http://a.example:8750\n", ["replica_urls: Input should be a valid array"]),
    ("- port: 1\n", ["must be a mapping of settings, not list"]),
    ("port: [1\n", ["is not valid YAML"]),
    ("clock: 1\nissuer: me\n", ["clock: unknown key", "issuer: unknown key"]),
])
def test_each_bad_file_is_one_error_naming_the_file_and_the_key(
        tmp_path: Path, text: str, fragments: list[str]) -> None:
    config = write(tmp_path, text)
    assert_one_line_error(serve_with(config, "--state-dir", str(tmp_path / "none")),
                          f"error: {config}", *fragments)


def test_an_unreadable_file_is_one_error(tmp_path: Path) -> None:
    assert_one_line_error(serve_with(tmp_path / "missing.yaml"),
                          f"cannot read {tmp_path / 'missing.yaml'}: No such file")
    if os.geteuid() != 0:  # root reads a file whatever its mode
        locked = write(tmp_path, "port: 9000\n")
        locked.chmod(0)
        assert_one_line_error(serve_with(locked), f"cannot read {locked}: Permission denied")


def test_a_bad_option_is_named_as_the_option_over_a_good_file(tmp_path: Path) -> None:
    config = write(tmp_path, GOOD)
    assert_one_line_error(serve_with(config, "--launcher", "slrum"),
                          "error: --launcher: 'slrum': unknown launcher; known: local, slurm")
    assert_one_line_error(serve_with(config, "--lease-s", "0"), "error: --lease-s: 0: must be")


def test_an_option_set_in_the_environment_overrides_the_file_and_is_named_so(
        tmp_path: Path) -> None:
    config = write(tmp_path, "lease_s: 12\n")
    result = dsn("controlplane", "serve", "--config", str(config),
                 env={"DSN_CONTROLPLANE_SERVE_LEASE_S": "0"})
    assert_one_line_error(result, "error: $DSN_CONTROLPLANE_SERVE_LEASE_S: 0: must be at least 1")


def test_listening_on_every_address_without_a_public_url_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path, "host: 0.0.0.0\n")
    line = assert_one_line_error(serve_with(config), f"{config}: host: '0.0.0.0'")
    assert "set public_url (--public-url)" in line
    assert_one_line_error(dsn("controlplane", "serve", "--host", "::"),
                          "--host: '::'", "set public_url")
    allowed = settings_from("--config", str(config), "--public-url", "https://dsn.example")
    assert allowed.public_base_url == "https://dsn.example"


def test_an_audit_checkpoint_file_in_a_missing_directory_stops_the_start(tmp_path: Path) -> None:
    assert dsn("admin", "init", "--state-dir", str(tmp_path / "state")).exit_code == 0
    config = write(tmp_path, "state_dir: state\naudit:\n  checkpoint_file: gone/cp.jsonl\n")
    assert_one_line_error(serve_with(config), f"audit checkpoint file {tmp_path.resolve()}/gone/"
                          "cp.jsonl: its directory does not exist (audit.checkpoint_file")


def test_the_shipped_example_for_a_site_loads() -> None:
    settings = settings_from("--config", str(EXAMPLE))
    assert settings.launcher == "slurm" and settings.launcher_options["sbatch_args"]
    assert settings.public_url and settings.state_dir.is_absolute()
    assert settings.jobs_dir != settings.state_dir / "jobs"  # on the shared filesystem
    written = EXAMPLE.read_text()
    for key in FILE_LAYOUT.keys(Settings).values():  # every setting a site sets is shown
        if key not in ("leeway_s", "client_max_size", "body_timeout_s", "min_free_bytes",
                       "jwks_max_age_s", "reconcile_s"):
            assert f"{key.rpartition('.')[2]}:" in written, key


def test_every_key_of_the_file_is_documented() -> None:
    documented = (REPO / "docs" / "configuration.md").read_text()
    for key in FILE_LAYOUT.keys(Settings).values():
        assert f"`{key}" in documented, key


# --- a real service from a file ------------------------------------------------------------------

def _http(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        url, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


@pytest.mark.timeout(90)
def test_a_service_started_from_a_file_serves_and_hands_jobs_its_public_url(
        tmp_path: Path) -> None:
    site = tmp_path / "etc"
    state = tmp_path / "state"
    assert dsn("admin", "init", "--state-dir", str(state)).exit_code == 0
    port, snapshot, updates = free_ports(3)
    config = write(site, f"""\
state_dir: ../state
port: {port}
public_url: http://dsn.facility.example:8443
jobs_dir: jobs
launcher:
  name: local
  local:
    grace_s: 2
state_endpoints:
  snapshot: tcp://127.0.0.1:{snapshot}
  updates: tcp://127.0.0.1:{updates}
""")
    with serving_config(config, tmp_path / "serve.log", f"http://127.0.0.1:{port}") as log:
        assert "reached at http://dsn.facility.example:8443" in log.read_text()
        assert f"store {state / 'controlplane.sqlite3'}" in log.read_text()
        job = _run_tiny_job(tmp_path, f"http://127.0.0.1:{port}", state)
        workdir = site / "jobs" / job["id"]
        assert job["state"] == "succeeded", (workdir / "job.log").read_text()
        # The job was told the public URL, not the address the service listens on.
        assert (workdir / "output" / "marker").read_text() == \
            "http://dsn.facility.example:8443\n"


@pytest.mark.timeout(90)
def test_a_replica_hands_its_jobs_every_replicas_url_its_own_first(tmp_path: Path) -> None:
    site = tmp_path / "etc"
    state = tmp_path / "state"
    assert dsn("admin", "init", "--state-dir", str(state)).exit_code == 0
    port, snapshot, updates = free_ports(3)
    config = write(site, f"""\
state_dir: ../state
port: {port}
public_url: http://dsn2.facility.example:8443
replica_urls: [http://dsn1.facility.example:8443, http://dsn2.facility.example:8443/,
               https://dsn3.facility.example]
jobs_dir: jobs
state_endpoints:
  snapshot: tcp://127.0.0.1:{snapshot}
  updates: tcp://127.0.0.1:{updates}
""")
    url = f"http://127.0.0.1:{port}"
    # Exported as the shipped job templates export it, and read back by the job itself.
    exporting = TINY_JOB.replace("set -eu\n", "set -eu\n  export DSN_CONTROLPLANE_URL="
                                 "{{ system.controlplane_urls | shquote }}\n").replace(
        "{{ params.marker | shquote }}", '"$DSN_CONTROLPLANE_URL"')
    with serving_config(config, tmp_path / "serve.log", url):
        job = _run_tiny_job(tmp_path, url, state, exporting)
    workdir = site / "jobs" / job["id"]
    assert job["state"] == "succeeded", (workdir / "job.log").read_text()
    assert (workdir / "output" / "marker").read_text() == (
        "http://dsn2.facility.example:8443,http://dsn1.facility.example:8443,"
        "https://dsn3.facility.example\n")


def test_without_replica_urls_jobs_get_the_public_url_alone(tmp_path: Path) -> None:
    settings = settings_from("--state-dir", str(tmp_path), "--public-url", "https://dsn.example")
    assert settings.job_controlplane_urls == ("https://dsn.example",)
    given = settings_from("--state-dir", str(tmp_path), "--port", "9000", "--replica-url",
                          "http://127.0.0.1:9001", "--replica-url", "http://127.0.0.1:9000")
    assert given.job_controlplane_urls == ("http://127.0.0.1:9000", "http://127.0.0.1:9001")


@contextlib.contextmanager
def serving_config(config: Path, log: Path, url: str) -> Iterator[Path]:
    """``dsn controlplane serve --config CONFIG``, started elsewhere than the file's directory,
    until the block ends, then SIGTERM (exit 0); yields its log."""
    with running([DSN, "controlplane", "serve", "--config", str(config)], log, url):
        yield log


def _run_tiny_job(tmp_path: Path, url: str, state: Path, job_template: str | None = None) -> Any:
    """A job of ``job_template``, by default one that writes the control plane URL it was given;
    its final record."""
    def admin(*args: str) -> Result:
        result = dsn("admin", *args, "--url", url, "--state-dir", str(state))
        assert result.exit_code == 0, result.output
        return result

    template = write(tmp_path, job_template or TINY_JOB.replace(
        "{{ params.marker | shquote }}", "{{ system.controlplane_url | shquote }}"),
        "tiny-job.yaml")
    admin("templates", "edit", "tiny-job", str(template), "--create")
    admin("projects", "create", "alpha")
    admin("tokens", "issue", "alpha", "--subject", "alice", "--out", str(tmp_path / "token"))
    token = (tmp_path / "token").read_text().strip()
    session = _http("POST", f"{url}/api/v1/sessions", token, {
        "project": "alpha", "template": "4dstem", "params": {},
        "client_key": zmq.curve_keypair()[0].decode()})
    job = _http("POST", f"{url}/api/v1/sessions/{session['id']}/jobs", token,
                {"template": "tiny-job"})
    job_url = f"{url}/api/v1/sessions/{session['id']}/jobs/{job['id']}"

    def ended() -> Any:
        record = _http("GET", job_url, token)
        return record if record["state"] not in ("pending", "running") else None

    return eventually(ended, timeout_s=30, what="the job to end", interval_s=0.1)
