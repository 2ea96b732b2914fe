"""The ``template_versions`` SQL: every write appends a row; nothing is ever updated in place.

The current version of a template is its highest; a deletion appends a *tombstone* (``deleted``,
empty source), so the template reads as absent while its history stays, and a rollback to version
N appends a new version carrying N's source.

Concurrency (RFC 9110 conditional requests): each version has a strong ETag
``"<name>-v<version>-<sha256[:16]>"``. Writes to an existing template need ``If-Match`` with the
latest version's ETag, else ``PreconditionRequired`` (a write that names no version could silently
overwrite someone else's); a stale ETag is ``PreconditionFailed``. A new template is created with
``If-None-Match: *`` (``PreconditionFailed`` if it exists). The check runs inside the store's write
transaction, so two writers holding the same ETag cannot both win.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from controlplane.errors import Conflict, NotFound, PreconditionFailed, PreconditionRequired
from controlplane.store.engine import Conn, Row, Store

SHIPPED_AUTHOR: Final = "shipped"


@dataclass(frozen=True)
class TemplateVersion:
    name: str
    version: int
    kind: str
    source: str
    sha256: str
    author: str
    created_at: float
    deleted: bool

    @property
    def etag(self) -> str:
        return f'"{self.name}-v{self.version}-{self.sha256[:16]}"'


@dataclass(frozen=True)
class Precondition:
    """The conditional headers of a write: the ETags of ``If-Match`` (``*`` kept as is) and
    whether ``If-None-Match: *`` was sent."""

    if_match: tuple[str, ...] | None
    if_none_match_any: bool


@dataclass(frozen=True)
class NewVersion:
    name: str
    kind: str
    source: str
    author: str
    created_at: float
    deleted: bool = False


def _row(row: Row) -> TemplateVersion:
    return TemplateVersion(name=row["name"], version=int(row["version"]), kind=row["kind"],
                           source=row["source"], sha256=row["sha256"], author=row["author"],
                           created_at=float(row["created_at"]), deleted=bool(row["deleted"]))


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


async def has_versions(store: Store) -> bool:
    """Whether the store holds any template version, tombstones included."""
    return bool(await store.read("SELECT 1 FROM template_versions LIMIT 1"))


async def latest(store: Store, name: str) -> TemplateVersion | None:
    """The highest version of ``name``, tombstone or not; None if it never existed."""
    rows = await store.read("SELECT * FROM template_versions WHERE name = ? "
                            "ORDER BY version DESC LIMIT 1", (name,))
    return _row(rows[0]) if rows else None


async def current(store: Store, name: str) -> TemplateVersion:
    """The live current version of ``name``; NotFound if it never existed or was deleted."""
    found = await latest(store, name)
    if found is None or found.deleted:
        raise NotFound(f"template {name!r} does not exist")
    return found


async def list_current(store: Store) -> list[TemplateVersion]:
    rows = await store.read(
        "SELECT t.* FROM template_versions t JOIN (SELECT name, MAX(version) AS version "
        "FROM template_versions GROUP BY name) m ON m.name = t.name AND m.version = t.version "
        "WHERE t.deleted = 0 ORDER BY t.name")
    return [_row(row) for row in rows]


async def history(store: Store, name: str) -> list[TemplateVersion]:
    """Every version of ``name``, oldest first (tombstones included); NotFound if none."""
    rows = await store.read("SELECT * FROM template_versions WHERE name = ? ORDER BY version",
                            (name,))
    if not rows:
        raise NotFound(f"template {name!r} does not exist")
    return [_row(row) for row in rows]


async def get_version(store: Store, name: str, version: int) -> TemplateVersion:
    rows = await store.read("SELECT * FROM template_versions WHERE name = ? AND version = ?",
                            (name, version))
    if not rows:
        raise NotFound(f"template {name!r} has no version {version}")
    return _row(rows[0])


def check_precondition(pre: Precondition, found: TemplateVersion | None) -> None:
    """PreconditionRequired for a write to an existing template naming no version;
    PreconditionFailed when the named one (or the absence ``If-None-Match: *`` asks for) is not
    what the store holds."""
    live = found is not None and not found.deleted
    if pre.if_none_match_any and live:
        raise PreconditionFailed("the template exists; send If-Match with its ETag to replace it")
    if pre.if_match is None:
        if live:
            raise PreconditionRequired("send If-Match with the current ETag (GET the template)")
        if not pre.if_none_match_any:
            raise PreconditionRequired("send If-None-Match: * to create a template")
        return
    if found is None or not ((live and "*" in pre.if_match) or found.etag in pre.if_match):
        raise PreconditionFailed("the template changed since that ETag (a lost update); "
                                 "GET it again and retry")


async def _latest_in(conn: Conn, name: str) -> TemplateVersion | None:
    async with conn.execute("SELECT * FROM template_versions WHERE name = ? "
                            "ORDER BY version DESC LIMIT 1", (name,)) as cursor:
        row = await cursor.fetchone()
    return None if row is None else _row(row)


async def _insert(conn: Conn, new: NewVersion, version: int) -> TemplateVersion:
    record = TemplateVersion(name=new.name, version=version, kind=new.kind, source=new.source,
                             sha256=_digest(new.source), author=new.author,
                             created_at=new.created_at, deleted=new.deleted)
    await conn.execute("INSERT INTO template_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.name, record.version, record.kind, record.source, record.sha256,
                        record.author, record.created_at, int(record.deleted)))
    return record


def _check_kind(found: TemplateVersion | None, kind: str) -> None:
    if found is not None and not found.deleted and found.kind != kind:
        # Sessions and jobs look templates up by name and rely on its kind staying put.
        raise Conflict(f"template {found.name!r} is a {found.kind} template; delete it before "
                       f"saving a {kind} template under that name")


async def save_version(store: Store, new: NewVersion, pre: Precondition) -> TemplateVersion:
    """Append ``new`` as the next version if ``pre`` holds against the latest one, in one write
    transaction, so no other writer can slip in between the check and the insert."""
    async def body(conn: Conn) -> TemplateVersion:
        found = await _latest_in(conn, new.name)
        check_precondition(pre, found)
        _check_kind(found, new.kind)
        return await _insert(conn, new, 1 if found is None else found.version + 1)
    return await store.write(body)


async def delete_version(store: Store, name: str, author: str, now: float,
                         pre: Precondition) -> TemplateVersion:
    """Append a tombstone after the live current version of ``name``; NotFound if there is none."""
    async def body(conn: Conn) -> TemplateVersion:
        found = await _latest_in(conn, name)
        if found is None or found.deleted:
            raise NotFound(f"template {name!r} does not exist")
        check_precondition(pre, found)
        tombstone = NewVersion(name, found.kind, "", author, now, deleted=True)
        return await _insert(conn, tombstone, found.version + 1)
    return await store.write(body)


async def seed(store: Store, shipped: Mapping[str, tuple[str, str]], now: float) -> int:
    """Store ``shipped`` (name -> (kind, source)) as version 1 if the store holds no template
    version at all; return how many were stored (0 on every later start)."""
    async def body(conn: Conn) -> int:
        async with conn.execute("SELECT 1 FROM template_versions LIMIT 1") as cursor:
            if await cursor.fetchone() is not None:
                return 0
        for name, (kind, source) in sorted(shipped.items()):
            await _insert(conn, NewVersion(name, kind, source, SHIPPED_AUTHOR, now), 1)
        return len(shipped)
    return await store.write(body)
