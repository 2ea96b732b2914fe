"""Job launchers: the job directory and token file, a real local job (bash and ``mpiexec -n 2``),
and the Slurm failures a real cluster cannot produce on demand (a refusing ``sbatch``, a scheduler
that does not answer, a state no Slurm prints, a forgotten job only ``sacct`` knows) through fake
commands that record how they were called. Slurm itself is tested in ``test_slurm.py``."""

from __future__ import annotations

import hashlib
import os
import shlex
import stat
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fake_slurm import FakeSlurm
from waiting import eventually_async

from controlplane.errors import ConfigurationError, Conflict, LaunchFailed, Unavailable
from controlplane.launchers import (
    TOKEN_FILE_ENV,
    JobHandle,
    JobSpec,
    JobStatus,
    LocalLauncher,
    SlurmLauncher,
    get_launcher,
    mpiexec_command,
    parse_sbatch_id,
    slurm_state,
    write_job_files,
)

TOKEN = "eyJhbGciOiJFZERTQSJ9.consumer-token-under-test.c2lnbmF0dXJl"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _spec(tmp_path: Path, script: str, job_id: str = "job-1") -> JobSpec:
    return JobSpec(job_id=job_id, session_id="s-1", script=script, workdir=tmp_path / job_id,
                   token=TOKEN, env={"DSN_SESSION": "s-1"})


async def _wait_finished(launcher: LocalLauncher, handle: JobHandle, timeout_s: float) -> JobStatus:
    async def finished() -> JobStatus | None:
        status = await launcher.status(handle)
        return status if status.finished else None

    return await eventually_async(finished, timeout_s=timeout_s, what=f"job {handle.job_id} to end",
                                  interval_s=0.05)


async def _wait_for_file(path: Path, timeout_s: float = 10.0) -> None:
    await eventually_async(path.exists, timeout_s=timeout_s, what=f"{path} to appear",
                           interval_s=0.05)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for a reaper has already been killed."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rpartition(")")[2].split()[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    """The live processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


async def _wait_dead(pids: list[int], timeout_s: float = 10.0) -> None:
    """SIGKILL is delivered asynchronously: wait for every process to be gone (or a zombie)."""
    def all_dead() -> bool:
        survivors = [pid for pid in pids if _alive(pid)]
        assert not survivors, f"processes {survivors} survived"
        return True

    await eventually_async(all_dead, timeout_s=timeout_s, what="a cancelled job's processes to die",
                           interval_s=0.05)


@pytest.fixture
async def local() -> AsyncIterator[LocalLauncher]:
    launcher = LocalLauncher(grace_s=1.0)
    yield launcher
    await launcher.close()


# --- job files and the job specification ---------------------------------------------------------

def test_job_files_are_private_from_creation_whatever_the_umask(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "#!/bin/bash\necho hello\n")
    previous = os.umask(0)  # the modes must not depend on a permissive umask
    try:
        script, token = write_job_files(spec)
    finally:
        os.umask(previous)
    assert (_mode(spec.workdir), _mode(token), _mode(script)) == (0o700, 0o600, 0o700)
    assert token.read_text() == TOKEN
    assert script.read_bytes() == spec.script.encode()
    assert TOKEN not in script.read_text()


def test_job_files_are_never_overwritten_nor_written_through_a_link(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "true\n")
    spec.workdir.mkdir(mode=0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("untouched")
    (spec.workdir / "token").symlink_to(elsewhere)
    with pytest.raises(Conflict, match="token exists; refusing to overwrite it"):
        write_job_files(spec)
    assert elsewhere.read_text() == "untouched"
    assert _mode(spec.workdir) == 0o700


def test_job_spec_keeps_the_token_out_of_its_repr_script_and_environment(tmp_path: Path) -> None:
    assert TOKEN not in repr(_spec(tmp_path, "true\n"))
    with pytest.raises(ValueError, match="script contains the consumer token"):
        _spec(tmp_path, f"dsn consumer run --token {TOKEN}\n")
    with pytest.raises(ValueError, match="contains the consumer token"):
        JobSpec("j", "s", "true\n", tmp_path, TOKEN, env={"TOKEN": TOKEN})
    with pytest.raises(ValueError, match=TOKEN_FILE_ENV):
        JobSpec("j", "s", "true\n", tmp_path, TOKEN, env={TOKEN_FILE_ENV: "/tmp/x"})
    with pytest.raises(ValueError, match="job id"):
        JobSpec("../escape", "s", "true\n", tmp_path, TOKEN)


# --- the registry --------------------------------------------------------------------------------

def test_an_unknown_launcher_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        get_launcher("x")
    assert str(info.value) == "unknown launcher 'x'; known: local, slurm"


def test_an_unknown_launcher_setting_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="'local' does not take settings partition"):
        get_launcher("local", partition="gpu")
    assert isinstance(get_launcher("local", grace_s=2.0), LocalLauncher)


