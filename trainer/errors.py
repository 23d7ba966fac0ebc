"""Errors the trainer reports as one sentence (and a non-zero exit on every rank)."""

from __future__ import annotations

from pipelora.errors import PipeloraError


class TrainerError(PipeloraError):
    """A model, topology or checkpoint problem the user can fix."""

    exit_code = 3


class Preempted(PipeloraError):
    """Every rank agreed to stop after committing a checkpoint (SIGTERM/SIGINT on some rank)."""

    exit_code = 75  # = step_boundary.PREEMPTED_EXIT_CODE

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted at step {step}, checkpoint committed; the next attempt resumes from it")
        self.step = step
