"""The audit chain on a real store, on SQLite and on PostgreSQL: appends, tamper detection, sink
failure, restarts, and several processes appending to one database."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from functools import partial

import pytest
from databases import Database

from controlplane.audit import (
    GENESIS_HASH,
    AuditLog,
    AuditRecord,
    AuditVerification,
    DenialDigest,
    DenialSummary,
    chain_hash,
)
from controlplane.errors import Unavailable
from controlplane.store.engine import MAX_BATCH, Store


class StepClock:
    """A clock that advances by one second on each read."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
async def store(database: Database) -> AsyncIterator[Store]:
    opened = await Store.open(database.location)
    yield opened
    await opened.close()


@pytest.fixture
def audit(store: Store) -> AuditLog:
    return AuditLog(store, clock=StepClock())


async def _append(audit: AuditLog, count: int, *, first: int = 1) -> None:
    for n in range(first, first + count):
        await audit.record(principal=f"admin:{n}", action="projects.create",
                           resource=f"project:p{n}", decision="allow" if n % 2 else "deny",
                           rule=f"rule-{n}", request_id=f"req-{n}")


async def _tamper(database: Database, *statements: str) -> None:
    # A second, independent connection: what an intruder with access to the database would do.
    await database.sql(*statements)


async def test_records_carry_every_field_and_chain_from_genesis(audit: AuditLog) -> None:
    first = await audit.record(principal="admin:root", action="tokens.issue",
                               resource="project:alpha", decision="allow", rule="role:admin",
                               request_id="r-1")
    second = await audit.record(principal="project:alpha/alice", action="sessions.open",
                                resource="template:secret", decision="deny",
                                rule="deny:templates", request_id="r-2")
    assert (first.seq, first.prev_hash, first.decision, first.rule) == \
        (1, GENESIS_HASH, "allow", "role:admin")
    assert first.ts == 1_700_000_001.0
    assert second.seq == 2 and second.prev_hash == first.hash
    assert second.hash == chain_hash(seq=2, ts=second.ts, principal="project:alpha/alice",
                                     action="sessions.open", resource="template:secret",
                                     decision="deny", rule="deny:templates", request_id="r-2",
                                     prev_hash=first.hash)
    assert await audit.list() == [first, second]
    assert await audit.list(after_seq=1, limit=5) == [second]
    assert await audit.verify() == AuditVerification(ok=True, records=2)


def test_the_hash_covers_seq_and_prev_hash() -> None:
    record = partial(chain_hash, ts=1.0, principal="p", action="a", resource="r",
                     decision="allow", rule="x", request_id="q")
    base = record(seq=1, prev_hash=GENESIS_HASH)
    assert record(seq=2, prev_hash=GENESIS_HASH) != base
    assert record(seq=1, prev_hash="0" * 64) != base


async def test_an_empty_log_verifies(audit: AuditLog) -> None:
    assert await audit.verify() == AuditVerification(ok=True, records=0)


async def test_an_unknown_decision_is_refused(audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="'maybe'"):
        await audit.record(principal="p", action="a", resource="r", decision="maybe",  # type: ignore[arg-type]
                           rule="x", request_id="q")


async def test_an_edited_field_is_detected(audit: AuditLog, database: Database) -> None:
    await _append(audit, 5)
    await _tamper(database, "UPDATE audit SET decision = 'allow' WHERE seq = 4")
    result = await audit.verify()
    assert (result.ok, result.first_bad_seq, result.records) == (False, 4, 3)
    assert "modified" in result.problem


async def test_a_deleted_middle_record_is_detected(audit: AuditLog, database: Database) -> None:
    await _append(audit, 5)
    await _tamper(database, "DELETE FROM audit WHERE seq = 3")
    result = await audit.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)
    assert "missing" in result.problem


async def test_a_deleted_and_renumbered_record_is_detected(audit: AuditLog,
                                                           database: Database) -> None:
    await _append(audit, 5)
    await _tamper(database, "DELETE FROM audit WHERE seq = 3",
            "UPDATE audit SET seq = seq - 1 WHERE seq > 3")
    result = await audit.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)


