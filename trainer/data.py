"""Micro-batches for the first and last pipeline stages, prefetched on a background thread.

The first stage needs (input_ids, position_ids), the last stage the labels; both walk the same
deterministic order (a per-epoch shuffle, then this data-parallel replica's partition), so they
agree row for row without talking. The position is the count of micro-batches handed to the
engine, from which epoch and row follow: a resumed run continues with exactly the next rows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipelora.rows import ROW_FIELDS, mask_sequence_starts
from pipelora.trainer.errors import TrainerError

Batch = tuple[Any, Any]
INPUT_IDS, LABELS, POSITION_IDS = ROW_FIELDS


def _stack(rows: list[dict[str, np.ndarray]], *, inputs: bool, labels: bool) -> Batch:
    ids = torch.from_numpy(np.stack([r[INPUT_IDS] for r in rows]).astype(np.int64))
    pos = np.stack([r[POSITION_IDS] for r in rows]).astype(np.int64)
    first: Any = (ids, torch.from_numpy(pos)) if inputs else None
    second: Any = None
    if labels:
        lab = np.stack([r[LABELS] for r in rows]).astype(np.int64)
        # The shard writer applies the same rule; applying it again (it is idempotent) keeps rows
        # from any source from training one packed sequence to predict the start of the next.
        second = torch.from_numpy(mask_sequence_starts(lab, pos))
    return first, second


class MicroBatchStream(Iterator[Batch]):
    """An endless iterator of micro-batches for DeepSpeed's `train_batch`."""

    def __init__(self, dataset: Any, *, dp_rank: int, dp_size: int, micro_batch_size: int, seed: int,
                 consumed: int = 0, inputs: bool = True, labels: bool = True, prefetch: int = 8) -> None:
        self.dataset = dataset
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.mbs = micro_batch_size
        self.seed = seed
        self.inputs, self.labels = inputs, labels
        self.per_epoch = (len(dataset) // dp_size) // micro_batch_size
        if self.per_epoch == 0:
            raise TrainerError(
                f"the train split has {len(dataset)} rows, fewer than one micro-batch ({micro_batch_size} rows) for "
                f"each of {dp_size} data-parallel replicas; prepare more data or lower parallel.micro_batch_size"
            )
        self.consumed = consumed
        self.wait_s = 0.0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(consumed,), daemon=True, name="prefetch")
        self._thread.start()

    def _view(self, epoch: int) -> Any:
        return self.dataset.shuffled(self.seed, epoch).partition(self.dp_rank, self.dp_size)

    def _produce(self, start: int) -> None:
        index = start
        epoch = -1
        view: Any = None
        try:
            while not self._stop.is_set():
                e, k = divmod(index, self.per_epoch)
                if e != epoch:
                    epoch, view = e, self._view(e)
                rows = [view[k * self.mbs + j] for j in range(self.mbs)]
                item = _stack(rows, inputs=self.inputs, labels=self.labels)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                index += 1
        except BaseException as exc:  # handed to the consumer, which raises it on the training thread
            self._queue.put(exc)

    def __next__(self) -> Batch:
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item
        self.consumed += 1
        return item

    def state(self) -> dict[str, int]:
        epoch, k = divmod(self.consumed, self.per_epoch)
        return {"consumed_micro_batches": self.consumed, "epoch": epoch, "row_in_epoch": k * self.mbs}

    def close(self) -> None:
        self._stop.set()


def eval_batches(dataset: Any, *, dp_rank: int, dp_size: int, micro_batch_size: int, count: int,
                 inputs: bool = True, labels: bool = True) -> Iterator[Batch]:
    """The first `count` micro-batches of this replica's eval rows (wrapping when there are fewer)."""
    view = dataset.partition(dp_rank, dp_size) if len(dataset) >= dp_size else dataset
    n = len(view)
    for b in range(count):
        rows = [view[(b * micro_batch_size + j) % n] for j in range(micro_batch_size)]
        yield _stack(rows, inputs=inputs, labels=labels)
