"""Consumer jobs under a real Slurm (``slurm_cluster``: munged, slurmctld and slurmd on loopback).

- The Slurm launcher on its own: real ``sbatch`` runs the job script, which reads its 0600 token
  file; ``squeue``/``scontrol`` states map to pending, running, succeeded, failed and cancelled;
  ``scancel`` cancels, and cancelling a finished job is no error.
- A session end to end: the shipped ``slurm-sbatch`` template (its site values set by the admin
  for this machine) submits a job whose MPI ranks start inside the allocation (``srun
  --mpi=pmix``), register, count a scan streamed through a real gateway and report it. Slurm's
  drain signal comes mid-scan: the ranks drain, leave at the drain deadline, the job succeeds and
  the gateway reports the scan they left ``partial``. Ending the session cancels the next job with
  ``scancel``; its ranks drain on the signal too, and report the scan that had ended before the
  end but was still being counted.
- Job states across a real restart of the control plane on the same state directory.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cp_helpers import ControlPlane, gateway_process, metrics_text, served_on, sql
from cp_helpers import start_control_plane as start
from slurm_cluster import Cluster
from test_interrupted_scans import CAMERA, POLL_S, Session, open_session, rank_events, stream
from waiting import eventually_async

from controlplane.launchers import JobHandle, JobSpec, JobStatus, SlurmLauncher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TOKEN = "eyJhbGciOiJFZERTQSJ9.consumer-token-under-test.c2lnbmF0dXJl"
WAIT_S = 60  # Slurm schedules every few seconds; MPI start-up under load takes more
RANKS = 2
# The consumers' drain: below the test cluster's KillWait (10 s), which ends it with SIGKILL.
DRAIN_S = "5"
SAMPLES = 10000  # more frames than a scan has: thresholds wait for the scan's end
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def slurm_env(slurm_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control plane under test, and every Slurm command it runs, talk to the test cluster."""
    for name, value in slurm_cluster.env.items():
        monkeypatch.setenv(name, value)


def _spec(tmp_path: Path, script: str, job_id: str) -> JobSpec:
    return JobSpec(job_id=job_id, session_id="s-1", script=script, workdir=tmp_path / job_id,
                   token=TOKEN)


async def _state(launcher: SlurmLauncher, handle: JobHandle, wanted: set[str]) -> JobStatus:
    async def reached() -> JobStatus | None:
        status = await launcher.status(handle)
        return status if status.state in wanted else None
    return await eventually_async(reached, timeout_s=WAIT_S, interval_s=0.2,
                                  what=f"Slurm job {handle.job_id} to be {sorted(wanted)}")


# --- the launcher --------------------------------------------------------------------------------

async def test_sbatch_runs_the_job_script_which_reads_its_private_token_file(
        tmp_path: Path, slurm_cluster: Cluster) -> None:
    script = ("#!/bin/bash\nset -eu\n"
              '[ "$(stat -c %a "$DSN_CONSUMER_TOKEN_FILE")" = 600 ]\n'
              'cmp -s "$DSN_CONSUMER_TOKEN_FILE" token\n'
              'echo "job $SLURM_JOB_ID ran in $PWD"\n')
    launcher = SlurmLauncher()
    handle = await launcher.submit(_spec(tmp_path, script, "reads-token"))
    assert handle.native_id.isdigit()

    status = await _state(launcher, handle, {"succeeded", "failed", "cancelled"})
    log = (handle.workdir / "job.log").read_text()
    assert status == JobStatus("succeeded", 0, "Slurm state COMPLETED"), log
    assert f"job {handle.native_id} ran in {handle.workdir}\n" == log
    shown = slurm_cluster.client("scontrol", "show", "job", "-o", handle.native_id).stdout
    assert f"Command={handle.workdir / 'job.sh'} " in shown and TOKEN not in shown


