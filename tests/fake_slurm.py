"""Slurm client commands that record each call and answer as told: the failures a real Slurm
cannot produce on demand (a refusing ``sbatch``, a controller that does not answer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

FAKE_TOOL = """#!{python}
import json, os, stat, sys, time
from pathlib import Path
state = Path({state!r})
name = Path(sys.argv[0]).name
call = {{"argv": sys.argv[1:], "token_file": os.environ.get("DSN_CONSUMER_TOKEN_FILE")}}
if len(sys.argv) > 1 and Path(sys.argv[-1]).is_file():
    call["script_path"] = sys.argv[-1]
    call["script"] = Path(sys.argv[-1]).read_text()
if call["token_file"]:
    call["token_mode"] = stat.S_IMODE(os.stat(call["token_file"]).st_mode)
with open(state / (name + ".calls"), "a") as log:
    log.write(json.dumps(call) + "\\n")
behaviour = state / (name + ".json")
answer = json.loads(behaviour.read_text()) if behaviour.exists() else {{}}
time.sleep(answer.get("sleep", 0))  # a scheduler too slow to answer, when told to be
sys.stdout.write(answer.get("stdout", ""))
sys.stderr.write(answer.get("stderr", ""))
sys.exit(answer.get("exit", 0))
"""


class FakeSlurm:
    """Slurm client commands on PATH that record each call and answer as told."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.state = root / "state"
        self.bin.mkdir(parents=True)
        self.state.mkdir()
        for tool in ("sbatch", "squeue", "scontrol", "sacct", "scancel"):
            path = self.bin / tool
            path.write_text(FAKE_TOOL.format(python=sys.executable, state=str(self.state)))
            path.chmod(0o755)

    def answer(self, tool: str, stdout: str = "", stderr: str = "", exit: int = 0,
               sleep: float = 0) -> None:
        (self.state / f"{tool}.json").write_text(json.dumps(
            {"stdout": stdout, "stderr": stderr, "exit": exit, "sleep": sleep}))

    def calls(self, tool: str) -> list[dict[str, object]]:
        path = self.state / f"{tool}.calls"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
