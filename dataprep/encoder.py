"""Tokenization over every core: windows of examples go to worker processes, results come back in order.

The Rust encoder holds the GIL and uses one core per call here, so threads do not help: each
worker process holds its own copy of the tokenizer (sent as tokenizer.json text, so workers never
import transformers) and encodes a slice of each window into numpy arrays, which travel back
cheaply. The parent keeps reading and validating the next window meanwhile, so even one worker
puts a second core to use.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from pipelora.dataprep.errors import DataprepError
from pipelora.dataprep.records import AlpacaExample, Example, RecordError
from pipelora.dataprep.templates import Span, encode_alpaca, encode_chat, render_chat
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


def _encode_slice(kind: str, items: list[Any]) -> TokenBatch:
    if kind == "alpaca":  # plain tuples travel faster than objects
        items = [AlpacaExample(*item) for item in items]
    return encode_items(_worker["backend"], _worker["options"], kind, items)


def _ready() -> bool:
    return "backend" in _worker


def encode_items(backend: Any, options: dict[str, Any], kind: str, items: list[Any]) -> TokenBatch:
    if kind == "alpaca":
        return encode_alpaca(backend, items, bos=options["bos"], eos=options["eos"],
                             train_on_inputs=options["train_on_inputs"])
    return encode_chat(backend, items, train_on_inputs=options["train_on_inputs"])


# -- parent side ----------------------------------------------------------------------------------


class PendingWindow:
    """A window submitted for encoding; `result()` waits for its slices."""

    def __init__(self, parts: list[Future[TokenBatch] | TokenBatch], positions: list[int],
                 errors: list[tuple[int, RecordError]]) -> None:
        self._parts = parts
        self._positions = positions
        self._errors = errors

    def result(self) -> Encoded:
        try:
            batches = [p.result() if isinstance(p, Future) else p for p in self._parts]
        except BrokenProcessPool:
            raise DataprepError(
                "a tokenizer worker process died (killed for memory?); rerun with fewer --workers or more memory"
            ) from None
        batch = batches[0] if len(batches) == 1 else TokenBatch.concat(batches)
        return Encoded(batch, self._positions, self._errors)


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
        positions, errors, items = self._prepare(examples)
        kind = "alpaca" if self.template == "alpaca" else "chat"
        if self._pool is None or len(items) < MIN_SLICE:
            batch = encode_items(self.tokenizer.backend_tokenizer, self.options, kind, items)
            return PendingWindow([batch], positions, errors)
        if kind == "alpaca":
            items = [(e.instruction, e.input, e.output) for e in items]
        step = -(-len(items) // self.workers)
        parts: list[Future[TokenBatch] | TokenBatch] = [
            self._pool.submit(_encode_slice, kind, items[i : i + step]) for i in range(0, len(items), step)
        ]
        return PendingWindow(parts, positions, errors)

    def _prepare(self, examples: Sequence[Example]) -> tuple[list[int], list[tuple[int, RecordError]], list[Any]]:
        if self.template == "alpaca":
            for example in examples:
                if not isinstance(example, AlpacaExample):
                    raise DataprepError("template 'alpaca' needs format 'alpaca'; use template: chat for messages data")
            return list(range(len(examples))), [], list(examples)
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
