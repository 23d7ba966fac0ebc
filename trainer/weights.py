"""Read only the tensors a stage needs from a Hugging Face safetensors checkpoint.

A safetensors file is an 8-byte header length, a JSON header of byte offsets, then raw data, so
a rank reads the headers (a few kB, parsed by `pipelora.safetensors_header`) and then ranged
reads of its own tensors: on S3 a stage of a 7B model fetches its share of the 14 GB, not all
of it. `bytes_read` counts what came over.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from pipelora.families import model_problems
from pipelora.safetensors_header import (
    ITEM_SIZES,
    NUMPY_DTYPES,
    SafetensorsHeaderError,
    TensorEntry,
    read_header,
)
from pipelora.storage import Storage, StorageError, join_uri
from pipelora.trainer import compat
from pipelora.trainer.errors import TrainerError

# The file names of a Hugging Face model folder (the layout `from_pretrained` reads).
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MERGE_GAP = 1 << 20  # neighbouring tensors closer than this are fetched in one request


def _torch_dtype(name: str) -> torch.dtype:
    # BF16 is the one safetensors dtype numpy lacks; every other follows from its numpy dtype.
    if name == "BF16":
        return torch.bfloat16
    return torch.from_numpy(np.empty(0, dtype=NUMPY_DTYPES[name])).dtype


# safetensors dtype name -> torch dtype, for every name the header module knows.
DTYPES: dict[str, torch.dtype] = {name: _torch_dtype(name) for name in ITEM_SIZES}


class CheckpointReader:
    """Tensor names → byte ranges across a checkpoint's files, read lazily through `Storage`."""

    def __init__(self, storage: Storage, model_uri: str) -> None:
        self.storage = storage
        self.model_uri = model_uri
        self.bytes_read = 0  # everything that came over: headers, tensors, gaps a merged read spans
        self.tensor_bytes = 0  # the bytes of the tensors asked for (what `plan` predicts per stage)
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
        try:
            entries = read_header(lambda start, length: self._read(uri, start, length), uri)
        except SafetensorsHeaderError as exc:
            raise TrainerError(str(exc)) from None
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

    def files(self) -> list[str]:
        """The checkpoint's safetensors files, in name order (one for an unsharded model)."""
        if self._weight_map is None:
            return [SINGLE]
        return sorted(set(self._weight_map.values()))

    def header(self, file: str) -> dict[str, TensorEntry]:
        """Every tensor of one file with its absolute byte range (read once, then cached)."""
        return self._header(file)

    def read_range(self, file: str, start: int, length: int) -> bytes:
        """Raw bytes of one file (headers included), counted in `bytes_read`."""
        return self._read(join_uri(self.model_uri, file), start, length)

    def file_of(self, name: str) -> str | None:
        if self._weight_map is None:
            return SINGLE if name in self._header(SINGLE) else None
        return self._weight_map.get(name)

    def has(self, name: str) -> bool:
        return self.file_of(name) is not None

    def entry(self, name: str) -> tuple[str, TensorEntry]:
        """(file, header entry) of a tensor."""
        file = self.file_of(name)
        if file is None or name not in self._header(file):
            raise TrainerError(f"tensor '{name}' is missing from the checkpoint in {self.model_uri}")
        return file, self._header(file)[name]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, fetched with as few ranged reads as their layout allows."""
        entries = sorted((self.entry(n) for n in names), key=lambda x: (x[0], x[1].start))
        out: dict[str, torch.Tensor] = {}
        group: list[TensorEntry] = []
        file = ""
        for item_file, item in entries:
            if group and (item_file != file or item.start - group[-1].end > MERGE_GAP):
                out.update(self._read_group(file, group))
                group = []
            file = item_file
            group.append(item)
        if group:
            out.update(self._read_group(file, group))
        return out

    def _read_group(self, file: str, group: list[TensorEntry]) -> dict[str, torch.Tensor]:
        first, last = group[0], group[-1]
        blob = bytearray(self._read(join_uri(self.model_uri, file), first.start, last.end - first.start))
        with self._lock:
            self.tensor_bytes += sum(e.end - e.start for e in group)
        out = {}
        for e in group:
            name = e.name
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

    uri = join_uri(model_uri, CONFIG)
    try:
        data = storage.read_json(uri)
    except StorageError as exc:
        raise TrainerError(
            f"cannot read the model config: {exc}; point model.uri at a Hugging Face model folder "
            "(create a test one with `pipelora-k8s init-model`)"
        ) from None
    if not isinstance(data, dict):
        raise TrainerError(f"{uri} is not a JSON object; point model.uri at a Hugging Face model folder")
    problems = model_problems(data, "all-linear", where=uri)
    if problems:
        raise TrainerError("; ".join(problems))
    kwargs = {k: v for k, v in data.items() if k != "model_type"}
    config = AutoConfig.for_model(data["model_type"], **kwargs)
    # sdpa takes the boolean block-diagonal masks built per layer; eager where attention logits are capped
    compat.set_attention_implementation(config, compat.attention_implementation(config))
    return config
