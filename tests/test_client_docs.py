"""docs/client.md's worked examples run as written, with only ``DSN_CONTROLPLANE_URL`` and
``DSN_PROJECT_TOKEN`` set, against a control plane on a real loopback port, a gateway process
following its sessions, and the examples' own 2-rank ``local-mpiexec`` consumer jobs launched
through the control plane: the Python cells, in order, in a fresh interpreter, and the shell
script with the ``dsn`` commands."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cp_helpers import ControlPlane
from test_cp_sessions_api import WORKER_SCOPE

DOC = Path(__file__).resolve().parents[1] / "docs" / "client.md"
WORKED_EXAMPLE = "### A worked example"
SHELL_EXAMPLE = "### The same from a shell"

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.timeout(300)]


def example_blocks(heading: str, language: str) -> list[str]:
    """The ``language`` blocks of the example under ``heading``, in the order the page shows
    them."""
    text = DOC.read_text()
    section = text[text.index(heading):]
    end = section.find("\n### ", 1)
    section = section if end < 0 else section[:end]
    return re.findall(rf"^```{language}\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)


async def user_environment(cp: ControlPlane) -> tuple[dict[str, str], str]:
    """A user's environment with a project token of alpha (created here), and the token."""
    await cp.create_project("alpha")
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSN_")}
    env |= {"DSN_CONTROLPLANE_URL": cp.settings.base_url, "DSN_PROJECT_TOKEN": token,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return env, token


def test_the_readme_links_the_client_page() -> None:
    readme = (DOC.parents[1] / "README.md").read_text()
    assert "(docs/client.md)" in readme


async def test_the_worked_example_runs_as_written(served: tuple[ControlPlane, str, Path],
                                                  tmp_path: Path) -> None:
    cp, _metrics, _spool = served
    env, token = await user_environment(cp)
    cells = example_blocks(WORKED_EXAMPLE, "python")
    assert len(cells) == 3, cells
    script = tmp_path / "notebook.py"
    script.write_text("\n".join(cells))
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


async def test_the_shell_example_runs_as_written(served: tuple[ControlPlane, str, Path],
                                                 tmp_path: Path) -> None:
    cp, _metrics, _spool = served
    env, token = await user_environment(cp)
    [script] = example_blocks(SHELL_EXAMPLE, "sh")
    (tmp_path / "gateway").mkdir()
    shutil.copy(cp.settings.gateway_public_key_file, tmp_path / "gateway" / "server.key")
    done = await asyncio.to_thread(subprocess.run, ["bash", "-c", script], capture_output=True,
                                   text=True, env=env, cwd=tmp_path, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert token not in done.stdout + done.stderr

    [listed] = (await (await cp.admin("GET", "/api/v1/scans?project=alpha")).json())["items"]
    assert listed["status"] == "complete" and listed["frames"] == 64
    shown = [line.split() for line in done.stdout.splitlines() if listed["sha256"] in line]
    assert len(shown) == 1 and shown[0][:4] == [listed["session"], "0", "consumer", "complete"]
    session = await (await cp.admin("GET", f"/api/v1/sessions/{listed['session']}")).json()
    assert session["state"] == "ended"
