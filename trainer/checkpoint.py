"""Checkpoints in object storage: every rank uploads its part, rank 0 commits, nothing else counts.

Layout of `<run>/checkpoints/step-<NNNNNNNN>/`: `stage-SS-lora.safetensors` (the stage's LoRA
weights under PEFT names) and `stage-SS-optim.pt` (optimizer + scheduler) from each stage's
first data-parallel replica, `rank-RRRRR-rng.pt` from every rank, and `COMMITTED` (written last
by rank 0 with sizes and sha256 of all of them, plus the step, data position and histories).
A folder without `COMMITTED` is an interrupted save: it is never read and never pruned.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipelora.storage import ObjectInfo, Storage, join_uri
from pipelora.trainer.errors import TrainerError

MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(checkpoints_uri: str, step: int) -> str:
    return join_uri(checkpoints_uri, f"step-{step:08d}")


def committed_steps(storage: Storage, checkpoints_uri: str) -> list[int]:
    """Steps with a COMMITTED marker, oldest first."""
    steps = []
    for name in storage.list_dirs(checkpoints_uri):
        match = STEP_DIR.match(name)
        if match and storage.exists(join_uri(checkpoints_uri, name, MARKER)):
            steps.append(int(match.group(1)))
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


def stage_files(*, stage: int, rank: int, write_stage: bool, lora: dict[str, torch.Tensor],
                optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, bytes]:
    """The bytes this rank contributes to a checkpoint."""
    files = {rng_name(rank): torch_bytes(rng_state())}
    if write_stage:
        files[lora_name(stage)] = save_safetensors({k: v.detach().cpu().contiguous() for k, v in lora.items()})
        files[optim_name(stage)] = torch_bytes({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    return files


def upload(storage: Storage, folder: str, files: dict[str, bytes]) -> list[ObjectInfo]:
    return [storage.write_bytes(join_uri(folder, name), data) for name, data in files.items()]


def prune(storage: Storage, checkpoints_uri: str, *, keep: int) -> list[int]:
    """Delete the oldest committed checkpoints beyond `keep`; the marker goes first."""
    steps = committed_steps(storage, checkpoints_uri)
    removed = steps[:-keep] if keep > 0 else []
    for step in removed:
        folder = step_dir(checkpoints_uri, step)
        storage.delete_prefix(join_uri(folder, MARKER))
        storage.delete_prefix(folder)
    return removed


class CommittedCheckpoint:
    """A committed checkpoint, read file by file with each file's sha256 checked against the marker."""

    def __init__(self, storage: Storage, folder: str, marker: dict[str, Any]) -> None:
        self.storage, self.folder, self.marker = storage, folder, marker

    def _bytes(self, name: str) -> bytes:
        meta = self.marker.get("files", {}).get(name)
        if meta is None:
            raise TrainerError(f"checkpoint {self.folder} has no {name}; it was written by a different topology")
        data = self.storage.read_bytes(join_uri(self.folder, name))
        if meta.get("sha256") and hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise TrainerError(f"{join_uri(self.folder, name)} does not match its sha256 in {MARKER}; it was modified")
        return data

    def lora(self, stage: int) -> dict[str, torch.Tensor]:
        return load_safetensors(self._bytes(lora_name(stage)))

    def optim(self, stage: int) -> dict[str, Any]:
        return torch.load(io.BytesIO(self._bytes(optim_name(stage))), weights_only=True)

    def rng(self, rank: int) -> dict[str, Any]:
        return torch.load(io.BytesIO(self._bytes(rng_name(rank))), weights_only=True)


def open_committed(storage: Storage, checkpoints_uri: str, step: int) -> CommittedCheckpoint:
    folder = step_dir(checkpoints_uri, step)
    marker = storage.read_marker(join_uri(folder, MARKER))
    if marker is None:
        raise TrainerError(f"checkpoint {folder} is not committed")
    return CommittedCheckpoint(storage, folder, marker)
