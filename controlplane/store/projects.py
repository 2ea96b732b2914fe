"""Projects' SQL: a project's templates, quotas and ``not_before`` cut-off, each change in one
``Store.write`` transaction."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from controlplane.errors import Conflict, NotFound
from controlplane.store.engine import Conn, Row, Store, time_or_none


@dataclass(frozen=True)
class Project:
    name: str
    allowed_templates: tuple[str, ...] = ()
    quotas: dict[str, int] = field(default_factory=dict)
    not_before: float | None = None
    created_at: float = 0.0


def _project(row: Row) -> Project:
    return Project(name=row["name"], allowed_templates=tuple(json.loads(row["allowed_templates"])),
                   quotas=dict(json.loads(row["quotas"])),
                   not_before=time_or_none(row["not_before"]), created_at=float(row["created_at"]))


async def create_project(store: Store, p: Project) -> None:
    async def body(conn: Conn) -> None:
        cursor = await conn.execute(
            "INSERT INTO projects VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO NOTHING",
            (p.name, json.dumps(list(p.allowed_templates)), json.dumps(p.quotas),
             p.not_before, p.created_at))
        if cursor.rowcount == 0:
            raise Conflict(f"project {p.name!r} already exists")
    await store.write(body)


async def get_project(store: Store, name: str) -> Project | None:
    rows = await store.read("SELECT * FROM projects WHERE name = ?", (name,))
    return _project(rows[0]) if rows else None


async def list_projects(store: Store) -> list[Project]:
    return [_project(row) for row in await store.read("SELECT * FROM projects ORDER BY name")]


async def update_project(store: Store, name: str, *,
                         allowed_templates: Sequence[str] | None = None,
                         quotas: dict[str, int] | None = None,
                         not_before: float | None = None) -> Project:
    """Change the given fields (``None`` leaves a field as it is); NotFound if no such project."""
    async def body(conn: Conn) -> Project:
        cursor = await conn.execute(
            "UPDATE projects SET allowed_templates = COALESCE(?, allowed_templates), "
            "quotas = COALESCE(?, quotas), not_before = COALESCE(?, not_before) "
            "WHERE name = ? RETURNING *",
            (None if allowed_templates is None else json.dumps(list(allowed_templates)),
             None if quotas is None else json.dumps(quotas), not_before, name))
        row = await cursor.fetchone()
        if row is None:
            raise NotFound(f"project {name!r} does not exist")
        return _project(row)
    return await store.write(body)