async def test_reordered_records_are_detected(audit: AuditLog, database: Database) -> None:
    await _append(audit, 5)
    await _tamper(database, "UPDATE audit SET seq = -2 WHERE seq = 2",
            "UPDATE audit SET seq = 2 WHERE seq = 3",
            "UPDATE audit SET seq = 3 WHERE seq = -2")
    result = await audit.verify()
    assert (result.ok, result.first_bad_seq) == (False, 2)
    assert "does not link" in result.problem


async def test_a_deleted_tail_record_is_detected(audit: AuditLog, database: Database) -> None:
    await _append(audit, 5)
    await _tamper(database, "DELETE FROM audit WHERE seq = 5")
    result = await audit.verify()
    assert (result.ok, result.first_bad_seq, result.records) == (False, 5, 4)
    assert "deleted from the end" in result.problem


async def test_a_wholly_emptied_log_is_detected(audit: AuditLog, database: Database) -> None:
    await _append(audit, 3)
    await _tamper(database, "DELETE FROM audit")
    result = await audit.verify()
    assert (result.ok, result.first_bad_seq) == (False, 1)


async def test_a_rewritten_head_hash_is_detected(audit: AuditLog, database: Database) -> None:
    await _append(audit, 3)
    await _tamper(database, f"UPDATE audit_head SET hash = '{'0' * 64}'")
    result = await audit.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)


async def test_concurrent_appends_form_one_chain(audit: AuditLog) -> None:
    await asyncio.gather(*(audit.record(principal=f"p{n}", action="a", resource="r",
                                        decision="allow", rule="x", request_id=f"q{n}")
                           for n in range(50)))
    records = await audit.list(limit=100)
    assert [r.seq for r in records] == list(range(1, 51))
    assert sorted(r.request_id for r in records) == sorted(f"q{n}" for n in range(50))
    assert await audit.verify() == AuditVerification(ok=True, records=50)


async def test_two_logs_on_one_database_still_form_one_chain(audit: AuditLog,
                                                             database: Database) -> None:
    # As with an admin CLI writing while the server runs: separate connections, separate locks.
    other_store = await Store.open(database.location)
    try:
        other = AuditLog(other_store)
        await asyncio.gather(*(log.record(principal="p", action="a", resource="r",
                                          decision="deny", rule="x", request_id=f"q{n}")
                               for n in range(10) for log in (audit, other)))
    finally:
        await other_store.close()
    assert await audit.verify() == AuditVerification(ok=True, records=20)


async def test_a_failing_sink_raises_unavailable_and_leaves_the_chain_valid(
        audit: AuditLog, database: Database) -> None:
    await _append(audit, 2)
    await database.fail_writes("audit_sink_down", "BEFORE INSERT ON audit")
    with pytest.raises(Unavailable, match="audit log unavailable") as caught:
        await audit.record(principal="p", action="tokens.issue", resource="r", decision="allow",
                           rule="x", request_id="lost")
    assert caught.value.retry_after_s == 1
    assert await audit.verify() == AuditVerification(ok=True, records=2)

    await database.allow_writes("audit_sink_down", "audit")
    after = await audit.record(principal="p", action="a", resource="r", decision="allow",
                               rule="x", request_id="back")
    assert after.seq == 3
    assert await audit.verify() == AuditVerification(ok=True, records=3)


async def test_a_failing_head_update_rolls_back_the_record_too(audit: AuditLog,
                                                               database: Database) -> None:
    await _append(audit, 1)
    await database.fail_writes("head_down", "BEFORE UPDATE ON audit_head")
    with pytest.raises(Unavailable):
        await _append(audit, 1, first=2)
    assert [r.seq for r in await audit.list()] == [1]
    assert await audit.verify() == AuditVerification(ok=True, records=1)


async def test_a_locked_database_gives_unavailable(database: Database) -> None:
    store = await Store.open(database.location, busy_timeout_s=0.1)
    audit = AuditLog(store)
    try:
        async with database.write_locked(["audit", "audit_head"]):
            with pytest.raises(Unavailable, match="audit log unavailable"):
                await _append(audit, 1)
    finally:
        await store.close()


