"""What every rank decides together at a step boundary: checkpoint now, and stop after it.

A preempted pod's SIGTERM reaches only the ranks on that pod (through the worker entrypoint), and
`checkpoint_every_minutes` reads each rank's own clock, so no rank can decide alone: each raises
its flags and one tiny all-reduce (MAX over two numbers) per step makes the decision the same on
every rank. All ranks then write one committed checkpoint at the same step, and a preempted run
exits with `PREEMPTED_EXIT_CODE`, which the launcher and `pipelora-k8s run` report as a preemption.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from types import FrameType

import torch

# EX_TEMPFAIL: the work is not done, try again (the next launcher attempt resumes).
PREEMPTED_EXIT_CODE = 75


@dataclass(frozen=True)
class Decision:
    checkpoint: bool
    stop: bool


class StepBoundary:
    """Signal flags and the checkpoint clock of one rank, agreed with the others every step."""

    def __init__(self, *, every_steps: int, every_minutes: float | None, max_steps: int,
                 device: torch.device) -> None:
        self.every_steps = every_steps
        self.every_s = every_minutes * 60 if every_minutes else None
        self.max_steps = max_steps
        self.device = device
        self.signalled_at: float | None = None
        self.signal_name = ""
        self.last_checkpoint = time.monotonic()
        self.allreduce_s = 0.0  # time spent agreeing, over the run (reported at the end)
        self._previous: dict[int, object] = {}

    # -- signals --------------------------------------------------------------------------------
    def install(self) -> None:
        """SIGTERM (eviction, preemption, `kubectl delete`) and SIGINT (Ctrl-C) only raise a flag."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name

    # -- the agreement --------------------------------------------------------------------------
    def decide(self, step: int) -> Decision:
        """After optimizer step `step`: the same Decision on every rank."""
        import torch.distributed as dist

        stop = self.signalled_at is not None
        time_due = self.every_s is not None and time.monotonic() - self.last_checkpoint >= self.every_s
        flags = torch.tensor([float(stop), float(time_due)], device=self.device)
        if dist.is_initialized():
            began = time.perf_counter()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            self.allreduce_s += time.perf_counter() - began
        stop, time_due = bool(flags[0].item()), bool(flags[1].item())
        scheduled = step % self.every_steps == 0 or step == self.max_steps
        return Decision(checkpoint=stop or time_due or scheduled, stop=stop and step < self.max_steps)

    def checkpointed(self) -> None:
        self.last_checkpoint = time.monotonic()

    def seconds_since_signal(self) -> float | None:
        return None if self.signalled_at is None else time.monotonic() - self.signalled_at
