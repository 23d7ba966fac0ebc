"""Shards: fixed-length rows of int32 `input_ids`, `labels`, `position_ids` in safetensors files.

The writer uploads each shard as soon as it is full, so a large dataset never sits whole in
memory or on local disk. The reader memory-maps shards (read only the rows asked for), checks
each shard's sha256 against the manifest on first use, and pulls s3:// shards through a local
cache keyed by that sha256, so every rank of every run reads verified bytes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipelora.dataprep.errors import ShardsError
from pipelora.layout import MANIFEST_NAME, shard_name
from pipelora.rows import ROW_DTYPE, ROW_FIELDS
from pipelora.safetensors_header import NUMPY_DTYPES, SafetensorsHeaderError, read_file_header
from pipelora.storage import (
    ObjectInfo,
    Storage,
    StorageError,
    check_against_marker,
    is_s3,
    join_uri,
    local_path,
    open_storage,
    sha256_file,
)

SHARD_BYTES = 64 * 1024 * 1024  # bounded shards: uploaded as they complete, cached one by one


def rows_per_shard(seq_len: int, *, shard_bytes: int = SHARD_BYTES) -> int:
    return max(1, shard_bytes // (len(ROW_FIELDS) * np.dtype(ROW_DTYPE).itemsize * seq_len))


def manifest_uri(data_uri: str) -> str:
    """The manifest of a run's `data/` folder (its name is the layout's)."""
    return join_uri(data_uri, MANIFEST_NAME)


# -- writing ------------------------------------------------------------------------------------


class ShardWriter:
    """Collects rows of one split, writes a shard whenever `rows_per_shard` are buffered.

    Uploads run on one background thread so tokenization continues while a shard travels.
    """

    def __init__(self, storage: Storage, data_uri: str, split: str, *, seq_len: int, rows_per_shard: int) -> None:
        self.storage = storage
        self.data_uri = data_uri
        self.split = split
        self.seq_len = seq_len
        self.rows_per_shard = rows_per_shard
        self._shard: dict[str, np.ndarray] | None = None  # one shard's rows, filled in place and reused
        self._filled = 0
        self._pending: list[tuple[str, int, Future[ObjectInfo]]] = []
        # One upload at a time while tokenization goes on; at most two shards are held in memory.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"upload-{split}")
        self.rows = 0

    def add(self, rows: dict[str, np.ndarray]) -> None:
        count = len(rows["input_ids"])
        for name in ROW_FIELDS:
            if rows[name].shape != (count, self.seq_len):
                raise ValueError(f"{name} has shape {rows[name].shape}, expected ({count}, {self.seq_len})")

        def copy(out: dict[str, np.ndarray], lo: int, hi: int) -> None:
            for name in ROW_FIELDS:
                out[name][:] = rows[name][lo:hi]

        self.fill(count, copy)

    def fill(self, count: int, write: Callable[[dict[str, np.ndarray], int, int], None]) -> None:
        """Append `count` rows that `write(out, lo, hi)` puts into `out` (rows lo..hi, in the shard buffer)."""
        done = 0
        while done < count:
            if self._shard is None:
                self._shard = {name: np.empty((self.rows_per_shard, self.seq_len), ROW_DTYPE) for name in ROW_FIELDS}
            n = min(count - done, self.rows_per_shard - self._filled)
            write({name: self._shard[name][self._filled : self._filled + n] for name in ROW_FIELDS}, done, done + n)
            self._filled += n
            done += n
            if self._filled == self.rows_per_shard:
                self._flush()

    def _flush(self) -> None:
        """Serialize the filled rows (a copy), so the buffer is free again for the next shard's rows."""
        from safetensors.numpy import save

        assert self._shard is not None
        count = self._filled
        tensors = {name: self._shard[name][:count] for name in ROW_FIELDS}  # leading rows: contiguous views
        name = shard_name(self.split, len(self._pending))
        # one metadata key: safetensors writes its metadata map in hash order, and shards must be byte-stable
        data = save(tensors, metadata={"split": self.split})
        self._filled = 0
        uri = join_uri(self.data_uri, name)
        if self._pending:
            self._pending[-1][2].result()  # back-pressure (and upload errors surface here, early)
        self._pending.append((name, count, self._pool.submit(self.storage.write_bytes, uri, data)))
        self.rows += count

    def close(self) -> tuple[list[ObjectInfo], dict[str, Any]]:
        """Write what is buffered, wait for every upload; returns objects and the split's manifest entry."""
        try:
            if self._filled:
                self._flush()
            infos = [future.result() for _, _, future in self._pending]
        finally:
            self._pool.shutdown(wait=True)
        entry = {
            "rows": self.rows,
            "shards": [name for name, _, _ in self._pending],
            "shard_rows": [count for _, count, _ in self._pending],
        }
        return infos, entry

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# -- reading ------------------------------------------------------------------------------------

