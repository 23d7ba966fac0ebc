"""`pipelora-k8s export`: a run's adapter, as PEFT files or merged into the base model's weights.

Servers that cannot apply adapters (or apply them slowly) want one ordinary Hugging Face folder:
base + `B @ A * alpha / r` in every adapted linear weight, in the base's dtype, sharded as the
base is, with its config and tokenizer. A 7B base is 14 GB, so the merge streams: each output
shard is written tensor by tensor from ranged reads of the base shard it mirrors (same header,
same byte offsets; only the adapted weights change), uploaded, deleted, and only then is the next
shard read. Memory stays near the largest tensor (below one shard); local disk holds one shard.

Whatever is exported is committed like every other artifact: a marker (`EXPORT_MARKER`) naming
every file with its size and sha256 is written last, so a folder without it is an interrupted
export, never a model. Without `--out`, exports go under `<run>/export/` (`EXPORT_DIR`):
`merged` or `merged-<step folder>` for merged models, the adapter folder's name (with the same
suffix for a checkpoint step) for adapters.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from pipelora.config import JobSpec
from pipelora.hub import base_model_name, model_storage_uri
from pipelora.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPORT_MARKER,
)
from pipelora.storage import ObjectInfo, Storage, StorageError, join_uri, relative_name, storage_for
from pipelora.trainer import checkpoint as ckpt
from pipelora.trainer.adapter import adapter_config, write_adapter
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.lora import PEFT_PREFIX, resolve_targets
from pipelora.trainer.weights import CONFIG, DTYPES, INDEX, SINGLE, CheckpointReader, read_model_config

# The export folder of a run, the merged model's folder in it, and the marker written last in an
# export. (Their home should be pipelora.layout, next to the other run paths and markers.)
COPY_CHUNK = 64 * 1024 * 1024  # unadapted tensors are copied in pieces of at most this
# Files of a model folder that are weights in other formats: never copied into a merged model.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_LORA_A = ".lora_A.weight"
_LORA_B = ".lora_B.weight"


@dataclass(frozen=True)
class Adapter:
    """A run's LoRA weights under PEFT names, the PEFT config that describes them, and where they
    came from (the final adapter, or a committed checkpoint step)."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    where: str
    step: int | None

    @property
    def scaling(self) -> float:
        r = int(self.config["r"])
        alpha = float(self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Base weight name (`model.layers.0.self_attn.q_proj.weight`) → (lora_A, lora_B)."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, a in self.tensors.items():
            if not name.endswith(_LORA_A):
                continue
            module = name[: -len(_LORA_A)]
            b = self.tensors.get(module + _LORA_B)
            if b is None or not module.startswith(PEFT_PREFIX):
                raise TrainerError(f"the adapter at {self.where} has {name} without its lora_B; it is not a PEFT "
                                   "LoRA adapter of this trainer")
            out[f"{module[len(PEFT_PREFIX):]}.weight"] = (a, b)
        return out


@dataclass
class Holdings:
    """What the exporter holds at once: tensors alive (counted until freed) and raw copy buffers.

    Every tensor the merge reads or makes is registered here; a finaliser takes it off when it is
    freed, so `peak_tensors` and `peak_bytes` say whether shards really went one at a time.
    """

    tensors: int = 0
    bytes: int = 0
    peak_tensors: int = 0
    peak_bytes: int = 0

    def _add(self, count: int, nbytes: int) -> None:
        self.tensors += count
        self.bytes += nbytes
        self.peak_tensors = max(self.peak_tensors, self.tensors)
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        self._add(1, nbytes)
        weakref.finalize(t, self._add, -1, -nbytes)
        return t

    @contextlib.contextmanager
    def buffer(self, nbytes: int) -> Iterator[None]:
        self._add(0, nbytes)
        try:
            yield
        finally:
            self._add(0, -nbytes)


@dataclass(frozen=True)
class ExportResult:
    out: str
    marker: str
    files: list[str]  # names in the output folder, the marker aside
    merged_tensors: int = 0
    shards: int = 0


# -- sources -----------------------------------------------------------------------------------------
def load_adapter(spec: JobSpec, storage: Storage, *, step: int | None) -> Adapter:
    """The final adapter (`step` None) or the LoRA weights of committed checkpoint `step`."""
    layout = spec.layout
    if step is None:
        if not storage.exists(layout.adapter_complete):
            steps = ckpt.committed_steps(storage, layout)
            hint = (f"pass --step with a committed checkpoint step ({', '.join(map(str, steps))})" if steps
                    else "train the run first")
            raise TrainerError(f"no final adapter at {layout.adapter}: the run has not finished; {hint}")
        tensors = load_safetensors(storage.read_bytes(layout.adapter_weights))
        config = storage.read_json(layout.adapter_config)
        return Adapter(tensors, config, layout.adapter, None)
    steps = ckpt.committed_steps(storage, layout)
    if step not in steps:
        have = f"committed steps: {', '.join(map(str, steps))}" if steps else "the run has no committed checkpoint"
        raise TrainerError(f"no committed checkpoint at step {step} in {layout.checkpoints} ({have}); pass one of them "
                           "to --step")
    found = ckpt.open_committed(storage, layout, step)
    tensors = {}
    for stage in range(found.meta.stages):
        tensors.update(found.lora(stage))
    lora = spec.lora
    ranks = {int(t.shape[0]) for n, t in tensors.items() if n.endswith(_LORA_A)}
    if ranks != {lora.r}:
        raise TrainerError(f"checkpoint {found.folder} holds LoRA of rank {sorted(ranks)} but lora.r is {lora.r}; "
                           "export with the spec the run was trained with")
    config = adapter_config(base_model=base_model_name(spec.model.uri), r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                            targets=resolve_targets(lora.target_modules))
    return Adapter(tensors, config, found.folder, step)


def default_out(spec: JobSpec, *, merge: bool, step: int | None) -> str:
    """`<run>/export/merged` or `<run>/export/<adapter folder>`, the step folder's name appended for a step."""
    return spec.layout.export(merge=merge, step=step)


def _prepare_out(storage: Storage, out: str, *, overwrite: bool, ours: bool) -> None:
    """Make `out` empty: a committed export is replaced only with `overwrite` (its marker goes
    first, so it is never half-replaced yet marked whole); leftovers of an interrupted export in
    the run's own export folder are cleared; anything else there needs `overwrite`."""
    marker = join_uri(out, EXPORT_MARKER)
    committed = storage.exists(marker)
    present = storage.list(out)
    if committed and not overwrite:
        raise TrainerError(f"{out} already holds a committed export; pass --overwrite to replace it or choose "
                           "another --out")
    if present and not (overwrite or ours):
        raise TrainerError(f"{out} is not empty; pass --overwrite to replace what it holds or choose another --out")
    if committed:
        storage.delete_prefix(marker)
    if present:
        storage.delete_prefix(out)


def _commit(storage: Storage, out: str, objects: list[ObjectInfo], extra: dict[str, Any]) -> ExportResult:
    marker = join_uri(out, EXPORT_MARKER)
    storage.commit(marker, objects, {**extra, "exported_at": time.time()})
    names = [relative_name(out, o.uri) for o in objects]
    return ExportResult(out, marker, names, int(extra.get("merged_tensors", 0)), int(extra.get("shards", 0)))


def _source(adapter: Adapter) -> dict[str, Any]:
    return {"lora_from": adapter.where, "step": adapter.step,
            "lora": {k: adapter.config.get(k) for k in ("r", "lora_alpha", "target_modules", "use_rslora")}}


# -- the adapter alone ---------------------------------------------------------------------------------
def export_adapter(spec: JobSpec, *, step: int | None = None, out: str | None = None,
                   overwrite: bool = False) -> ExportResult:
    """Copy the PEFT adapter of the run (final, or of checkpoint `step`) to `out`, committed."""
    adapter = load_adapter(spec, storage_for(spec), step=step)
    target = out or default_out(spec, merge=False, step=step)
    storage = storage_for(spec, target)
    _prepare_out(storage, target, overwrite=overwrite, ours=out is None)
    write_adapter(storage, target, tensors=adapter.tensors, config=adapter.config)
    objects = [storage.checksum(join_uri(target, name)) for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)]
    return _commit(storage, target, objects, {"kind": "peft", **_source(adapter)})


