"""The shared peer harness (``../shared/peers``), run where it lives and never copied: one script
at a time, its ``RESULT`` lines parsed, or the reason it could not run. Used by
``bench/line_rate.py`` (HAProxy, stunnel, zmq.proxy, CURVE, no hop) and ``bench/counting.py``
(stempy)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "peers"
RUNS = 3
TIMEOUT_S = 900


@dataclass(frozen=True)
class Peer:
    script: str
    args: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()  # programs it needs (Debian packages): any one of them will do


Result = dict[str, str]


def run_peer(directory: Path | None, peer: Peer) -> list[Result] | str:
    """The peer's RESULT lines as key=value maps (``name`` is the result's name), or why it did
    not run."""
    if directory is None or not (directory / peer.script).is_file():
        return f"no peer harness at {directory} (--peers DIR)"
    if peer.tools and not any(shutil.which(tool) for tool in peer.tools):
        return f"{' or '.join(peer.tools)} not installed (scripts/install-bench-deps.sh)"
    try:
        done = subprocess.run([sys.executable, peer.script, *peer.args, "--runs", str(RUNS),
                               "--quiet"], cwd=directory, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"{peer.script} took more than {TIMEOUT_S} s"
    results = [parse_result(line) for line in done.stdout.splitlines()
               if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{peer.script} failed (status {done.returncode}): {said}"
    return results


def parse_result(line: str) -> Result:
    _, name, *fields = line.split()
    return {"name": name, **dict(field.split("=", 1) for field in fields)}
