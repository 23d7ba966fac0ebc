"""Counts a dataprep run keeps (for the manifest and the summary line), in bounded memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLITS = ("train", "eval")
SHOWN_BAD = 5


@dataclass
class Stats:
    seq_len: int
    records: int = 0
    examples: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped: int = 0
    no_labels: int = 0
    label_tokens: int = 0
    bad: list[str] = field(default_factory=list)
    split_examples: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    split_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    length_histogram: np.ndarray | None = None

    def note_bad(self, where: str, reason: str) -> None:
        self.skipped += 1
        if len(self.bad) < SHOWN_BAD:
            self.bad.append(f"{where}: {reason}")

    def note_lengths(self, lengths: np.ndarray) -> None:
        """Kept examples' lengths (each at most seq_len): a histogram, not a list per example."""
        counts = np.bincount(lengths, minlength=self.seq_len + 1)
        self.length_histogram = counts if self.length_histogram is None else self.length_histogram + counts

    def length_summary(self) -> dict[str, float]:
        hist = self.length_histogram
        if hist is None or not hist.sum():
            return {}
        present = np.flatnonzero(hist)
        cumulative = np.cumsum(hist)
        total = int(cumulative[-1])

        def percentile(q: float) -> int:
            return int(np.searchsorted(cumulative, q * total, side="left"))

        return {
            "min": int(present[0]),
            "mean": round(float((np.arange(len(hist)) * hist).sum() / total), 2),
            "p50": percentile(0.5),
            "p95": percentile(0.95),
            "max": int(present[-1]),
        }


def summary_line(manifest: dict[str, Any]) -> str:
    """The one line a dataprep run ends with (also what a no-op run compares against)."""
    s = manifest["stats"]
    sp = manifest["splits"]
    return (
        f"dataprep: {s['examples']} examples, {s['tokens']} tokens, {s['rows']} rows "
        f"(train {sp['train']['rows']}, eval {sp['eval']['rows']}), packing efficiency {s['packing_efficiency']:.4f}, "
        f"truncated {s['truncated']}, dropped {s['dropped']}, skipped {s['skipped']}, {s['seconds']:.1f} s"
    )
