"""The dataprep run: dataset → examples → tokens → split → packed rows → shards → manifest.

Everything streams in windows: records are read, validated and tokenized a window at a time,
and each split is packed a (larger) window at a time, so memory is bounded by the window sizes,
not the dataset. The manifest is committed last; until then nothing under `data/` counts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelora.config import JobSpec
from pipelora.dataprep.encoder import Encoder, PendingWindow
from pipelora.dataprep.errors import BadInputError, DataprepError, OutputExistsError
from pipelora.dataprep.hubsource import (
    HubDataset,
    ModelSource,
    model_source,
    open_hub_dataset,
    read_hub_records,
)
from pipelora.dataprep.packing import build_rows, plan_rows
from pipelora.dataprep.readers import DatasetFile, RawRecord, count_records, fetch_dataset, read_records
from pipelora.dataprep.records import Example, RecordError, alpaca_example, chat_example
from pipelora.dataprep.shards import ShardWriter, manifest_uri, rows_per_shard
from pipelora.dataprep.stats import SPLITS, Stats, summary_line
from pipelora.dataprep.tokenizer import TokenizerInfo, fetch_tokenizer_files, load_tokenizer, tokenizer_info
from pipelora.dataprep.tokens import TokenBatch
from pipelora.hub import is_hub_uri
from pipelora.storage import Storage, storage_for

FORMAT_VERSION = 1  # bump when the bytes written for the same inputs change
READ_WINDOW = 2048  # records validated and tokenized together
IN_FLIGHT = 4  # windows being encoded while the next is read (slack for a pack or a shard write)
AUTO_WORKERS_BYTES = 8 * 1024 * 1024  # smaller datasets: no worker (workers cost a second to start)
PACK_WINDOW = 16384  # examples packed together (per split)


@dataclass(frozen=True)
class DataprepResult:
    manifest: dict[str, Any]
    reused: bool
    summary: str


def fingerprint(spec: JobSpec, *, dataset_id: str, tokenizer_digest: str, model_sha: str | None = None) -> str:
    """Everything the shards' bytes depend on; equal fingerprints mean equal shards.

    `dataset_id`: the sha256 of a dataset file, or an hf:// dataset's repository, commit and split;
    `model_sha`: an hf:// model's commit, so a new revision of the model prepares the data again.
    """
    d = spec.dataset
    inputs: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "dataset": dataset_id,
        "tokenizer": tokenizer_digest,
        "format": d.format,
        "template": d.template,
        "seq_len": d.seq_len,
        "packing": d.packing,
        "train_on_inputs": d.train_on_inputs,
        "eval_fraction": d.eval_fraction,
        "overlong": d.overlong,
        "max_bad_fraction": d.max_bad_fraction,
        "seed": spec.training.seed,
    }
    if model_sha is not None:  # only for hf:// models: fingerprints of models given by path stay as they were
        inputs["model_sha"] = model_sha
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def eval_target(count: int, fraction: float) -> int:
    """How many of the first `count` examples go to eval: ceil, but the first always trains."""
    return math.ceil(round(fraction * (count - 1), 9)) if count > 0 and fraction > 0 else 0


def _windows(records: Iterator[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    window: list[RawRecord] = []
    for record in records:
        window.append(record)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


class _SplitPacker:
    """Pending examples of one split, packed and handed to its writer a window at a time."""

    def __init__(self, writer: ShardWriter, *, spec: JobSpec, pad_id: int, split_index: int) -> None:
        self.writer = writer
        self.seq_len = spec.dataset.seq_len
        self.packing = spec.dataset.packing
        self.pad_id = pad_id
        self.seed = spec.training.seed
        self.split_index = split_index
        self.pending: list[TokenBatch] = []
        self.pending_count = 0
        self.windows = 0

    def add(self, batch: TokenBatch) -> None:
        if not len(batch):
            return
        self.pending.append(batch)
        self.pending_count += len(batch)
        if self.pending_count >= PACK_WINDOW:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rng = np.random.default_rng([self.seed, self.split_index, self.windows])
        batch = TokenBatch.concat(self.pending)
        bins = plan_rows(batch.lengths, seq_len=self.seq_len, packing=self.packing, rng=rng)

        def write(out: dict[str, np.ndarray], lo: int, hi: int) -> None:
            build_rows(batch, bins[lo:hi], seq_len=self.seq_len, pad_id=self.pad_id, out=out)

        self.writer.fill(len(bins), write)  # rows are built in the shard's buffer
        self.pending, self.pending_count = [], 0
        self.windows += 1


def _fit(batch: TokenBatch, *, seq_len: int, overlong: str, stats: Stats) -> tuple[TokenBatch, np.ndarray]:
    """Apply dataset.overlong; an example left with no trainable token is dropped (and counted).

    Returns the kept examples and their trainable-token counts (a pass over every label, done once)."""
    over = batch.lengths > seq_len
    keep = np.ones(len(batch), dtype=bool)
    if over.any():
        if overlong == "drop":
            stats.dropped += int(over.sum())
            keep &= ~over
        else:
            stats.truncated += int(over.sum())
            batch = TokenBatch(batch.ids, batch.labels, batch.starts, np.minimum(batch.lengths, seq_len))
    counts = batch.label_counts()
    empty = keep & (counts == 0)
    stats.no_labels += int(empty.sum())
    keep &= ~empty
    if keep.all():
        return batch, counts
    kept_at = np.flatnonzero(keep)
    return batch.take(kept_at), counts[kept_at]


def _check_bad(stats: Stats, spec: JobSpec, uri: str, *, final: bool) -> None:
    """Fail once skipped records exceed dataset.max_bad_fraction (at once when it is 0)."""
    limit = spec.dataset.max_bad_fraction
    if not stats.skipped or (not final and limit > 0):
        return
    if final and stats.records and stats.skipped / stats.records <= limit:
        return
    seen = f"{stats.skipped} of {stats.records}" if final else f"{stats.skipped} of the first {stats.records}"
    raise BadInputError(
        f"dataset {uri}: {seen} records are unusable (dataset.max_bad_fraction is {limit}); first: "
        + "; ".join(stats.bad)
    )


def _progress(total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit=" records", desc="dataprep", file=sys.stderr, disable=not sys.stderr.isatty())


def _existing(storage: Storage, data_uri: str, fp: str, *, overwrite: bool) -> dict[str, Any] | None:
    """The committed manifest when it has our fingerprint; clears `data/` when it will be rewritten."""
    marker = manifest_uri(data_uri)
    manifest = storage.read_marker(marker)
    if manifest is not None and not overwrite:
        if manifest.get("fingerprint") == fp:
            return manifest
        raise OutputExistsError(
            f"{data_uri} already holds data prepared from other inputs (fingerprint "
            f"{str(manifest.get('fingerprint'))[:12]}, now {fp[:12]}); rerun with --overwrite to replace it "
            "or change the job name"
        )
    # No manifest: leftovers of an interrupted run were never committed; with --overwrite, the old data goes
    # (manifest first, so no reader ever sees a manifest naming deleted shards).
    if manifest is not None:
        storage.delete_prefix(marker)
    storage.delete_prefix(data_uri)
    return None


def _manifest_fields(spec: JobSpec, *, stats: Stats, entries: dict[str, Any], fingerprint: str,
                     dataset: DatasetFile | HubDataset, model: ModelSource, info: TokenizerInfo,
                     seconds: float) -> dict[str, Any]:
    """Everything the manifest says besides its file list: counts, token statistics, inputs."""
    d = spec.dataset
    rows = sum(e["rows"] for e in entries.values())
    tokens = sum(stats.split_tokens.values())
    manifest_stats = {
        "records": stats.records,
        "examples": stats.examples,
        "tokens": tokens,
        "label_tokens": stats.label_tokens,
        "rows": rows,
        "packing_efficiency": round(tokens / (rows * d.seq_len), 6) if rows else 0.0,
        "truncated": stats.truncated,
        "dropped": stats.dropped + stats.no_labels,
        "dropped_overlong": stats.dropped,
        "dropped_no_labels": stats.no_labels,
        "skipped": stats.skipped,
        "skipped_first": stats.bad,
        "example_tokens": stats.length_summary(),
        "seconds": round(seconds, 3),
    }
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": d.seq_len,
        "fingerprint": fingerprint,
        "dataset": (dataset.as_manifest(d.format) if isinstance(dataset, HubDataset)
                    else {"uri": d.uri, "sha256": dataset.sha256, "bytes": dataset.size, "format": d.format}),
        # An hf:// model's commit and mirror: the trainer finds the model here, in storage.
        "model": model.record,
        "template": d.template,
        "packing": d.packing,
        "train_on_inputs": d.train_on_inputs,
        "seed": spec.training.seed,
        "splits": entries,
        "stats": manifest_stats,
        "tokenizer": info.as_manifest(),
    }


def run_dataprep(
    spec: JobSpec, *, overwrite: bool = False, shard_rows: int | None = None, workers: int | None = None
) -> DataprepResult:
    """Prepare `<run>/data/` for `spec`, or reuse it when its fingerprint matches.

    `workers`: tokenizer processes (default: one per core but one, at least one, for datasets over
    8 MiB; 0: tokenize in this process); `shard_rows`: rows per shard (default: 64 MiB of rows).
    Workers are spawned processes: a script that calls this with workers must guard its entry point
    (`if __name__ == "__main__":`), as for any multiprocessing code.
    """
    started = time.perf_counter()
    d = spec.dataset
    storage = storage_for(spec, spec.run_uri)
    data_uri = spec.layout.data
    with tempfile.TemporaryDirectory(prefix="pipelora-dataprep-") as scratch:
        dataset = _open_dataset(spec, Path(scratch))  # before the model: a wrong dataset fails before a download
        model = model_source(spec, scratch=Path(scratch))
        tok_dir = fetch_tokenizer_files(storage_for(spec, model.uri), model.uri, dest=Path(scratch) / "tok")
        tokenizer = load_tokenizer(tok_dir)
        info = tokenizer_info(tokenizer, tok_dir)
        dataset_id = dataset.identity if isinstance(dataset, HubDataset) else dataset.sha256
        fp = fingerprint(spec, dataset_id=dataset_id, tokenizer_digest=info.digest, model_sha=model.sha)
        found = _existing(storage, data_uri, fp, overwrite=overwrite)
        if found is not None:
            rows = found["splits"]["train"]["rows"]
            return DataprepResult(
                found, True,
                f"dataprep: {data_uri} is already prepared from these inputs (fingerprint {fp[:12]}, {rows} train rows); "
                "nothing to do (--overwrite redoes it)",
            )
        if workers is None:  # one core stays with this process, which reads, packs and writes
            workers = max(1, (os.cpu_count() or 1) - 1) if dataset.size >= AUTO_WORKERS_BYTES else 0
        encoder = Encoder(tokenizer, template=d.template, train_on_inputs=d.train_on_inputs, workers=workers)
        per_shard = shard_rows or rows_per_shard(d.seq_len)
        writers = {s: ShardWriter(storage, data_uri, s, seq_len=d.seq_len, rows_per_shard=per_shard) for s in SPLITS}
        packers = {s: _SplitPacker(writers[s], spec=spec, pad_id=info.pad_id, split_index=i) for i, s in enumerate(SPLITS)}
        stats = Stats(seq_len=d.seq_len)
        try:
            try:
                _stream(dataset, encoder, packers, spec=spec, stats=stats)
            finally:
                encoder.close()
            for packer in packers.values():
                packer.flush()
            objects, entries = [], {}
            for split, writer in writers.items():
                infos, entry = writer.close()
                objects.extend(infos)
                entries[split] = {**entry, "examples": stats.split_examples[split], "tokens": stats.split_tokens[split]}
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
    extra = _manifest_fields(spec, stats=stats, entries=entries, fingerprint=fp, dataset=dataset, model=model,
                             info=info, seconds=time.perf_counter() - started)
    manifest = storage.commit(spec.layout.manifest, objects, extra)
    return DataprepResult(manifest, False, summary_line(manifest))


def _open_dataset(spec: JobSpec, scratch: Path) -> DatasetFile | HubDataset:
    """An hf:// dataset pinned to a commit (streamed later), or the dataset file (fetched from S3 if need be)."""
    uri = spec.dataset.uri
    if is_hub_uri(uri):
        return open_hub_dataset(uri, scratch=scratch)
    return fetch_dataset(storage_for(spec, uri), uri, scratch=scratch)