async def test_slurm_states_map_to_job_states_and_scancel_cancels(tmp_path: Path) -> None:
    launcher = SlurmLauncher()
    failing = await launcher.submit(_spec(tmp_path, "#!/bin/bash\nexit 3\n", "failing"))
    later = await launcher.submit(_spec(
        tmp_path, "#!/bin/bash\n#SBATCH --begin=now+3600\ntrue\n", "later"))
    sleeping = await launcher.submit(_spec(tmp_path, "#!/bin/bash\nexec sleep 300\n", "sleeping"))

    assert await _state(launcher, failing, {"failed"}) == JobStatus("failed", 3,
                                                                    "Slurm state FAILED")
    assert await launcher.status(later) == JobStatus("pending", None, "Slurm state PENDING")
    assert (await _state(launcher, sleeping, {"running"})).detail == "Slurm state RUNNING"

    for handle in (sleeping, later):
        await launcher.cancel(handle)
        cancelled = await _state(launcher, handle, {"cancelled"})
        assert cancelled.detail.startswith("Slurm state CANCELLED")
    await launcher.cancel(failing)  # it has ended: nothing to cancel, and no error
    assert (await launcher.status(failing)).state == "failed"


# --- a session end to end ------------------------------------------------------------------------

def site_template(source: str) -> str:
    """The shipped Slurm template as this machine's admin would set it: the project's virtualenv
    activated, its Python on the node, ranks started by ``srun --mpi=pmix`` (Slurm's PMIx serves
    the Open MPI wheel's ranks, and srun hands them Slurm's signals)."""
    document = yaml.safe_load(source)
    document["site"]["setup"]["value"] = [["source", str(VENV_BIN / "activate")]]
    document["site"]["python"]["value"] = [sys.executable]
    document["site"]["launch"]["value"] = ["srun", "--mpi=pmix"]
    document["site"]["bind_host"]["value"] = "route:127.0.0.1"
    return str(yaml.safe_dump(document, sort_keys=False))


async def use_site_template(cp: ControlPlane) -> None:
    path = "/api/v1/templates/slurm-sbatch"
    current = await (await cp.admin("GET", path)).json()
    response = await cp.admin("PUT", path, json={"source": site_template(current["source"])},
                              headers={"If-Match": current["etag"]})
    assert response.status == 200, await response.text()


@pytest.fixture
async def slurm_served(tmp_path: Path, free_port: Any) -> AsyncIterator[tuple[ControlPlane, str]]:
    """A control plane whose launcher is ``slurm``, on a real port, and a live gateway."""
    port = free_port()
    async with served_on(port) as serve:
        cp = await start(serve, tmp_path / "state", port=port, reconcile_s=0.2, launcher="slurm",
                         gateway_endpoint=f"tcp://127.0.0.1:{free_port()}",
                         gateway_receipts_endpoint=f"tcp://127.0.0.1:{free_port()}")
        metrics = f"127.0.0.1:{free_port()}"
        with gateway_process(cp, tmp_path / "spool", metrics):
            yield cp, metrics


async def launch_job(cp: ControlPlane, session: Session, **params: Any) -> tuple[str, str, Path]:
    """Launch a consumer job through the Slurm template; once its ranks are live and listening:
    its path, its Slurm job id and its log."""
    response = await cp.call("POST", f"{session.base}/jobs", session.token, json={
        "ranks": RANKS, "params": {"account": "lcls:xpp12345", "constraint": "cpu",
                                   "time": "00:10:00", "drain_s": 30, **params}})
    assert response.status == 202, await response.text()
    job = await response.json()
    assert (job["template"], job["launcher"]) == ("slurm-sbatch", "slurm")
    job_log = cp.settings.jobs_dir / job["id"] / "job.log"

    async def ranks_live() -> bool:
        detail = await (await cp.call("GET", session.base, session.token)).json()
        live = [c for c in detail["consumers"] if c["state"] == "live"]
        return sorted(c["rank"] for c in live if c["job_id"] == job["id"]) == list(range(RANKS))
    await eventually_async(ranks_live, timeout_s=WAIT_S, interval_s=POLL_S,
                           what="the Slurm job's ranks to register")
    await eventually_async(
        lambda: sorted(entry["rank"] for entry in rank_events(job_log, "listening")) == [0, 1],
        timeout_s=WAIT_S, what="both ranks to log that they listen", interval_s=POLL_S)
    return response.headers["Location"], _native(cp, response.headers["Location"]), job_log


async def begin_scan(session: Session, scan: int, job_log: Path) -> Any:
    """A producer that began ``scan`` and sent a few frames, once every rank has it under way."""
    producer = await asyncio.to_thread(stream, session, scan, range(4), end=False)
    await ranks_logged(job_log, "scan begins", scan)
    return producer


