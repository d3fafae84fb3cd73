"""The layering contract (pyproject.toml, import-linter): kept by the code, and broken by an
import that runs back up a layer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harlflow", "harl", "xrlflow", "tasks", "flows")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the tree under cwd, not the installed one
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_code_keeps_its_layers():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 kept, 0 broken" in r.stdout, r.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "harl" / "database.py", "a") as f:  # a library reaching for a stage
        f.write("\nfrom tasks import tracking  # noqa: E402,F401\n")
    with open(tmp_path / "harl" / "budget.py", "a") as f:  # and a circle inside harl
        f.write("\nfrom harl import tuning  # noqa: E402,F401\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0
    assert "harlflow's layers: each imports only those below it BROKEN" in r.stdout, r.stdout
    assert "harl.database -> tasks.tracking" in r.stdout, r.stdout
    assert "no import cycles between the modules of a package BROKEN" in r.stdout, r.stdout
