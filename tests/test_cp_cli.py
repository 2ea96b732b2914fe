"""``dsn admin`` and ``dsn controlplane serve``: init, fail-closed start, and every admin command
against a real ``dsn controlplane serve`` process on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from waiting import eventually

from common.keys import load_keypair
from common.ports import free_port
from controlplane.settings import DATABASE_NAME
from dsn.cli import main

DSN = str(Path(sys.executable).parent / "dsn")
OS_USER = pwd.getpwuid(os.geteuid()).pw_name
SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"


def dsn(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """A failed command: exit status 1, exactly one 'error: ...' line, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    for fragment in fragments:
        assert fragment in line, line
    return line


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- init and serve, no service needed -----------------------------------------------------------

def test_init_writes_a_0600_token_shown_once_and_refuses_a_second_init(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = dsn("admin", "init", "--state-dir", str(state))
    assert result.exit_code == 0, result.output
    token_file = state / "admin.token"
    assert mode(token_file) == 0o600 and mode(state) == 0o700
    token = token_file.read_text().strip()
    assert result.stdout.strip() == token  # the token alone on stdout, the note on stderr
    assert str(token_file) in result.stderr and token not in result.stderr
    assert mode(state / DATABASE_NAME) == 0o600
    assert all(mode(pem) == 0o600 for pem in (state / "keys").glob("*.pem"))
    assert mode(state / "keys" / "server.key_secret") == 0o600
    assert load_keypair(state / "keys" / "server.key").secret is None

    again = dsn("admin", "init", "--state-dir", str(state))
    assert_one_line_error(again, "already initialised")
    assert token_file.read_text().strip() == token


def test_init_names_the_first_admin_and_records_who_ran_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    bad = dsn("admin", "init", "--state-dir", str(state), "--name", "Alice Smith")
    assert_one_line_error(bad, "admin name 'Alice Smith'")
    assert not state.exists()
    assert dsn("admin", "init", "--state-dir", str(state), "--name", "alice").exit_code == 0
    with sqlite3.connect(state / DATABASE_NAME) as db:
        assert db.execute("SELECT name, created_by, removed_at FROM admins").fetchall() == [
            ("alice", f"offline:{OS_USER}", None)]
        (principal, action, resource), = db.execute(
            "SELECT principal, action, resource FROM audit").fetchall()
        subject, = db.execute("SELECT subject FROM tokens WHERE kind = 'admin'").fetchone()
    assert (principal, action, resource.split("#")[0]) == (
        f"offline:{OS_USER}", "admin.init", "admin/alice")
    assert subject == "alice"


def test_a_token_file_and_the_environment_variable_together_are_one_error(
        tmp_path: Path) -> None:
    token_file = tmp_path / "mine.token"
    token_file.write_text("x.y.z\n")
    token_file.chmod(0o600)
    result = dsn("admin", "projects", "list", "--token-file", str(token_file),
                 "--url", "http://127.0.0.1:1", env={"DSN_ADMIN_TOKEN": "a.b.c"})
    line = assert_one_line_error(result, f"--token-file {token_file}", "$DSN_ADMIN_TOKEN")
    assert "x.y.z" not in line and "a.b.c" not in line  # and no request was tried
    help_text = dsn("admin", "projects", "list", "--help").stdout
    assert "not both: that is an error" in " ".join(help_text.split())


def test_serve_refuses_an_uninitialised_state_dir_and_creates_nothing(tmp_path: Path) -> None:
    state = tmp_path / "empty"
    result = dsn("controlplane", "serve", "--state-dir", str(state), "--port", "1")
    assert_one_line_error(result, "not initialised", "dsn admin init")
    assert not (state / DATABASE_NAME).exists() and not (state / "admin.token").exists()


def test_serve_on_a_read_only_state_dir_left_by_a_crash_is_one_line(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only bind of the state directory")
    source, state = tmp_path / "source", tmp_path / "read-only"
    assert dsn("admin", "init", "--state-dir", str(source)).exit_code == 0
    port = free_port()
    # Free state-service ports too: another control plane on this machine may hold the defaults.
    served = subprocess.Popen(_serve_command(source, port), stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: _healthy(port), timeout_s=20, what="the control plane to serve")
    finally:
        served.kill()  # a crash: the write-ahead log is left behind
        served.wait(timeout=10)
    state.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(state)], check=False).returncode:
        pytest.skip("mount refused here (no CAP_SYS_ADMIN): cannot make a read-only state dir")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(state)], check=True)
        result = dsn(*_serve_command(state, port)[1:])
    finally:
        subprocess.run(["umount", str(state)], check=True)
    assert_one_line_error(result, "cannot be written", "Read-only file system")


