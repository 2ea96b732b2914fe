"""Child processes that are always cleaned up: started with logs, watched, and stopped in order."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from common.processes import signal_group
from dsn.errors import ProcessFailed


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def failure(self, what: str) -> ProcessFailed:
        return ProcessFailed(f"{self.name} {what}; last lines of {self.log}:\n{log_tail(self.log)}")


@dataclass
class ProcessGroup:
    """Starts children; on exit stops every one still running (SIGTERM, then SIGKILL)."""

    stop_timeout_s: float = 10.0
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], log: Path,
              env: dict[str, str] | None = None) -> Child:
        with log.open("wb") as out:
            process = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def check_running(self) -> None:
        """Raise if any child has exited while it was still needed."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise child.failure(f"exited early with status {code}")

    def wait(self, child: Child, timeout_s: float) -> None:
        """Wait for ``child`` to finish successfully while every other child keeps running."""
        deadline = time.monotonic() + timeout_s
        while (code := child.process.poll()) is None:
            for other in self.children:
                if other is not child and other.process.poll() is not None:
                    raise other.failure(f"exited early with status {other.process.returncode}")
            if time.monotonic() > deadline:
                raise child.failure(f"did not finish within {timeout_s:.0f} s")
            time.sleep(0.1)
        if code != 0:
            raise child.failure(f"failed with status {code}")

    def wait_for_log(self, child: Child, marker: str, timeout_s: float) -> None:
        """Wait until ``marker`` appears in the child's log (its readiness line)."""
        deadline = time.monotonic() + timeout_s
        while marker not in log_tail(child.log, lines=50):
            if child.process.poll() is not None:
                raise child.failure(f"exited with status {child.process.returncode} "
                                    "before it was ready")
            if time.monotonic() > deadline:
                raise child.failure(f"was not ready within {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self, child: Child) -> int:
        """SIGTERM the child's process group, SIGKILL it if it lingers; returns the exit status."""
        if child.process.poll() is None:
            signal_group(child.process.pid, signal.SIGTERM)
            try:
                child.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                signal_group(child.process.pid, signal.SIGKILL)
                child.process.wait()
        return child.process.returncode

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for child in reversed(self.children):
            self.stop(child)