# --- local ---------------------------------------------------------------------------------------

TOKEN_CHECK_SCRIPT = """#!/bin/bash
set -eu
[ "$(stat -c %a "$DSN_CONSUMER_TOKEN_FILE")" = 600 ]
[ "$(stat -c %a .)" = 700 ]
printf '%s' "$(cat "$DSN_CONSUMER_TOKEN_FILE")" | sha256sum | cut -d' ' -f1 > marker
echo "session $DSN_SESSION checked its token"
"""


@pytest.mark.timeout(30)
async def test_local_job_reads_its_0600_token_file_and_succeeds(tmp_path: Path,
                                                                 local: LocalLauncher) -> None:
    spec = _spec(tmp_path, TOKEN_CHECK_SCRIPT)
    handle = await local.submit(spec)
    assert (handle.launcher, handle.job_id, handle.workdir) == ("local", "job-1", spec.workdir)

    status = await _wait_finished(local, handle, timeout_s=20)
    log = (spec.workdir / "job.log").read_text()
    assert status == JobStatus("succeeded", 0, "exited with status 0"), log
    assert ((spec.workdir / "marker").read_text().strip()
            == hashlib.sha256(TOKEN.encode()).hexdigest())
    assert "session s-1 checked its token" in log
    assert (spec.workdir / "job.sh").read_text() == TOKEN_CHECK_SCRIPT
    assert _mode(spec.workdir / "job.log") == 0o600


GATED_SCRIPT = """while [ ! -e go ]; do sleep 0.05; done
exit {code}
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("code", "state"), [(0, "succeeded"), (3, "failed")])
async def test_local_status_moves_from_running_to_the_exit_status(
        tmp_path: Path, local: LocalLauncher, code: int, state: str) -> None:
    spec = _spec(tmp_path, GATED_SCRIPT.format(code=code))
    handle = await local.submit(spec)
    assert (await local.status(handle)).state == "running"
    (spec.workdir / "go").touch()
    status = await _wait_finished(local, handle, timeout_s=20)
    assert (status.state, status.exit_code) == (state, code)


MPI_RANK_CODE = """
import hashlib, os
from mpi4py import MPI
comm = MPI.COMM_WORLD
token = open(os.environ["DSN_CONSUMER_TOKEN_FILE"]).read()
total = comm.allreduce(comm.Get_rank() + 1)
with open(f"rank{comm.Get_rank()}.txt", "w") as out:
    out.write(f"{comm.Get_size()} {total} {hashlib.sha256(token.encode()).hexdigest()}")