def _stream(dataset: DatasetFile | HubDataset, encoder: Encoder, packers: dict[str, _SplitPacker], *, spec: JobSpec, stats: Stats) -> None:
    """Read and validate window k+1 while the workers encode window k; results are used in order."""
    d = spec.dataset
    bar = _progress(None if isinstance(dataset, HubDataset) else count_records(dataset))
    parse = alpaca_example if d.format == "alpaca" else chat_example
    in_flight: deque[tuple[int, list[RawRecord], PendingWindow]] = deque()
    state = {"kept": 0, "index": 0}
    try:
        records = read_hub_records(dataset) if isinstance(dataset, HubDataset) else read_records(dataset)
        for window in _windows(records, READ_WINDOW):
            examples: list[Example] = []
            sources: list[RawRecord] = []
            for record in window:
                if record.error is not None:
                    stats.note_bad(record.where, record.error)
                    continue
                try:
                    examples.append(parse(record.value))
                    sources.append(record)
                except RecordError as exc:
                    stats.note_bad(record.where, str(exc))
            stats.records += len(window)
            _check_bad(stats, spec, d.uri, final=False)
            if examples:
                in_flight.append((len(window), sources, encoder.submit(examples)))
            else:
                bar.update(len(window))
            while len(in_flight) > IN_FLIGHT:
                _use_window(*in_flight.popleft(), packers=packers, spec=spec, stats=stats, state=state, bar=bar)
        while in_flight:
            _use_window(*in_flight.popleft(), packers=packers, spec=spec, stats=stats, state=state, bar=bar)
    finally:
        bar.close()
    _check_bad(stats, spec, d.uri, final=True)
    if stats.records == 0:
        raise DataprepError(f"dataset {d.uri} is empty: it holds no records")
    if state["kept"] == 0:
        raise DataprepError(
            f"dataset {d.uri} has no usable example ({stats.records} records, {stats.skipped} skipped, "
            f"{stats.dropped} dropped as longer than dataset.seq_len {d.seq_len}, {stats.no_labels} with nothing to learn)"
        )


