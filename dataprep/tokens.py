"""A batch of tokenized examples stored back to back in flat arrays.

Per-example Python objects cost more than the tokenizer itself at Alpaca scale, so examples
live as (start, length) views into two flat int32 arrays, and truncation, splitting and row
building are numpy operations over whole windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipelora.rows import IGNORE_INDEX


def ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """[0..l0), [0..l1), ... concatenated: the position of each token inside its example."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    firsts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(firsts, lengths)


@dataclass
class TokenBatch:
    """Examples `k` = ids[starts[k] : starts[k] + lengths[k]] (and the same slice of labels)."""

    ids: np.ndarray
    labels: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def empty(cls) -> TokenBatch:
        z = np.zeros(0, dtype=np.int32)
        return cls(z, z.copy(), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> TokenBatch:
        """From per-example (ids, labels) arrays."""
        if not pairs:
            return cls.empty()
        lengths = np.fromiter((len(ids) for ids, _ in pairs), dtype=np.int64, count=len(pairs))
        ids = np.concatenate([p[0] for p in pairs]).astype(np.int32, copy=False)
        labels = np.concatenate([p[1] for p in pairs]).astype(np.int32, copy=False)
        return cls(ids, labels, np.cumsum(lengths) - lengths, lengths)

    def source_index(self) -> np.ndarray:
        """Flat indices of every token of every example, in example order."""
        return np.repeat(self.starts, self.lengths) + ragged_arange(self.lengths)

    def take(self, indices: np.ndarray) -> TokenBatch:
        """A compact batch of the examples at `indices` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64)
        sub = TokenBatch(self.ids, self.labels, self.starts[indices], self.lengths[indices])
        src = sub.source_index()
        lengths = sub.lengths.copy()
        return TokenBatch(self.ids[src], self.labels[src], np.cumsum(lengths) - lengths, lengths)

    def example(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        a, n = int(self.starts[k]), int(self.lengths[k])
        return self.ids[a : a + n], self.labels[a : a + n]

    def label_counts(self) -> np.ndarray:
        """Trainable tokens per example (within each example's current length)."""
        counted = np.concatenate([[0], np.cumsum(self.labels != IGNORE_INDEX)])
        return counted[self.starts + self.lengths] - counted[self.starts]

    def select(self, indices: np.ndarray) -> TokenBatch:
        """The examples at `indices`, sharing this batch's token arrays (no copy)."""
        indices = np.asarray(indices, dtype=np.int64)
        return TokenBatch(self.ids, self.labels, self.starts[indices], self.lengths[indices])

    @staticmethod
    def concat(batches: Sequence[TokenBatch]) -> TokenBatch:
        """One batch over several: token arrays appended (a copy), example views shifted to match."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return TokenBatch.empty()
        bases = np.cumsum([0] + [len(b.ids) for b in batches[:-1]])
        return TokenBatch(
            np.concatenate([b.ids for b in batches]),
            np.concatenate([b.labels for b in batches]),
            np.concatenate([b.starts + base for b, base in zip(batches, bases, strict=True)]),
            np.concatenate([b.lengths for b in batches]),
        )
