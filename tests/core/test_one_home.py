"""Each contract has one definition: run paths and marker names in `pipelora/layout.py`, the
hostfile path and rendezvous port in `pipelora/launch.py`. No other file of the package or the
chart spells them (tests may, to check the contract from outside)."""

from __future__ import annotations

import re
from pathlib import Path

from pipelora import launch, layout

REPO = Path(__file__).resolve().parents[2]
HOMES = {REPO / "pipelora" / "layout.py", REPO / "pipelora" / "launch.py"}
SOURCES = ("pipelora", "dataprep", "trainer", "workflow", "helm")


def contract_literals() -> list[str]:
    return [layout.MANIFEST_NAME, layout.PROGRESS_NAME, layout.CHECKPOINT_MARKER, layout.ADAPTER_WEIGHTS,
            layout.ADAPTER_CONFIG, launch.CLUSTER_HOSTFILE, str(launch.MASTER_PORT), launch.POD_RUNTIME_DIR]


def stray_literals() -> list[str]:
    pattern = re.compile("|".join(re.escape(x) for x in contract_literals()))
    found = []
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*")):
            if path in HOMES or path.suffix not in (".py", ".yaml", ".tpl", ".json") or "__pycache__" in path.parts:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    return found


def test_run_paths_markers_and_launch_constants_live_only_in_their_homes() -> None:
    assert stray_literals() == []


def test_the_grep_would_catch_a_stray_literal(tmp_path: Path) -> None:
    pattern = re.compile("|".join(re.escape(x) for x in contract_literals()))
    assert pattern.search('uri = join_uri(run, "data", "manifest.json")')
    assert pattern.search("mpirun --hostfile /etc/mpi/hostfile")
    assert not pattern.search("uri = spec.layout.manifest")