def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file: only the rows asked for are ever read."""
    out: dict[str, np.ndarray] = {}
    for name, entry in read_file_header(str(path)).items():
        if entry.dtype not in NUMPY_DTYPES:
            raise SafetensorsHeaderError(f"{path} holds {name} as {entry.dtype}, which shards never use")
        dtype = np.dtype(NUMPY_DTYPES[entry.dtype])
        if entry.end == entry.start:
            out[name] = np.zeros(entry.shape, dtype=dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=entry.start, shape=entry.shape)
    return out


class _ShardStore:
    """The shards of one split: located, fetched, verified and mapped once, shared by all views."""

    def __init__(self, storage: Storage, data_uri: str, manifest: dict[str, Any], split: str, cache_dir: Path | None):
        self.storage = storage
        self.data_uri = data_uri
        self.manifest = manifest
        self.seq_len = int(manifest["seq_len"])
        self.cache_dir = cache_dir
        self._maps: dict[int, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()
        entry = manifest["splits"][split]
        self.names: list[str] = list(entry["shards"])
        counts = entry.get("shard_rows")
        if counts is None:  # a manifest without per-shard counts: read them from the files
            counts = [len(self._mapped(i)["input_ids"]) for i in range(len(self.names))]
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _local_file(self, name: str, sha: str | None) -> Path:
        uri = join_uri(self.data_uri, name)
        if not is_s3(uri):
            return local_path(uri)
        cache = self.cache_dir or Path(os.environ.get("PIPELORA_CACHE", Path(tempfile.gettempdir()) / "pipelora-cache"))
        cache.mkdir(parents=True, exist_ok=True)
        # content-addressed: two runs with the same shard bytes share one cached copy
        target = cache / ((sha or hashlib.sha256(uri.encode()).hexdigest()) + Path(name).suffix)
        if not target.exists():
            partial = cache / f".{target.name}.{os.getpid()}.{threading.get_ident()}"
            self.storage.download_file(uri, partial)
            os.replace(partial, target)
        return target

    def _mapped(self, index: int) -> dict[str, np.ndarray]:
        with self._lock:
            if index in self._maps:
                return self._maps[index]
            name = self.names[index]
            uri = join_uri(self.data_uri, name)
            meta = self.manifest.get("files", {}).get(name)
            if meta is None:
                raise ShardsError(
                    f"{manifest_uri(self.data_uri)} lists shard {name} but records no size or sha256 for it; "
                    "run dataprep again with --overwrite"
                )
            try:
                path = self._local_file(name, meta.get("sha256"))
            except StorageError as exc:
                raise ShardsError(f"cannot fetch shard {name} of {self.data_uri}: {exc}") from None
            if not path.is_file():
                raise ShardsError(f"shard {uri} is missing; run dataprep again with --overwrite")
            try:  # the local copy is hashed here; the comparison is the one every marker reader uses
                check_against_marker(uri, size=path.stat().st_size, sha256=sha256_file(path), meta=meta,
                                     marker_uri=manifest_uri(self.data_uri))
            except StorageError as exc:
                if is_s3(self.data_uri):
                    path.unlink(missing_ok=True)  # a bad cached copy is fetched again next time
                raise ShardsError(f"shard {exc} or truncated: run dataprep again with --overwrite") from None
            try:
                tensors = map_safetensors(path)
            except SafetensorsHeaderError as exc:
                raise ShardsError(f"shard {uri} is unreadable ({exc}); run dataprep again with --overwrite") from None
            missing = [f for f in ROW_FIELDS if f not in tensors]
            if missing:
                raise ShardsError(f"shard {name} of {self.data_uri} lacks tensors {missing}")
            self._maps[index] = tensors
            return tensors

    def row(self, index: int) -> dict[str, np.ndarray]:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        tensors = self._mapped(shard)
        local = index - int(self.offsets[shard])
        return {name: np.array(tensors[name][local], dtype=ROW_DTYPE) for name in ROW_FIELDS}


class ShardDataset:
    """Random access to the rows of one split; `partition` and `shuffled` return cheap views."""

    def __init__(self, store: _ShardStore, indices: np.ndarray | None = None) -> None:
        self._store = store
        self._indices = indices

    @property
    def manifest(self) -> dict[str, Any]:
        return self._store.manifest

    @property
    def seq_len(self) -> int:
        return self._store.seq_len

    def __len__(self) -> int:
        return len(self._store) if self._indices is None else len(self._indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i = i % n
        return self._store.row(i if self._indices is None else int(self._indices[i]))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    def _base_indices(self) -> np.ndarray:
        return np.arange(len(self._store), dtype=np.int64) if self._indices is None else self._indices

    def partition(self, rank: int, world: int) -> ShardDataset:
        """Rank `rank` of `world` gets a disjoint, equally long slice (floor(len/world) rows)."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        per_rank = len(self) // world
        return ShardDataset(self._store, self._base_indices()[rank * per_rank : (rank + 1) * per_rank])

    def shuffled(self, seed: int, epoch: int = 0) -> ShardDataset:
        """The same rows in an order fixed by (seed, epoch), identical on every rank."""
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(self))
        return ShardDataset(self._store, self._base_indices()[order])


def read_manifest(data_uri: str, *, endpoint_url: str | None = None) -> dict[str, Any] | None:
    storage = open_storage(data_uri, endpoint_url=endpoint_url)
    return storage.read_marker(manifest_uri(data_uri))


def open_shards(
    data_uri: str,
    *,
    split: str = "train",
    endpoint_url: str | None = None,
    cache_dir: str | Path | None = None,
) -> ShardDataset:
    """Open the prepared rows of `split` under a run's `data/` folder (local or s3://)."""
    storage = open_storage(data_uri, endpoint_url=endpoint_url)
    try:
        manifest = storage.read_marker(manifest_uri(data_uri))
    except StorageError as exc:
        raise ShardsError(f"cannot read the data manifest of {data_uri}: {exc}") from None
    if manifest is None:
        raise ShardsError(
            f"no data manifest at {manifest_uri(data_uri)}: run dataprep first "
            "(pipelora-k8s dataprep --config job.yaml)"
        )
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ShardsError(f"the data at {data_uri} has no '{split}' split (it has: {', '.join(splits) or 'none'})")
    store = _ShardStore(storage, data_uri, manifest, split, Path(cache_dir) if cache_dir else None)
    return ShardDataset(store)
