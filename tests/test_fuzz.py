"""Property tests on the control plane's two pure deciders: policy evaluation and template
parameters. Complements
``test_cp_policy.py::test_decide_never_raises_and_never_allows_unknown_actions``
(the shipped policy, well-typed inputs) and the parametrized injection cases of
``test_cp_templating.py`` with generated policies, ill-typed principals and arbitrary values.
The wire codec's property tests live in ``test_protocol.py``."""

from __future__ import annotations

import fnmatch
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from test_cp_templating import DSN_SYSTEM, DSN_WITH_TEXT, ECHO_JOB, FREE_TEXT, JOB_SYSTEM, make

from controlplane.errors import InvalidRequest
from controlplane.policy import (
    ACTIONS,
    BUILTIN_RULES,
    PRINCIPAL_KINDS,
    SCOPES,
    PolicyDocument,
    PolicySet,
    Principal,
    Resource,
    expand_actions,
    load_policies,
)
from controlplane.templates.loader import Template, load_templates
from controlplane.templates.render import render_values, validate_params
from controlplane.tokens import TokenKind

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_POLICY = ROOT / "policies" / "default.yaml"
EXAMPLES = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- policy ----------------------------------------------------------------------------------

KINDS = sorted(PRINCIPAL_KINDS)
TOKEN_KINDS = sorted(kind.value for kind in TokenKind)
PROJECTS = ["p1", "p2", "lab-7"]
ALL_SCOPES = frozenset(SCOPES)
anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                     st.text(max_size=12), st.binary(max_size=6),
                     st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
rules = st.lists(st.fixed_dictionaries({
    "effect": st.sampled_from(["allow", "deny"]),
    "principals": st.lists(st.sampled_from([*KINDS, "*"]), min_size=1, max_size=3, unique=True),
    "actions": st.lists(st.sampled_from(["*", *sorted({a.split(":")[0] + ":*" for a in ACTIONS}),
                                         *sorted(ACTIONS)]), min_size=1, max_size=3, unique=True),
}, optional={"projects": st.lists(st.sampled_from(["p1", "p*", "lab-?", "*", "none"]),
                                  max_size=2)}), max_size=6)


@st.composite
def requests(draw: st.DrawFn) -> tuple[Principal, str, Resource]:
    """A well-formed request: a known action on a resource of the kind it acts on, by a principal
    of its own project holding every scope, so that the policy's rules are what decides."""
    action = draw(st.sampled_from(sorted(ACTIONS)))
    spec = ACTIONS[action]
    # Anonymous callers hold no scope, so only public actions reach the rules for them.
    kind = draw(st.sampled_from(KINDS if spec.scope is None else TOKEN_KINDS))
    # A project-bound token acts inside its own project only (the cross-project guard).
    optional = (st.sampled_from(PROJECTS) if TokenKind(kind).project_bound
                else st.one_of(st.none(), st.sampled_from(PROJECTS))) if kind in TOKEN_KINDS \
        else st.one_of(st.none(), st.sampled_from(PROJECTS))
    project = {"none": st.none(), "required": st.sampled_from(PROJECTS),
               "optional": optional}[spec.project]
    resource = Resource(spec.resource, draw(project), draw(st.sampled_from(["4dstem", "other"])))
    principal = Principal(kind, "alice", resource.project, ALL_SCOPES)
    return principal, action, resource


def _policy(generated: list[dict[str, Any]]) -> PolicySet:
    """The shipped policy with ``generated`` as its rules and every scope granted to every kind
    (the scope guard is proven elsewhere; here the rules must decide)."""
    document = yaml.safe_load(SHIPPED_POLICY.read_text())
    document.pop("version")  # the file format's marker, checked by the loader
    document["roles"] = {"everything": sorted(SCOPES)}
    for kind in document["tokens"].values():
        kind["roles"] = ["everything"]
    document["rules"] = [{"id": f"r{i}", **rule} for i, rule in enumerate(generated)]
    return PolicySet(PolicyDocument.model_validate(document), ("generated",))


