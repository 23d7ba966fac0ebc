"""Parsers of the lines ranks print, for tests that read a run's output."""

from __future__ import annotations

import re
from dataclasses import dataclass

MEMORY_LINE = re.compile(r"^\[stage (\d+)/(\d+) dp \d+/\d+\] memory: peak ([\d.]+)GiB, ([\d.]+)GiB above the built "
                         r"stage; plan predicted ([\d.]+)GiB for its activations \((\d+) micro-batch", re.M)


@dataclass(frozen=True)
class StageMemoryLine:
    """One rank's end-of-training memory line (`pipelora.trainer.memory_report`)."""

    stages: int
    peak_gib: float
    grew_gib: float
    predicted_gib: float
    in_flight: int


def memory_lines(stdout: str) -> dict[int, StageMemoryLine]:
    """Stage (1-based) → its memory line."""
    return {int(s): StageMemoryLine(int(p), float(peak), float(grew), float(pred), int(k))
            for s, p, peak, grew, pred, k in MEMORY_LINE.findall(stdout)}
