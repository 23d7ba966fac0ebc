"""Tokenization over every core: windows of examples go to worker processes, results come back in order.

The Rust encoder holds the GIL and uses one core per call here, so threads do not help: each
worker process holds its own copy of the tokenizer (sent as tokenizer.json text, so workers never
import transformers) and encodes a slice of each window into numpy arrays, which travel back
cheaply. Workers do only what the encoder must (Alpaca: the ids of the prompt and reply texts);
the parent renders the texts and builds BOS/EOS, labels and offsets with whole-window numpy
while it reads and validates the next windows: even one worker puts a second core to use, and
the worker, which is the limit, spends its time in the encoder.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelora.dataprep.errors import DataprepError
from pipelora.dataprep.records import AlpacaExample, Example, RecordError
from pipelora.dataprep.templates import (
    Span,
    alpaca_texts,
    assemble_alpaca,
    encode_chat,
    encode_texts,
    render_chat,
)
from pipelora.dataprep.tokenizer import special_prefix
from pipelora.dataprep.tokens import TokenBatch

MIN_SLICE = 64  # examples; smaller windows are not worth splitting


@dataclass
class Encoded:
    """A window's tokens; `positions[k]` is the index in the window of example k of `batch`."""

    batch: TokenBatch
    positions: list[int]
    errors: list[tuple[int, RecordError]]


# -- worker side ----------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, options: dict[str, Any]) -> None:
    from tokenizers import Tokenizer

    _worker["backend"] = Tokenizer.from_str(tokenizer_json)
    _worker["options"] = options


def _encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Alpaca pieces: the worker only encodes; the parent, which has time to spare, builds the rest."""
    return encode_texts(_worker["backend"], texts)


def _encode_chat(items: list[Any]) -> TokenBatch:
    return encode_chat(_worker["backend"], items, train_on_inputs=_worker["options"]["train_on_inputs"])


def _ready() -> bool:
    return "backend" in _worker


# -- parent side ----------------------------------------------------------------------------------

Part = Future[Any] | Any


class PendingWindow:
    """A window submitted for encoding; `result()` waits for its slices and joins them."""

    def __init__(self, parts: list[Part], join: Callable[[list[Any]], TokenBatch], positions: list[int],
                 errors: list[tuple[int, RecordError]]) -> None:
        self._parts = parts
        self._join = join
        self._positions = positions
        self._errors = errors

    def result(self) -> Encoded:
        try:
            done = [p.result() if isinstance(p, Future) else p for p in self._parts]
        except BrokenProcessPool:
            raise DataprepError(
                "a tokenizer worker process died (killed for memory?); rerun with fewer --workers or more memory"
            ) from None
        return Encoded(self._join(done), self._positions, self._errors)


def _join_batches(batches: list[TokenBatch]) -> TokenBatch:
    return batches[0] if len(batches) == 1 else TokenBatch.concat(batches)


class Encoder:
    """Encodes windows of examples with `workers` processes (in this process when workers is 0)."""

    def __init__(self, tokenizer: Any, *, template: str, train_on_inputs: bool, workers: int) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.workers = max(0, workers)
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataprepError(
                "dataset.template is 'chat' but the tokenizer has no chat template; add chat_template to "
                "tokenizer_config.json in the model folder, or use template: alpaca"
            )
        self.options = {
            "bos": [int(i) for i in special_prefix(tokenizer)],  # BOS as the tokenizer adds it
            "eos": int(tokenizer.eos_token_id),
            "train_on_inputs": train_on_inputs,
        }
        self._pool: ProcessPoolExecutor | None = None
        if self.workers > 0:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded parent
                initializer=_init_worker,
                initargs=(tokenizer.backend_tokenizer.to_str(), self.options),
            )
            for _ in range(self.workers):  # start the workers now, while the first window is read
                self._pool.submit(_ready)

    def submit(self, examples: Sequence[Example]) -> PendingWindow:
        if self.template == "alpaca":
            return self._submit_alpaca(examples)
        positions, errors, rendered = self._render_chat(examples)
        backend = self.tokenizer.backend_tokenizer
        train_on_inputs = self.options["train_on_inputs"]
        if self._pool is None or len(rendered) < MIN_SLICE:
            return PendingWindow([encode_chat(backend, rendered, train_on_inputs=train_on_inputs)], _join_batches,
                                 positions, errors)
        return PendingWindow(self._spread(_encode_chat, rendered, unit=1), _join_batches, positions, errors)

    def _submit_alpaca(self, examples: Sequence[Example]) -> PendingWindow:
        for example in examples:
            if not isinstance(example, AlpacaExample):
                raise DataprepError("template 'alpaca' needs format 'alpaca'; use template: chat for messages data")
        texts = alpaca_texts(examples)  # type: ignore[arg-type]
        options = self.options

        def join(parts: list[tuple[np.ndarray, np.ndarray]]) -> TokenBatch:
            flat = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
            lengths = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
            return assemble_alpaca(flat, lengths, bos=options["bos"], eos=options["eos"],
                                   train_on_inputs=options["train_on_inputs"])

        positions = list(range(len(examples)))
        if self._pool is None or len(examples) < MIN_SLICE:
            return PendingWindow([encode_texts(self.tokenizer.backend_tokenizer, texts)], join, positions, [])
        return PendingWindow(self._spread(_encode_texts, texts, unit=2), join, positions, [])

    def _spread(self, fn: Callable[[list[Any]], Any], items: list[Any], *, unit: int) -> list[Part]:
        """One slice per worker, each a whole number of `unit`s (an example's pieces stay together)."""
        assert self._pool is not None
        units = len(items) // unit
        step = -(-units // self.workers) * unit
        return [self._pool.submit(fn, items[i : i + step]) for i in range(0, len(items), step)]

    def _render_chat(self, examples: Sequence[Example]) -> tuple[list[int], list[tuple[int, RecordError]], list[Any]]:
        positions: list[int] = []
        errors: list[tuple[int, RecordError]] = []
        rendered: list[tuple[str, list[Span]]] = []
        for position, example in enumerate(examples):
            try:
                rendered.append(render_chat(self.tokenizer, example))
                positions.append(position)
            except RecordError as exc:
                errors.append((position, exc))
        return positions, errors, rendered

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
