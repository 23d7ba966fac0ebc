"""What a running job tells people: one log line per step per stage, and `progress.json`."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

import torch

from pipelora.storage import Storage


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def peak_memory_gib() -> float:
    """Peak accelerator memory on GPUs, peak resident memory of this process on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def emit(line: str) -> None:
    """stdout, and a copy to PIPELORA_MIRROR_LOG (a worker pod's main process output) when set."""
    # One write per line: ranks share the launcher's output, and separate writes of the text and
    # its newline (unbuffered stdout) would interleave lines of different ranks.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    mirror = os.environ.get("PIPELORA_MIRROR_LOG")
    if mirror:
        try:
            with open(mirror, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except OSError:
            pass


def step_line(*, stage: int, stages: int, dp: int, dps: int, step: int, max_steps: int, loss: float, lr: float,
              tokens_per_s: float, mem_gib: float, eta_s: float) -> str:
    return (f"[stage {stage + 1}/{stages} dp {dp}/{dps}] step {step}/{max_steps} loss {loss:.3f} lr {lr:.1e} "
            f"tok/s {tokens_per_s:.0f} mem {mem_gib:.1f}GiB eta {format_eta(eta_s)}")


class Progress:
    """`<run>/progress.json`, written by rank 0: at most every `interval` s, and on every event."""

    def __init__(self, storage: Storage, uri: str, *, max_steps: int, interval: float = 5.0) -> None:
        self.storage, self.uri, self.interval = storage, uri, interval
        self.state: dict[str, Any] = {"step": 0, "max_steps": max_steps, "loss": None, "eval_loss": None, "lr": None,
                                      "tokens_per_s": None, "eta_s": None, "state": "running",
                                      "losses": [], "eval_losses": []}
        self._last = 0.0

    def restore(self, losses: list[list[float]], eval_losses: list[list[float]]) -> None:
        self.state["losses"] = [list(x) for x in losses]
        self.state["eval_losses"] = [list(x) for x in eval_losses]
        if losses:
            self.state["step"], self.state["loss"] = int(losses[-1][0]), losses[-1][1]
        if eval_losses:
            self.state["eval_loss"] = eval_losses[-1][1]

    def step(self, *, step: int, loss: float, lr: float, tokens_per_s: float, eta_s: float, grad_norm: float) -> None:
        self.state.update(step=step, loss=loss, lr=lr, tokens_per_s=tokens_per_s, eta_s=eta_s, grad_norm=grad_norm)
        self.state["losses"].append([step, loss])

    def eval(self, *, step: int, loss: float) -> None:
        self.state["eval_loss"] = loss
        self.state["eval_losses"].append([step, loss])

    def write(self, *, force: bool = False, state: str | None = None) -> None:
        if state:
            self.state["state"] = state
        now = time.time()
        if not force and now - self._last < self.interval:
            return
        self.state["updated_at"] = now
        self.storage.write_json(self.uri, self.state)
        self._last = now
