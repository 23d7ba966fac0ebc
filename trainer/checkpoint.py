"""Checkpoints in object storage: every rank uploads its part, rank 0 commits, nothing else counts.

A checkpoint folder (`RunLayout.checkpoint(step)`) holds `stage-SS-lora.safetensors` (the stage's
LoRA weights under PEFT names) and `stage-SS-optim.pt` (optimizer + scheduler) from each stage's
first data-parallel replica, `rank-RRRRR-rng.pt` from every rank, and the commit marker
(`RunLayout.checkpoint_marker(step)`), written last by rank 0: sizes and sha256 of all of them
plus `CheckpointMeta` (step, topology, data position, loss histories). A folder without its
marker is an interrupted save: it is never read and never pruned.

This module owns the marker's schema and the rule for which checkpoints a run may resume from.
"""

from __future__ import annotations

import copy
import io
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipelora.layout import RunLayout, parse_step_dir
from pipelora.storage import ObjectInfo, Storage, join_uri
from pipelora.trainer.errors import TrainerError

# A (step, loss) history, as the progress file and the marker both keep it.
History = list[list[float]]
_REQUIRED = ("step", "stages", "data_parallel", "bounds")


@dataclass(frozen=True)
class CheckpointMeta:
    """What the commit marker records besides its files: enough to check that a run may resume
    from the checkpoint and to continue it exactly (data position, loss histories)."""

    step: int
    stages: int
    data_parallel: int
    bounds: tuple[int, ...]  # the pipeline cut: stage s owned items [bounds[s], bounds[s+1])
    consumed_micro_batches: int = 0
    epoch: int = 0
    row_in_epoch: int = 0
    losses: History = field(default_factory=list)
    eval_losses: History = field(default_factory=list)
    saved_at: float = 0.0

    def to_marker(self) -> dict[str, Any]:
        """The marker's fields (`Storage.commit` adds `files`)."""
        return {
            "step": self.step, "stages": self.stages, "data_parallel": self.data_parallel,
            "bounds": list(self.bounds), "consumed_micro_batches": self.consumed_micro_batches,
            "epoch": self.epoch, "row_in_epoch": self.row_in_epoch, "losses": self.losses,
            "eval_losses": self.eval_losses, "saved_at": self.saved_at,
        }

    @classmethod
    def from_marker(cls, marker: dict[str, Any], *, where: str) -> CheckpointMeta:
        """The meta of a marker read from `where`; a marker of another schema is one clear error."""
        missing = [key for key in _REQUIRED if key not in marker]
        if missing:
            raise TrainerError(
                f"the marker of checkpoint {where} has no {', '.join(missing)}; it was not written by this trainer: "
                "use a new run name"
            )
        try:
            return cls(
                step=int(marker["step"]), stages=int(marker["stages"]), data_parallel=int(marker["data_parallel"]),
                bounds=tuple(int(b) for b in marker["bounds"]),
                consumed_micro_batches=int(marker.get("consumed_micro_batches", 0)),
                epoch=int(marker.get("epoch", 0)), row_in_epoch=int(marker.get("row_in_epoch", 0)),
                losses=[list(x) for x in marker.get("losses", [])],
                eval_losses=[list(x) for x in marker.get("eval_losses", [])],
                saved_at=float(marker.get("saved_at", 0.0)),
            )
        except (TypeError, ValueError):
            raise TrainerError(
                f"the marker of checkpoint {where} has malformed fields; it was not written by this trainer: "
                "use a new run name"
            ) from None

    def check_compatible(self, *, stages: int, data_parallel: int, bounds: tuple[int, ...], where: str) -> None:
        """Refuse a checkpoint cut differently from this run: its per-stage files would not fit."""
        have = (self.stages, self.data_parallel, list(self.bounds))
        want = (stages, data_parallel, list(bounds))
        if have != want:
            raise TrainerError(
                f"checkpoint {where} was written with {have[0]} stages x {have[1]} data-parallel (items {have[2]}), "
                f"this run has {want[0]} x {want[1]} ({want[2]}); resume with the same parallel settings or use a "
                "new run name"
            )


def new_meta(*, step: int, stages: int, data_parallel: int, bounds: tuple[int, ...], data_position: dict[str, int],
             losses: History, eval_losses: History) -> CheckpointMeta:
    """The meta of a checkpoint saved now; `data_position` is the data stream's `state()`."""
    return CheckpointMeta(step=step, stages=stages, data_parallel=data_parallel, bounds=tuple(bounds),
                          consumed_micro_batches=data_position.get("consumed_micro_batches", 0),
                          epoch=data_position.get("epoch", 0), row_in_epoch=data_position.get("row_in_epoch", 0),
                          losses=losses, eval_losses=eval_losses, saved_at=time.time())


