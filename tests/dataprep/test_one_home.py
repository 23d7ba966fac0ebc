"""Run paths, marker names and the row contract are spelled once (pipelora/layout.py, pipelora/rows.py).

dataprep writes the manifest, the shards and their labels: a literal of any of them in its code
would be a second definition that a change to the layout or the row contract silently misses.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOMES = {REPO / "pipelora" / "layout.py", REPO / "pipelora" / "rows.py"}

# What a stray second definition looks like in source text.
STRAY = {
    "the data manifest's name": re.compile(r"manifest\.json"),
    "the checkpoint marker's name": re.compile(r"\bCOMMITTED\b"),
    "the ignore label": re.compile(r"(?<![\w.])-100(?![\w.])"),
    "a .safetensors name built by hand": re.compile(r"""\.safetensors["']|\{[^{}]*:0\d+d\}"""),
}


def stray_literals(text: str) -> list[tuple[int, str, str]]:
    """(line number, what, line) for every stray literal in `text`."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in STRAY.items():
            if pattern.search(line):
                found.append((number, what, line.strip()))
    return found


@pytest.mark.parametrize(
    "line",
    [
        'MANIFEST = "manifest.json"',
        'marker = join_uri(folder, "COMMITTED")',
        "labels.fill(-100)",
        "IGNORE = -100",
        'name = f"{split}-{index:05d}.safetensors"',
        'target = cache / (sha + ".safetensors")',
        'f"step-{step:08d}"',
    ],
)
def test_the_patterns_catch_each_form_of_a_second_definition(line: str) -> None:
    assert stray_literals(line), line


@pytest.mark.parametrize(
    "line",
    [
        "from pipelora.layout import MANIFEST_NAME, shard_name",
        '"""Shards: fixed-length rows in safetensors files."""',
        "from safetensors.numpy import save",
        "labels.fill(IGNORE_INDEX)",
        "x = values[-1000:]",
        "delta = -1.005",
    ],
)
def test_the_patterns_let_ordinary_code_through(line: str) -> None:
    assert not stray_literals(line), line


def test_dataprep_spells_no_run_path_marker_or_ignore_label() -> None:
    sources = sorted((REPO / "dataprep").rglob("*.py"))
    assert len(sources) > 5  # the package is where this test expects it
    offending = [
        f"{path.relative_to(REPO)}:{number}: {what}: {line}"
        for path in sources
        if path not in HOMES
        for number, what, line in stray_literals(path.read_text(encoding="utf-8"))
    ]
    assert not offending, "use pipelora.layout / pipelora.rows instead:\n" + "\n".join(offending)