def _matches(rule: dict[str, Any], principal: Principal, action: str, resource: Resource) -> bool:
    """The rule semantics as the policy format documents them, written independently."""
    kinds, patterns = rule["principals"], rule.get("projects")
    if "*" not in kinds and principal.kind not in kinds:
        return False
    if not any(action in expand_actions(pattern) for pattern in rule["actions"]):
        return False
    return patterns is None or (isinstance(resource.project, str) and any(
        fnmatch.fnmatchcase(resource.project, p) for p in patterns))


AUDIT_READ = (Principal("admin", "root", None, ALL_SCOPES), "audit:read",
              Resource("audit", None, None))


@EXAMPLES
@example(generated=[{"effect": "allow", "principals": ["*"], "actions": ["audit:*"]},
                    {"effect": "deny", "principals": ["admin"], "actions": ["audit:read"]}],
         request=AUDIT_READ)  # deny over allow, whatever the order
@example(generated=[{"effect": "allow", "principals": ["admin"], "actions": ["*"]},
                    {"effect": "deny", "principals": ["admin"], "actions": ["audit:verify"]}],
         request=AUDIT_READ)  # a deny for another action leaves the allow standing
@given(generated=rules, request=requests())
def test_generated_policies_decide_by_deny_over_allow_and_name_the_deciding_rule(
        generated: list[dict[str, Any]], request: tuple[Principal, str, Resource]) -> None:
    principal, action, resource = request
    decision = _policy(generated).decide(principal, action, resource)
    matching = [(f"r{i}", rule) for i, rule in enumerate(generated)
                if _matches(rule, principal, action, resource)]
    denies = [rid for rid, rule in matching if rule["effect"] == "deny"]
    allows = [rid for rid, rule in matching if rule["effect"] == "allow"]
    expected = ((False, denies[0]) if denies else (True, allows[0]) if allows
                else (False, "default-deny"))
    event(f"{'deny' if denies else 'allow' if allows else 'default-deny'}"
          f"{' over allow' if denies and allows else ''}")
    assert (decision.allowed, decision.rule) == expected
    assert decision.reason
    # Rule order decides only which rule is named, never the outcome.
    reordered = _policy(generated[::-1]).decide(principal, action, resource)
    assert reordered.allowed == decision.allowed


@EXAMPLES
@given(generated=rules, kind=st.one_of(st.sampled_from(KINDS), anything),
       project=st.one_of(st.sampled_from(PROJECTS), anything),
       scopes=st.one_of(st.just(ALL_SCOPES), st.sets(st.sampled_from(sorted(SCOPES))), anything),
       action=st.one_of(st.sampled_from(sorted(ACTIONS)), st.text(max_size=24), anything),
       resource_kind=st.one_of(st.sampled_from(sorted({s.resource for s in ACTIONS.values()})),
                               anything),
       resource_project=st.one_of(st.sampled_from(PROJECTS), anything),
       name=st.one_of(st.text(max_size=8), anything))
def test_ill_typed_requests_never_raise_and_unknown_actions_are_denied(
        generated: list[dict[str, Any]], kind: Any, project: Any, scopes: Any, action: Any,
        resource_kind: Any, resource_project: Any, name: Any) -> None:
    policy = _policy(generated)
    principal = Principal(kind, "mallory", project, scopes)
    decision = policy.decide(principal, action, Resource(resource_kind, resource_project, name))
    ids = {f"r{i}" for i in range(len(generated))}
    assert decision.rule in ids | BUILTIN_RULES and decision.reason
    if not (isinstance(action, str) and action in ACTIONS):
        assert (decision.allowed, decision.rule) == (False, "unknown-action")
    if decision.allowed:
        assert decision.rule in ids and isinstance(kind, str) and isinstance(scopes, frozenset)


@EXAMPLES
@given(action=st.one_of(st.text(max_size=30), anything).filter(
    lambda a: not (isinstance(a, str) and a in ACTIONS)), project=st.sampled_from(PROJECTS))
def test_unknown_actions_are_denied_even_to_an_admin_under_an_allow_everything_rule(
        action: Any, project: str) -> None:
    policy = _policy([{"effect": "allow", "principals": ["*"], "actions": ["*"]}])
    admin = Principal("admin", "root", None, ALL_SCOPES)
    for resource in (Resource("project", project, project), Resource("key", None, None)):
        decision = policy.decide(admin, action, resource)
        assert (decision.allowed, decision.rule) == (False, "unknown-action")


