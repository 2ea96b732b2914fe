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

Someone able to rewrite the database file can rebuild a consistent chain and head: signed
checkpoints of the head, kept outside the database (``controlplane.anchor``), catch that up to the
last checkpoint; ``verify`` takes them as ``anchors``.

Repeated denials (a flood of requests with no or a forged token, or beyond a rate limit) are not one
record each: ``DenialDigest`` records a principal's first denial in a window as it happens and sums
up the rest in one record whose ``count`` says how many it stands for. A denial grants nothing, so
the fail-closed rule above (no decision takes effect unrecorded) is about grants.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

from controlplane.errors import Unavailable
from controlplane.store.audit import (
    AuditFilter,
    AuditRecord,
    append_audit,
    audit_head,
    list_audit,
    search_audit,
)
from controlplane.store.engine import Store

__all__ = ["GENESIS_HASH", "Anchor", "AuditLog", "AuditRecord", "AuditVerification", "DenialDigest",
           "chain_hash"]

log = logging.getLogger("dsn.controlplane.audit")

GENESIS_HASH = hashlib.sha256(b"dsn-controlplane-audit-genesis-v1").hexdigest()
_VERIFY_PAGE = 1000

Decision = Literal["allow", "deny"]


def chain_hash(*, seq: int, ts: float, principal: str, action: str, resource: str, decision: str,
               rule: str, request_id: str, prev_hash: str, count: int = 1) -> str:
    """The hash of one record: SHA-256 over the canonical JSON of its fields and ``prev_hash``."""
    body: dict[str, object] = {
        "seq": seq, "ts": float(ts), "principal": principal, "action": action,
        "resource": resource, "decision": decision, "rule": rule, "request_id": request_id,
        "prev_hash": prev_hash}
    if count != 1:
        # Hashed only when it says more than one: records written before counts existed verify.
        body["count"] = count
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _recomputed(rec: AuditRecord) -> str:
    return chain_hash(seq=rec.seq, ts=rec.ts, principal=rec.principal, action=rec.action,
                      resource=rec.resource, decision=rec.decision, rule=rec.rule,
                      request_id=rec.request_id, prev_hash=rec.prev_hash, count=rec.count)


@dataclass(frozen=True)
class AuditVerification:
    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str = ""
    checkpoints: int = 0  # signed checkpoints the chain was checked against


@dataclass(frozen=True)
class Anchor:
    """What a signed checkpoint vouches for: record ``seq`` had hash ``hash`` at time ``ts``."""

    seq: int
    hash: str
    ts: float


