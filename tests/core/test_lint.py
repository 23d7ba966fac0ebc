"""The tree stays `ruff check` clean and the core package `mypy --strict` clean (as `make lint`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ruff_check_is_clean() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    proc = subprocess.run([str(ruff), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_on_the_core_package_is_clean() -> None:
    """pyproject's [tool.mypy]: strict over `pipelora/` (the job spec, storage, layout, pod plumbing)."""
    mypy = Path(sys.executable).parent / "mypy"
    proc = subprocess.run([str(mypy), "--no-incremental"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout
