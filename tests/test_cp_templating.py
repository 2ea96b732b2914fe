"""The template engine: golden renders of the shipped templates, and injection attempts through
user parameters, system values and admin template bodies that must all fail."""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from controlplane.errors import InvalidRequest, NotFound
from controlplane.policy import PolicySet, load_policies
from controlplane.templates.loader import (
    KIND_DIRECTORIES,
    Template,
    load_template,
    load_templates,
    parse_template,
)
from controlplane.templates.render import check_template, render, render_values, validate_params
from controlplane.templates.system import validate_system

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
GOLDEN = Path(__file__).resolve().parent / "golden"
POLICY_FILE = ROOT / "policies" / "default.yaml"
CLIENT_KEY = "/4N.yOTDbCH%GY+usagOvQ(o]2cJv@quIFGJ%)3}"

DSN_SYSTEM: dict[str, Any] = {
    "session_id": "s-20261122-0001", "client_key": CLIENT_KEY,
    "expires_at": datetime(2026, 11, 22, 18, 0, tzinfo=UTC), "ingress": "tcp://*:5555",
    "server_secret_key_file": "/var/lib/dsn/keys/gateway.key_secret",
    "consumers": ["tcp://127.0.0.1:6001", "tcp://127.0.0.1:6002"],
}
JOB_SYSTEM: dict[str, Any] = {
    "session_id": "s-20261122-0001", "job_id": "j-0001", "ranks": 4,
    "config_path": "/var/lib/dsn/sessions/s-20261122-0001/dsn.yaml",
    "output_dir": "/scratch/dsn/s-20261122-0001",
    "token_file": "/var/lib/dsn/sessions/s-20261122-0001/consumer.token",
    "controlplane_url": "https://dsn.example.org:8750",
    "controlplane_urls": "https://dsn.example.org:8750,https://dsn2.example.org:8750",
    "consumer_command": ["/opt/dsn/.venv/bin/python", "-m", "dataplane.consumer"],
    "mpiexec": ["/opt/dsn/.venv/bin/mpiexec", "--oversubscribe"],
}
GOLDEN_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "4dstem": ({"sources": ["127.0.0.0/24", "::1/128"], "targets": ["127.0.0.0/8"], "hwm": 512},
               DSN_SYSTEM, "dsn-4dstem.yaml"),
    "local-mpiexec": ({"kernel": "stempy", "scans": 3}, JOB_SYSTEM, "job-local-mpiexec.sh"),
    "slurm-sbatch": ({"account": "lcls:xpp12345", "partition": "realtime", "reservation": "beam-42",
                      "qos": "realtime", "constraint": "gpu", "nodes": 2, "cpus_per_task": 8,
                      "gpus_per_node": 4, "mem": "64G", "time": "01:00:00", "drain_s": 120,
                      "exclusive": True, "kernel": "stempy"}, JOB_SYSTEM, "job-slurm-sbatch.sh"),
}


@pytest.fixture(scope="module")
def policy() -> PolicySet:
    return load_policies(POLICY_FILE)


@pytest.fixture(scope="module")
def open_policy(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    """The shipped policy, but producers may connect from anywhere."""
    document = yaml.safe_load(POLICY_FILE.read_text())
    document["networks"]["sources"] = ["0.0.0.0/0", "::/0"]
    path = tmp_path_factory.mktemp("policy") / "open.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_policies(path)


@pytest.fixture(scope="module")
def shipped() -> dict[str, Template]:
    return load_templates(TEMPLATES)


def make(kind: str, parameters: dict[str, Any], body: str, name: str = "test") -> Template:
    return parse_template(yaml.safe_dump({"name": name, "kind": kind, "parameters": parameters,
                                          "body": body}))


def fields(exc: pytest.ExceptionInfo[InvalidRequest]) -> dict[str, str]:
    return {error["field"]: error["message"] for error in exc.value.errors}


# A DSN template with one free-form string, to show that no string can add YAML structure.
FREE_TEXT = {"type": "string", "pattern": ".*", "example": "x"}
DSN_WITH_TEXT = """version: 1
gateway:
  ingress: "tcp://*:5555"
  server_secret_key_file: {{ params.text | yaml }}
sessions:
  - id: s1
    client_keys: [{{ system.client_key | yaml }}]
    allowed_networks: [127.0.0.0/8]
    allowed_targets: [127.0.0.0/8]
    consumers: {{ system.consumers | yaml }}
"""
ECHO_JOB = ("#!/bin/sh\nprintf '%s\\n' {{ params.text | shquote }}"
            " {{ system.consumer_command | shquote }}\n")


# --- golden files ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_shipped_templates_render_their_golden_files(name: str, shipped: dict[str, Template],
                                                     policy: PolicySet) -> None:
    values, system, golden = GOLDEN_CASES[name]
    rendered = render_values(shipped[name], values, system, policy)
    assert rendered.text == (GOLDEN / golden).read_text()