def utc_text(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class _ChainChecker:
    """Pure, incremental chain check: feed records in seq order, then ``finish`` with the head.

    ``anchors`` (any order) are checkpoints signed outside the database: each named record must
    exist with the hash the checkpoint recorded, which a chain rebuilt or cut short cannot fake.
    """

    def __init__(self, anchors: Iterable[Anchor] = ()) -> None:
        self.records = 0
        self._last_seq = 0
        self._last_hash = GENESIS_HASH
        self._anchors = sorted(anchors, key=lambda anchor: anchor.seq)
        self._next_anchor = 0

    def feed(self, rec: AuditRecord) -> AuditVerification | None:
        """None while the chain holds; the failure at the first broken record."""
        expected = self._last_seq + 1
        if rec.seq != expected:
            return self._bad(expected, f"record {expected} is missing (next is {rec.seq})")
        if rec.prev_hash != self._last_hash:
            return self._bad(rec.seq, f"record {rec.seq} does not link to record {rec.seq - 1}")
        if _recomputed(rec) != rec.hash:
            return self._bad(rec.seq, f"record {rec.seq} was modified (hash mismatch)")
        while (anchor := self._anchor()) is not None and anchor.seq == rec.seq:
            if anchor.hash != rec.hash:
                return self._bad(rec.seq, f"record {rec.seq} is not the one the checkpoint of "
                                          f"{utc_text(anchor.ts)} signed: the chain was rewritten")
            self._next_anchor += 1
        self.records += 1
        self._last_seq, self._last_hash = rec.seq, rec.hash
        return None

    def _anchor(self) -> Anchor | None:
        return self._anchors[self._next_anchor] if self._next_anchor < len(self._anchors) else None

    def finish(self, head: tuple[int, str] | None) -> AuditVerification:
        if (anchor := self._anchor()) is not None and anchor.seq > self._last_seq:
            first = self._last_seq + 1
            return self._bad(first, f"records {first}..{anchor.seq} were removed: the checkpoint "
                                    f"of {utc_text(anchor.ts)} signed record {anchor.seq}")
        head_seq, head_hash = head if head is not None else (0, GENESIS_HASH)
        if head_seq > self._last_seq:
            return self._bad(self._last_seq + 1, f"records {self._last_seq + 1}..{head_seq} "
                                                 "were deleted from the end of the log")
        if head_seq < self._last_seq:
            return self._bad(head_seq + 1, f"the chain head is at {head_seq} but records run "
                                           f"to {self._last_seq}")
        if head_hash != self._last_hash:
            return self._bad(head_seq, f"record {head_seq} does not match the chain head")
        return AuditVerification(ok=True, records=self.records, checkpoints=len(self._anchors))

    def _bad(self, seq: int, problem: str) -> AuditVerification:
        return AuditVerification(ok=False, records=self.records, first_bad_seq=seq,
                                 problem=problem, checkpoints=len(self._anchors))


@dataclass(frozen=True)
class DenialSummary:
    """``count`` denials of ``principal`` not recorded one by one; ``*`` where they differed."""

    principal: str
    action: str
    resource: str
    rule: str
    count: int
    request_id: str  # the last one's


@dataclass
class _Window:
    """The denials of one principal counted since its last record."""

    opened: float
    count: int = 0
    action: str = ""
    resource: str = ""
    rule: str = ""
    request_id: str = ""

    def add(self, action: str, resource: str, rule: str, request_id: str) -> None:
        first = self.count == 0
        self.count += 1
        self.request_id = request_id
        self.action = action if first or action == self.action else "*"
        self.resource = resource if first or resource == self.resource else "*"
        self.rule = rule if first or rule == self.rule else "*"

    def summary(self, principal: str) -> DenialSummary:
        return DenialSummary(principal, self.action, self.resource, self.rule, self.count,
                             self.request_id)


class DenialDigest:
    """Which repeated denials to record one by one (pure; the caller owns clock and store).

    A principal's first denial in a window of ``window_s`` is recorded as it happens
    (``admit`` says so); later ones in the window are counted, and ``due`` hands out one summary
    per principal whose window has ended. A flood therefore costs at most two records per principal
    and window. Beyond ``max_principals`` open windows, new principals share one window under
    ``OVERFLOW``, so memory stays bounded when the sources are many. ``window_s`` 0 records every
    denial.
    """

    OVERFLOW: Final = "(other principals)"

    def __init__(self, window_s: float, *, max_principals: int = 10_000) -> None:
        self._window_s = window_s
        self._max = max_principals
        self._windows: dict[str, _Window] = {}
        self._ended: list[DenialSummary] = []

    def admit(self, principal: str, action: str, resource: str, rule: str, request_id: str,
              now: float) -> bool:
        """True: record this denial now. False: it is counted into the principal's summary."""
        if self._window_s <= 0:
            return True
        if principal not in self._windows and len(self._windows) >= self._max:
            principal = self.OVERFLOW
        window = self._windows.get(principal)
        if window is not None and now - window.opened < self._window_s:
            window.add(action, resource, rule, request_id)
            return False
        if window is not None and window.count:
            self._ended.append(window.summary(principal))
        self._windows[principal] = _Window(now)
        return True

    def due(self, now: float) -> list[DenialSummary]:
        """The summaries of windows ended by ``now``, each handed out once."""
        ended, self._ended = self._ended, []
        for principal, window in list(self._windows.items()):
            if now - window.opened >= self._window_s:
                del self._windows[principal]
                if window.count:
                    ended.append(window.summary(principal))
        return ended

    def drain(self) -> list[DenialSummary]:
        """Every pending summary, open windows included (at shutdown)."""
        ended = self._ended + [w.summary(p) for p, w in self._windows.items() if w.count]
        self._ended, self._windows = [], {}
        return ended


class AuditLog:
    """Appends decisions to the chain in the store and verifies it."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time,
                 denial_window_s: float = 0.0) -> None:
        self._store = store
        self._clock = clock
        self._denials = DenialDigest(denial_window_s)

    async def record(self, *, principal: str, action: str, resource: str, decision: Decision,
                     rule: str, request_id: str, count: int = 1) -> AuditRecord:
        """Append one decision (``count`` > 1: a summary of that many) and return it once durable;
        ``Unavailable`` if it cannot be written (refuse the decision)."""
        if decision not in ("allow", "deny"):
            raise ValueError(f"decision must be 'allow' or 'deny', not {decision!r}")
        if count < 1:
            raise ValueError(f"a record stands for at least one decision, not {count}")
        ts = self._clock()

        def build(seq: int, head_hash: str | None) -> AuditRecord:
            prev = GENESIS_HASH if head_hash is None else head_hash
            digest = chain_hash(seq=seq, ts=ts, principal=principal, action=action,
                                resource=resource, decision=decision, rule=rule,
                                request_id=request_id, prev_hash=prev, count=count)
            return AuditRecord(seq, float(ts), principal, action, resource, decision, rule,
                               request_id, prev, digest, count)

        try:
            return await append_audit(self._store, build)
        except Exception as exc:
            log.error("audit record not written (%s); refusing the decision", type(exc).__name__)
            raise Unavailable("audit log unavailable") from exc

    async def record_denial(self, *, principal: str, action: str, resource: str, rule: str,
                            request_id: str) -> None:
        """A denial that may come in floods: recorded now if it is the principal's first in the
        window, else counted into the summary ``flush_denials`` writes when the window ends."""
        if self._denials.admit(principal, action, resource, rule, request_id, self._clock()):
            await self.record(principal=principal, action=action, resource=resource,
                              decision="deny", rule=rule, request_id=request_id)

    async def flush_denials(self, *, everything: bool = False) -> int:
        """Write the summaries of ended windows (``everything``: of open ones too); how many."""
        summaries = self._denials.drain() if everything else self._denials.due(self._clock())
        for summary in summaries:
            await self.record(principal=summary.principal, action=summary.action,
                              resource=summary.resource, decision="deny", rule=summary.rule,
                              request_id=summary.request_id, count=summary.count)
        return len(summaries)

    async def verify(self, anchors: Iterable[Anchor] = ()) -> AuditVerification:
        """Walk the whole chain in pages and compare its end with the stored head, and each
        record an anchor names with the hash the anchor vouches for."""
        checker = _ChainChecker(anchors)
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

    async def search(self, where: AuditFilter, limit: int = 100, *,
                     newest_first: bool = False) -> builtins.list[AuditRecord]:
        """Up to ``limit`` of the records ``where`` selects, oldest (or newest) first."""
        return await search_audit(self._store, where, limit, newest_first=newest_first)
