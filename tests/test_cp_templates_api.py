"""The versioned template API end to end: a real app on real SQLite.

Covers seeding of the shipped templates (once), ETag / If-Match / If-None-Match on every write
(428 without a precondition, 412 on a lost update, also under concurrency), history, single
versions, diff, rollback, tombstone deletes, save-time rejection of sandbox escapes and bad
parameter declarations, dry-run rendering (admin and project tokens, policy-bound, field errors)
and the audit records of these decisions.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from cp_helpers import (
    SHIPPED_POLICY,
    ClientFactory,
    ControlPlane,
    sql,
    start_control_plane,
)

from controlplane.templates.loader import shipped_templates_dir
from dsn.cli import main

SHIPPED = {"4dstem": "dsn", "local-mpiexec": "job", "slurm-sbatch": "job"}
T = "/api/v1/templates"
RENDER_SCOPE = "token:exchange projects:read templates:render"


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    return await start_control_plane(aiohttp_client, tmp_path / "state")


def shipped_source(name: str = "4dstem") -> str:
    return (shipped_templates_dir() / "dsn" / f"{name}.yaml").read_text()


def edited(source: str, old: str, new: str) -> str:
    assert old in source
    return source.replace(old, new, 1)


async def status_json(response: Any) -> tuple[int, Any]:
    return response.status, await response.json()


async def etag_of(cp: ControlPlane, name: str) -> str:
    response = await cp.admin("GET", f"{T}/{name}")
    assert response.status == 200, await response.text()
    return str(response.headers["ETag"])


async def put(cp: ControlPlane, name: str, source: str, **headers: str) -> Any:
    http_headers = {key.replace("_", "-"): value for key, value in headers.items()}
    return await cp.admin("PUT", f"{T}/{name}", json={"source": source}, headers=http_headers)


def fields(body: dict[str, Any]) -> dict[str, str]:
    return {error["field"]: error["message"] for error in body.get("errors", [])}


# --- seeding -------------------------------------------------------------------------------------

async def test_shipped_templates_are_seeded_once_as_version_1(aiohttp_client: ClientFactory,
                                                              tmp_path: Path) -> None:
    state = tmp_path / "state"
    cp = await start_control_plane(aiohttp_client, state)
    status, listing = await status_json(await cp.admin("GET", T))
    assert status == 200
    assert {item["name"]: item["kind"] for item in listing["items"]} == SHIPPED
    assert {(item["version"], item["author"]) for item in listing["items"]} == {(1, "shipped")}
    response = await cp.admin("GET", f"{T}/4dstem")
    body = await response.json()
    assert body["source"] == shipped_source() and set(body["parameters"]) >= {"sources", "hwm"}
    assert response.headers["ETag"] == f'"4dstem-v1-{body["sha256"][:16]}"' == body["etag"]

    # An admin deletes one; a restart on the same (non-empty) store seeds nothing again.
    deleted = await cp.admin("DELETE", f"{T}/slurm-sbatch",
                             headers={"If-Match": await etag_of(cp, "slurm-sbatch")})
    assert deleted.status == 200
    await cp.client.close()
    again = await start_control_plane(aiohttp_client, state, clock=cp.clock)
    names = {item["name"] for item in (await (await again.admin("GET", T)).json())["items"]}
    assert names == {"4dstem", "local-mpiexec"}
    assert sql(again.database, "SELECT COUNT(*) FROM template_versions") == [(4,)]


# --- versions and preconditions ------------------------------------------------------------------

async def test_every_put_is_a_new_version_guarded_by_if_match(cp: ControlPlane) -> None:
    v1 = await etag_of(cp, "4dstem")
    changed = edited(shipped_source(), "default: 256", "default: 512")

    status, problem = await status_json(await put(cp, "4dstem", changed))
    assert status == 428 and "If-Match" in problem["detail"]
    assert (await put(cp, "4dstem", changed, If_Match='"4dstem-v9-0000000000000000"')).status == 412

    response = await put(cp, "4dstem", changed, If_Match=v1)
    saved = await response.json()
    assert response.status == 200 and saved["version"] == 2 and saved["author"].startswith("admin:")
    assert response.headers["ETag"] == saved["etag"] != v1
    assert saved["parameters"]["hwm"]["default"] == 512

    # Someone still holding v1's ETag loses, and is told so, instead of overwriting version 2.
    lost = await put(cp, "4dstem", shipped_source(), If_Match=v1)
    assert lost.status == 412
    assert (await (await cp.admin("GET", f"{T}/4dstem")).json())["version"] == 2


async def test_concurrent_writers_with_one_etag_cannot_both_win(cp: ControlPlane) -> None:
    etag = await etag_of(cp, "4dstem")
    sources = [edited(shipped_source(), "default: 256", f"default: {n}") for n in (300, 400)]
    responses = await asyncio.gather(*(put(cp, "4dstem", s, If_Match=etag) for s in sources))
    assert sorted(r.status for r in responses) == [200, 412]
    versions = (await (await cp.admin("GET", f"{T}/4dstem/versions")).json())["items"]
    assert [v["version"] for v in versions] == [1, 2]


async def test_create_needs_if_none_match_star_and_the_declared_name(cp: ControlPlane) -> None:
    source = edited(shipped_source(), "name: 4dstem", "name: fast-scan")
    assert (await put(cp, "fast-scan", source)).status == 428
    assert (await put(cp, "fast-scan", source, If_Match="*")).status == 412
    created = await put(cp, "fast-scan", source, If_None_Match="*")
    assert created.status == 200 and (await created.json())["version"] == 1
    assert (await put(cp, "fast-scan", source, If_None_Match="*")).status == 412

    status, problem = await status_json(await put(cp, "other", source, If_None_Match="*"))
    assert status == 400 and "fast-scan" in fields(problem)["name"]


async def test_history_single_versions_and_diff(cp: ControlPlane) -> None:
    changed = edited(shipped_source(), "default: 256", "default: 512")
    assert (await put(cp, "4dstem", changed, If_Match=await etag_of(cp, "4dstem"))).status == 200

    versions = (await (await cp.admin("GET", f"{T}/4dstem/versions")).json())["items"]
    assert [(v["version"], v["deleted"]) for v in versions] == [(1, False), (2, False)]
    assert "source" not in versions[0]
    first = await cp.admin("GET", f"{T}/4dstem/versions/1")
    assert (await first.json())["source"] == shipped_source()
    assert first.headers["ETag"] == versions[0]["etag"]

    status, diff = await status_json(await cp.admin("GET", f"{T}/4dstem/diff?from=1&to=2"))
    assert status == 200 and (diff["from_version"], diff["to_version"]) == (1, 2)
    assert diff["diff"].startswith("--- 4dstem@v1\n+++ 4dstem@v2\n")
    assert "-    default: 256\n" in diff["diff"] and "+    default: 512\n" in diff["diff"]

    for path in (f"{T}/4dstem/versions/3", f"{T}/4dstem/versions/x", f"{T}/4dstem/versions/0",
                 f"{T}/4dstem/diff?from=1&to=9", f"{T}/nothing/versions", f"{T}/Bad_Name"):
        assert (await cp.admin("GET", path)).status == 404, path
    assert (await cp.admin("GET", f"{T}/4dstem/diff?from=1")).status == 400


async def test_rollback_makes_a_new_version_with_the_old_source(cp: ControlPlane) -> None:
    changed = edited(shipped_source(), "default: 256", "default: 512")
    v2 = await (await put(cp, "4dstem", changed, If_Match=await etag_of(cp, "4dstem"))).json()
    path = f"{T}/4dstem/rollback"
    assert (await cp.admin("POST", path, json={"version": 1})).status == 428
    stale = await cp.admin("POST", path, json={"version": 1}, headers={"If-Match": '"x"'})
    assert stale.status == 412

    response = await cp.admin("POST", path, json={"version": 1}, headers={"If-Match": v2["etag"]})
    v3 = await response.json()
    assert response.status == 200 and v3["version"] == 3 and v3["source"] == shipped_source()
    v1 = await (await cp.admin("GET", f"{T}/4dstem/versions/1")).json()
    assert v3["sha256"] == v1["sha256"] and v3["etag"] != v1["etag"]
    missing = await cp.admin("POST", path, json={"version": 7}, headers={"If-Match": v3["etag"]})
    assert missing.status == 404


async def test_delete_writes_a_tombstone_and_keeps_the_history(cp: ControlPlane) -> None:
    path = f"{T}/4dstem"
    assert (await cp.admin("DELETE", path)).status == 428
    response = await cp.admin("DELETE", path, headers={"If-Match": await etag_of(cp, "4dstem")})
    tombstone = await response.json()
    assert response.status == 200 and (tombstone["version"], tombstone["deleted"]) == (2, True)

    assert (await cp.admin("GET", path)).status == 404
    assert (await cp.admin("POST", path + "/render", json={"params": {}})).status == 404
    assert (await cp.admin("DELETE", path, headers={"If-Match": tombstone["etag"]})).status == 404
    assert "4dstem" not in {i["name"] for i in (await (await cp.admin("GET", T)).json())["items"]}
    versions = (await (await cp.admin("GET", path + "/versions")).json())["items"]
    assert [(v["version"], v["deleted"]) for v in versions] == [(1, False), (2, True)]

    # Rolling back past the deletion restores it; so would a create with If-None-Match: *.
    assert (await cp.admin("POST", path + "/rollback", json={"version": 2},
                           headers={"If-Match": tombstone["etag"]})).status == 400
    restored = await cp.admin("POST", path + "/rollback", json={"version": 1},
                              headers={"If-Match": tombstone["etag"]})
    assert restored.status == 200 and (await restored.json())["version"] == 3


async def test_a_template_keeps_its_kind_until_deleted(cp: ControlPlane) -> None:
    job = (shipped_templates_dir() / "jobs" / "local-mpiexec.yaml").read_text()
    as_dsn_name = edited(job, "name: local-mpiexec", "name: 4dstem")
    status, problem = await status_json(
        await put(cp, "4dstem", as_dsn_name, If_Match=await etag_of(cp, "4dstem")))
    assert status == 409 and "dsn template" in problem["detail"]


# --- save-time checks ----------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() | yaml }}",
    "{{ system.ingress.format_map(params) | yaml }}",
    "{% include '/etc/passwd' %}",
    "{{ params.hwm }}",  # not piped through | yaml: structure injection
]


@pytest.mark.parametrize("escape", ESCAPES)
async def test_sandbox_escapes_are_rejected_on_save(cp: ControlPlane, escape: str) -> None:
    source = edited(shipped_source(), "hwm: {{ params.hwm | yaml }}", f"hwm: {escape}")
    status, problem = await status_json(
        await put(cp, "4dstem", source, If_Match=await etag_of(cp, "4dstem")))
    assert status == 400 and "body" in fields(problem), problem
    assert sql(cp.database, "SELECT MAX(version) FROM template_versions "
                            "WHERE name = '4dstem'") == [(1,)]


async def test_bad_parameter_declarations_and_yaml_are_field_errors(cp: ControlPlane) -> None:
    etag = await etag_of(cp, "4dstem")
    unbounded = edited(shipped_source(), "    min: 1\n    max: 10000\n", "")
    status, problem = await status_json(await put(cp, "4dstem", unbounded, If_Match=etag))
    assert status == 400 and "parameters.hwm" in fields(problem)
    outside = edited(shipped_source(), "default: [127.0.0.0/8]", "default: [192.0.2.0/24]")
    status, problem = await status_json(await put(cp, "4dstem", outside, If_Match=etag))
    assert status == 400 and "outside" in fields(problem)["parameters.sources"]
    status, problem = await status_json(await put(cp, "4dstem", "name: [unclosed", If_Match=etag))
    assert status == 400 and problem["errors"]
    wrong_type = await cp.admin("PUT", f"{T}/4dstem", data=shipped_source(),
                                headers={"If-Match": etag, "Content-Type": "application/yaml"})
    assert wrong_type.status == 415


def line_of(source: str, text: str, after: int = 0) -> int:
    """The file line (1 = first) of the first line after line ``after`` containing ``text``."""
    return next(n for n, line in enumerate(source.splitlines(), 1) if n > after and text in line)


async def rejected(cp: ControlPlane, source: str, name: str = "4dstem") -> list[dict[str, Any]]:
    response = await put(cp, name, source, If_Match=await etag_of(cp, name))
    problem = await response.json()
    assert response.status == 400, problem
    assert all(isinstance(error["line"], int) for error in problem["errors"]), problem
    return list(problem["errors"])


async def test_every_save_error_names_its_line_in_the_template_file(cp: ControlPlane) -> None:
    # Two problems in the body: each its own error at its own file line (not the body's line).
    body = edited(shipped_source(), "hwm: {{ params.hwm | yaml }}", "hwm: {{ params.hwm }}")
    body = edited(body, "max_producers: {{ params.max_producers | yaml }}",
                  "max_producers: {{ secrets | yaml }}")
    errors = await rejected(cp, body)
    assert [(e["field"], e["line"]) for e in errors] == [
        ("body", line_of(body, "hwm: {{ params.hwm }}")),
        ("body", line_of(body, "max_producers: {{ secrets"))]
    assert "| yaml" in errors[0]["message"] and "'secrets'" in errors[1]["message"]
    assert not any("line" in e["message"] for e in errors)  # no second, body-relative number

    unclosed = edited(shipped_source(), "      detector:",
                      "      {% if params.hwm %}\n      detector:")
    [error] = await rejected(cp, unclosed)
    assert error["field"] == "body" and error["line"] > line_of(unclosed, "{% if params.hwm %}")

    # Declarations, defaults and the declared name: the line of the key at fault.
    unbounded = edited(shipped_source(), "    min: 1\n    max: 10000\n", "")
    assert [(e["field"], e["line"]) for e in await rejected(cp, unbounded)] == [
        ("parameters.hwm", line_of(unbounded, "  hwm:"))]
    outside = edited(shipped_source(), "default: [127.0.0.0/8]", "default: [192.0.2.0/24]")
    [error] = await rejected(cp, outside)
    assert (error["field"], error["line"]) == ("parameters.sources",
                                               line_of(outside, "  sources:"))
    renamed = edited(shipped_source(), "name: 4dstem", "# the DSN template\nname: other")
    assert [(e["field"], e["line"]) for e in await rejected(cp, renamed)] == [("name", 2)]
    unknown = edited(shipped_source(), "    max_items: 16", "    max_items: 16\n    colour: red")
    assert [(e["field"], e["line"]) for e in await rejected(cp, unknown)] == [
        ("parameters.sources.colour", line_of(unknown, "colour: red"))]

    # The dry render a save makes fails at a line of the body: that line of the file.
    undefined = edited(shipped_source(), "hwm: {{ params.hwm | yaml }}",
                       "hwm: {{ params.nope | yaml }}")
    assert [(e["field"], e["line"]) for e in await rejected(cp, undefined)] == [
        ("body", line_of(undefined, "params.nope"))]

    # A YAML syntax error: the line the parser stopped at.
    broken = edited(shipped_source(), "  hwm:\n", "  hwm: [unclosed\n")
    [error] = await rejected(cp, broken)
    assert error["field"] == "(top level)" and error["line"] >= line_of(broken, "hwm: [unclosed")


async def test_a_render_that_fails_names_the_line_of_the_stored_file(cp: ControlPlane) -> None:
    # Only some values reach the faulty line, so the save-time dry render passes.
    source = edited(shipped_source(), "        hwm: {{ params.hwm | yaml }}\n",
                    "        {% if params.hwm == 7 %}\n        hwm: {{ site.nope | yaml }}\n"
                    "        {% else %}\n        hwm: {{ params.hwm | yaml }}\n"
                    "        {% endif %}\n")
    saved = await put(cp, "4dstem", source, If_Match=await etag_of(cp, "4dstem"))
    assert saved.status == 200, await saved.text()
    path = f"{T}/4dstem/render"
    assert (await cp.admin("POST", path, json={"params": {"hwm": 8}})).status == 200
    status, problem = await status_json(await cp.admin("POST", path, json={"params": {"hwm": 7}}))
    assert status == 400 and [(e["field"], e["line"]) for e in problem["errors"]] == [
        ("body", line_of(source, "site.nope"))]


# --- dry-run rendering ---------------------------------------------------------------------------

async def test_render_returns_the_config_or_field_errors(cp: ControlPlane) -> None:
    path = f"{T}/4dstem/render"
    status, out = await status_json(await cp.admin("POST", path, json={"params": {"hwm": 64}}))
    assert status == 200 and out["kind"] == "dsn" and out["script"] is None
    session = out["config"]["sessions"][0]
    assert session["limits"]["hwm"] == 64 and session["id"] == "dry-run"
    assert yaml.safe_load(out["text"])["sessions"][0]["limits"]["hwm"] == 64

    bad = {"hwm": 0, "sources": ["10.0.0.0/8\nallowed_networks: [0.0.0.0/0]"], "colour": "red"}
    status, problem = await status_json(await cp.admin("POST", path, json={"params": bad}))
    assert status == 400
    assert set(fields(problem)) == {"params.hwm", "params.sources", "params.colour"}
    assert (await cp.admin("POST", path, json={"params": [], "extra": 1})).status == 400

    status, job = await status_json(await cp.admin("POST", f"{T}/local-mpiexec/render",
                                                   json={"params": {}}))
    assert status == 200 and job["config"] is None and job["script"].startswith("#!")


async def test_project_tokens_read_and_render_allowed_templates_and_never_write(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    document = yaml.safe_load(SHIPPED_POLICY.read_text())
    document["templates"]["projects"] = {"alpha": ["4d*"]}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(document))
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", policy_path=policy)
    await cp.create_project("alpha")
    token = (await cp.project_token("alpha", scope=RENDER_SCOPE))["token"]

    allowed = await cp.call("POST", f"{T}/4dstem/render", token, json={"params": {}})
    assert allowed.status == 200, await allowed.text()
    denied = await cp.call("POST", f"{T}/local-mpiexec/render", token, json={"params": {}})
    assert denied.status == 403
    # Reading needs its own scope, and then shows only the templates the project may use.
    assert (await cp.call("GET", f"{T}/4dstem", token)).status == 403
    reader = (await cp.project_token("alpha", scope=RENDER_SCOPE + " templates:read"))["token"]
    status, listing = await status_json(await cp.call("GET", T, reader))
    assert status == 200 and [item["name"] for item in listing["items"]] == ["4dstem"]
    response = await cp.call("GET", f"{T}/4dstem", reader)
    assert response.status == 200 and (await response.json())["source"] == shipped_source()
    for path in (f"{T}/4dstem/versions", f"{T}/4dstem/versions/1", f"{T}/4dstem/diff?from=1&to=1"):
        assert (await cp.call("GET", path, reader)).status == 200, path
    for path in (f"{T}/local-mpiexec", f"{T}/local-mpiexec/versions"):
        assert (await cp.call("GET", path, reader)).status == 404, path

    # Writing is for admins only: the policy refuses a project token, whatever its ETag.
    etag = await etag_of(cp, "4dstem")
    for method, path, body in (("PUT", f"{T}/4dstem", {"source": shipped_source()}),
                               ("POST", f"{T}/4dstem/rollback", {"version": 1}),
                               ("DELETE", f"{T}/4dstem", None)):
        refused = await cp.call(method, path, reader, json=body, headers={"If-Match": etag})
        assert refused.status == 403, (method, path, await refused.text())
    assert len((await (await cp.admin("GET", f"{T}/4dstem/versions")).json())["items"]) == 1

    rows = [row[2:6] for row in cp.audit_rows()]
    assert ("templates:render", "template/alpha/4dstem", "allow",
            "clients-work-in-their-project") in rows
    assert ("templates:render", "template/alpha/local-mpiexec", "deny",
            "template-not-allowed") in rows
    # A project token cannot even carry the scope (its role lacks it); a rule denies it besides.
    assert [r for r in rows if r[0] == "templates:write"] == [
        ("templates:write", "template/4dstem", "deny", "missing-scope")] * 3


async def test_writes_and_reads_are_audited(cp: ControlPlane) -> None:
    etag = await etag_of(cp, "4dstem")
    await put(cp, "4dstem", shipped_source(), If_Match=etag)
    rows = [row[2:6] for row in cp.audit_rows()]
    assert ("templates:read", "template/4dstem", "allow", "admins-administer") in rows
    assert ("templates:write", "template/4dstem", "allow", "admins-administer") in rows


# --- dsn admin templates (the CLI against this app, called from a worker thread) ------------------

async def admin_cli(cp: ControlPlane, *args: str, stdin: str | None = None) -> Result:
    url = str(cp.client.make_url("")).rstrip("/")
    group, *rest = args
    argv = ["admin", group, *rest, "--url", url]
    env = {"DSN_ADMIN_TOKEN": cp.admin_token}
    return await asyncio.to_thread(CliRunner().invoke, main, argv, input=stdin, env=env)


async def test_cli_edit_history_diff_rollback_render(cp: ControlPlane, tmp_path: Path) -> None:
    listing = await admin_cli(cp, "templates", "list")
    assert listing.exit_code == 0 and "4dstem" in listing.stdout, listing.output
    shown = await admin_cli(cp, "templates", "show", "4dstem")
    assert shown.stdout == shipped_source() and '"4dstem-v1-' in shown.stderr

    stale = await etag_of(cp, "4dstem")
    edit = tmp_path / "4dstem.yaml"
    edit.write_text(edited(shipped_source(), "default: 256", "default: 512"))
    saved = await admin_cli(cp, "templates", "edit", "4dstem", str(edit))
    assert saved.exit_code == 0 and saved.stdout.startswith("saved 4dstem v2 "), saved.output
    lost = await admin_cli(cp, "templates", "edit", "4dstem", str(edit), "--if-match", stale)
    assert (lost.exit_code == 1
            and lost.stderr.startswith("error: PUT /api/v1/templates/4dstem: 412 ")), lost.output

    broken = edited(shipped_source(), "hwm: {{ params.hwm | yaml }}", "hwm: {{ params.hwm }}")
    edit.write_text(broken)
    refused = await admin_cli(cp, "templates", "edit", "4dstem", str(edit))
    line = line_of(broken, "hwm: {{ params.hwm }}")
    assert refused.exit_code == 1 and f"body (line {line}): " in refused.stderr, refused.output

    history = await admin_cli(cp, "templates", "history", "4dstem")
    assert [line.split()[0] for line in history.stdout.splitlines()] == ["VERSION", "1", "2"]
    diff = await admin_cli(cp, "templates", "diff", "4dstem", "1", "2")
    assert "+    default: 512" in diff.stdout
    rolled = await admin_cli(cp, "templates", "rollback", "4dstem", "1")
    assert rolled.exit_code == 0 and "as v3" in rolled.stdout, rolled.output

    rendered = await admin_cli(cp, "templates", "render", "4dstem", "--param", "hwm=64",
                               "--param", 'targets=["127.0.0.0/8"]')
    assert yaml.safe_load(rendered.stdout)["sessions"][0]["limits"]["hwm"] == 64
    bad = await admin_cli(cp, "templates", "render", "4dstem", "--param", "hwm=0")
    assert bad.exit_code == 1 and "params.hwm" in bad.stderr

    created = await admin_cli(cp, "templates", "edit", "new-scan", "-", "--create",
                              stdin=edited(shipped_source(), "name: 4dstem", "name: new-scan"))
    assert created.exit_code == 0 and "new-scan v1" in created.stdout, created.output
    deleted = await admin_cli(cp, "templates", "delete", "new-scan")
    assert deleted.exit_code == 0 and "v2" in deleted.stdout, deleted.output