# --- templates -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped_policy() -> PolicySet:
    return load_policies(SHIPPED_POLICY)


@pytest.fixture(scope="module")
def dsn_template() -> Template:
    return load_templates(ROOT / "templates")["4dstem"]


def _refused_fields(exc: InvalidRequest) -> set[str]:
    return {error["field"] for error in exc.errors}


@EXAMPLES
@given(text=st.text(max_size=80))
def test_any_string_renders_as_one_yaml_scalar_or_is_refused(text: str,
                                                             shipped_policy: PolicySet) -> None:
    template = make("dsn", {"text": FREE_TEXT}, DSN_WITH_TEXT)
    try:
        rendered = render_values(template, {"text": text}, DSN_SYSTEM, shipped_policy)
    except InvalidRequest as exc:
        assert _refused_fields(exc) == {"params.text"}, exc.errors
        assert not text.isprintable() or text == ""
        return
    assert rendered.config is not None
    reparsed = yaml.safe_load(rendered.text)
    assert reparsed["gateway"]["server_secret_key_file"] == text
    assert set(reparsed) == {"version", "gateway", "sessions"}
    assert [s["id"] for s in reparsed["sessions"]] == ["s1"]
    assert rendered.config.sessions[0].allowed_networks == ["127.0.0.0/8"]


@EXAMPLES
@given(text=st.text(max_size=60))
def test_any_string_reaches_a_job_script_as_exactly_one_shell_word_or_is_refused(
        text: str, shipped_policy: PolicySet) -> None:
    template = make("job", {"text": {"type": "string", "pattern": ".*", "example": "x"}}, ECHO_JOB)
    try:
        script = render_values(template, {"text": text}, JOB_SYSTEM, shipped_policy).text
    except InvalidRequest as exc:
        assert _refused_fields(exc) == {"params.text"} and not text.isprintable()
        return
    command = script.splitlines()[1]
    assert shlex.split(command) == ["printf", "%s\\n", text, *JOB_SYSTEM["consumer_command"]]


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    | st.sampled_from(["127.0.0.0/8", "127.0.0.1/32", "10.0.0.0/8", "0.0.0.0/0", "::1/128",
                       "127.0.0.1", "127.0.0.0/8\nx: 1", "256", "1e3"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=12)
LIMITS = ("hwm", "max_scan_positions", "max_producers", "max_open_scans")
# As a session is opened: no consumer yet (each is checked against the targets when it
# registers), so any targets the policy allows render.
OPENING_SYSTEM = {**DSN_SYSTEM, "consumers": []}


@EXAMPLES
@example(params={"hwm": 5, "sources": ["127.0.0.1/32"]})  # a valid render
@example(params={"hwm": "5", "sources": "127.0.0.0/8"})  # two refusals
@example(params={"targets": ["::1/128"]})  # targets any consumer must register inside later
@given(params=st.dictionaries(st.sampled_from(["sources", "targets", *LIMITS]), values,
                              max_size=6))
def test_shipped_dsn_template_renders_exactly_the_validated_values_or_names_each_bad_one(
        params: dict[str, Any], shipped_policy: PolicySet, dsn_template: Template) -> None:
    try:
        canonical = validate_params(dsn_template, params, shipped_policy)
    except InvalidRequest as exc:
        event("refused")
        assert _refused_fields(exc) <= {f"params.{name}" for name in params}
        assert exc.errors
        return
    rendered = render_values(dsn_template, params, OPENING_SYSTEM, shipped_policy)
    assert rendered.config is not None
    session = rendered.config.sessions[0]
    assert session.allowed_networks == canonical["sources"]
    assert session.allowed_targets == canonical["targets"]
    assert {name: getattr(session.limits, name) for name in LIMITS} == \
        {name: canonical[name] for name in LIMITS}
    assert yaml.safe_load(rendered.text)["sessions"][0]["id"] == DSN_SYSTEM["session_id"]