"""


@pytest.mark.mpi
@pytest.mark.timeout(120)
async def test_local_job_runs_the_bundled_mpiexec_with_two_ranks(tmp_path: Path,
                                                                  local: LocalLauncher) -> None:
    command = shlex.join(mpiexec_command(2, [sys.executable, "-c", MPI_RANK_CODE]))
    spec = _spec(tmp_path, f"#!/bin/bash\nset -eu\n{command}\n")
    handle = await local.submit(spec)
    status = await _wait_finished(local, handle, timeout_s=100)
    assert status.state == "succeeded", (spec.workdir / "job.log").read_text()
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    for rank in (0, 1):
        assert (spec.workdir / f"rank{rank}.txt").read_text() == f"2 3 {digest}"


CANCEL_SCRIPT = """sleep 300 & echo $! > child.pid
sh -c 'trap "" TERM; echo $$ > stubborn.pid; exec sleep 300' &
echo $$ > shell.pid
while [ ! -s stubborn.pid ]; do sleep 0.05; done
touch ready
wait
"""


@pytest.mark.timeout(30)
async def test_cancel_kills_the_whole_process_group_even_children_ignoring_sigterm(
        tmp_path: Path, local: LocalLauncher) -> None:
    spec = _spec(tmp_path, CANCEL_SCRIPT)
    handle = await local.submit(spec)
    await _wait_for_file(spec.workdir / "ready")
    pids = [int((spec.workdir / f"{name}.pid").read_text())
            for name in ("shell", "child", "stubborn")]
    assert all(_alive(pid) for pid in pids)

    await local.cancel(handle)
    status = await local.status(handle)
    assert (status.state, status.exit_code) == ("cancelled", None)
    await _wait_dead(pids)
    await local.cancel(handle)  # cancelling a finished job changes nothing
    assert (await local.status(handle)).state == "cancelled"


@pytest.mark.timeout(30)
async def test_a_job_ignoring_sigterm_is_killed_after_the_grace_period(
        tmp_path: Path, local: LocalLauncher) -> None:
    spec = _spec(tmp_path, "trap '' TERM\nsleep 300 &\ntouch ready\nwait\n")
    handle = await local.submit(spec)
    await _wait_for_file(spec.workdir / "ready")
    members = _group_members(int(handle.native_id))
    assert len(members) == 2, "expected bash and its sleep in the job's process group"
    started = time.monotonic()
    await local.cancel(handle)
    assert time.monotonic() - started >= local.grace_s
    assert await local.status(handle) == JobStatus("cancelled", None, "cancelled")
    await _wait_dead(members)


@pytest.mark.timeout(30)
async def test_the_token_is_never_on_a_running_jobs_command_line_or_environment(
        tmp_path: Path, local: LocalLauncher) -> None:
    spec = _spec(tmp_path, "sleep 30 &\ntouch ready\nwait\n")
    handle = await local.submit(spec)
    await _wait_for_file(spec.workdir / "ready")
    members = _group_members(int(handle.native_id))
    assert len(members) >= 2, "expected bash and its sleep in the job's process group"
    token_file = str(spec.workdir / "token").encode()
    for pid in members:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert TOKEN.encode() not in cmdline
        assert TOKEN.encode() not in environ
        assert f"{TOKEN_FILE_ENV}=".encode() + token_file in environ.split(b"\0")
    assert TOKEN not in (spec.workdir / "job.sh").read_text()
    await local.cancel(handle)


@pytest.mark.timeout(30)
async def test_close_stops_every_running_local_job(tmp_path: Path) -> None:
    launcher = LocalLauncher(grace_s=1.0)
    handles = [await launcher.submit(_spec(tmp_path, "sleep 300\n", job_id=f"j{i}"))
               for i in (1, 2)]
    await launcher.close()
    assert [(await launcher.status(h)).state for h in handles] == ["cancelled", "cancelled"]


# --- slurm ---------------------------------------------------------------------------------------

@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSlurm]:
    fake = FakeSlurm(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    yield fake


SLURM_SCRIPT = """#!/bin/bash
#SBATCH --nodes=2
srun dsn consumer run --config dsn.yaml --session s-1 --output-dir out
"""


@pytest.mark.timeout(30)
async def test_a_job_slurm_forgot_is_read_from_sacct_on_its_cluster(tmp_path: Path,
                                                                   slurm: FakeSlurm) -> None:
    # Past MinJobAge only the accounting database knows a job (the test cluster keeps none).
    handle = JobHandle("slurm", "job-1", "777;perlmutter", tmp_path)
    slurm.answer("squeue", stderr="slurm_load_jobs error: Invalid job id specified", exit=1)
    slurm.answer("scontrol", stderr="slurm_load_jobs error: Invalid job id specified", exit=1)
    slurm.answer("sacct", stdout="FAILED|2:0\n")
    assert await SlurmLauncher().status(handle) == JobStatus("failed", 2, "Slurm state FAILED")
    assert slurm.calls("squeue")[0]["argv"] == ["--clusters=perlmutter", "-h", "-t", "all", "-j",
                                                "777", "-o", "%T"]
    assert slurm.calls("scontrol")[0]["argv"] == ["--clusters=perlmutter", "show", "job", "-o",
                                                  "777"]
    assert slurm.calls("sacct")[0]["argv"] == ["--clusters=perlmutter", "-n", "-X", "-P", "-j",
                                               "777", "-o", "State,ExitCode"]


@pytest.mark.timeout(30)
async def test_a_job_no_slurm_command_can_report_is_unavailable(tmp_path: Path,
                                                               slurm: FakeSlurm) -> None:
    slurm.answer("squeue", stderr="squeue: error: Unable to contact slurm controller", exit=1)
    slurm.answer("scontrol", stderr="scontrol: error: Unable to contact slurm controller", exit=1)
    slurm.answer("sacct", stderr="sacct: error: Slurm accounting storage is disabled", exit=1)
    with pytest.raises(Unavailable, match="Slurm cannot report job 777: squeue: squeue: error: "
                                          "Unable to contact .*accounting storage is disabled"):
        await SlurmLauncher().status(JobHandle("slurm", "job-1", "777", tmp_path))


@pytest.mark.timeout(30)
async def test_an_unknown_slurm_state_keeps_the_job_pending(tmp_path: Path,
                                                            slurm: FakeSlurm) -> None:
    slurm.answer("squeue", stdout="TELEPORTED\n")
    slurm.answer("scontrol", stdout="JobId=777 JobState=TELEPORTED ExitCode=0:0\n")
    status = await SlurmLauncher().status(JobHandle("slurm", "job-1", "777", tmp_path))
    assert status == JobStatus("pending", None, "Slurm state 'TELEPORTED' is not recognised")


@pytest.mark.parametrize(("raw", "exit_code", "expected"), [
    ("PENDING", "", JobStatus("pending", None, "Slurm state PENDING")),
    ("CONFIGURING", "", JobStatus("pending", None, "Slurm state CONFIGURING")),
    ("COMPLETING", "", JobStatus("running", None, "Slurm state COMPLETING")),
    ("COMPLETED", "0:0", JobStatus("succeeded", 0, "Slurm state COMPLETED")),
    ("TIMEOUT", "0:15", JobStatus("failed", None, "Slurm state TIMEOUT, signal 15")),
    ("OUT_OF_MEMORY", "0:125", JobStatus("failed", None, "Slurm state OUT_OF_MEMORY, signal 125")),
    ("NODE_FAIL", "1:0", JobStatus("failed", 1, "Slurm state NODE_FAIL")),
    ("CANCELLED by 1000", "0:15", JobStatus("cancelled", None, "Slurm state CANCELLED, signal 15")),
    ("CANCELLED+", "", JobStatus("cancelled", None, "Slurm state CANCELLED")),
    ("WEIRD", "", JobStatus("pending", None, "Slurm state 'WEIRD' is not recognised")),
])
def test_slurm_states_map_to_job_states(raw: str, exit_code: str, expected: JobStatus) -> None:
    assert slurm_state(raw, exit_code) == expected


def test_sbatch_parsable_output_is_an_id_with_an_optional_cluster() -> None:
    assert parse_sbatch_id("12345\n") == ("12345", None)
    assert parse_sbatch_id("12345;perlmutter\n") == ("12345", "perlmutter")
    with pytest.raises(LaunchFailed, match="'Submitted batch job 1', not a job id"):
        parse_sbatch_id("Submitted batch job 1")


@pytest.mark.timeout(30)
async def test_sbatch_refusal_is_a_clear_error(tmp_path: Path, slurm: FakeSlurm) -> None:
    slurm.answer("sbatch", stderr="sbatch: error: invalid partition specified: gpu\n", exit=1)
    with pytest.raises(LaunchFailed, match="sbatch refused job job-1 .*invalid partition"):
        await SlurmLauncher().submit(_spec(tmp_path, SLURM_SCRIPT))


@pytest.mark.timeout(30)
async def test_a_scheduler_that_does_not_answer_is_unavailable(tmp_path: Path,
                                                              slurm: FakeSlurm) -> None:
    slurm.answer("squeue", sleep=20)
    launcher = SlurmLauncher(timeout_s=0.5)
    with pytest.raises(Unavailable, match="squeue did not answer within 0.5 s"):
        await launcher.status(JobHandle("slurm", "job-1", "777", tmp_path))


@pytest.mark.timeout(30)
async def test_scancel_refusing_a_running_job_is_a_clear_error(tmp_path: Path,
                                                              slurm: FakeSlurm) -> None:
    slurm.answer("scancel", stderr="scancel: error: Access/permission denied", exit=1)
    slurm.answer("squeue", stdout="RUNNING\n")
    with pytest.raises(LaunchFailed, match="scancel could not cancel job 777: .*denied"):
        await SlurmLauncher().cancel(JobHandle("slurm", "job-1", "777", tmp_path))
    assert slurm.calls("scancel")[0]["argv"] == ["777"]


def test_missing_sbatch_is_a_configuration_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigurationError, match="sbatch not found on PATH; the slurm launcher"):
        get_launcher("slurm")
