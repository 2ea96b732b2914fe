"""Policy-as-code: decisions (pure), loading and linting real files, reload, the shipped policy."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.errors import ConfigurationError
from controlplane.policy import (
    ACTIONS,
    BUILTIN_RULES,
    SCOPES,
    LifetimeCaps,
    PolicyHolder,
    PolicySet,
    Principal,
    Resource,
    lint,
    load_policies,
    parse_duration,
)
from controlplane.tokens import TokenKind

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
DEFAULT = SHIPPED / "default.yaml"


@pytest.fixture(scope="module")
def policy() -> PolicySet:
    return load_policies(DEFAULT)


def default_doc() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT.read_text())


def write(path: Path, doc: dict[str, Any] | str) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def client(project: str | None = "p1", scopes: frozenset[str] | None = None,
           kind: str = "project") -> Principal:
    return Principal(kind, "alice", project,
                     frozenset({"token:exchange", "sessions:write", "sessions:read",
                                "projects:read", "templates:render"}) if scopes is None else scopes)


def admin(policy: PolicySet) -> Principal:
    return Principal("admin", "root", None, policy.admin_scopes())


# --- decisions ---------------------------------------------------------------------------------

def test_shipped_policy_lints_clean() -> None:
    assert lint(DEFAULT) == []
    assert lint(SHIPPED) == []


def test_every_decision_names_its_rule(policy: PolicySet) -> None:
    cases = [
        (admin(policy), "projects:create", Resource("project", None, None), True,
         "admins-administer"),
        (client(), "token:exchange", Resource("token", "p1", None), True,
         "clients-work-in-their-project"),
        (client(), "token:exchange", Resource("token", "p2", None), False, "cross-project"),
        (client(), "keys:rotate", Resource("key", None, None), False, "missing-scope"),
        (client(), "no:such", Resource("key", None, None), False, "unknown-action"),
        (Principal("anonymous", "-", None, frozenset()), "jwks:read", Resource("key", None, None),
         True, "public-keys"),
    ]
    for principal, action, resource, allowed, rule in cases:
        decision = policy.decide(principal, action, resource)
        assert (decision.allowed, decision.rule) == (allowed, rule), (action, decision)
        assert decision.reason


def test_deny_overrides_allow(tmp_path: Path) -> None:
    doc = default_doc()
    doc["rules"].append({"id": "freeze-legacy", "effect": "deny", "principals": ["*"],
                         "actions": ["sessions:open"], "projects": ["legacy-*"]})
    policy = load_policies(write(tmp_path / "p.yaml", doc))
    admin_ = admin(policy)
    frozen = policy.decide(admin_, "sessions:open", Resource("session", "legacy-7", "4dstem"))
    assert (frozen.allowed, frozen.rule) == (False, "freeze-legacy")
    open_ = policy.decide(admin_, "sessions:open", Resource("session", "fresh", "4dstem"))
    assert (open_.allowed, open_.rule) == (True, "admins-administer")


def test_deny_rule_wins_regardless_of_order(tmp_path: Path) -> None:
    doc = default_doc()
    doc["rules"].insert(0, {"id": "no-audit", "effect": "deny", "principals": ["admin"],
                            "actions": ["audit:*"]})
    policy = load_policies(write(tmp_path / "p.yaml", doc))
    decision = policy.decide(admin(policy), "audit:verify", Resource("audit", None, None))
    assert (decision.allowed, decision.rule) == (False, "no-audit")


def test_unknown_action_denied_even_for_admin(policy: PolicySet) -> None:
    for action in ("projects:explode", "", "PROJECTS:CREATE", "projects:*", "*"):
        decision = policy.decide(admin(policy), action, Resource("project", None, None))
        assert (decision.allowed, decision.rule) == (False, "unknown-action")


def test_cross_project_denied_for_every_project_bound_kind(policy: PolicySet) -> None:
    scopes = policy.scopes_for(TokenKind.SESSION) | policy.scopes_for(TokenKind.CONSUMER)
    for kind in ("project", "session", "consumer"):
        principal = client(kind=kind, scopes=scopes)
        for project in ("p2", None):
            decision = policy.decide(principal, "sessions:read", Resource("session", project, "s1"))
            assert (decision.allowed, decision.rule) == (False, "cross-project")
        assert policy.decide(principal, "sessions:read", Resource("session", "p1", "s1")).allowed


def test_missing_scope_denied(policy: PolicySet) -> None:
    narrow = client(scopes=frozenset({"sessions:read"}))
    decision = policy.decide(narrow, "sessions:open", Resource("session", "p1", "4dstem"))
    assert (decision.allowed, decision.rule) == (False, "missing-scope")
    assert "sessions:write" in decision.reason


def test_scopes_beyond_the_kinds_roles_do_not_count(policy: PolicySet) -> None:
    # A session token that somehow carries token:exchange still may not exchange.
    session = client(kind="session", scopes=frozenset({"token:exchange"}))
    decision = policy.decide(session, "token:exchange", Resource("token", "p1", None))
    assert (decision.allowed, decision.rule) == (False, "missing-scope")


def test_resource_mismatch_denied(policy: PolicySet) -> None:
    for resource in (Resource("session", None, None), Resource("project", "p1", "p1"),
                     Resource("key", "p1", None)):
        action = "keys:rotate" if resource.kind == "key" else "projects:read"
        decision = policy.decide(admin(policy), action, resource)
        assert (decision.allowed, decision.rule) in {(False, "resource-mismatch"),
                                                     (True, "admins-administer")}
    decision = policy.decide(admin(policy), "projects:read", Resource("session", "p1", None))
    assert (decision.allowed, decision.rule) == (False, "resource-mismatch")
    decision = policy.decide(admin(policy), "keys:rotate", Resource("key", "p1", None))
    assert (decision.allowed, decision.rule) == (False, "resource-mismatch")


def test_template_permission_per_project(tmp_path: Path) -> None:
    doc = default_doc()
    doc["templates"] = {"defaults": ["4dstem-*"], "projects": {"ncem": ["ncem-*"]}}
    policy = load_policies(write(tmp_path / "p.yaml", doc))
    assert policy.may_use_template("p1", "4dstem-basic")
    assert not policy.may_use_template("p1", "ncem-fast")
    assert policy.may_use_template("ncem", "ncem-fast")
    assert not policy.may_use_template("ncem", "4dstem-basic")
    decision = policy.decide(client(), "sessions:open", Resource("session", "p1", "ncem-fast"))
    assert (decision.allowed, decision.rule) == (False, "template-not-allowed")
    assert policy.decide(client(), "sessions:open", Resource("session", "p1", "4dstem-a")).allowed


def test_gateway_permission_per_project(tmp_path: Path, policy: PolicySet) -> None:
    # Shipped: every project may use every registered gateway.
    assert policy.gateways_for("p1").allows("east-1") and policy.gateways_for("p1").allows("x")
    doc = default_doc()
    doc["gateways"] = {"defaults": ["west*", "spare"], "projects": {"ncem": ["east*"],
                                                                    "paused": []}}
    narrowed = load_policies(write(tmp_path / "p.yaml", doc))
    anyone, ncem = narrowed.gateways_for("p1"), narrowed.gateways_for("ncem")
    assert anyone.allows("west-2") and anyone.allows("spare") and not anyone.allows("east-1")
    # A project listed gets exactly its own list: not the defaults as well.
    assert ncem.allows("east-1") and not ncem.allows("west-2") and not ncem.allows("spare")
    assert not ncem.allows("EAST-1")  # names are matched case-sensitively
    assert str(ncem) == "gateways matching 'east*'"
    assert str(narrowed.gateways_for("paused")) == "none"
    assert not narrowed.gateways_for("paused").allows("west-1")
    # A policy without the section keeps every gateway open to every project.
    del doc["gateways"]
    assert load_policies(write(tmp_path / "p.yaml", doc)).gateways_for("ncem").allows("any")


@pytest.mark.parametrize(("section", "fragment"), [
    ({"default": ["*"]}, "gateways.default: unknown key"),
    ({"defaults": "east*"}, "gateways.defaults: Input should be a valid list"),
    ({"defaults": ["east*", 7]}, "gateways.defaults[1]: Input should be a valid string"),
    ({"defaults": [""]}, "gateways.defaults[0]: '' is not a gateway name pattern"),
    ({"defaults": ["east 1"]}, "gateways.defaults[0]: 'east 1' is not a gateway name pattern"),
    ({"projects": {"ncem": "east*"}}, "gateways.projects.ncem: Input should be a valid list"),
    ({"projects": {"ncem": None}}, "gateways.projects.ncem: Input should be a valid list"),
    ({"projects": {"ncem": ["east*", ""]}},
     "gateways.projects.ncem[1]: '' is not a gateway name pattern"),
    ({"projects": {"NCEM team": ["east*"]}},
     "gateways.projects.NCEM team: 'NCEM team' is not a project name"),
    ({"projects": ["ncem"]}, "gateways.projects: Input should be a valid dictionary"),
    ("everything", "gateways: Input should be a valid dictionary"),
])
def test_a_bad_gateways_section_is_named(tmp_path: Path, section: Any, fragment: str) -> None:
    doc = default_doc()
    doc["gateways"] = section
    problems = lint(write(tmp_path / "p.yaml", doc))
    assert any(fragment in problem for problem in problems), problems
    with pytest.raises(ConfigurationError):
        load_policies(tmp_path / "p.yaml")


def test_settings_read_from_the_shipped_policy(policy: PolicySet) -> None:
    assert policy.lifetime_cap(TokenKind.SESSION) == policy.lifetime_cap("session") == 12 * 3600
    assert policy.quota("p1", "tokens") == 100
    assert policy.allow_plaintext is False
    assert [str(item) for item in policy.per_token_limits] == ["50 per 1 second",
                                                               "1000 per 1 minute"]
    assert policy.target_allowed("127.0.0.1") and policy.target_allowed("localhost")
    assert not policy.target_allowed("10.1.2.3") and not policy.target_allowed("evil.example")
    assert policy.source_allowed("127.0.0.0/24") and not policy.source_allowed("0.0.0.0/0")
    assert "token:exchange" not in policy.scopes_for(TokenKind.SESSION)
    assert policy.describe()["tokens"]["admin"]["max_ttl"] == 30 * 86400
    with pytest.raises(ValueError, match="unknown quota"):
        policy.quota("p1", "gpus")


def test_per_project_quota_overrides(tmp_path: Path) -> None:
    doc = default_doc()
    doc["quotas"]["projects"] = {"big": {"sessions": 16}}
    policy = load_policies(write(tmp_path / "p.yaml", doc))
    assert policy.quota("big", "sessions") == 16
    assert policy.quota("big", "tokens") == 100
    assert policy.quota("small", "sessions") == 4


def test_every_action_needs_a_known_scope_or_is_public() -> None:
    public = {name for name, spec in ACTIONS.items() if spec.scope is None}
    # token:federate needs no scope because an outside identity holds none: the federation's
    # rules decided, and the policy's rules admit only the federated kind to it.
    # The console's own actions need none either: a console session only ever acts as the token
    # it was opened with, each further action judged (scope included) by its own route.
    assert public == {"jwks:read", "token:federate", "console:sign_in", "console:session",
                      "console:sign_out"}
    assert all(spec.scope in SCOPES for spec in ACTIONS.values() if spec.scope is not None)


def test_durations() -> None:
    assert parse_duration("90s") == 90 and parse_duration("12h") == 43200
    assert parse_duration("2w") == 1209600 and parse_duration(60) == 60
    for bad in ("0s", "12", "1y", True, -5, 1.5, "1h30m"):
        with pytest.raises(ValueError):
            parse_duration(bad)


principals = st.builds(
    Principal, kind=st.sampled_from(["admin", "project", "session", "consumer", "gateway",
                                     "anonymous", "root", ""]),
    subject=st.text(max_size=5), project=st.one_of(st.none(), st.sampled_from(["p1", "p2"])),
    scopes=st.frozensets(st.sampled_from(sorted(SCOPES) + ["x", "admin"]), max_size=8))
resources = st.builds(
    Resource, kind=st.sampled_from(["project", "token", "key", "session", "template", "scan",
                                    "audit", "policy", "???"]),
    project=st.one_of(st.none(), st.sampled_from(["p1", "p2"]), st.integers()),
    name=st.one_of(st.none(), st.text(max_size=8), st.integers()))
actions = st.one_of(st.sampled_from(sorted(ACTIONS)), st.text(max_size=20), st.integers(),
                    st.none())


@settings(max_examples=500, deadline=None)
@given(principal=principals, action=actions, resource=resources)
def test_decide_never_raises_and_never_allows_unknown_actions(
        policy: PolicySet, principal: Principal, action: Any, resource: Resource) -> None:
    decision = policy.decide(principal, action, resource)
    assert decision.rule and decision.reason
    if action not in ACTIONS:
        assert (decision.allowed, decision.rule) == (False, "unknown-action")
    if decision.allowed:
        assert decision.rule not in BUILTIN_RULES
        spec = ACTIONS[action]
        assert spec.scope is None or spec.scope in principal.scopes
        if principal.kind in ("project", "session", "consumer") and spec.project != "none":
            assert resource.project == principal.project is not None


# --- loading and linting -----------------------------------------------------------------------

BROKEN = """\
version: 1
colour: blue
roles:
  administrator: [projects:read, projects:fly]
