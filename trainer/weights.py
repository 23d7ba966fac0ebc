"""Read only the tensors a stage needs from a Hugging Face safetensors checkpoint.

A safetensors file is an 8-byte header length, a JSON header of byte offsets, then raw data, so
a rank reads the headers (a few kB) and then ranged reads of its own tensors: on S3 a stage of a
7B model fetches its share of the 14 GB, not all of it. `bytes_read` counts what came over.
"""

from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass
from typing import Any

import torch

from pipelora.storage import Storage, StorageError, join_uri
from pipelora.trainer.errors import TrainerError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MERGE_GAP = 1 << 20  # neighbouring tensors closer than this are fetched in one request


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class CheckpointReader:
    """Tensor names → byte ranges across a checkpoint's files, read lazily through `Storage`."""

    def __init__(self, storage: Storage, model_uri: str) -> None:
        self.storage = storage
        self.model_uri = model_uri
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._weight_map = self._read_weight_map()
        self._headers: dict[str, dict[str, TensorEntry]] = {}

    def _read_weight_map(self) -> dict[str, str] | None:
        index_uri = join_uri(self.model_uri, INDEX)
        if self.storage.exists(index_uri):
            index = self.storage.read_json(index_uri)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise TrainerError(f"{index_uri} has no 'weight_map'; it is not a safetensors index")
            return weight_map
        if self.storage.exists(join_uri(self.model_uri, SINGLE)):
            return None
        raise TrainerError(
            f"no weights in {self.model_uri}: expected {SINGLE} or {INDEX} (safetensors); "
            "point model.uri at a Hugging Face model folder or create one with `pipelora-k8s init-model`"
        )

    def _header(self, file: str) -> dict[str, TensorEntry]:
        if file in self._headers:
            return self._headers[file]
        uri = join_uri(self.model_uri, file)
        head = self._read(uri, 0, 8)
        if len(head) < 8:
            raise TrainerError(f"{uri} is truncated or not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        try:
            header = json.loads(self._read(uri, 8, length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TrainerError(f"{uri} has a corrupt safetensors header") from None
        base = 8 + length
        entries = {
            name: TensorEntry(file, meta["dtype"], tuple(meta["shape"]), base + meta["data_offsets"][0],
                              base + meta["data_offsets"][1])
            for name, meta in header.items()
            if name != "__metadata__"
        }
        self._headers[file] = entries
        return entries

    def _read(self, uri: str, start: int, length: int) -> bytes:
        try:
            data = self.storage.read_range(uri, start, length)
        except StorageError as exc:
            raise TrainerError(f"cannot read model weights: {exc}") from None
        with self._lock:
            self.bytes_read += len(data)
        return data

    def file_of(self, name: str) -> str | None:
        if self._weight_map is None:
            return SINGLE if name in self._header(SINGLE) else None
        return self._weight_map.get(name)

    def has(self, name: str) -> bool:
        return self.file_of(name) is not None

    def entry(self, name: str) -> TensorEntry:
        file = self.file_of(name)
        if file is None or name not in self._header(file):
            raise TrainerError(f"tensor '{name}' is missing from the checkpoint in {self.model_uri}")
        return self._header(file)[name]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, fetched with as few ranged reads as their layout allows."""
        entries = sorted(((n, self.entry(n)) for n in names), key=lambda x: (x[1].file, x[1].start))
        out: dict[str, torch.Tensor] = {}
        group: list[tuple[str, TensorEntry]] = []
        for item in entries:
            if group and (item[1].file != group[-1][1].file or item[1].start - group[-1][1].end > MERGE_GAP):
                out.update(self._read_group(group))
                group = []
            group.append(item)
        if group:
            out.update(self._read_group(group))
        return out

    def _read_group(self, group: list[tuple[str, TensorEntry]]) -> dict[str, torch.Tensor]:
        first, last = group[0][1], group[-1][1]
        blob = bytearray(self._read(join_uri(self.model_uri, first.file), first.start, last.end - first.start))
        out = {}
        for name, e in group:
            if e.dtype not in DTYPES:
                raise TrainerError(f"tensor '{name}' has unsupported dtype {e.dtype}")
            if e.end - e.start == 0:
                out[name] = torch.empty(e.shape, dtype=DTYPES[e.dtype])
                continue
            view = memoryview(blob)[e.start - first.start : e.end - first.start]
            out[name] = torch.frombuffer(view, dtype=DTYPES[e.dtype]).reshape(e.shape)
        return out


def read_model_config(storage: Storage, model_uri: str) -> Any:
    """The transformers config of a model folder, with one clear error when it is missing."""
    from transformers import AutoConfig

    uri = join_uri(model_uri, "config.json")
    try:
        data = storage.read_json(uri)
    except StorageError as exc:
        raise TrainerError(
            f"cannot read the model config: {exc}; point model.uri at a Hugging Face model folder "
            "(create a test one with `pipelora-k8s init-model`)"
        ) from None
    model_type = data.get("model_type")
    if model_type not in ("mistral", "llama"):
        raise TrainerError(f"{uri} has model_type '{model_type}'; the trainer supports mistral and llama")
    kwargs = {k: v for k, v in data.items() if k != "model_type"}
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "sdpa"  # takes the boolean block-diagonal masks built per layer
    return config
