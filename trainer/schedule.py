"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based).

    Warmup reaches the peak at step `warmup - 1` (never a wasted step at LR 0); the decay runs
    to zero at `total`.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