# -- merged ---------------------------------------------------------------------------------------------
def export_merged(spec: JobSpec, *, step: int | None = None, out: str | None = None, overwrite: bool = False,
                  holdings: Holdings | None = None) -> ExportResult:
    """Merge the run's adapter (final, or of checkpoint `step`) into the base model, into `out`."""
    adapter = load_adapter(spec, storage_for(spec), step=step)
    target = out or default_out(spec, merge=True, step=step)
    storage = storage_for(spec, target)
    _prepare_out(storage, target, overwrite=overwrite, ours=out is None)
    model_uri = model_storage_uri(spec)  # an hf:// model is read from its committed mirror
    return merge_into(storage_for(spec, model_uri), model_uri, adapter, storage, target, holdings=holdings)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return t.contiguous().view(torch.uint8).numpy().data


def _merged(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, holdings: Holdings) -> torch.Tensor:
    """`W + B @ A * scaling`, summed in fp32 and rounded once to the base's dtype."""
    delta = holdings.tensor((b.float() @ a.float()).mul_(scaling))
    return holdings.tensor((base.float() + delta).to(base.dtype))


def merge_into(model_storage: Storage, model_uri: str, adapter: Adapter, storage: Storage, out: str, *,
               holdings: Holdings | None = None) -> ExportResult:
    """Write base + adapter to `out` (already empty) one shard at a time, then commit it.

    Every output shard mirrors one base shard byte for byte (its header, the offsets, every
    unadapted tensor) except the adapted weights, so shapes and dtypes are the base's by
    construction; the index names every shard.
    """
    holdings = holdings or Holdings()
    read_model_config(model_storage, model_uri)  # a supported family, with one clear error otherwise
    reader = CheckpointReader(model_storage, model_uri)
    deltas = adapter.deltas()
    for name, (a, b) in deltas.items():
        if not reader.has(name):
            raise TrainerError(f"the adapter at {adapter.where} adapts {name}, which the model at {model_uri} "
                               "does not have; export with the model the run was trained on")
        shape = reader.entry(name)[1].shape
        if tuple(shape) != (b.shape[0], a.shape[1]):
            raise TrainerError(f"the adapter at {adapter.where} has {name} as {b.shape[0]}x{a.shape[1]} but the model "
                               f"at {model_uri} has it as {'x'.join(map(str, shape))}; export with the model the run "
                               "was trained on")
    files = reader.files()
    objects: list[ObjectInfo] = []
    weight_map: dict[str, str] = {}
    total = 0
    merged = 0
    with tempfile.TemporaryDirectory(prefix="pipelora-export-") as tmp:
        for i, file in enumerate(files):
            name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            path = Path(tmp) / name
            entries = sorted(reader.header(file).values(), key=lambda e: e.start)
            merged += _write_shard(reader, file, entries, deltas, adapter.scaling, path, holdings)
            objects.append(storage.upload_file(path, join_uri(out, name)))
            path.unlink()
            weight_map.update({e.name: name for e in entries})
            total += sum(e.end - e.start for e in entries)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    objects.append(storage.write_bytes(join_uri(out, INDEX), json.dumps(index, indent=2).encode() + b"\n"))
    objects += _copy_model_files(model_storage, model_uri, storage, out)
    extra = {"kind": "merged", "base_model": model_uri, **_source(adapter), "merged_tensors": merged,
             "shards": len(files)}
    return _commit(storage, out, objects, extra)


