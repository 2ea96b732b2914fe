"""Child-process supervision used by the demo: readiness, early exits, and cleanup."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dsn.errors import ProcessFailed
from dsn.processes import ProcessGroup


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.timeout(30)
def test_readiness_line_is_awaited_and_children_are_stopped_on_exit(tmp_path: Path) -> None:
    with ProcessGroup(stop_timeout_s=5) as group:
        # The sleep stands for a server's lifetime: it runs until the group stops it.
        child = group.start("server", _python(
            "import sys, time; print('ready', flush=True); time.sleep(60)"), tmp_path / "s.log")
        group.wait_for_log(child, "ready", timeout_s=10)
        assert child.process.poll() is None
    assert child.process.returncode is not None


@pytest.mark.timeout(30)
def test_a_child_that_dies_before_it_is_ready_fails_fast_with_its_log(tmp_path: Path) -> None:
    with ProcessGroup() as group:
        child = group.start("gateway", _python(
            "import sys; print('error: cannot load key', file=sys.stderr); sys.exit(2)"),
            tmp_path / "g.log")
        with pytest.raises(ProcessFailed, match="exited with status 2 before it was ready") as info:
            group.wait_for_log(child, "ready", timeout_s=10)
    assert "error: cannot load key" in str(info.value)


@pytest.mark.timeout(30)
def test_waiting_for_a_job_fails_when_another_child_exits(tmp_path: Path) -> None:
    with ProcessGroup() as group:
        # The job outlives the test unless the group notices the gateway's exit.
        job = group.start("job", _python("import time; time.sleep(60)"), tmp_path / "j.log")
        group.start("gateway", _python("import sys; sys.exit(1)"), tmp_path / "g.log")
        with pytest.raises(ProcessFailed, match="gateway exited early with status 1"):
            group.wait(job, timeout_s=20)