def committed_steps(storage: Storage, layout: RunLayout) -> list[int]:
    """Steps with a commit marker, oldest first."""
    steps = []
    for name in storage.list_dirs(layout.checkpoints):
        step = parse_step_dir(name)
        if step is not None and storage.exists(layout.checkpoint_marker(step)):
            steps.append(step)
    return sorted(steps)


def lora_name(stage: int) -> str:
    return f"stage-{stage:02d}-lora.safetensors"


def optim_name(stage: int) -> str:
    return f"stage-{stage:02d}-optim.pt"


def rng_name(rank: int) -> str:
    return f"rank-{rank:05d}-rng.pt"


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def host_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to host memory and every container rebuilt: nothing in the copy
    is shared with the live state, which the next optimizer step updates in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [host_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass(frozen=True)
class StageSnapshot:
    """One rank's part of a checkpoint, copied to host memory at the step boundary.

    Taking it costs a memory copy; turning it into file bytes (`files`) and uploading them can then
    happen on another thread while training goes on, and still save exactly this step's state.
    """

    stage: int
    rank: int
    rng: dict[str, Any]
    lora: dict[str, torch.Tensor] | None = None  # only from the stage's first data-parallel replica
    optim: dict[str, Any] | None = None  # {"optimizer": ..., "scheduler": ...}, idem

    def files(self) -> dict[str, bytes]:
        """The bytes this rank contributes to a checkpoint, by file name."""
        files = {rng_name(self.rank): torch_bytes(self.rng)}
        if self.lora is not None:
            files[lora_name(self.stage)] = save_safetensors({k: v.contiguous() for k, v in self.lora.items()})
        if self.optim is not None:
            files[optim_name(self.stage)] = torch_bytes(self.optim)
        return files


def snapshot(*, stage: int, rank: int, write_stage: bool, lora: dict[str, torch.Tensor],
             optimizer: torch.optim.Optimizer, scheduler: Any) -> StageSnapshot:
    """This rank's state now, in host memory (see StageSnapshot)."""
    if not write_stage:
        return StageSnapshot(stage, rank, host_copy(rng_state()))
    return StageSnapshot(stage, rank, host_copy(rng_state()), lora=host_copy(dict(lora)),
                         optim=host_copy({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}))


def upload(storage: Storage, layout: RunLayout, step: int, files: dict[str, bytes]) -> list[ObjectInfo]:
    folder = layout.checkpoint(step)
    return [storage.write_bytes(join_uri(folder, name), data) for name, data in files.items()]


def commit(storage: Storage, layout: RunLayout, objects: list[ObjectInfo], meta: CheckpointMeta) -> None:
    """Make a checkpoint visible: its marker names every rank's objects, written after all of them."""
    storage.commit(layout.checkpoint_marker(meta.step), objects, meta.to_marker())


def prune(storage: Storage, layout: RunLayout, *, keep: int) -> list[int]:
    """Delete the oldest committed checkpoints beyond `keep`; the marker goes first."""
    steps = committed_steps(storage, layout)
    removed = steps[:-keep] if keep > 0 else []
    for step in removed:
        storage.delete_prefix(layout.checkpoint_marker(step))
        storage.delete_prefix(layout.checkpoint(step))
    return removed


class CommittedCheckpoint:
    """A committed checkpoint, read file by file, each file verified against the marker."""

    def __init__(self, storage: Storage, layout: RunLayout, step: int, marker: dict[str, Any]) -> None:
        self.storage: Storage = storage
        self.folder: str = layout.checkpoint(step)
        self.marker_uri: str = layout.checkpoint_marker(step)
        self.marker: dict[str, Any] = marker
        self.meta: CheckpointMeta = CheckpointMeta.from_marker(marker, where=self.folder)

    def _bytes(self, name: str) -> bytes:
        return self.storage.read_verified(self.marker_uri, self.marker, name)

    def lora(self, stage: int) -> dict[str, torch.Tensor]:
        return load_safetensors(self._bytes(lora_name(stage)))

    def optim(self, stage: int) -> dict[str, Any]:
        """The stage's optimizer and scheduler states."""
        return _load_torch(self._bytes(optim_name(stage)))

    def rng(self, rank: int) -> dict[str, Any]:
        return _load_torch(self._bytes(rng_name(rank)))


def _load_torch(data: bytes) -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code, even one somebody else wrote to the bucket.
    state: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True)
    return state


def open_committed(storage: Storage, layout: RunLayout, step: int) -> CommittedCheckpoint:
    marker = storage.read_marker(layout.checkpoint_marker(step))
    if marker is None:
        raise TrainerError(f"checkpoint {layout.checkpoint(step)} is not committed")
    return CommittedCheckpoint(storage, layout, step, marker)
