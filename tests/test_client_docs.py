"""docs/client.md's worked example runs as written: its Python cells, in order, in a fresh
interpreter with only ``DSN_CONTROLPLANE_URL`` and ``DSN_PROJECT_TOKEN`` set, against a control
plane on a real loopback port, a gateway process following its sessions, and the example's own
2-rank ``local-mpiexec`` consumer job launched through the control plane."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cp_helpers import ControlPlane
from test_cp_sessions_api import WORKER_SCOPE

DOC = Path(__file__).resolve().parents[1] / "docs" / "client.md"
WORKED_EXAMPLE = "### A worked example"

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.timeout(300)]


def example_cells() -> list[str]:
    """The Python cells of the worked example, in the order the page shows them."""
    text = DOC.read_text()
    example = text[text.index(WORKED_EXAMPLE):]
    return re.findall(r"^```python\n(.*?)^```$", example, re.MULTILINE | re.DOTALL)


def test_the_readme_links_the_client_page() -> None:
    readme = (DOC.parents[1] / "README.md").read_text()
    assert "(docs/client.md)" in readme


async def test_the_worked_example_runs_as_written(served: tuple[ControlPlane, str, Path],
                                                  tmp_path: Path) -> None:
    cp, _metrics, _spool = served
    await cp.create_project("alpha")
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    cells = example_cells()
    assert len(cells) == 3, cells
    script = tmp_path / "notebook.py"
    script.write_text("\n".join(cells))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSN_")}
    env |= {"DSN_CONTROLPLANE_URL": cp.settings.base_url, "DSN_PROJECT_TOKEN": token}
    done = await asyncio.to_thread(subprocess.run, [sys.executable, str(script)],
                                   capture_output=True, text=True, env=env, cwd=tmp_path,
                                   timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert token not in done.stdout + done.stderr

    printed = done.stdout.splitlines()
    assert printed[0] == f"Client(url='{cp.settings.base_url}', project='alpha')"
    assert printed[1] == "sent 256 messages; scan 0: complete, 64 frames, " \
                         f"{printed[1].rsplit(', ', 1)[1]}"
    path = printed[2].removeprefix("file: ")
    [listed] = (await (await cp.admin("GET", "/api/v1/scans?project=alpha")).json())["items"]
    assert (listed["path"], listed["status"]) == (path, "complete")
    assert printed[3] == f"sha256: {listed['sha256']}"
    assert printed[4] == f"session {listed['session']} is ended"
