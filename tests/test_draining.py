"""Consumer ranks drain on the signal that ends them, with real processes: the control plane on
real HTTP, a ``dsn gateway run`` process, a two-rank job of the shipped ``local-mpiexec``
template (``mpiexec -n 2``), CURVE producers streaming a synthetic 4D camera.

The jobs take more sample frames than a scan has (``samples``), so that a rank contributes to a
scan's threshold agreement only once the scan has ended, or once it drains; and a scan begun
before another one, and still open, holds it back: thresholds are agreed in the order scans began.
So a scan forwarded whole while an earlier one is open is certain to be unfinished when the test
signals, with no timing involved.

- A session ended as soon as the gateway reports a scan forwarded (``dsn producer stream
  --end-session``), before its result is in: the job is cancelled, its ranks drain and still
  report the scan, with its file, then leave at the drain deadline.
- Ranks signalled (the session open) with one scan ended and one under way: they finish and report
  the ended one and leave at the drain deadline; the gateway reports the other ``partial``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from cp_helpers import ControlPlane, metric
from test_interrupted_scans import (
    CAMERA,
    POLL_S,
    RANKS,
    WAIT_S,
    Session,
    events_by_frame,
    open_session,
    planted_by_frame,
    rank_events,
    rank_pid,
    stream,
)
from waiting import eventually_async

from common.receipts import GatewayReport
from dataplane.producer import Producer
from dataplane.receipts import ReceiptClient, await_report

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.timeout(180)]

SAMPLES = 10000  # more frames than any scan here: thresholds wait for the scan's end
DRAIN_S = "8"  # the consumers' drain (DSN_CONSUMER_DRAIN_S), below the launcher's grace


@pytest.fixture(autouse=True)
def short_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local jobs inherit the control plane's environment, and so the consumers' drain."""
    monkeypatch.setenv("DSN_CONSUMER_DRAIN_S", DRAIN_S)


async def serving(session: Session, metrics: str) -> None:
    """Until the gateway routes the session to both ranks (else it would spool the scans)."""
    await eventually_async(
        lambda: metric(metrics, "dsn_gateway_consumers", session.id) == RANKS,
        timeout_s=WAIT_S, what="the gateway to route to both ranks", interval_s=POLL_S)


async def logged(job_log: Path, event: str, scan: int) -> None:
    await eventually_async(
        lambda: sum(e.get("scan") == scan for e in rank_events(job_log, event)) == RANKS,
        timeout_s=WAIT_S, what=f"both ranks to log {event!r} for scan {scan}", interval_s=POLL_S)


async def hold_back(session: Session, job_log: Path, scan: int) -> Producer:
    """Begin ``scan`` with a few frames and leave it open; the producer, once both ranks have it."""
    producer = await asyncio.to_thread(stream, session, scan, range(4), end=False)
    await logged(job_log, "scan begins", scan)
    return producer


async def result(session: Session, scan: int) -> dict[str, Any]:
    [found] = await eventually_async(lambda: session.results(scan), timeout_s=WAIT_S,
                                     what=f"scan {scan}'s result", interval_s=POLL_S)
    return dict(found)


def stream_confirmed(session: Session, scan: int) -> GatewayReport:
    """Stream all of ``scan`` and wait for the gateway's report, as ``dsn producer stream`` does
    before it ends the session."""
    target = session.cp.settings.gateway_receipts
    with ReceiptClient(target, session.server_key, session.client) as receipts:
        stream(session, scan, range(CAMERA.spec.positions))
        return await_report(receipts, scan, timeout_s=WAIT_S)


def assert_counted(found: dict[str, Any]) -> None:
    assert (found["source"], found["status"], found["frames"]) == (
        "consumer", "complete", CAMERA.spec.positions)
    assert events_by_frame(Path(found["path"])) == planted_by_frame()


async def test_a_session_ended_once_its_scan_is_forwarded_still_records_the_scans_result(
        served: tuple[ControlPlane, str, Path]) -> None:
    cp, metrics, _ = served
    session = await open_session(cp)
    job, job_log = await session.launch(scans=0, samples=SAMPLES)
    await serving(session, metrics)
    held = await hold_back(session, job_log, 1)

    report = await asyncio.to_thread(stream_confirmed, session, 2)
    assert (report.outcome, report.forwarded) == ("forwarded", report.sent)
    # Ended at once: what the gateway's sockets still queue for the ranks reaches them after the
    # end, and scan 1, still open, keeps scan 2's thresholds (so its result) waiting till then.
    assert await session.results(2) == []
    ended = await cp.call("DELETE", session.base, session.token)
    assert ended.status == 200, await ended.text()

    # With the job's token revoked at the end, or its ranks stopped at once, this would be lost.
    assert_counted(await result(session, 2))
    assert (await session.job_ended(job))["state"] == "cancelled"
    stopped = rank_events(job_log, "consumer stopped")
    assert sorted((e["rank"], e["signalled"], e["scans"]) for e in stopped) == [
        (0, True, 1), (1, True, 1)], job_log.read_text()[-3000:]
    assert len(rank_events(job_log, "left the session")) == RANKS
    held.close(linger_s=0)  # scan 1 never ends: its session did


async def test_signalled_ranks_finish_the_ended_scan_and_leave_the_open_one_to_the_gateway(
        served: tuple[ControlPlane, str, Path]) -> None:
    cp, metrics, _ = served
    session = await open_session(cp)
    job, job_log = await session.launch(scans=0, samples=SAMPLES)
    await serving(session, metrics)

    # Scan 2 stays open; scan 3, begun after it, is streamed whole and ends, but cannot finish.
    open_scan = await hold_back(session, job_log, 2)
    await asyncio.to_thread(stream, session, 3, range(CAMERA.spec.positions))
    await logged(job_log, "scan ends", 3)
    assert await session.results(3) == []

    # Signalled as a batch system signals a job's ranks: they drain.
    for rank in range(RANKS):
        os.kill(rank_pid(job_log, rank), signal.SIGTERM)
    assert_counted(await result(session, 3))
    drained = await session.job_ended(job)
    log = job_log.read_text()
    assert (drained["state"], drained["exit_code"]) == ("succeeded", 0), log[-3000:]
    assert sorted((e["rank"], e["signalled"], e["scans"])
                  for e in rank_events(job_log, "consumer stopped")) == [(0, True, 1), (1, True, 1)]
    unfinished = rank_events(job_log, "stopping with scans unfinished")
    assert [sorted(e["scans"]) for e in unfinished] == [["2"], ["2"]], log[-3000:]

    # The ranks left with scan 2 under way: the gateway spools the rest and reports it.
    await asyncio.to_thread(stream, session, 2, range(4, CAMERA.spec.positions), begin=False,
                            producer=open_scan)
    interrupted = await result(session, 2)
    assert (interrupted["source"], interrupted["status"]) == ("gateway", "partial")
    assert interrupted["lost_by_reason"] == {"consumer_gone": interrupted["lost_sectors"]}
