"""The package layout holds: imports run one way only, and a consumer rank loads the data plane
and nothing of the control plane or the gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
FOREIGN = ("controlplane", "gateway")


def loaded_packages(code: str) -> set[str]:
    """The top-level packages of this project that ``code`` has imported when it ends."""
    probe = (f"{code}\nimport json, sys\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    return set(json.loads(out.stdout.splitlines()[-1])) & {"common", "dataplane", "dsn", *FOREIGN}


def test_the_import_contracts_hold() -> None:
    result = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_import_against_the_direction_breaks_the_contracts(tmp_path: Path) -> None:
    """The same contracts over a small tree in which ``common`` imports the control plane."""
    for package, source in {"common": "import controlplane.app\n", "controlplane": "",
                            "dataplane": "import common\n", "gateway": "import dataplane\n",
                            "dsn": "import gateway\nimport controlplane\n"}.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(source)
    (tmp_path / "controlplane" / "app.py").write_text("import common\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    result = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=False,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "common -> controlplane" in result.stdout.replace(".app", "").replace(" (l.1)", "")


@pytest.mark.parametrize("code", [
    "import dataplane.consumer.runner, dataplane.consumer.cli",
    "from dsn.cli import main\n"
    "try:\n    main(['consumer', 'run', '--help'])\nexcept SystemExit:\n    pass",
])
def test_a_consumer_loads_neither_the_control_plane_nor_the_gateway(code: str) -> None:
    loaded = loaded_packages(code)
    assert "dataplane" in loaded
    assert not loaded & set(FOREIGN), loaded


@pytest.mark.parametrize(("argv", "expected"), [
    (["admin", "--help"], {"common", "controlplane", "dsn"}),
    (["gateway", "--help"], {"common", "dataplane", "dsn", "gateway"}),
    (["producer", "--help"], {"common", "dataplane", "dsn"}),
])
def test_the_dsn_command_loads_only_the_group_that_runs(argv: list[str],
                                                         expected: set[str]) -> None:
    code = f"from dsn.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert loaded_packages(code) == expected