def _healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
        return bool(answer.status == 200)


def test_policies_check_passes_a_good_file_and_lists_every_problem_of_a_broken_one(
        tmp_path: Path) -> None:
    good = dsn("admin", "policies", "check", str(SHIPPED_POLICY))
    assert good.exit_code == 0 and good.stdout.strip().endswith(": ok"), good.output

    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 2\nroles: {ops: [no:such-scope]}\n"
                      "tokens: {admin: {max_ttl: 1y, roles: [ops]}}\n")
    result = dsn("admin", "policies", "check", str(broken))
    assert result.exit_code == 1 and "Traceback" not in result.output and result.stdout == ""
    *problems, summary = result.stderr.strip().splitlines()
    assert all(line.startswith(f"{broken}: ") for line in problems)
    for fragment in ("version", "no:such-scope", "'1y' is not a duration", "rules"):
        assert any(fragment in line for line in problems), (fragment, problems)
    assert summary == f"error: {broken}: {len(problems)} problem(s)"

    unparsable = tmp_path / "unparsable.yaml"
    unparsable.write_text("version: 1\nroles: [not, a, mapping\n")
    result = dsn("admin", "policies", "check", str(unparsable))
    assert result.exit_code == 1 and "not valid YAML" in result.stderr


def test_offline_audit_verify_detects_an_edited_and_a_deleted_record(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert dsn("admin", "init", "--state-dir", str(state)).exit_code == 0
    ok = dsn("admin", "audit", "verify", "--offline", "--state-dir", str(state))
    assert ok.exit_code == 0 and "audit chain ok: 1 records" in ok.stdout, ok.output

    with sqlite3.connect(state / DATABASE_NAME) as db:
        db.execute("UPDATE audit SET decision = 'deny' WHERE seq = 1")
    assert_one_line_error(dsn("admin", "audit", "verify", "--offline", "--state-dir", str(state)),
                          "broken at record 1")
    with sqlite3.connect(state / DATABASE_NAME) as db:
        db.execute("DELETE FROM audit WHERE seq = 1")
    assert_one_line_error(dsn("admin", "audit", "verify", "--offline", "--state-dir", str(state)),
                          "audit chain broken")


@pytest.mark.timeout(60)
def test_signed_checkpoints_catch_a_cut_audit_log_offline_and_at_start(tmp_path: Path) -> None:
    state, checkpoints = tmp_path / "state", tmp_path / "elsewhere" / "checkpoints.jsonl"
    checkpoints.parent.mkdir()
    assert dsn("admin", "init", "--state-dir", str(state)).exit_code == 0
    with serving(state, tmp_path / "serve.log", "--audit-checkpoints", str(checkpoints)) as cp:
        for _ in range(3):
            assert cp.admin("projects", "list").exit_code == 0
    # Stopping signed the head into the file given, not into the state directory.
    assert not (state / "audit-checkpoints.jsonl").exists()
    verify = ("admin", "audit", "verify", "--offline", "--state-dir", str(state),
              "--checkpoints", str(checkpoints))
    ok = dsn(*verify)
    assert ok.exit_code == 0 and ok.stdout.strip() == (
        "audit chain ok: 4 records, 1 signed checkpoints hold"), ok.output
    unanchored = dsn("admin", "audit", "verify", "--offline", "--state-dir", str(state))
    assert "no signed checkpoint to check it against" in unanchored.stdout

    with sqlite3.connect(state / DATABASE_NAME) as db:
        db.execute("DELETE FROM audit WHERE seq > 2")
        db.execute("UPDATE audit_head SET seq = 2, hash = (SELECT hash FROM audit WHERE seq = 2)")
    assert_one_line_error(dsn(*verify), "broken at record 3", "records 3..4 were removed")
    refused = subprocess.run(_serve_command(state, free_port(), "--audit-checkpoints",
                                            str(checkpoints)),
                             capture_output=True, text=True, timeout=30, check=False)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr
    assert "does not hold record 4" in lines[0] and "move the checkpoint file" in lines[0]


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("x.y.z\n")
    token_file.chmod(0o644)
    result = dsn("admin", "projects", "list", "--token-file", str(token_file),
                 "--url", "http://127.0.0.1:1")
    assert_one_line_error(result, "readable by others", "chmod 600")


def test_an_unreachable_service_is_one_line(tmp_path: Path) -> None:
    result = dsn("admin", "projects", "list", "--url", "http://127.0.0.1:1",
                 env={"DSN_ADMIN_TOKEN": "x.y.z"})
    assert_one_line_error(result, "cannot reach the control plane at http://127.0.0.1:1")


def test_no_command_takes_a_token_on_argv() -> None:
    for args in (["tokens", "issue"], ["tokens", "list"], ["audit", "verify"], ["keys", "rotate"],
                 ["admins", "add"], ["admins", "token"], ["admins", "remove"], ["whoami"]):
        help_text = dsn("admin", *args, "--help").stdout
        assert "--token-file" in help_text and "--token " not in help_text


# --- against a running service -------------------------------------------------------------------

@dataclass(frozen=True)
class Service:
    url: str
    state: Path

    def admin(self, *args: str) -> Result:
        group, *rest = args
        return dsn("admin", group, *rest, "--url", self.url, "--state-dir", str(self.state))


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    def up_or_exited() -> str | None:
        if process.poll() is not None:
            return "exited"
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
            return "up" if response.status == 200 else None

    try:
        outcome = eventually(up_or_exited, timeout_s=timeout_s, what=f"{url}/healthz to answer",
                             interval_s=0.05)
    except AssertionError as stuck:
        raise AssertionError(f"{stuck}\nserve log: {log.read_text()}") from None
    assert outcome == "up", f"serve exited: {log.read_text()}"


def _serve_command(state: Path, port: int, *options: str) -> list[str]:
    return [DSN, "controlplane", "serve", "--state-dir", str(state), "--port", str(port),
            "--state-snapshots", f"tcp://127.0.0.1:{free_port()}",
            "--state-updates", f"tcp://127.0.0.1:{free_port()}", *options]


@contextlib.contextmanager
def serving(state: Path, log: Path, *options: str) -> Iterator[Service]:
    """``dsn controlplane serve`` on ``state`` until the block ends, then SIGTERM (exit 0)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(_serve_command(state, port, *options), log, url):
        yield Service(url, state)


@contextlib.contextmanager
def running(command: list[str], log: Path, url: str) -> Iterator[None]:
    """``command``, a control plane serving ``url``, logging to ``log`` and run from its
    directory, until the block ends; then SIGTERM, which it must end on with status 0."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    try:
        _wait_healthy(url, process, log, timeout_s=20)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=10) == 0, log.read_text()
        finally:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("cp")
    state = root / "state"
    assert dsn("admin", "init", "--state-dir", str(state)).exit_code == 0
    with serving(state, root / "serve.log") as running:
        yield running


