"""The append-only, hash-chained audit log of every authorization decision.

Record ``n`` stores ``hash_n = SHA-256(canonical_json(fields_n + {"prev_hash": hash_(n-1)}))`` where
the fields include ``seq`` and the first record chains to ``GENESIS_HASH``. Canonical JSON is
``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` in UTF-8. The chain
head (last seq and hash) is kept in its own table, written in the same transaction as the record, so
verification notices an edited field, a deleted or reordered record, and a deleted tail.

Writing fails closed: ``record`` returns only once its record is committed (fsynced) and raises
``Unavailable`` if it cannot be written; the caller must then refuse the decision it was about to
grant. Records arriving together are group-committed by the store: chained in arrival order and
written in one transaction, so concurrent decisions share one fsync instead of each waiting for
its own.

Limit: someone able to rewrite the database file can rebuild a consistent chain and head; anchor
``head`` outside the host (a log shipper, a signed checkpoint) to detect that too.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from controlplane.errors import Unavailable
from controlplane.store.audit import AuditRecord, append_audit, audit_head, list_audit
from controlplane.store.engine import Store

__all__ = ["GENESIS_HASH", "AuditLog", "AuditRecord", "AuditVerification", "chain_hash"]

log = logging.getLogger(__name__)

GENESIS_HASH = hashlib.sha256(b"dsn-controlplane-audit-genesis-v1").hexdigest()
_VERIFY_PAGE = 1000

Decision = Literal["allow", "deny"]


def chain_hash(*, seq: int, ts: float, principal: str, action: str, resource: str, decision: str,
               rule: str, request_id: str, prev_hash: str) -> str:
    """The hash of one record: SHA-256 over the canonical JSON of its fields and ``prev_hash``."""
    body = {"seq": seq, "ts": float(ts), "principal": principal, "action": action,
            "resource": resource, "decision": decision, "rule": rule, "request_id": request_id,
            "prev_hash": prev_hash}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _recomputed(rec: AuditRecord) -> str:
    return chain_hash(seq=rec.seq, ts=rec.ts, principal=rec.principal, action=rec.action,
                      resource=rec.resource, decision=rec.decision, rule=rec.rule,
                      request_id=rec.request_id, prev_hash=rec.prev_hash)


@dataclass(frozen=True)
class AuditVerification:
    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str = ""


class _ChainChecker:
    """Pure, incremental chain check: feed records in seq order, then ``finish`` with the head."""

    def __init__(self) -> None:
        self.records = 0
        self._last_seq = 0
        self._last_hash = GENESIS_HASH

    def feed(self, rec: AuditRecord) -> AuditVerification | None:
        """None while the chain holds; the failure at the first broken record."""
        expected = self._last_seq + 1
        if rec.seq != expected:
            return self._bad(expected, f"record {expected} is missing (next is {rec.seq})")
        if rec.prev_hash != self._last_hash:
            return self._bad(rec.seq, f"record {rec.seq} does not link to record {rec.seq - 1}")
        if _recomputed(rec) != rec.hash:
            return self._bad(rec.seq, f"record {rec.seq} was modified (hash mismatch)")
        self.records += 1
        self._last_seq, self._last_hash = rec.seq, rec.hash
        return None

    def finish(self, head: tuple[int, str] | None) -> AuditVerification:
        head_seq, head_hash = head if head is not None else (0, GENESIS_HASH)
        if head_seq > self._last_seq:
            return self._bad(self._last_seq + 1, f"records {self._last_seq + 1}..{head_seq} "
                                                 "were deleted from the end of the log")
        if head_seq < self._last_seq:
            return self._bad(head_seq + 1, f"the chain head is at {head_seq} but records run "
                                           f"to {self._last_seq}")
        if head_hash != self._last_hash:
            return self._bad(head_seq, f"record {head_seq} does not match the chain head")
        return AuditVerification(ok=True, records=self.records)

    def _bad(self, seq: int, problem: str) -> AuditVerification:
        return AuditVerification(ok=False, records=self.records, first_bad_seq=seq,
                                 problem=problem)


class AuditLog:
    """Appends decisions to the chain in the store and verifies it."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def record(self, *, principal: str, action: str, resource: str, decision: Decision,
                     rule: str, request_id: str) -> AuditRecord:
        """Append one decision and return it once durable; ``Unavailable`` if it cannot be written
        (refuse the decision)."""
        if decision not in ("allow", "deny"):
            raise ValueError(f"decision must be 'allow' or 'deny', not {decision!r}")
        ts = self._clock()

        def build(seq: int, head_hash: str | None) -> AuditRecord:
            prev = GENESIS_HASH if head_hash is None else head_hash
            digest = chain_hash(seq=seq, ts=ts, principal=principal, action=action,
                                resource=resource, decision=decision, rule=rule,
                                request_id=request_id, prev_hash=prev)
            return AuditRecord(seq, float(ts), principal, action, resource, decision, rule,
                               request_id, prev, digest)

        try:
            return await append_audit(self._store, build)
        except Exception as exc:
            log.error("audit record not written (%s); refusing the decision", type(exc).__name__)
            raise Unavailable("audit log unavailable") from exc

    async def verify(self) -> AuditVerification:
        """Walk the whole chain in pages and compare its end with the stored head."""
        checker = _ChainChecker()
        after = 0
        while page := await list_audit(self._store, after_seq=after, limit=_VERIFY_PAGE):
            for rec in page:
                if (failure := checker.feed(rec)) is not None:
                    return failure
            after = page[-1].seq
        return checker.finish(await audit_head(self._store))

    async def list(self, after_seq: int = 0, limit: int = 100) -> builtins.list[AuditRecord]:
        """Up to ``limit`` records after ``after_seq``, oldest first."""
        return await list_audit(self._store, after_seq=after_seq, limit=limit)
