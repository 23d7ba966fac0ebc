"""The contract of a shard row, shared by the writer (dataprep) and the readers (trainer).

A row is `seq_len` tokens in three aligned int32 arrays: `input_ids`; `labels`, aligned with
`input_ids` as in Hugging Face (the model shifts them), `IGNORE_INDEX` where no loss is taken;
and `position_ids`, which restart at 0 at every packed sequence (so attention never crosses
sequences and RoPE positions are those of an unpacked sequence).
"""

from __future__ import annotations

import numpy as np

ROW_FIELDS = ("input_ids", "labels", "position_ids")
ROW_DTYPE = np.int32
IGNORE_INDEX = -100


def mask_sequence_starts(labels: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    """Set `labels` to IGNORE_INDEX (in place) wherever a packed sequence starts; returns `labels`.

    The model predicts token t+1 from position t, so the label at a sequence's first position is
    what the *previous* sequence's last token would be trained to predict: its neighbour's first
    token, across a boundary attention never crosses. Masking it keeps a packed row's loss equal
    to the sum of its sequences' unpacked losses. The writer (dataprep) applies it to every row it
    packs; a reader may apply it again (it is idempotent) to guard rows from other writers.
    """
    labels[position_ids == 0] = IGNORE_INDEX
    return labels
