"""Examples → fixed rows of `seq_len`: best-fit-decreasing bin packing within a bounded window.

Sorting a window of a few thousand examples by length and putting each into the fullest row
it still fits reaches > 0.98 of the row slots on Alpaca-like data, while memory stays bounded
however large the dataset is. Ties are broken by a seeded key and the rows of a window are
shuffled with the same seed, so the output is a pure function of (data, seed).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from pipelora.dataprep.tokens import TokenBatch
from pipelora.rows import IGNORE_INDEX, ROW_DTYPE, ROW_FIELDS, mask_sequence_starts


def best_fit_decreasing(lengths: Sequence[int], capacity: int, *, rng: np.random.Generator) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most `capacity`."""
    sizes = np.asarray(lengths, dtype=np.int64)
    if len(sizes) and sizes.max() > capacity:
        raise ValueError(f"an item of length {int(sizes.max())} exceeds the capacity {capacity}")
    tie = rng.random(len(sizes))
    order = np.lexsort((tie, -sizes))
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (remaining, bin id), sorted: bisect finds the best fit
    for item in order.tolist():
        size = int(sizes[item])
        at = bisect.bisect_left(open_bins, (size, -1))
        if at < len(open_bins):
            remaining, bin_id = open_bins.pop(at)
            bins[bin_id].append(item)
        else:
            bin_id, remaining = len(bins), capacity
            bins.append([item])
        remaining -= size
        if remaining > 0:
            bisect.insort(open_bins, (remaining, bin_id))
    return bins


def build_rows(
    batch: TokenBatch, bins: Sequence[Sequence[int]], *, seq_len: int, pad_id: int,
    out: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Rows for `bins`: sequences back to back, then padding as its own segment (labels IGNORE_INDEX).

    `out`: arrays of len(bins) rows to fill (a shard's buffer: no second copy); new ones otherwise.
    Slice copies per example (memcpy) beat index gathers over every token by several times.
    The first label of every sequence is masked by `pipelora.rows.mask_sequence_starts`, so shards
    carry final labels; a reader applying the same function again changes nothing (it is idempotent).
    """
    count = len(bins)
    if out is None:
        out = {name: np.empty((count, seq_len), dtype=ROW_DTYPE) for name in ROW_FIELDS}
    input_ids, labels, position_ids = out["input_ids"], out["labels"], out["position_ids"]
    input_ids.fill(pad_id)
    labels.fill(IGNORE_INDEX)
    ramp = np.arange(seq_len, dtype=np.int32)
    starts, lengths = batch.starts.tolist(), batch.lengths.tolist()
    for row, members in enumerate(bins):
        row_ids, row_labels, row_positions = input_ids[row], labels[row], position_ids[row]
        cursor = 0
        for k in members:
            start, n = starts[k], lengths[k]
            if cursor + n > seq_len:
                raise ValueError(f"row {row} would hold more than seq_len {seq_len} tokens")
            row_ids[cursor : cursor + n] = batch.ids[start : start + n]
            row_labels[cursor : cursor + n] = batch.labels[start : start + n]
            row_positions[cursor : cursor + n] = ramp[:n]
            cursor += n
        row_positions[cursor:] = ramp[: seq_len - cursor]
    mask_sequence_starts(labels, position_ids)
    return out


def plan_rows(lengths: Sequence[int], *, seq_len: int, packing: bool, rng: np.random.Generator) -> list[list[int]]:
    """The rows of a window of examples, in their seeded order: packed (best fit) or one example per row."""
    if packing:
        bins = best_fit_decreasing(lengths, seq_len, rng=rng)
    else:
        bins = [[i] for i in range(len(lengths))]
    order = rng.permutation(len(bins))
    return [bins[i] for i in order]
