"""The whole system as separate processes: a control plane, a gateway fed by its state service, a
real ``mpiexec -n 2`` consumer job launched through the session's job API and four CURVE producers
with sector loss, duplicates and reordering, checked against the synthetic truth."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import stempy.io
from click.testing import CliRunner

from dataplane.synthetic import CameraSpec, StreamPlan
from dsn.cli import main
from dsn.demo import DemoOptions, run_demo


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_scan_streams_through_gateway_into_mpi_job_with_exact_accounting(tmp_path: Path) -> None:
    options = DemoOptions(state_dir=tmp_path, scan_shape=(32, 32), ranks=2, loss=0.001,
                          duplicates=0.001, reorder=16, seed=3)
    summary = run_demo(options, say=lambda _: None)
    plan = StreamPlan(CameraSpec(scan_shape=(32, 32), seed=3), loss_rate=0.001,
                      duplicate_rate=0.001, reorder_window=16, seed=3)
    assert plan.lost and plan.duplicated, "the scenario must include loss and duplicates"

    # verify_scan_file compared every frame's events with the planted electrons and with stempy's
    # electron_count_frame, and /metadata/stream's counters with the plan.
    assert summary.check.ok, summary.check.problems
    assert summary.check.frames == 32 * 32
    assert summary.check.incomplete_frames == len({frame for frame, _ in plan.lost})

    path = Path(summary.result.path)
    assert stempy.io.load_electron_counts(str(path)).scan_shape == (32, 32)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    with h5py.File(path) as f:
        stream = f["metadata/stream"].attrs
        assert stream["session"] == summary.session and int(stream["scan"]) == 0
        assert int(stream["unaccounted_sectors"]) == 0
    assert (summary.result.session, summary.result.scan) == (summary.session, 0)
    assert summary.result.frames == 32 * 32 and summary.result.events == summary.check.events
    assert summary.result.status == "partial"
    assert summary.result.lost_sectors == len(plan.lost)
    assert summary.stream.messages == 32 * 32 * 4 - len(plan.lost) + len(plan.duplicated)

    gateway_stop = json.loads(
        (next(tmp_path.glob("demo/*/gateway.log"))).read_text().splitlines()[-1])
    assert gateway_stop["event"] == "stop"
    assert (gateway_stop["counters"]["sessions"][summary.session]["messages"]
            == summary.stream.messages)
    assert gateway_stop["counters"]["drops"] == {}


def test_demo_fails_clearly_when_it_cannot_start(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["demo", "--state-dir", str(blocker / "state")])
    assert result.exit_code == 1
    assert "demo failed: cannot create the demo's working directory" in result.output
    assert "Traceback" not in result.output
