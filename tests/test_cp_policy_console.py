"""The policy routes the console uses: checking an uploaded policy document exactly as a reload
would (with the line of each problem, nothing activated), and the active set's decision on a sample
request; both for admins only, validated, and audited."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cp_helpers import ClientFactory, ControlPlane, start_control_plane

from controlplane.policy import Principal, Resource, lint

SHIPPED = Path(__file__).parent.parent / "policies" / "default.yaml"
BROKEN_RULE = """\
  - id: broken
    effect: perhaps
    principals: [admin]
    actions: [nothing:at-all]
"""


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    return await start_control_plane(aiohttp_client, tmp_path / "state")


def broken_policy() -> tuple[str, int]:
    """The shipped policy with one bad rule inserted; the line of its ``effect``."""
    lines = SHIPPED.read_text().splitlines(keepends=True)
    at = lines.index("rules:\n") + 1
    return "".join(lines[:at] + [BROKEN_RULE] + lines[at:]), at + 2


async def validate(cp: ControlPlane, text: str, token: str | None = None) -> Any:
    return await cp.call("POST", "/api/v1/policies/validate", token or cp.admin_token,
                         json={"text": text, "name": "mine.yaml"})


async def decide(cp: ControlPlane, body: dict[str, Any], token: str | None = None) -> Any:
    return await cp.call("POST", "/api/v1/policies/decide", token or cp.admin_token, json=body)


def sample(action: str, **resource: Any) -> dict[str, Any]:
    return {"principal": {"kind": "project", "subject": "bob", "project": "alpha"},
            "action": action, "resource": resource}


async def test_the_active_set_is_shown_with_its_digest(cp: ControlPlane) -> None:
    response = await cp.admin("GET", "/api/v1/policies")
    body = await response.json()
    assert body["digest"] == cp.services.policies.current.digest
    assert {rule["id"] for rule in body["policy"]["rules"]} >= {"admins-administer"}


async def test_a_good_document_is_valid_and_nothing_is_activated(cp: ControlPlane) -> None:
    before = cp.services.policies.current
    text = SHIPPED.read_text().replace("per_project: 200/second", "per_project: 100/second")
    response = await validate(cp, text)
    assert response.status == 200
    body = await response.json()
    assert body["valid"] is True and body["errors"] == []
    assert "rules" in body["summary"] and body["digest"] != before.digest
    assert cp.services.policies.current is before


async def test_the_active_document_is_recognised(cp: ControlPlane) -> None:
    body = await (await validate(cp, SHIPPED.read_text())).json()
    assert body["digest"] == cp.services.policies.current.digest
    assert "(the active set)" in body["summary"]


async def test_problems_name_field_and_line_as_the_check_command_does(cp: ControlPlane,
                                                                     tmp_path: Path) -> None:
    text, effect_line = broken_policy()
    body = await (await validate(cp, text)).json()
    assert body["valid"] is False and body["digest"] is None
    errors = {error["field"]: error for error in body["errors"]}
    assert errors["rules[0].effect"]["line"] == effect_line
    assert errors["rules[0].actions"]["line"] == effect_line + 2
    assert "nothing:at-all" in errors["rules[0].actions"]["message"]
    # The same problems, in the same order, as `dsn admin policies check` reports for the file.
    file = tmp_path / "mine.yaml"
    file.write_text(text)
    assert [f"{file}: {e['field']}: {e['message']}" for e in body["errors"]] == lint(file)


async def test_unparsable_yaml_names_its_line(cp: ControlPlane) -> None:
    body = await (await validate(cp, "version: 1\n\nroles: a: b\n")).json()
    assert body["valid"] is False
    [error] = body["errors"]
    assert error["field"] == "document" and "not valid YAML" in error["message"]
    assert error["line"] == 3


async def test_a_deeply_nested_document_is_a_problem_not_a_failure(cp: ControlPlane) -> None:
    body = await (await validate(cp, "a: " + "[" * 50_000)).json()
    assert body["valid"] is False and "nested too deeply" in body["errors"][0]["message"]


async def test_an_oversized_upload_is_refused_before_it_is_read(cp: ControlPlane) -> None:
    response = await validate(cp, "#" * (600 * 1024))
    assert response.status == 413


async def test_a_project_token_may_neither_validate_nor_decide(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    token = (await cp.project_token("alpha"))["token"]
    assert (await validate(cp, SHIPPED.read_text(), token)).status == 401
    assert (await decide(cp, sample("projects:read", kind="project", project="alpha"),
                         token)).status == 401
    # Refusals of one principal are audited as they come, the repeats counted per window.
    assert cp.audit_rows()[-1][2:6] == ("policies:check", "policy", "deny", "token:kind")


@pytest.mark.parametrize(("change", "field"), [
    ({"action": "projects:steal"}, "action"),
    ({"principal": {"kind": "wizard"}}, "principal.kind"),
    ({"resource": {"kind": "castle"}}, "resource.kind"),
    ({"principal": {"kind": "project", "scopes": ["everything"]}}, "principal.scopes.0"),
    ({"principal": {"kind": "project", "project": "Not A Name"}}, "principal.project"),
    ({"resource": {"kind": "project", "name": "x" * 201}}, "resource.name"),
])
async def test_unknown_or_unbounded_sample_values_are_refused(cp: ControlPlane,
                                                              change: dict[str, Any],
                                                              field: str) -> None:
    body = {**sample("projects:read", kind="project", project="alpha"), **change}
    response = await decide(cp, body)
    assert response.status == 400
    problem = await response.json()
    assert field in [error["field"] for error in problem["errors"]]


async def test_the_sample_decision_is_the_active_policy_s(cp: ControlPlane) -> None:
    policy = cp.services.policies.current
    body = sample("sessions:read", kind="session", project="beta", name="run-1")
    response = await decide(cp, body)
    answer = await response.json()
    assert answer["allowed"] is False and answer["rule"] == "cross-project"
    expected = policy.decide(
        Principal("project", "bob", "alpha", policy.scopes_for("project")), "sessions:read",
        Resource("session", "beta", "run-1"))
    assert (answer["rule"], answer["reason"]) == (expected.rule, expected.reason)
    own = await (await decide(cp, sample("sessions:read", kind="session", project="alpha"))).json()
    assert own["allowed"] is True and own["rule"] == "clients-work-in-their-project"
    narrow = sample("sessions:read", kind="session", project="alpha")
    narrow["principal"]["scopes"] = ["projects:read"]
    assert (await (await decide(cp, narrow)).json())["rule"] == "missing-scope"
    # Each request is audited under its own action, as the admin allowed it.
    rows = [row for row in cp.audit_rows() if row[2] == "policies:decide"]
    assert len(rows) == 3
    assert all(row[1].startswith("admin:") and row[4:6] == ("allow", "admins-administer")
               for row in rows)


async def test_a_bad_gateways_section_is_named_with_its_line(cp: ControlPlane,
                                                            tmp_path: Path) -> None:
    shipped = SHIPPED.read_text()
    section = "gateways:\n  defaults: [\"*\"]\n  projects: {}\n"
    assert section in shipped
    good = shipped.replace(section, "gateways:\n  defaults: [\"west*\"]\n"
                                    "  projects: {alpha: [\"east*\"]}\n")
    assert (await (await validate(cp, good)).json())["valid"] is True
    bad = shipped.replace(section, "gateways:\n  defaults: [\"west*\"]\n  projects:\n"
                                   "    alpha: [\"east*\", \"\"]\n    beta: east\n  spare: x\n")
    body = await (await validate(cp, bad)).json()
    assert body["valid"] is False
    line = shipped.splitlines().index("gateways:") + 1
    assert {(e["field"], e["line"]) for e in body["errors"]} == {
        ("gateways.projects.alpha[1]", line + 3), ("gateways.projects.beta", line + 4),
        ("gateways.spare", line + 5)}
    messages = " | ".join(e["message"] for e in body["errors"])
    assert "'' is not a gateway name pattern" in messages and "unknown key" in messages
    file = tmp_path / "mine.yaml"
    file.write_text(bad)
    assert [f"{file}: {e['field']}: {e['message']}" for e in body["errors"]] == lint(file)
