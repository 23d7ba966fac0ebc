"""What a running job tells people: one log line per step per stage, and the run's progress file."""

from __future__ import annotations

import resource
import sys
import time
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pipelora.storage import Storage

if TYPE_CHECKING:
    from pipelora.trainer.plan import Plan


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
              tokens_per_s: float, mem_gib: float, eta_s: float, tokens_per_s_device: float | None = None,
              mfu: float | None = None) -> str:
    """The documented fields, then (when known) tokens/s per device and MFU:
    `... eta 0:42:10 tok/s/dev 640 mfu 41.3%`."""
    line = (f"[stage {stage + 1}/{stages} dp {dp}/{dps}] step {step}/{max_steps} loss {loss:.3f} lr {lr:.1e} "
            f"tok/s {tokens_per_s:.0f} mem {mem_gib:.1f}GiB eta {format_eta(eta_s)}")
    if tokens_per_s_device is not None:
        line += f" tok/s/dev {tokens_per_s_device:.0f}"
    if mfu is not None:
        line += f" mfu {mfu * 100:.1f}%"
    return line


def matmul_flops(device: torch.device, dtype: torch.dtype, *, seconds: float = 0.2) -> float:
    """The device's dense matmul rate in `dtype`, FLOP/s, from square matmuls for about `seconds`."""
    size = 8192 if device.type == "cuda" else (256 if dtype != torch.float32 else 1024)
    # A private generator: the run's RNG stream (dropout masks, restored exactly on resume) is untouched.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)  # warm-up: kernel selection, allocation
    sync()
    runs, began = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        runs += 1
        if runs % 4 == 0 or device.type != "cuda":
            sync()
            elapsed = time.perf_counter() - began
            if elapsed >= seconds:
                return 2.0 * size**3 * runs / elapsed


_device_rates: dict[tuple[str, str], tuple[float, str]] = {}


def device_rate(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where it came from) that MFU is reported against: `PIPELORA_GPU_TFLOPS` when set,
    else the measured matmul rate of this device in the run dtype (measured once per process)."""
    from pipelora.trainer.memory import env_device_flops

    given = env_device_flops()
    if given:
        return given, "PIPELORA_GPU_TFLOPS"
    key = (str(device), str(dtype))
    if key not in _device_rates:
        name = str(dtype).removeprefix("torch.")
        _device_rates[key] = (matmul_flops(device, dtype), f"measured {name} matmul on {device}")
    return _device_rates[key]


_model_flops: dict[int, float] = {}


def utilisation(plan_: Plan, tokens_per_s: float) -> dict[str, float]:
    """`step_line`'s extra fields: tokens/s per device and MFU (model FLOPs per token x tokens/s per
    device / the device rate; the FLOPs count of `pipelora.trainer.memory`, recomputation excluded).

    The first call measures the device rate (when not given) and says what MFU is measured against.
    """
    from pipelora.trainer.memory import ModelShape, RunShape, model_flops_per_token

    key = id(plan_)
    first = key not in _model_flops
    if first:
        run = RunShape.from_spec(plan_.spec, device="cuda" if plan_.device.type == "cuda" else "cpu")
        _model_flops[key] = model_flops_per_token(ModelShape.from_config(plan_.config), run)
    rate, source = device_rate(plan_.device, plan_.dtype)
    if first:
        emit(f"{plan_.tag} MFU against {rate / 1e12:.3f} TFLOP/s ({source}); model "
             f"{_model_flops[key] / 1e9:.4f} GFLOP/token (4 N_frozen + 6 N_lora + 12 L H d S)")
    per_device = tokens_per_s / plan_.info.world_size
    return {"tokens_per_s_device": per_device, "mfu": _model_flops[key] * per_device / rate}


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

    def step(self, *, step: int, loss: float, lr: float, tokens_per_s: float, eta_s: float, grad_norm: float,
             tokens_per_s_device: float | None = None, mfu: float | None = None) -> None:
        self.state.update(step=step, loss=loss, lr=lr, tokens_per_s=tokens_per_s, eta_s=eta_s, grad_norm=grad_norm)
        if tokens_per_s_device is not None:
            self.state["tokens_per_s_device"] = tokens_per_s_device
        if mfu is not None:
            self.state["mfu"] = mfu
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