def _json(result: Result) -> object:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.timeout(60)
def test_projects_create_list_show_update(service: Service) -> None:
    created = _json(service.admin("projects", "create", "ncem", "--template", "fourd",
                                  "--quota", "sessions=2", "--json"))
    assert created["name"] == "ncem" and created["allowed_templates"] == ["fourd"]
    table = service.admin("projects", "list")
    assert table.exit_code == 0 and table.stdout.splitlines()[0].split()[0] == "NAME"
    assert any(line.split()[0] == "ncem" for line in table.stdout.splitlines()[1:])
    updated = _json(service.admin("projects", "update", "ncem", "--quota", "sessions=4",
                                  "--not-before", "2020-01-01T00:00:00Z", "--json"))
    assert updated["quotas"] == {"sessions": 4} and updated["not_before"].startswith("2020-01-01")
    shown = _json(service.admin("projects", "show", "ncem", "--json"))
    assert shown == updated
    assert_one_line_error(service.admin("projects", "create", "ncem"), "409", "already exists")
    assert_one_line_error(service.admin("projects", "show", "nope"), "404", "request")


@pytest.mark.timeout(60)
def test_tokens_issue_list_without_secrets_and_revoke_twice(service: Service) -> None:
    assert service.admin("projects", "create", "tok").exit_code == 0
    issued = service.admin("tokens", "issue", "tok", "--subject", "acq-pc", "--scope",
                           "projects:read", "--scope", "sessions:write", "--ttl", "1h")
    assert issued.exit_code == 0, issued.output
    token = issued.stdout.strip()
    assert token.count(".") == 2 and token not in issued.stderr
    jti = next(part.split("=", 1)[1] for part in issued.stderr.split() if part.startswith("jti="))

    listing = service.admin("tokens", "list", "tok")
    assert listing.exit_code == 0 and jti in listing.stdout and token not in listing.stdout
    as_json = _json(service.admin("tokens", "list", "tok", "--json"))
    assert [row["jti"] for row in as_json] == [jti]
    assert all("token" not in row for row in as_json)

    project_url = f"{service.url}/api/v1/projects/tok"
    request = urllib.request.Request(project_url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    for _ in range(2):  # idempotent
        revoked = service.admin("tokens", "revoke", jti)
        assert revoked.exit_code == 0 and revoked.stdout.strip() == f"revoked {jti}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    with refused.value as response:
        assert response.code == 401
    rows = _json(service.admin("tokens", "list", "tok", "--json"))
    assert rows[0]["revoked_at"] is not None


@pytest.mark.timeout(60)
def test_tokens_issue_out_writes_a_0600_file_and_a_bad_ttl_is_a_usage_error(
        service: Service, tmp_path: Path) -> None:
    assert service.admin("projects", "create", "out").exit_code == 0
    out = tmp_path / "project.token"
    result = service.admin("tokens", "issue", "out", "--subject", "s", "--scope",
                           "sessions:write", "--ttl", "600", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert mode(out) == 0o600 and out.read_text().strip() not in result.output
    bad = service.admin("tokens", "issue", "out", "--subject", "s", "--scope", "x", "--ttl", "1y")
    assert bad.exit_code == 2 and "not a duration" in bad.output


@pytest.mark.timeout(60)
def test_keys_rotate_publishes_a_second_key(service: Service) -> None:
    def kids() -> list[str]:
        with urllib.request.urlopen(f"{service.url}/.well-known/jwks.json", timeout=5) as r:
            return [key["kid"] for key in json.load(r)["keys"]]

    before = kids()
    rotated = _json(service.admin("keys", "rotate", "--json"))
    after = kids()
    assert len(after) == len(before) + 1 and after[0] == rotated["kid"]
    assert set(before) <= set(after)
    # the admin token signed by the older key still works
    assert service.admin("projects", "list").exit_code == 0


@pytest.mark.timeout(60)
def test_policies_show_and_reload(service: Service) -> None:
    reloaded = service.admin("policies", "reload")
    assert reloaded.exit_code == 0 and reloaded.stdout.startswith("policies reloaded from")
    shown = _json(service.admin("policies", "show"))
    assert shown["sources"]


@pytest.mark.timeout(60)
def test_audit_show_and_verify_online(service: Service) -> None:
    assert service.admin("projects", "list").exit_code == 0
    rows = _json(service.admin("audit", "show", "--limit", "5", "--json"))
    assert 1 <= len(rows) <= 5 and rows[0]["seq"] == 1 and rows[0]["action"] == "admin.init"
    table = service.admin("audit", "show", "--limit", "3")
    assert table.exit_code == 0 and len(table.stdout.strip().splitlines()) == 4
    verified = service.admin("audit", "verify")
    assert (verified.exit_code == 0
            and verified.stdout.startswith("audit chain ok:")), verified.output


@pytest.mark.timeout(60)
def test_a_wrong_admin_token_is_a_one_line_401(service: Service, tmp_path: Path) -> None:
    result = dsn("admin", "projects", "list", "--url", service.url,
                 env={"DSN_ADMIN_TOKEN": "a.b.c"})
    assert_one_line_error(result, "401")
    assert "a.b.c" not in result.output


@pytest.mark.timeout(60)
def test_the_real_console_script_runs_an_admin_command(service: Service) -> None:
    env = {**os.environ, "DSN_ADMIN_TOKEN": (service.state / "admin.token").read_text().strip()}
    done = subprocess.run([DSN, "admin", "projects", "list", "--url", service.url, "--json"],
                          check=False, capture_output=True, text=True, timeout=30,
                            env=env)
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), list)
    broken = subprocess.run([DSN, "admin", "projects", "show", "absent", "--url", service.url],
                            check=False, capture_output=True, text=True, timeout=30,
                            env=env)
    assert broken.returncode == 1 and broken.stdout == ""
    assert len(broken.stderr.strip().splitlines()) == 1 and "404" in broken.stderr