tokens:
  admin: {max_ttl: 1d, roles: [administrator], extra: 1}
  project: {max_ttl: 1y, roles: [nobody]}
  session: {max_ttl: 1h, roles: []}
  consumer: {max_ttl: 1h, roles: []}
  root: {max_ttl: 1h, roles: []}
rules:
  - {id: a, effect: allow, principals: [admin], actions: [projects:create]}
  - {id: a, effect: deny, principals: [admin], actions: [projects:destroy]}
  - {id: default-deny, effect: maybe, principals: [robot], actions: ["*"]}
networks:
  sources: [10.0.0.1/8, 300.1.1.0/24]
  targets: [127.0.0.0/8]
quotas:
  defaults: {tokens: 1, sessions: 1}
rate_limits:
  per_token: lots
  per_project: 10/second
"""


def test_lint_finds_every_problem(tmp_path: Path) -> None:
    problems = lint(write(tmp_path / "broken.yaml", BROKEN))
    text = "\n".join(problems)
    expected = [
        "colour: unknown key",
        "roles: role 'administrator': unknown scope(s) ['projects:fly']",
        "tokens.admin.extra: unknown key",
        "tokens.project.max_ttl",
        "'1y' is not a duration",
        "tokens.project.roles: unknown role 'nobody'",
        "no entry for gateway tokens",
        "tokens.root: unknown token kind",
        "rules[1].actions: unknown action(s) ['projects:destroy']",
        "rules[1].id: duplicate rule id 'a'",
        "rules[2].id: 'default-deny' is a built-in rule name",
        "rules[2].effect",
        "rules[2].principals: unknown principal kind(s) ['robot']",
        "networks.sources: invalid CIDR(s): '10.0.0.1/8'",
        "'300.1.1.0/24'",
        "quotas.defaults.consumers: Field required",
        "rate_limits.per_token: 'lots' is not a rate",
    ]
    for fragment in expected:
        assert fragment in text, fragment
    assert all(problem.startswith(str(tmp_path / "broken.yaml")) for problem in problems)
    with pytest.raises(ConfigurationError) as caught:
        load_policies(tmp_path / "broken.yaml")
    assert "rate_limits.per_token" in caught.value.detail


@pytest.mark.parametrize(("text", "fragment"), [
    ("version: 1\nroles: {}\nroles: {}\n", "duplicate key 'roles'"),
    ("version: 1\nrules: [\n", "not valid YAML"),
    ("- a\n- b\n", "must be a mapping"),
    ("version: 2\n", "version: must be 1"),
    ("version: true\n", "version: must be 1"),
    ("version: 1\n? [a, b]\n: c\n", "unhashable key"),
    ("version: 1\nroles: !!python/object:os.system {}\n", "not valid YAML"),
])
def test_lint_refuses_unsafe_or_malformed_yaml(tmp_path: Path, text: str, fragment: str) -> None:
    problems = lint(write(tmp_path / "bad.yaml", text))
    assert any(fragment in problem for problem in problems), problems


def test_directory_merges_rules_and_roles_and_refuses_redefined_sections(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    shutil.copy(DEFAULT, directory / "00-default.yaml")
    write(directory / "10-site.yaml", {"version": 1, "rules": [
        {"id": "site-deny", "effect": "deny", "principals": ["*"], "actions": ["scans:read"]}]})
    policy = load_policies(directory)
    assert policy.sources == ("00-default.yaml", "10-site.yaml")
    assert policy.decide(admin(policy), "scans:read", Resource("scan", None, None)).rule == \
        "site-deny"
    write(directory / "20-clash.yaml", {"version": 1, "allow_plaintext": True,
                                         "roles": {"client": ["scans:read"]}})
    problems = lint(directory)
    assert any("20-clash.yaml: allow_plaintext: already defined in" in p for p in problems)
    assert any("20-clash.yaml: roles.client: already defined in" in p for p in problems), problems
    write(directory / "30-clash.yaml", {"version": 1, "quotas": {"defaults": {
        "tokens": 1, "sessions": 1, "consumers": 1}}})
    assert any("30-clash.yaml: quotas: already defined in" in p for p in lint(directory))


def test_empty_directory_is_a_problem(tmp_path: Path) -> None:
    assert "no policy files" in lint(tmp_path)[0]


def test_reload_keeps_the_last_good_set(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", default_doc())
    holder = PolicyHolder.load(path)
    first = holder.current
    write(path, BROKEN)
    ok, problems = holder.reload(path)
    assert not ok and problems
    assert holder.current is first
    doc = default_doc()
    doc["allow_plaintext"] = True
    write(path, doc)
    assert holder.reload(path) == (True, [])
    assert holder.current.allow_plaintext is True


def test_lifetime_caps_follow_reloads(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", default_doc())
    holder = PolicyHolder.load(path)
    caps: LifetimeCaps = holder.lifetime_caps
    assert caps[TokenKind.SESSION] == 12 * 3600 and len(caps) == len(TokenKind)
    doc = default_doc()
    doc["tokens"]["session"]["max_ttl"] = "5m"
    write(path, doc)
    assert holder.reload(path)[0]
    assert caps[TokenKind.SESSION] == 300
    assert dict(caps)[TokenKind.ADMIN] == 30 * 86400


def test_only_federated_identities_may_federate(policy: PolicySet) -> None:
    resource = Resource("token", "p1", None)
    for kind in ("anonymous", "project", "session", "consumer", "gateway"):
        who = Principal(kind=kind, subject="x", project="p1", scopes=frozenset({"token:exchange"}))
        assert not policy.decide(who, "token:federate", resource).allowed, kind
    federated = Principal(kind="federated", subject="facility:abc", project="p1",
                          scopes=frozenset())
    decision = policy.decide(federated, "token:federate", resource)
    assert decision.allowed and decision.rule == "federated-identities-sign-in"
    assert not policy.decide(federated, "token:exchange", resource).allowed


def test_federation_rules_match_on_verified_email_and_claims() -> None:
    from controlplane.federation import MappingRule

    rule = MappingRule.model_validate({
        "id": "ncem", "project": "p1", "scopes": ["sessions:read"], "email": "*@ncem.example",
        "claims": [{"name": "groups", "contains": "ncem-staff"}]})
    staff = {"email": "Alice@NCEM.example", "groups": ["users", "ncem-staff"]}
    assert rule.matches(staff)
    assert not rule.matches({**staff, "email_verified": False})
    assert not rule.matches({**staff, "groups": ["users"]})
    assert not rule.matches({**staff, "groups": "ncem-staff"})  # a string is not a list
    assert not rule.matches({**staff, "email": "alice@ncem.example.evil"})