def _write_shard(reader: CheckpointReader, file: str, entries: list[Any],
                 deltas: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float, path: Path,
                 holdings: Holdings) -> int:
    """One output shard at `path`: the base header verbatim, then each tensor in file order."""
    head = reader.read_range(file, 0, 8)
    data_start = 8 + int.from_bytes(head, "little")
    merged = 0
    with open(path, "wb") as fh:
        fh.write(reader.read_range(file, 0, data_start))
        pos = data_start
        for entry in entries:
            if entry.start > pos:  # bytes between tensors (none in files safetensors writes) stay as they are
                _copy_range(reader, file, pos, entry.start, fh, holdings)
            if entry.name in deltas:
                if entry.dtype not in DTYPES or not DTYPES[entry.dtype].is_floating_point:
                    raise TrainerError(f"tensor '{entry.name}' of {reader.model_uri} is {entry.dtype}, not a float "
                                       "weight; a quantised model cannot be merged")
                a, b = deltas[entry.name]
                base = holdings.tensor(reader.read([entry.name])[entry.name])
                out = _merged(base, a, b, scaling, holdings)
                del base
                fh.write(_tensor_bytes(out))
                del out
                merged += 1
            else:
                _copy_range(reader, file, entry.start, entry.end, fh, holdings)
            pos = entry.end
    if path.stat().st_size != pos:
        raise TrainerError(f"the merged copy of {file} came out {path.stat().st_size} bytes, not {pos}")
    return merged


def _copy_range(reader: CheckpointReader, file: str, start: int, end: int, fh: Any, holdings: Holdings) -> None:
    for lo in range(start, end, COPY_CHUNK):
        length = min(COPY_CHUNK, end - lo)
        with holdings.buffer(length):
            chunk = reader.read_range(file, lo, length)
            if len(chunk) != length:
                raise TrainerError(f"{join_uri(reader.model_uri, file)} is shorter than its header says; the model "
                                   "is truncated")
            fh.write(chunk)
            del chunk


def _copy_model_files(model_storage: Storage, model_uri: str, storage: Storage, out: str) -> list[ObjectInfo]:
    """config.json, the tokenizer and generation files: every top-level file that is not weights."""
    copied = []
    for obj in model_storage.list(model_uri):
        name = relative_name(model_uri, obj.uri)
        if ("/" in name or name.startswith(".") or name in (INDEX, SINGLE, EXPORT_MARKER)
                or name.endswith(".safetensors") or name.endswith(_OTHER_WEIGHTS)):
            continue
        try:
            copied.append(storage.write_bytes(join_uri(out, name), model_storage.read_bytes(obj.uri)))
        except StorageError as exc:
            raise TrainerError(f"cannot copy {name} of the model: {exc}") from None
    if not any(relative_name(out, o.uri) == CONFIG for o in copied):
        raise TrainerError(f"{model_uri} has no {CONFIG} to copy; point model.uri at a Hugging Face model folder")
    return copied


def describe(result: ExportResult) -> str:
    what = f"{result.shards} shards, {result.merged_tensors} weights merged" if result.shards else "the PEFT adapter"
    return f"exported {what} to {result.out} (committed: {result.marker})"
