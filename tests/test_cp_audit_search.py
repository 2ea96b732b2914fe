"""``GET /api/v1/audit`` filters and pages: by principal (a substring, any case), action,
decision and time, newest first with ``before`` to page back, and bad filters refused naming the
field."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cp_helpers import ClientFactory, ControlPlane, start_control_plane


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    return await start_control_plane(aiohttp_client, tmp_path / "state")


async def search(cp: ControlPlane, query: str) -> dict[str, Any]:
    response = await cp.admin("GET", f"/api/v1/audit?{query}")
    assert response.status == 200, await response.text()
    return dict(await response.json())


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


async def test_filters_narrow_the_list(cp: ControlPlane) -> None:
    await cp.create_project("audit-demo")
    token = (await cp.project_token("audit-demo", subject="Bob"))["token"]
    change = "/api/v1/projects/audit-demo"
    assert (await cp.call("PATCH", change, token, json={"quotas": {"x": 1}})).status == 403
    cp.clock.advance(100)
    between = cp.clock() - 50
    assert (await cp.admin("PATCH", change, json={"quotas": {"x": 1}})).status == 200

    denied = (await search(cp, "decision=deny"))["items"]
    assert [(r["action"], r["rule"]) for r in denied] == [
        ("projects:update", "missing-scope")]
    assert denied[0]["principal"].startswith("project:Bob@audit-demo#")
    by_bob = (await search(cp, "principal=bob%40AUDIT"))["items"]
    assert [r["decision"] for r in by_bob] == ["deny"]
    listed = (await search(cp, "action=projects:update"))["items"]
    assert [r["decision"] for r in listed] == ["deny", "allow"]
    recent = (await search(cp, f"since={iso(between)}&action=projects:update"))["items"]
    assert [r["decision"] for r in recent] == ["allow"]
    earlier = (await search(cp, f"until={iso(between)}&action=projects:update"))["items"]
    assert [r["decision"] for r in earlier] == ["deny"]
    assert (await search(cp, "principal=nobody-at-all"))["items"] == []


async def test_newest_first_pages_back_with_before_and_forward_with_after(
        cp: ControlPlane) -> None:
    for _ in range(5):
        await cp.admin("GET", "/api/v1/projects")
    newest = await search(cp, "order=desc&limit=2&action=projects:list")
    seqs = [r["seq"] for r in newest["items"]]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) == 2
    assert newest["next_before"] == seqs[-1] and newest["next_after"] == seqs[0]
    older = await search(cp, f"order=desc&limit=2&action=projects:list"
                             f"&before={newest['next_before']}")
    older_seqs = [r["seq"] for r in older["items"]]
    assert len(older_seqs) == 2 and max(older_seqs) < min(seqs)
    newer = await search(cp, f"limit=2&action=projects:list&after={older['next_after']}")
    assert [r["seq"] for r in newer["items"]] == sorted(seqs)
    empty = await search(cp, "order=desc&before=1")
    assert empty["items"] == [] and empty["next_before"] == 1


@pytest.mark.parametrize(("query", "field"), [
    ("decision=maybe", "decision"),
    ("since=2026-01-01T00:00:00", "since"),
    ("until=yesterday", "until"),
    ("action=DROP%20TABLE", "action"),
    ("before=-1", "before"),
    ("order=sideways", "order"),
    ("principal=", "principal"),
])
async def test_a_bad_filter_is_refused_naming_the_field(cp: ControlPlane, query: str,
                                                        field: str) -> None:
    response = await cp.admin("GET", f"/api/v1/audit?{query}")
    assert response.status == 400
    problem = await response.json()
    assert [e["field"] for e in problem["errors"]] == [field]


async def test_a_project_token_may_not_search(cp: ControlPlane) -> None:
    await cp.create_project("audit-demo")
    token = (await cp.project_token("audit-demo"))["token"]
    # The audit is an admin's route: a project token is not a credential there at all.
    assert (await cp.call("GET", "/api/v1/audit?decision=deny", token)).status == 401