def _use_window(size: int, sources: list[RawRecord], pending: PendingWindow, *, packers: dict[str, _SplitPacker],
                spec: JobSpec, stats: Stats, state: dict[str, int], bar: Any) -> None:
    """An encoded window: count, fit to seq_len, split train/eval (by example), hand to the packers."""
    d = spec.dataset
    encoded = pending.result()
    for position, error in encoded.errors:
        stats.note_bad(sources[position].where, str(error))
    stats.examples += len(encoded.batch)
    kept, label_counts = _fit(encoded.batch, seq_len=d.seq_len, overlong=d.overlong, stats=stats)
    _check_bad(stats, spec, d.uri, final=False)
    before = state["kept"]
    n_eval = eval_target(before + len(kept), d.eval_fraction) - eval_target(before, d.eval_fraction)
    state["kept"] = before + len(kept)
    rng = np.random.default_rng([spec.training.seed, 7, state["index"]])
    state["index"] += 1
    is_eval = np.zeros(len(kept), dtype=bool)
    is_eval[rng.choice(len(kept), size=min(n_eval, len(kept)), replace=False)] = True
    stats.note_lengths(kept.lengths)
    stats.label_tokens += int(label_counts.sum())
    for split, chosen in (("train", ~is_eval), ("eval", is_eval)):
        chosen_at = np.flatnonzero(chosen)
        # a view keeps the window's arrays alive: copy out small selections (the eval share)
        part = kept.select(chosen_at) if 2 * len(chosen_at) >= len(kept) else kept.take(chosen_at)
        stats.split_examples[split] += len(part)
        stats.split_tokens[split] += int(part.lengths.sum())
        packers[split].add(part)
    bar.update(size)