def _as(service: Service, token_file: Path, *args: str) -> Result:
    """An admin command run with the admin token in ``token_file``."""
    group, *rest = args
    return dsn("admin", group, *rest, "--url", service.url, "--state-dir", str(service.state),
               "--token-file", str(token_file))


def _jti(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return next(part.split("=", 1)[1] for part in result.stdout.split()
                if part.startswith("jti="))


@pytest.mark.timeout(60)
def test_admins_add_whoami_rotate_and_remove_over_the_cli(service: Service,
                                                          tmp_path: Path) -> None:
    first, second = tmp_path / "bob.token", tmp_path / "bob-2.token"
    added = service.admin("admins", "add", "cli-bob", "--out", str(first), "--ttl", "2d")
    first_jti = _jti(added)
    assert mode(first) == 0o600 and first.read_text().strip() not in added.output
    me = _as(service, first, "whoami")
    assert me.exit_code == 0, me.output
    assert me.stdout.startswith(f"admin cli-bob, token {first_jti} expires ")
    assert re.search(r" \(in (2d 0h|1d 23h)\); ", me.stdout), me.stdout
    assert me.stdout.rstrip().endswith(f"; token from --token-file {first}")
    assert _json(_as(service, first, "whoami", "--json"))["subject"] == "cli-bob"

    rotated = _as(service, first, "admins", "token", "cli-bob", "--out", str(second),
                  "--revoke-others")
    second_jti = _jti(rotated)
    assert_one_line_error(_as(service, first, "whoami"), "401", "revoked")
    assert f"token {second_jti}" in _as(service, second, "whoami").stdout
    shown = _json(service.admin("admins", "show", "cli-bob", "--json"))
    assert {t["jti"]: t["revoked_at"] is None for t in shown} == {first_jti: False,
                                                                   second_jti: True}
    assert_one_line_error(service.admin("admins", "token", "cli-bob", "--out", str(second)),
                          "exists")

    removed = service.admin("admins", "remove", "cli-bob")
    assert removed.exit_code == 0 and removed.stdout.strip() == (
        "removed admin cli-bob; its tokens are revoked")
    assert_one_line_error(_as(service, second, "projects", "list"), "401")
    table = service.admin("admins", "list").stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "ACTIVE"]
    assert any(line.split()[:3] == ["cli-bob", "no", "0"] for line in table[1:])
    rows = _json(service.admin("audit", "show", "--limit", "1000", "--json"))
    actors = {row["principal"].split("#")[0] for row in rows
              if row["action"] in ("admins:whoami", "admins:issue", "admins:remove")}
    assert {"admin:admin", "admin:cli-bob"} <= actors


