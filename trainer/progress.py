"""What a running job tells people: one log line per step per stage, and the run's progress file."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Protocol

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


# Where a rank's lines go besides stdout (its pod's relay, the run's durable log): see rank_output.
_sinks: list[LineSink] = []


class LineSink(Protocol):
    def write(self, line: str) -> None: ...


def add_sink(sink: LineSink) -> None:
    _sinks.append(sink)


def remove_sink(sink: LineSink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def emit(line: str) -> None:
    """stdout (the launcher's log, through mpirun), then every attached sink."""
    # One write per line: ranks share the launcher's output, and separate writes of the text and
    # its newline (unbuffered stdout) would interleave lines of different ranks.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    for sink in list(_sinks):
        sink.write(line)


def step_line(*, stage: int, stages: int, dp: int, dps: int, step: int, max_steps: int, loss: float, lr: float,
              tokens_per_s: float, mem_gib: float, eta_s: float) -> str:
    return (f"[stage {stage + 1}/{stages} dp {dp}/{dps}] step {step}/{max_steps} loss {loss:.3f} lr {lr:.1e} "
            f"tok/s {tokens_per_s:.0f} mem {mem_gib:.1f}GiB eta {format_eta(eta_s)}")


class Progress:
    """The run's progress file (`RunLayout.progress`), written by rank 0: at most every `interval` s,
    and on every event."""

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