async def ranks_logged(job_log: Path, event: str, scan: int) -> None:
    await eventually_async(
        lambda: sum(entry["scan"] == scan for entry in rank_events(job_log, event)) == RANKS,
        timeout_s=WAIT_S, what=f"the ranks to log {event!r} for scan {scan}", interval_s=POLL_S)


async def ranks_stopped(job_log: Path) -> list[dict[str, Any]]:
    def stopped() -> list[dict[str, Any]] | None:
        entries = rank_events(job_log, "consumer stopped")
        return entries if len(entries) == RANKS else None
    return await eventually_async(stopped, timeout_s=WAIT_S, interval_s=POLL_S,
                                  what="every rank to log that it stopped")


@pytest.mark.mpi
async def test_a_slurm_job_counts_a_streamed_scan_and_drains_on_slurms_signals(
        slurm_served: tuple[ControlPlane, str], slurm_cluster: Cluster,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSN_CONSUMER_DRAIN_S", DRAIN_S)  # sbatch hands the job its environment
    cp, metrics = slurm_served
    await use_site_template(cp)
    session = await open_session(cp)
    job_path, slurm_id, job_log = await launch_job(cp, session)
    await eventually_async(lambda: "dsn_gateway_consumers" in metrics_text(metrics),
                           timeout_s=WAIT_S, what="the gateway to serve", interval_s=POLL_S)
    polled = await (await cp.call("GET", job_path, session.token)).json()
    assert (polled["state"], polled["detail"]) == ("running", "Slurm state RUNNING")

    # A whole scan streamed through the gateway is counted and reported by the job's root rank.
    await asyncio.to_thread(stream, session, 1, range(CAMERA.spec.positions))
    [result] = await _results(session, 1)
    assert (result["status"], result["source"], result["frames"]) == (
        "complete", "consumer", CAMERA.spec.positions)
    assert Path(result["path"]).is_file()
    listed = await (await cp.call("GET", "/api/v1/scans?project=alpha", session.token)).json()
    assert [(r["session"], r["scan"]) for r in listed["items"]] == [(session.id, 1)]

    # Scan 2 is under way when the drain signal comes, as --signal=TERM@DRAIN_S sends it before
    # the time limit: to every task of the job's steps, so to every rank srun started. They drain
    # until their deadline, as scan 2 does not end, then leave the session and exit 0; the gateway
    # spools the rest of the scan and reports it.
    producer = await begin_scan(session, 2, job_log)
    signalled = slurm_cluster.client("scancel", "--signal=TERM", slurm_id)
    assert signalled.returncode == 0, signalled.stderr
    drained = await _job_ended(cp, session, job_path)
    await asyncio.to_thread(stream, session, 2, range(4, CAMERA.spec.positions), begin=False,
                            producer=producer)
    [interrupted] = await _results(session, 2)
    log = job_log.read_text(errors="replace")
    assert (drained["state"], drained["exit_code"]) == ("succeeded", 0), log[-3000:]
    assert all(e["signalled"] and e["scans"] == 1 for e in await ranks_stopped(job_log))
    assert len(rank_events(job_log, "stopping with scans unfinished")) == RANKS, log[-3000:]
    assert len(rank_events(job_log, "left the session")) == RANKS, log[-3000:]
    assert (interrupted["source"], interrupted["status"]) == ("gateway", "partial")

    # Ending the session cancels the next job with scancel; its ranks drain on Slurm's SIGTERM.
    # Scan 4 was streamed whole before the end but is still being counted: scan 3, begun before
    # it and left open, holds its thresholds back (they are agreed in the order scans began, and
    # with more samples than frames only at a scan's end). Draining, the ranks finish scan 4 and
    # report it, with the job's token still good for the control plane's drain window.
    job_path, _, job_log = await launch_job(cp, session, samples=SAMPLES)
    held = await begin_scan(session, 3, job_log)
    await asyncio.to_thread(stream, session, 4, range(CAMERA.spec.positions))
    await ranks_logged(job_log, "scan ends", 4)
    assert await session.results(4) == []
    ended = await cp.call("DELETE", session.base, session.token)
    assert ended.status == 200, await ended.text()
    cancelled = await _job_ended(cp, session, job_path)
    assert cancelled["state"] == "cancelled", job_log.read_text(errors="replace")[-3000:]
    assert cancelled["detail"].startswith("Slurm state CANCELLED")
    [last] = await _results(session, 4)
    assert (last["source"], last["status"], last["frames"]) == (
        "consumer", "complete", CAMERA.spec.positions)
    assert Path(last["path"]).is_file()
    assert all(e["signalled"] and e["scans"] == 1 for e in await ranks_stopped(job_log))
    held.close(linger_s=0)  # scan 3 never ends: its session did


async def _results(session: Session, scan: int) -> list[dict[str, Any]]:
    async def reported() -> list[dict[str, Any]] | None:
        return await session.results(scan) or None
    return await eventually_async(reported, timeout_s=WAIT_S, interval_s=POLL_S,
                                  what=f"scan {scan}'s result")


async def _job_ended(cp: ControlPlane, session: Session, job_path: str) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        answer = await (await cp.call("GET", job_path, session.token)).json()
        return None if answer["state"] in ("pending", "running") else dict(answer)
    return await eventually_async(ended, timeout_s=WAIT_S, what="the Slurm job to end",
                                  interval_s=POLL_S)


# --- restarts ------------------------------------------------------------------------------------

WAITING_JOB = """\
name: waiting-job
kind: job
description: A test job that ends once told to, with the status it is told.
body: |
  #!/bin/bash
  while [ ! -e {{ (system.output_dir ~ "/exit") | shquote }} ]; do sleep 0.2; done
  exit "$(cat {{ (system.output_dir ~ "/exit") | shquote }})"
"""


async def test_slurm_job_states_survive_a_restart_and_jobs_are_adopted_again(
        tmp_path: Path, free_port: Any, slurm_cluster: Cluster) -> None:
    port = free_port()
    async with served_on(port) as serve:
        cp = await start(serve, tmp_path / "state", port=port, launcher="slurm")
        response = await cp.admin("PUT", "/api/v1/templates/waiting-job",
                                  json={"source": WAITING_JOB}, headers={"If-None-Match": "*"})
        assert response.status == 200, await response.text()
        session = await open_session(cp)

        async def launch() -> tuple[str, Path]:
            answer = await cp.call("POST", f"{session.base}/jobs", session.token,
                                   json={"template": "waiting-job"})
            assert answer.status == 202, await answer.text()
            output = cp.settings.jobs_dir / (await answer.json())["id"] / "output"
            return answer.headers["Location"], output

        (done, done_out), (during, during_out), (across, _) = [await launch() for _ in range(3)]
        (done_out / "exit").write_text("0\n")
        assert (await _job_ended(cp, session, done))["state"] == "succeeded"
        # The third job must be running when the control plane stops (a loaded machine may
        # still hold it pending): it is the one adopted as running.
        await eventually_async(
            lambda: "RUNNING" in slurm_cluster.client("squeue", "-h", "-t", "all", "-j",
                                                      _native(cp, across), "-o", "%T").stdout,
            timeout_s=WAIT_S, what="the third job to run", interval_s=0.2)

        await cp.client.close()  # the control plane stops; Slurm jobs are the scheduler's
        (during_out / "exit").write_text("4\n")  # ... and one of them fails meanwhile
        await eventually_async(
            lambda: "FAILED" in slurm_cluster.client("squeue", "-h", "-t", "all", "-j",
                                                     _native(cp, during), "-o", "%T").stdout,
            timeout_s=WAIT_S, what="the job to fail while the control plane is down",
            interval_s=0.2)

        again = await start(serve, tmp_path / "state", port=port, launcher="slurm",
                            clock=cp.clock)
        # Adopted at start-up, before anyone asks: the outcome is already stored.
        states = dict(sql(again.database, "SELECT id, state FROM jobs"))
        assert [states[path.rsplit("/", 1)[1]] for path in (done, during, across)] == [
            "succeeded", "failed", "running"]
        failed = await (await again.call("GET", during, session.token)).json()
        assert (failed["state"], failed["exit_code"]) == ("failed", 4)
        kept = await (await again.call("GET", done, session.token)).json()
        assert (kept["state"], kept["exit_code"]) == ("succeeded", 0)

        assert (await again.call("DELETE", session.base, session.token)).status == 200
        cancelled = await _job_ended(again, session, across)
        assert cancelled["state"] == "cancelled"


def _native(cp: ControlPlane, job_path: str) -> str:
    [(native,)] = sql(cp.database, "SELECT native_id FROM jobs WHERE id = ?",
                      (job_path.rsplit("/", 1)[1],))
    return str(native)
