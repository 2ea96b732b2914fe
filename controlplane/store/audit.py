"""The audit chain's SQL: records and the chain head, kept in separate tables so a deleted tail
shows. Hashing lives in ``controlplane.audit``; this module only stores what it builds.

Appends are grouped writes (``Store.write_grouped``): the engine runs ``_append_chain`` once per
batch over every append queued in it, so a batch extends the chain with one head read, one insert
and one head move. The chain-extension SQL lives here rather than in the engine because all the
engine needs to know is that some writes run together under one savepoint; what they write, and
that it is a hash chain, is this feature's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields

from controlplane.store.engine import Conn, Row, Store


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    ts: float
    principal: str
    action: str
    resource: str
    decision: str
    rule: str
    request_id: str
    prev_hash: str
    hash: str
    count: int = 1  # decisions the record stands for (a summary of repeated denials: more)


CHAIN_LOCK = "audit chain"
# Builds the record to append from the next seq and the head's hash (None for the first record).
AuditBuilder = Callable[[int, str | None], AuditRecord]


def _audit(row: Row) -> AuditRecord:
    return AuditRecord(seq=int(row["seq"]), ts=float(row["ts"]), principal=row["principal"],
                       action=row["action"], resource=row["resource"], decision=row["decision"],
                       rule=row["rule"], request_id=row["request_id"], prev_hash=row["prev_hash"],
                       hash=row["hash"], count=int(row["count"]))


# Its columns named: on PostgreSQL ``count``, added later, comes after the table's ``rowid``.
_INSERT_RECORD = (f"INSERT INTO audit ({', '.join(f.name for f in fields(AuditRecord))}) "
                  f"VALUES ({', '.join('?' * len(fields(AuditRecord)))})")


async def append_audit(store: Store, build: AuditBuilder) -> AuditRecord:
    """Append ``build(next_seq, head_hash)`` and move the chain head; return once committed.

    Appends queued together are chained in queue order in one transaction, the head read
    inside it, so appends from other processes sharing the database still form a single
    chain. ``head_hash`` is None for the first record. If the batch cannot be written, every
    append in it raises ``Unavailable`` and the chain is left as it was.
    """
    return await store.write_grouped(_append_chain, build)


async def _append_chain(builds: Sequence[AuditBuilder], conn: Conn) -> list[AuditRecord]:
    """Chain ``builds`` in order onto the head, read inside the write transaction so appends from
    other processes sharing the database still form a single chain; then move the head once.

    The lock, held to the commit, serialises appenders of every process: without it two of them
    could read the same head and fork the chain."""
    await conn.lock(CHAIN_LOCK)
    async with conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1") as cursor:
        head = await cursor.fetchone()
    seq, prev = (0, None) if head is None else (int(head["seq"]), str(head["hash"]))
    records = []
    for build in builds:
        record = build(seq + 1, prev)
        records.append(record)
        seq, prev = record.seq, record.hash
    await conn.executemany(_INSERT_RECORD, [astuple(record) for record in records])
    await conn.execute("INSERT INTO audit_head VALUES (1, ?, ?) ON CONFLICT(id) DO UPDATE "
                       "SET seq = excluded.seq, hash = excluded.hash", (seq, prev))
    return records


async def audit_head(store: Store) -> tuple[int, str] | None:
    rows = await store.read("SELECT seq, hash FROM audit_head WHERE id = 1")
    return (int(rows[0]["seq"]), str(rows[0]["hash"])) if rows else None


async def list_audit(store: Store, after_seq: int = 0, limit: int = 100) -> list[AuditRecord]:
    rows = await store.read("SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                            (after_seq, limit))
    return [_audit(row) for row in rows]


@dataclass(frozen=True)
class AuditFilter:
    """Which records a search returns: seq strictly between ``after_seq`` and ``before_seq``, a
    principal containing ``principal`` (any case), exactly ``action`` and ``decision``, a time in
    [``since``, ``until``); None matches anything."""

    after_seq: int = 0
    before_seq: int | None = None
    principal: str | None = None
    action: str | None = None
    decision: str | None = None
    since: float | None = None
    until: float | None = None

    def where(self) -> tuple[str, tuple[object, ...]]:
        tests = [("seq > ?", self.after_seq), ("seq < ?", self.before_seq),
                 ("instr(lower(principal), lower(?)) > 0", self.principal),
                 ("action = ?", self.action), ("decision = ?", self.decision),
                 ("ts >= ?", self.since), ("ts < ?", self.until)]
        given = [(test, value) for test, value in tests if value is not None]
        return " AND ".join(test for test, _ in given), tuple(value for _, value in given)


async def search_audit(store: Store, where: AuditFilter, limit: int = 100, *,
                       newest_first: bool = False) -> list[AuditRecord]:
    """Up to ``limit`` records ``where`` selects, oldest first (``newest_first``: newest first,
    so a page of the most recent records, or of those just before ``before_seq``)."""
    condition, values = where.where()
    order = "DESC" if newest_first else "ASC"
    rows = await store.read(f"SELECT * FROM audit WHERE {condition} ORDER BY seq {order} LIMIT ?",
                            (*values, limit))
    return [_audit(row) for row in rows]


async def get_audit_record(store: Store, seq: int) -> AuditRecord | None:
    rows = await store.read("SELECT * FROM audit WHERE seq = ?", (seq,))
    return _audit(rows[0]) if rows else None