async def test_the_chain_continues_across_reopen(database: Database) -> None:
    store = await Store.open(database.location)
    await _append(AuditLog(store, clock=StepClock()), 3)
    await store.close()

    store = await Store.open(database.location)
    try:
        audit = AuditLog(store, clock=StepClock(2_000_000_000.0))
        fourth = await audit.record(principal="p", action="a", resource="r", decision="allow",
                                    rule="x", request_id="after-restart")
        assert fourth.seq == 4
        assert fourth.prev_hash == (await audit.list(after_seq=2, limit=1))[0].hash
        assert await audit.verify() == AuditVerification(ok=True, records=4)
    finally:
        await store.close()


async def test_verify_pages_through_a_long_log(audit: AuditLog, database: Database) -> None:
    await _append(audit, 2100)
    assert await audit.verify() == AuditVerification(ok=True, records=2100)
    await _tamper(database, "UPDATE audit SET rule = 'forged' WHERE seq = 2050")
    result = await audit.verify()
    assert (result.ok, result.first_bad_seq) == (False, 2050)


def _batch_sizes(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The size of every write transaction the store committed, from its debug log."""
    return [int(r.getMessage().split()[1]) for r in caplog.records
            if r.name == "controlplane.store" and r.msg == "committed %d writes in one transaction"]


def _concurrently(audit: AuditLog, count: int) -> list[Awaitable[AuditRecord]]:
    return [audit.record(principal=f"p{n}", action="a", resource="r", decision="allow",
                         rule="x", request_id=f"q{n}") for n in range(count)]


async def test_many_concurrent_records_form_one_chain_in_a_few_transactions(
        audit: AuditLog, caplog: pytest.LogCaptureFixture) -> None:
    count = 2 * MAX_BATCH + 10
    with caplog.at_level(logging.DEBUG, logger="controlplane.store"):
        records = await asyncio.gather(*_concurrently(audit, count))
    assert [r.seq for r in records] == list(range(1, count + 1))  # chained in arrival order
    assert [r.request_id for r in records] == [f"q{n}" for n in range(count)]
    sizes = _batch_sizes(caplog)
    assert sum(sizes) == count and max(sizes) <= MAX_BATCH
    assert len(sizes) == 3
    assert await audit.verify() == AuditVerification(ok=True, records=count)


async def test_a_failing_batch_fails_every_waiter_and_leaves_the_chain_valid(
        audit: AuditLog, database: Database, caplog: pytest.LogCaptureFixture) -> None:
    await _append(audit, 3)
    await database.fail_writes("head_down", "BEFORE UPDATE ON audit_head")
    with caplog.at_level(logging.DEBUG, logger="controlplane.store"):
        results = await asyncio.gather(*_concurrently(audit, 40), return_exceptions=True)
    assert _batch_sizes(caplog) == [40]  # one batch, and none of it written
    assert all(isinstance(r, Unavailable) for r in results)
    assert [r.seq for r in await audit.list()] == [1, 2, 3]
    assert await audit.verify() == AuditVerification(ok=True, records=3)

    await database.allow_writes("head_down", "audit_head")
    assert (await asyncio.gather(*_concurrently(audit, 5)))[-1].seq == 8
    assert await audit.verify() == AuditVerification(ok=True, records=8)


async def test_records_are_committed_when_record_returns(audit: AuditLog,
                                                        database: Database) -> None:
    records = await asyncio.gather(*_concurrently(audit, 30))
    # Before any close: another connection (another process) already sees every record and head.
    assert await database.sql("SELECT COUNT(*) FROM audit") == [(30,)]
    assert await database.sql("SELECT seq, hash FROM audit_head") == [(30, records[-1].hash)]

    reopened = await Store.open(database.location)
    try:
        assert await AuditLog(reopened).verify() == AuditVerification(ok=True, records=30)
    finally:
        await reopened.close()


async def test_close_writes_the_pending_records_and_refuses_later_ones(database: Database) -> None:
    store = await Store.open(database.location)
    audit = AuditLog(store, clock=StepClock())
    pending = [asyncio.ensure_future(record) for record in _concurrently(audit, 50)]
    await asyncio.sleep(0)  # every record is queued, none committed yet
    await asyncio.wait_for(store.close(), timeout=5.0)
    assert [r.seq for r in await asyncio.gather(*pending)] == list(range(1, 51))
    with pytest.raises(Unavailable):
        await _append(audit, 1)

    reopened = await Store.open(database.location)
    try:
        assert await AuditLog(reopened).verify() == AuditVerification(ok=True, records=50)
    finally:
        await reopened.close()


async def test_close_while_the_database_is_locked_fails_the_pending_records(
        database: Database) -> None:
    store = await Store.open(database.location, busy_timeout_s=0.2)
    audit = AuditLog(store, clock=StepClock())
    async with database.write_locked(["audit", "audit_head"]):
        pending = [asyncio.ensure_future(record) for record in _concurrently(audit, 20)]
        await asyncio.sleep(0)  # every record is queued before the close
        await asyncio.wait_for(store.close(), timeout=5.0)
        results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    assert await database.sql("SELECT COUNT(*) FROM audit") == [(0,)]


# --- repeated denials ----------------------------------------------------------------------------

def _deny(digest: DenialDigest, principal: str, now: float, *, rule: str = "token:malformed",
          request_id: str = "q") -> bool:
    return digest.admit(principal, "projects:list", "project", rule, request_id, now)


def test_a_principals_first_denial_is_recorded_and_the_rest_of_its_window_summed_up() -> None:
    digest = DenialDigest(60.0)
    assert _deny(digest, "anonymous@10.0.0.1", 0.0)
    assert not _deny(digest, "anonymous@10.0.0.1", 1.0, rule="token:expired")
    assert not _deny(digest, "anonymous@10.0.0.1", 2.0, rule="token:expired", request_id="last")
    assert _deny(digest, "anonymous@10.0.0.2", 3.0)  # another source has its own window
    assert digest.due(59.0) == []
    assert digest.due(60.0) == [DenialSummary("anonymous@10.0.0.1", "projects:list", "project",
                                              "token:expired", 2, "last")]
    assert digest.due(120.0) == []  # each summary once; the quiet source needs none
    assert _deny(digest, "anonymous@10.0.0.1", 121.0)  # a new window opens with a record


def test_where_summed_up_denials_differ_the_summary_says_star() -> None:
    digest = DenialDigest(60.0)
    _deny(digest, "p", 0.0)
    _deny(digest, "p", 1.0, rule="token:malformed")
    _deny(digest, "p", 2.0, rule="rate-limit")
    assert [(s.rule, s.count) for s in digest.drain()] == [("*", 2)]


def test_a_window_reopened_before_due_keeps_the_old_summary() -> None:
    digest = DenialDigest(10.0)
    _deny(digest, "p", 0.0)
    _deny(digest, "p", 1.0)
    assert _deny(digest, "p", 11.0)  # due() did not run in between
    assert [s.count for s in digest.due(11.0)] == [1]


def test_past_its_bound_new_principals_share_one_window() -> None:
    digest = DenialDigest(60.0, max_principals=2)
    for n in range(5):
        _deny(digest, f"anonymous@10.0.0.{n}", 0.0)
        _deny(digest, f"anonymous@10.0.0.{n}", 1.0)
    counts = {s.principal: s.count for s in digest.drain()}
    assert counts == {"anonymous@10.0.0.0": 1, "anonymous@10.0.0.1": 1,
                      DenialDigest.OVERFLOW: 5}


def test_a_zero_window_records_every_denial() -> None:
    digest = DenialDigest(0.0)
    assert all(_deny(digest, "p", float(n)) for n in range(3)) and digest.drain() == []


async def test_a_summary_record_carries_its_count_in_the_chain(database: Database) -> None:
    store = await Store.open(database.location)
    clock = StepClock()
    try:
        audit = AuditLog(store, clock=clock, denial_window_s=3600)
        for n in range(4):
            await audit.record_denial(principal="anonymous@10.0.0.9", action="a", resource="r",
                                      rule="token:missing", request_id=f"q{n}")
        assert [r.count for r in await audit.list()] == [1]
        assert await audit.flush_denials(everything=True) == 1
        summary = (await audit.list())[-1]
        assert (summary.count, summary.request_id) == (3, "q3")
        assert summary.hash != chain_hash(  # the count is hashed: it cannot be edited unseen
            seq=summary.seq, ts=summary.ts, principal=summary.principal, action="a",
            resource="r", decision="deny", rule="token:missing", request_id="q3",
            prev_hash=summary.prev_hash)
        assert (await audit.verify()).ok
        await _tamper(database, "UPDATE audit SET count = 1 WHERE seq = 2")
        assert (await audit.verify()).first_bad_seq == 2
    finally:
        await store.close()
