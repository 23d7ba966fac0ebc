"""Rows as the writer builds them: the contract of pipelora.rows, applied once, in one place."""

from __future__ import annotations

import numpy as np
import pytest

from pipelora.dataprep.packing import build_rows
from pipelora.dataprep.tokens import TokenBatch
from pipelora.rows import IGNORE_INDEX, ROW_DTYPE, ROW_FIELDS

PAD = 0


def _batch(*examples: list[int]) -> TokenBatch:
    """Examples whose every label is trainable (label = id), so only the writer can mask them."""
    pairs = [(np.asarray(e, dtype=np.int32), np.asarray(e, dtype=np.int32)) for e in examples]
    return TokenBatch.from_pairs(pairs)


def test_packed_row_masks_each_sequence_start_and_the_padding() -> None:
    batch = _batch([11, 12, 13], [21, 22], [31, 32, 33, 34])
    rows = build_rows(batch, [[0, 1], [2]], seq_len=7, pad_id=PAD)
    assert set(rows) == set(ROW_FIELDS) and all(a.dtype == ROW_DTYPE and a.shape == (2, 7) for a in rows.values())
    x = IGNORE_INDEX
    assert rows["input_ids"].tolist() == [[11, 12, 13, 21, 22, PAD, PAD], [31, 32, 33, 34, PAD, PAD, PAD]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    # labels aligned with input_ids (the model shifts): a sequence's first label would be its
    # neighbour's target across a boundary attention never crosses, so it is masked
    assert rows["labels"].tolist() == [[x, 12, 13, x, 22, x, x], [x, 32, 33, 34, x, x, x]]


def test_full_row_and_rows_written_into_a_shard_buffer() -> None:
    batch = _batch([1, 2, 3, 4], [5, 6])
    out = {name: np.full((3, 4), 99, dtype=ROW_DTYPE) for name in ROW_FIELDS}
    view = {name: array[1:3] for name, array in out.items()}  # rows 1..2 of a shard buffer
    build_rows(batch, [[0], [1]], seq_len=4, pad_id=PAD, out=view)
    assert out["labels"].tolist() == [[99] * 4, [IGNORE_INDEX, 2, 3, 4], [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["position_ids"][1:].tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    assert (out["input_ids"][0] == 99).all()  # rows outside the view are untouched


def test_a_row_over_seq_len_is_refused() -> None:
    with pytest.raises(ValueError, match="more than seq_len 4"):
        build_rows(_batch([1, 2, 3], [4, 5]), [[0, 1]], seq_len=4, pad_id=PAD)
