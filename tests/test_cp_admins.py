"""Named admin principals over real HTTP (aiohttp test server, real SQLite): admins act under
their own names and the audit log tells them apart; one admin adds, issues tokens to, rotates and
removes another; a removed admin's tokens stop at once; the last active admin stays; no other
kind of token reaches these routes; an upgraded store keeps its admins; offline recovery."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from cp_helpers import ClientFactory, ControlPlane, sql, start_control_plane, write_policy
from test_cp_api import assert_problem

from controlplane.admin.bootstrap import recover
from controlplane.errors import ConfigurationError
from controlplane.middlewares import ROUTE_SPECS
from controlplane.store.engine import Store
from controlplane.store.migrations import MIGRATIONS

DAY = 86400
ADMIN_ROUTES = [("POST", "/api/v1/admins"), ("GET", "/api/v1/admins"),
                ("DELETE", "/api/v1/admins/{admin}"), ("GET", "/api/v1/admins/{admin}/tokens"),
                ("POST", "/api/v1/admins/{admin}/tokens"), ("GET", "/api/v1/whoami")]


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    # Every refusal its own audit record and none held back, so each test can name its own
    # (floods are summed up and limited otherwise: test_cp_api.py covers that).
    policy = write_policy(tmp_path / "policy", unauthenticated_per_source="10000/minute")
    return await start_control_plane(aiohttp_client, tmp_path / "state", policy_path=policy,
                                     audit_denial_window_s=0)


async def status(cp: ControlPlane, method: str, path: str, token: str, **kwargs: Any) -> int:
    return int((await cp.call(method, path, token, **kwargs)).status)


def audit_tail(cp: ControlPlane, count: int) -> list[tuple[Any, ...]]:
    """(principal, action, resource, decision, rule) of the last ``count`` records."""
    return [row[1:6] for row in cp.audit_rows()[-count:]]


def admins_table(cp: ControlPlane) -> dict[str, tuple[Any, ...]]:
    return {row[0]: row[1:] for row in sql(cp.database, "SELECT name, created_by, removed_at "
                                                        "FROM admins")}


async def test_named_admins_act_under_their_names_and_the_audit_log_tells_them_apart(
        cp: ControlPlane) -> None:
    bob = await cp.add_admin("bob")
    assert (bob["kind"], bob["subject"], bob["project"]) == ("admin", "bob", None)
    first = await cp.admin("GET", "/api/v1/whoami")
    assert (await first.json())["subject"] == "admin"
    created = await cp.call("POST", "/api/v1/projects", bob["token"], json={"name": "by-bob"})
    assert created.status == 201, await created.text()
    me = await (await cp.call("GET", "/api/v1/whoami", bob["token"])).json()
    assert (me["kind"], me["subject"], me["jti"]) == ("admin", "bob", bob["jti"])
    assert me["expires_at"] == bob["expires_at"] and 0 < me["expires_in"] <= 30 * DAY
    principals = [row[0] for row in audit_tail(cp, 4)]
    assert principals[0].startswith("admin:admin#")  # the first admin added bob ...
    assert principals[1].startswith("admin:admin#")  # ... and asked who it is
    assert principals[2:] == [f"admin:bob#{bob['jti']}"] * 2  # bob acted as bob
    assert audit_tail(cp, 4)[2][1:] == ("projects:create", "project", "allow", "admins-administer")
    assert admins_table(cp)["bob"][0].startswith("admin:admin#")


async def test_an_admin_issues_rotates_and_removes_another(cp: ControlPlane) -> None:
    bob = await cp.add_admin("bob", ttl=3600)
    assert bob["expires_in"] == 3600
    cp.clock.advance(1)  # tokens list in the order they were issued
    second = await cp.admin("POST", "/api/v1/admins/bob/tokens", json={})
    assert second.status == 201 and second.headers["Cache-Control"] == "no-store"
    second_token = (await second.json())["token"]
    for token in (bob["token"], second_token):  # both of bob's tokens work side by side
        assert await status(cp, "GET", "/api/v1/projects", token) == 200
    cp.clock.advance(1)
    rotated = await cp.call("POST", "/api/v1/admins/bob/tokens", bob["token"],
                            json={"revoke_others": True})
    assert rotated.status == 201
    newest = await rotated.json()
    for token in (bob["token"], second_token):  # a rotation leaves only the new token
        await assert_problem(await cp.call("GET", "/api/v1/projects", token), 401)
    assert await status(cp, "GET", "/api/v1/projects", newest["token"]) == 200
    listed = await (await cp.admin("GET", "/api/v1/admins/bob/tokens")).json()
    assert [t["revoked_at"] is None for t in listed["items"]] == [False, False, True]
    assert listed["items"][2]["parent_jti"] == bob["jti"]  # bob's own token asked for it
    assert all("token" not in t for t in listed["items"])

    removed = await cp.admin("DELETE", "/api/v1/admins/bob")
    assert removed.status == 200
    assert (await removed.json())["active"] is False
    problem = await assert_problem(await cp.call("GET", "/api/v1/projects", newest["token"]), 401)
    assert "revoked" in problem["detail"]
    assert audit_tail(cp, 1) == [("anonymous@127.0.0.1", "projects:list", "project", "deny",
                                  "token:revoked")]
    again = await cp.admin("DELETE", "/api/v1/admins/bob")  # removing twice is harmless
    assert again.status == 200
    listing = {a["name"]: a for a in (await (await cp.admin("GET", "/api/v1/admins")).json())
               ["items"]}
    assert listing["bob"]["active"] is False and listing["bob"]["live_tokens"] == 0
    assert listing["admin"]["active"] is True and listing["admin"]["live_tokens"] == 1
    await assert_problem(await cp.admin("DELETE", "/api/v1/admins/nobody"), 404)
    await assert_problem(await cp.admin("POST", "/api/v1/admins/nobody/tokens", json={}), 404)


async def test_a_removed_admin_gets_no_token_until_added_again(cp: ControlPlane) -> None:
    bob = await cp.add_admin("bob")
    await assert_problem(await cp.admin("POST", "/api/v1/admins", json={"name": "bob"}), 409)
    assert (await cp.admin("DELETE", "/api/v1/admins/bob")).status == 200
    refused = await assert_problem(
        await cp.admin("POST", "/api/v1/admins/bob/tokens", json={}), 409)
    assert "removed" in refused["detail"]
    back = await cp.add_admin("bob")
    assert await status(cp, "GET", "/api/v1/projects", back["token"]) == 200
    await assert_problem(await cp.call("GET", "/api/v1/projects", bob["token"]), 401)


async def test_the_last_active_admin_cannot_be_removed(cp: ControlPlane) -> None:
    refused = await assert_problem(await cp.admin("DELETE", "/api/v1/admins/admin"), 409)
    assert "last active admin" in refused["detail"]
    assert await status(cp, "GET", "/api/v1/projects", cp.admin_token) == 200
    bob = await cp.add_admin("bob")
    assert await status(cp, "DELETE", "/api/v1/admins/admin", bob["token"]) == 200
    await assert_problem(await cp.admin("GET", "/api/v1/projects"), 401)
    await assert_problem(await cp.call("DELETE", "/api/v1/admins/bob", bob["token"]), 409)
    assert admins_table(cp)["bob"][1] is None


async def test_an_admin_token_naming_no_active_admin_is_refused(cp: ControlPlane) -> None:
    # Signed with the service's own key, so only the admin check can refuse it.
    ghost = cp.sign(cp.claims(sub="ghost", jti="ghost-1"))
    problem = await assert_problem(await cp.call("GET", "/api/v1/projects", ghost), 401)
    assert "admin" in problem["detail"]
    assert audit_tail(cp, 1)[0][3:] == ("deny", "token:unknown_admin")
    await cp.add_admin("bob")
    assert (await cp.admin("DELETE", "/api/v1/admins/bob")).status == 200
    # A token of bob the removal did not revoke (issued while it ran) is refused all the same.
    late = cp.sign(cp.claims(sub="bob", jti="late-1"))
    await assert_problem(await cp.call("GET", "/api/v1/projects", late), 401)
    assert audit_tail(cp, 1)[0][3:] == ("deny", "token:unknown_admin")


async def test_admin_tokens_are_capped_by_the_policy_and_names_are_checked(
        cp: ControlPlane) -> None:
    too_long = await cp.admin("POST", "/api/v1/admins", json={"name": "bob", "ttl": 31 * DAY})
    assert "2592000" in (await assert_problem(too_long, 400))["detail"]
    bad = await assert_problem(await cp.admin("POST", "/api/v1/admins", json={"name": "Bob"}),
                               400)
    assert bad["errors"][0]["field"] == "name"
    unknown = await cp.admin("POST", "/api/v1/admins", json={"name": "bob", "scope": "x"})
    assert (await assert_problem(unknown, 400))["errors"][0]["field"] == "scope"
    await assert_problem(await cp.admin("GET", "/api/v1/admins/Not_A..Name/tokens"), 404)
    assert "bob" not in admins_table(cp)
    issued = await cp.add_admin("bob")
    assert issued["expires_in"] == 30 * DAY  # the policy's cap by default


async def test_no_other_kind_of_token_reaches_the_admin_routes(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    project = (await cp.project_token("alpha"))["token"]
    consumer = (await cp.exchange(project, kind="consumer"))["token"]
    served = {(spec.method, spec.path) for spec in cp.client.app[ROUTE_SPECS].values()}
    assert set(ADMIN_ROUTES) <= served
    before = sql(cp.database, "SELECT * FROM admins ORDER BY name")
    for method, path in ADMIN_ROUTES:
        for token in (project, consumer):
            answer = await cp.call(method, path.format(admin="admin"), token, json={"name": "x"})
            await assert_problem(answer, 401)
            assert audit_tail(cp, 1)[0][3:] == ("deny", "token:kind")
    assert sql(cp.database, "SELECT * FROM admins ORDER BY name") == before


async def test_an_upgraded_store_keeps_every_admin_that_held_a_token(tmp_path: Path) -> None:
    database = tmp_path / "state" / "cp.sqlite"
    database.parent.mkdir()
    with sqlite3.connect(database) as conn:
        for step in MIGRATIONS[:6]:
            for statement in step:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 6")
        conn.executemany("INSERT INTO tokens VALUES (?, NULL, 'admin', ?, 's', ?, 9e9, NULL, NULL)",
                         [("j1", "admin", 20.0), ("j2", "admin", 10.0), ("j3", "ops", 30.0)])
        conn.execute("INSERT INTO tokens VALUES ('j4', 'p', 'project', 'alice', 's', 1, 9, "
                     "NULL, NULL)")
    store = await Store.open(database)
    await store.close()
    assert sql(database, "SELECT * FROM admins ORDER BY name") == [
        ("admin", 10.0, "upgrade", None), ("ops", 30.0, "upgrade", None)]


async def test_offline_recovery_enables_an_admin_with_a_new_token_and_is_audited(
        cp: ControlPlane, tmp_path: Path) -> None:
    bob = await cp.add_admin("bob")
    assert (await cp.call("DELETE", "/api/v1/admins/admin", bob["token"])).status == 200
    assert (await cp.admin("GET", "/api/v1/projects")).status == 401
    spare = tmp_path / "spare.token"  # bob's tokens are lost: one is recovered, the rest revoked
    await recover(cp.settings.state_dir, name="bob", out=spare, now=cp.clock())
    assert await status(cp, "GET", "/api/v1/projects", bob["token"]) == 200
    await recover(cp.settings.state_dir, name="bob", out=tmp_path / "bob.token", now=cp.clock(),
                  revoke_others=True)
    for lost in (bob["token"], spare.read_text().strip()):
        await assert_problem(await cp.call("GET", "/api/v1/projects", lost), 401)
    out = tmp_path / "recovered.token"
    claims = await recover(cp.settings.state_dir, name="admin", out=out, ttl_s=DAY,
                           now=cp.clock())
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    token = out.read_text().strip()
    me = await (await cp.call("GET", "/api/v1/whoami", token)).json()
    assert (me["subject"], me["jti"], me["expires_in"]) == ("admin", claims.jti, DAY)
    (principal, action, resource, decision, rule), = audit_tail(cp, 2)[:1]
    assert principal.startswith("offline:") and (action, resource, decision, rule) == (
        "admin.recover", f"admin/admin#{claims.jti}", "allow", "offline-recovery")
    assert token not in str(cp.audit_rows())
    assert (await cp.call("GET", "/api/v1/audit/verify", token)).status == 200
    with pytest.raises(ConfigurationError, match="is not 1 to 63"):
        await recover(cp.settings.state_dir, name="../x", out=tmp_path / "x.token")
    assert not (tmp_path / "x.token").exists()