@pytest.mark.timeout(60)
def test_offline_recovery_while_the_service_runs_is_audited(service: Service,
                                                            tmp_path: Path) -> None:
    lost = tmp_path / "lost.token"
    assert service.admin("admins", "add", "cli-carol", "--out", str(lost)).exit_code == 0
    assert service.admin("admins", "remove", "cli-carol").exit_code == 0
    out = tmp_path / "carol.token"
    done = subprocess.run([DSN, "admin", "recover", "--state-dir", str(service.state),
                           "--name", "cli-carol", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert mode(out) == 0o600 and out.read_text().strip() not in done.stdout + done.stderr
    jti = next(part.split("=", 1)[1] for part in done.stdout.split() if part.startswith("jti="))
    assert f"admin cli-carol, token {jti}" in _as(service, out, "whoami").stdout
    assert_one_line_error(_as(service, lost, "whoami"), "401")  # the old token stays revoked
    rows = _json(service.admin("audit", "show", "--limit", "1000", "--json"))
    recovery, = (row for row in rows if row["action"] == "admin.recover")
    assert (recovery["principal"], recovery["resource"], recovery["rule"]) == (
        f"offline:{OS_USER}", f"admin/cli-carol#{jti}", "offline-recovery")
    assert "audit chain ok" in service.admin("audit", "verify").stdout
    again = subprocess.run([DSN, "admin", "recover", "--state-dir", str(service.state),
                            "--name", "cli-carol", "--out", str(out)],
                           check=False, capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and again.stderr.strip() == f"error: {out} exists; refusing to " \
                                                            "overwrite it"