def test_the_rendered_dsn_config_is_validated_by_the_gateway_schema(
        shipped: dict[str, Template], policy: PolicySet) -> None:
    values, system, _ = GOLDEN_CASES["4dstem"]
    config = render_values(shipped["4dstem"], values, system, policy).config
    assert config is not None
    session = config.session("s-20261122-0001")
    assert session.client_keys == [CLIENT_KEY]
    assert session.allowed_networks == ["127.0.0.0/24", "::1/128"]
    assert session.limits.hwm == 512 and session.limits.max_producers == 4
    assert session.expires_at == datetime(2026, 11, 22, 18, 0, tzinfo=UTC)


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*/*.yaml")), ids=lambda p: p.stem)
def test_shipped_templates_pass_the_save_check(path: Path, policy: PolicySet) -> None:
    template = check_template(path.read_text(), policy)
    assert path.stem == template.name
    assert path.parent.name == KIND_DIRECTORIES[template.kind]


def test_the_shipped_set_is_one_dsn_and_two_job_templates(shipped: dict[str, Template]) -> None:
    assert {name: t.kind for name, t in shipped.items()} == {
        "4dstem": "dsn", "local-mpiexec": "job", "slurm-sbatch": "job"}


# --- user parameters: types, bounds, policy ----------------------------------------------------

def test_every_bad_parameter_is_reported_at_once(shipped: dict[str, Template],
                                                 policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_params(shipped["4dstem"], {"hwm": "256", "max_producers": True,
                                            "sources": "127.0.0.0/8", "bogus": 1}, policy)
    assert set(fields(exc)) == {"params.hwm", "params.max_producers", "params.sources",
                                "params.bogus"}
    assert "must be an integer, not '256'" in fields(exc)["params.hwm"]
    assert "unknown parameter 'bogus'" in fields(exc)["params.bogus"]


def test_defaults_apply_and_required_parameters_are_named(shipped: dict[str, Template],
                                                          policy: PolicySet) -> None:
    assert validate_params(shipped["4dstem"], {}, policy)["hwm"] == 256
    with pytest.raises(InvalidRequest) as exc:
        validate_params(shipped["slurm-sbatch"], {}, policy)
    assert fields(exc) == {"params.account": "required"}


@pytest.mark.parametrize("hwm", [0, -1, 10_001, 2**64, "256", 256.0, True, None, [256]])
def test_hwm_zero_or_above_the_cap_is_refused(hwm: Any, shipped: dict[str, Template],
                                              policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_params(shipped["4dstem"], {"hwm": hwm}, policy)
    assert list(fields(exc)) == ["params.hwm"]


@pytest.mark.parametrize("hwm", [1, 10_000])
def test_hwm_bounds_are_inclusive(hwm: int, shipped: dict[str, Template],
                                  policy: PolicySet) -> None:
    assert validate_params(shipped["4dstem"], {"hwm": hwm}, policy)["hwm"] == hwm


def test_the_config_schema_backstops_a_template_that_allows_hwm_zero(policy: PolicySet) -> None:
    body = DSN_WITH_TEXT.replace("    consumers:", "    limits: {hwm: {{ params.hwm | yaml }}}\n"
                                                  "    consumers:")
    template = make("dsn", {"text": FREE_TEXT, "hwm": {"type": "int", "min": 0, "max": 10}}, body)
    with pytest.raises(InvalidRequest) as exc:
        render_values(template, {"text": "/k", "hwm": 0}, DSN_SYSTEM, policy)
    assert "limits.hwm" in fields(exc)["config"]


@pytest.mark.parametrize("cidr, reason", [
    ("0.0.0.0/0", "outside the sources networks the policy allows"),
    ("10.0.0.0/8", "outside the sources networks the policy allows"),
    ("127.0.0.1/8", "host bits set"),
    ("127.0.0.0/255.0.0.0", "canonical form; write 127.0.0.0/8"),
    ("127.0.0.0/0.255.255.255", "canonical form; write 127.0.0.0/8"),
    ("::ffff:127.0.0.0/104", "IPv4-mapped"),
    ("fe80::%eth0/64", "scoped IPv6"),
    ("0:0:0:0:0:0:0:1/128", "canonical form; write ::1/128"),
    ("127.0.0.1", "no prefix length"),
    ("127.000.0.0/8", "not a CIDR network"),
    ("localhost/8", "not a CIDR network"),
    (2130706432, "not a CIDR string"),
    (True, "not a CIDR string"),
    ("", "no prefix length"),
])
def test_bad_cidrs_are_refused(cidr: Any, reason: str, shipped: dict[str, Template],
                               policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_params(shipped["4dstem"], {"sources": [cidr]}, policy)
    assert reason in fields(exc)["params.sources"]


def test_cidr_lists_are_bounded_and_unique(shipped: dict[str, Template],
                                           policy: PolicySet) -> None:
    for sources in ([], ["127.0.0.0/8"] * 2, [f"127.0.{i}.0/24" for i in range(17)]):
        with pytest.raises(InvalidRequest):
            validate_params(shipped["4dstem"], {"sources": sources}, policy)


def test_the_whole_internet_is_allowed_only_where_the_policy_allows_it(
        shipped: dict[str, Template], open_policy: PolicySet) -> None:
    params = validate_params(shipped["4dstem"], {"sources": ["0.0.0.0/0"]}, open_policy)
    assert params["sources"] == ["0.0.0.0/0"]
    with pytest.raises(InvalidRequest) as exc:  # the targets still follow the policy's targets
        validate_params(shipped["4dstem"], {"targets": ["0.0.0.0/0"]}, open_policy)
    assert "outside the targets networks" in fields(exc)["params.targets"]


NETWORK_PARAMS = {
    "port": {"type": "port"},
    "hosts": {"type": "host_list", "network": "targets", "default": ["localhost"]},
    "endpoints": {"type": "endpoint_list", "network": "targets",
                  "default": ["tcp://127.0.0.1:6001"]},
}


@pytest.fixture(scope="module")
def network_job() -> Template:
    return make("job", NETWORK_PARAMS | {"port": {"type": "port", "default": 6001}},
                "#!/bin/sh\necho {{ params.port | shquote }} {{ params.hosts | shquote }}\n")


@pytest.mark.parametrize("port", [0, 65_536, -1, "5", True, 5.0])
def test_ports_outside_1_to_65535_or_not_integers_are_refused(
        port: Any, network_job: Template, policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_params(network_job, {"port": port}, policy)
    assert list(fields(exc)) == ["params.port"]


@pytest.mark.parametrize("port", [1, 65_535])
def test_port_bounds_are_inclusive(port: int, network_job: Template, policy: PolicySet) -> None:
    assert validate_params(network_job, {"port": port}, policy)["port"] == port


@pytest.mark.parametrize("host", ["127.1", "2130706433", "LOCALHOST", "evil.example.org",
                                  "10.0.0.1", "::ffff:127.0.0.1", "fe80::1%eth0", "-x", "a b",
                                  "localhost\n", 2130706433])
def test_bad_or_foreign_hosts_are_refused(host: Any, network_job: Template,
                                          policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_params(network_job, {"hosts": [host]}, policy)
    assert list(fields(exc)) == ["params.hosts"]


@pytest.mark.parametrize("endpoint", [
    "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://127.0.0.1:080", "tcp://*:6001",
    "tcp://localhost:6001", "tcp://[::ffff:127.0.0.1]:6001", "tcp://[fe80::1%eth0]:6001",
    "tcp://10.0.0.1:6001", "udp://127.0.0.1:6001", "tcp://127.0.0.1:6001\n", 6001,
])
def test_bad_or_foreign_endpoints_are_refused(endpoint: Any, network_job: Template,
                                              policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_params(network_job, {"endpoints": [endpoint]}, policy)
    assert list(fields(exc)) == ["params.endpoints"]


def test_canonical_hosts_and_endpoints_inside_the_policy_pass(network_job: Template,
                                                              policy: PolicySet) -> None:
    params = validate_params(network_job, {"hosts": ["localhost", "127.0.0.5", "::1"],
                                           "endpoints": ["tcp://[::1]:7000"]}, policy)
    assert params["hosts"] == ["localhost", "127.0.0.5", "::1"]


def test_enums_and_bools_are_strict(shipped: dict[str, Template], policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_params(shipped["slurm-sbatch"], {"account": "m1", "qos": "REALTIME",
                                                  "exclusive": 1}, policy)
    assert set(fields(exc)) == {"params.qos", "params.exclusive"}


# --- injection through values ------------------------------------------------------------------

@pytest.mark.parametrize("text", ["a\nb", "a\rb", "a\tb", "a\x00b", "a\x1bb", "a\x85b", "a\u2028b"])
def test_newlines_and_control_characters_never_reach_a_template(text: str,
                                                                policy: PolicySet) -> None:
    template = make("dsn", {"text": FREE_TEXT}, DSN_WITH_TEXT)
    with pytest.raises(InvalidRequest) as exc:
        validate_params(template, {"text": text}, policy)
    assert "newline or control character" in fields(exc)["params.text"]


@pytest.mark.parametrize("text", [
    'x", "allowed_networks": ["0.0.0.0/0"], "y": "', "x\"\n", "]: {a: b}", "*alias", "&anchor x",
    "!!python/object/apply:os.system ['true']", "key: value", "- item", "# comment", "'",
    "{{7*7}}", "{% for i in params %}x{% endfor %}", "\\", "\u00e9t\u00e9 \U0001f52c",
])
def test_yaml_structure_in_a_value_stays_one_scalar(text: str, policy: PolicySet) -> None:
    template = make("dsn", {"text": FREE_TEXT}, DSN_WITH_TEXT)
    if not text.isprintable():
        pytest.raises(InvalidRequest, validate_params, template, {"text": text}, policy)
        return
    rendered = render_values(template, {"text": text}, DSN_SYSTEM, policy)
    assert rendered.config is not None
    assert str(rendered.config.gateway.server_secret_key_file) == text
    assert rendered.config.sessions[0].allowed_networks == ["127.0.0.0/8"]
    assert "49" not in rendered.text


SHELL_ATTACKS = ["$(touch PWNED)", "`touch PWNED`", "; touch PWNED", "' ; touch PWNED; '",
                 '" ; touch PWNED; "', "&& touch PWNED", "| touch PWNED", "> PWNED", "$HOME",
                 "*", "-n", "a b", "{{7*7}}", "\\", "", "--config=/etc/passwd"]


@pytest.mark.parametrize("text", SHELL_ATTACKS)
def test_job_values_reach_the_command_as_one_word_each(text: str, tmp_path: Path,
                                                       policy: PolicySet) -> None:
    template = make("job", {"text": {"type": "string", "pattern": ".*", "example": "x"}},
                    ECHO_JOB)
    system = JOB_SYSTEM | {"consumer_command": [f"x{text}", "second word"]}
    script = render_values(template, {"text": text}, system, policy).text
    run = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=10, check=True)
    assert run.stdout == f"{text}\nx{text}\nsecond word\n"
    assert not (tmp_path / "PWNED").exists()


def test_shipped_job_templates_refuse_shell_syntax_in_strings(shipped: dict[str, Template],
                                                              policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_params(shipped["slurm-sbatch"], {
            "account": "m1; rm -rf ~", "time": "1:00:00 --uid=0", "partition": "a b",
            "reservation": "$(id)", "mem": "64G --uid=0", "gpus_per_node": 9}, policy)
    assert set(fields(exc)) == {"params.account", "params.time", "params.partition",
                                "params.reservation", "params.mem", "params.gpus_per_node"}


@pytest.mark.parametrize("account", ["m1234", "lcls:xpp12345", "nstaff_g", "a.b-c"])
def test_the_slurm_account_takes_facility_names(account: str, shipped: dict[str, Template],
                                                policy: PolicySet) -> None:
    params = validate_params(shipped["slurm-sbatch"], {"account": account}, policy)
    assert params["account"] == account


# --- site values: set by the admin, typed and quoted like parameters ---------------------------

SITE_JOB = ("#!/bin/sh\n{% for command in site.setup %}{{ command | shquote }}\n{% endfor %}"
            "printf '%s\\n' {{ site.python | shquote }}\n")


def make_site(site: dict[str, Any], body: str = SITE_JOB,
              parameters: dict[str, Any] | None = None) -> Template:
    return parse_template(yaml.safe_dump({"name": "site-test", "kind": "job",
                                          "parameters": parameters or {}, "site": site,
                                          "body": body}))


@pytest.mark.parametrize("text", SHELL_ATTACKS[:-2])
def test_site_values_reach_the_script_as_one_word_each(text: str, tmp_path: Path,
                                                       policy: PolicySet) -> None:
    template = make_site({
        "setup": {"type": "command_list", "min_items": 0,
                  "value": [["printf", "%s\\n", text], ["export", f"X={text}"]]},
        "python": {"type": "command", "value": [f"x{text}", "second word"]}})
    script = render_values(template, {}, JOB_SYSTEM, policy).text
    run = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=10, check=True)
    assert run.stdout == f"{text}\nx{text}\nsecond word\n"
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("site, field", [
    ({"python": {"type": "command", "value": "/usr/bin/python3"}}, "site.python"),
    ({"python": {"type": "command", "value": []}}, "site.python"),
    ({"python": {"type": "command", "value": ["python\nrm -rf /"]}}, "site.python"),
    ({"python": {"type": "command", "value": [""]}}, "site.python"),
    ({"python": {"type": "command", "value": [3]}}, "site.python"),
    ({"python": {"type": "command"}}, "site.python.value"),
    ({"python": {"type": "command", "value": ["p"], "default": ["p"]}}, "site.python"),
    ({"setup": {"type": "command_list", "value": [["module", "load"], "source x"]}},
     "site.setup"),
    ({"setup": {"type": "command_list", "min_items": 0, "value": [[]]}}, "site.setup"),
    ({"launch": {"type": "enum", "choices": ["srun", "mpiexec"], "value": "aprun"}},
     "site.launch"),
    ({"Launch": {"type": "command", "value": ["srun"]}}, "site.Launch.[key]"),
])
def test_a_bad_site_value_is_refused_naming_it(site: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        make_site(site, "#!/bin/sh\n")
    assert field in fields(exc), fields(exc)


def test_a_command_is_never_a_user_parameter() -> None:
    with pytest.raises(InvalidRequest) as exc:
        make_site({}, "#!/bin/sh\n", {"python": {"type": "command", "example": ["python3"]}})
    assert "declare it under site" in fields(exc)["parameters"]


def test_a_user_cannot_set_a_site_value(shipped: dict[str, Template],
                                        policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_params(shipped["slurm-sbatch"], {"account": "m1", "python": ["/bin/sh"]}, policy)
    assert "unknown parameter 'python'" in fields(exc)["params.python"]


def test_site_values_outside_the_policy_are_refused_when_saved(policy: PolicySet) -> None:
    source = yaml.safe_dump({
        "name": "site-test", "kind": "job", "body": "#!/bin/sh\n",
        "site": {"hosts": {"type": "host_list", "network": "targets", "value": ["8.8.8.8"]}}})
    with pytest.raises(InvalidRequest) as exc:
        check_template(source, policy)
    assert "outside the targets networks" in fields(exc)["site.hosts"]


def test_parameter_names_that_shadow_methods_read_the_value(policy: PolicySet) -> None:
    template = make("job", {"items": {"type": "int", "min": 0, "max": 9, "default": 7}},
                    "#!/bin/sh\necho {{ params.items | shquote }}"
                    " {{ params['items'] | shquote }}\n")
    assert render_values(template, {}, JOB_SYSTEM, policy).text.endswith("echo 7 7\n")


# --- system values -----------------------------------------------------------------------------

@pytest.mark.parametrize("change, field", [
    ({"client_key": "not-a-key"}, "system.client_key"),
    ({"consumers": ["tcp://10.0.0.1:6001"]}, "system.consumers"),
    ({"server_secret_key_file": "keys/gateway"}, "system.server_secret_key_file"),
    ({"server_secret_key_file": "/k\nsessions: []"}, "system.server_secret_key_file"),
    ({"session_id": "../x"}, "system.session_id"),
    ({"expires_at": "2026-11-22T18:00:00Z"}, "system.expires_at"),
    ({"expires_at": datetime(2026, 11, 22)}, "system.expires_at"),
    ({"extra": 1}, "system.extra"),
])
def test_system_values_are_validated_too(change: dict[str, Any], field: str,
                                         policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_system("dsn", DSN_SYSTEM | change, policy)
    assert field in fields(exc)


@pytest.mark.parametrize("change, field", [
    ({"ranks": 0}, "system.ranks"), ({"ranks": "4"}, "system.ranks"),
    ({"token_file": "/t\n; curl evil"}, "system.token_file"),
    ({"consumer_command": []}, "system.consumer_command"),
    ({"controlplane_url": "http://x/$(id)"}, "system.controlplane_url"),
    ({"controlplane_urls": "http://x:1,http://y/$(id)"}, "system.controlplane_urls"),
    ({"controlplane_urls": "http://x:1,,http://y:2"}, "system.controlplane_urls"),
    ({"controlplane_urls": "http://x:1 http://y:2"}, "system.controlplane_urls"),
])
def test_job_system_values_are_validated(change: dict[str, Any], field: str,
                                         policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_system("job", JOB_SYSTEM | change, policy)
    assert field in fields(exc)


def test_render_takes_only_validated_values(shipped: dict[str, Template],
                                            policy: PolicySet) -> None:
    system = validate_system("dsn", DSN_SYSTEM, policy)
    with pytest.raises(InvalidRequest):
        render(shipped["4dstem"], {"hwm": 0}, system)
    with pytest.raises(TypeError):
        render(shipped["local-mpiexec"], {}, system)


# --- admin templates: the static check, the sandbox, the bounds ---------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() | yaml }}",
    "{{ params.__class__ | yaml }}",
    "{{ params['__class__'] | yaml }}",
    "{{ params.hwm.mro | yaml }}",
    "{{ self.__init__.__globals__ | yaml }}",
    "{{ cycler.__init__.__globals__.os | yaml }}",
    "{{ lipsum.__globals__ | yaml }}",
    "{{ joiner | yaml }}",
    "{{ namespace | yaml }}",
    "{{ config | yaml }}",
    "{{ request | yaml }}",
    "{{ params.items() | yaml }}",
    "{{ params.hwm }}",
    "{{ params.hwm | string }}",
    "{{ params.hwm | yaml(indent=2) }}",
    "{{ params.hwm | format | yaml }}",
    "{% set x = params.hwm %}",
    "{% include '/etc/passwd' %}",
    "{% extends 'base.yaml' %}",
    "{% import 'x' as y %}",
    "{% macro m() %}x{% endmacro %}",
    "{% filter upper %}x{% endfilter %}",
    "{% for x in params recursive %}{{ loop(x) }}{% endfor %}",
    "{% for x in [1, 2] %}x{% endfor %}",
    "{% for _x in params.sources %}x{% endfor %}",
    "{% for x in params.sources %}{{ loop.cycle | yaml }}{% endfor %}",
    "{{ params.sources[1:] | yaml }}",
    "{{ 'x' ~ params.hwm | yaml }}",
]


@pytest.mark.parametrize("body", ESCAPES)
def test_sandbox_escapes_are_refused_when_saved(body: str, policy: PolicySet) -> None:
    source = yaml.safe_dump({"name": "evil", "kind": "dsn", "body": body,
                             "parameters": {"hwm": {"type": "int", "min": 1, "max": 9,
                                                    "default": 1},
                                            "sources": {"type": "cidr_list",
                                                        "network": "sources",
                                                        "default": ["127.0.0.0/8"]}}})
    with pytest.raises(InvalidRequest) as exc:
        check_template(source, policy)
    assert "body" in fields(exc)


@pytest.mark.parametrize("expression", ["system.ranks.real", "system.session_id.upper",
                                        "system.consumer_command.copy",
                                        "system['ranks'].numerator"])
def test_the_sandbox_reads_plain_data_only(expression: str, policy: PolicySet) -> None:
    source = yaml.safe_dump({"name": "probe", "kind": "job",
                             "body": f"#!/bin/sh\necho {{{{ {expression} | shquote }}}}\n"})
    with pytest.raises(InvalidRequest) as exc:
        check_template(source, policy)
    assert "is unsafe" in fields(exc)["body"]


BOMBS = [
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ ('x' * 10**9) | yaml }}",
    "{{ (9**9**9) | yaml }}",
    "{{ params.sources | yaml | center(1000000000) }}",
    "{% for a in params.sources %}{% for b in params.sources %}x{% endfor %}{% endfor %}",
    "{{ '{:>999999999}'.format(1) | yaml }}",
    "{{ " + "(" * 2000 + "1" + ")" * 2000 + " | yaml }}",
]


@pytest.mark.parametrize("body", BOMBS)
def test_render_bombs_are_refused_quickly_when_saved(body: str, policy: PolicySet) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidRequest):
        make("dsn", {"sources": NETWORK_PARAMS["hosts"]}, body)
    assert time.monotonic() - started < 1.0


def _loop_template(chunk: str) -> Template:
    items = [f"tcp://127.0.0.{i // 250 + 1}:{6000 + i % 250}" for i in range(256)]
    return make("job", {"eps": {"type": "endpoint_list", "network": "targets", "max_items": 256,
                                "default": items}},
                f"#!/bin/sh\n{{% for e in params.eps %}}{chunk}{{{{ e | shquote }}}}\n"
                "{% endfor %}")


def test_output_size_is_bounded_while_rendering(policy: PolicySet) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidRequest) as exc:
        render_values(_loop_template("x" * 1024), {}, JOB_SYSTEM, policy)
    assert "exceeds 65536 bytes" in fields(exc)["body"]
    assert time.monotonic() - started < 1.0


def test_render_time_is_bounded(policy: PolicySet) -> None:
    with pytest.raises(InvalidRequest) as exc:
        render_values(_loop_template(""), {}, JOB_SYSTEM, policy, max_seconds=0.0)
    assert "longer than 0.0 s" in fields(exc)["body"]


def test_yaml_aliases_in_a_dsn_body_are_refused(policy: PolicySet) -> None:
    body = DSN_WITH_TEXT.replace("allowed_targets: [127.0.0.0/8]",
                                 "allowed_targets: &t [127.0.0.0/8]\n    x: *t")
    with pytest.raises(InvalidRequest) as exc:
        render_values(make("dsn", {"text": FREE_TEXT}, body), {"text": "/k"}, DSN_SYSTEM,
                      policy)
    assert "aliases are not allowed" in fields(exc)["config"]


def test_a_job_script_must_start_with_a_shebang(policy: PolicySet) -> None:
    template = make("job", {}, "echo {{ system.ranks | shquote }}\n")
    with pytest.raises(InvalidRequest) as exc:
        render_values(template, {}, JOB_SYSTEM, policy)
    assert "#!" in fields(exc)["body"]


@pytest.mark.parametrize("parameter, field", [
    ({"type": "int", "default": 1}, "parameters.p"),
    ({"type": "int", "min": 5, "max": 1}, "parameters.p"),
    ({"type": "int", "min": 1, "max": 9, "default": 10}, "parameters.p"),
    ({"type": "int", "min": 1, "max": 9, "default": "5"}, "parameters.p"),
    ({"type": "port", "min": 0}, "parameters.p"),
    ({"type": "enum", "default": "a"}, "parameters.p"),
    ({"type": "enum", "choices": ["a", "a"]}, "parameters.p"),
    ({"type": "enum", "choices": [True]}, "parameters.p.choices.0.str"),
    ({"type": "string", "default": "x"}, "parameters.p"),
    ({"type": "string", "pattern": "("}, "parameters.p"),
    ({"type": "bool", "min": 1}, "parameters.p"),
    ({"type": "cidr_list", "default": ["127.0.0.0/8"]}, "parameters.p"),
    ({"type": "cidr_list", "network": "sources", "default": ["127.0.0.1/8"]}, "parameters.p"),
    ({"type": "float"}, "parameters.p.type"),
    ({"type": "bool", "secret": True}, "parameters.p.secret"),
])
def test_bad_parameter_declarations_are_refused(parameter: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        make("job", {"p": parameter}, "#!/bin/sh\n")
    assert field in fields(exc)


def test_defaults_outside_the_policy_are_refused_when_saved(policy: PolicySet) -> None:
    source = (TEMPLATES / "dsn" / "4dstem.yaml").read_text().replace(
        "default: [127.0.0.0/8]", "default: [0.0.0.0/0]", 1)
    with pytest.raises(InvalidRequest) as exc:
        check_template(source, policy)
    assert "outside the sources networks" in fields(exc)["parameters.sources"]


@pytest.mark.parametrize("source, field", [
    ("name: a\nname: b\nkind: job\nbody: x\n", "(top level)"),
    ("name: ../etc\nkind: job\nbody: '#!/bin/sh'\n", "name"),
    ("name: a\nkind: shell\nbody: x\n", "kind"),
    ("name: a\nkind: job\nbody: x\nowner: me\n", "owner"),
    ("name: a\nkind: job\nparameters: {Bad-Name: {type: bool}}\nbody: x\n",
     "parameters.Bad-Name.[key]"),
    ("[1, 2]", "(top level)"),
    ("name: a\nkind: job\nbody: '{% if %}'\n", "body"),
])
def test_malformed_template_documents_are_refused(source: str, field: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        parse_template(source)
    assert field in fields(exc)


# --- names and the shipped directory -----------------------------------------------------------

@pytest.mark.parametrize("name", ["../policies/default", "..", "/etc/passwd", "dsn/4dstem",
                                  "4dstem/../4dstem", "4DSTEM", "", "a" * 64, "-x", "4dstem\n",
                                  None, 4])
def test_template_names_cannot_traverse_paths(name: Any) -> None:
    with pytest.raises(InvalidRequest) as exc:
        load_template(TEMPLATES, name)
    assert list(fields(exc)) == ["name"]


def test_a_symbolic_link_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    (root / "dsn").mkdir(parents=True)
    (root / "dsn" / "evil.yaml").symlink_to(TEMPLATES / "dsn" / "4dstem.yaml")
    with pytest.raises(InvalidRequest) as exc:
        load_template(root, "evil")
    assert "resolves outside" in fields(exc)["name"]


def test_an_unknown_template_is_not_found() -> None:
    with pytest.raises(NotFound):
        load_template(TEMPLATES, "no-such-template")
