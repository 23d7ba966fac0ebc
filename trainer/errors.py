"""Errors the trainer reports as one sentence (and a non-zero exit on every rank)."""

from __future__ import annotations

from pipelora.errors import PipeloraError


class TrainerError(PipeloraError):
    """A model, topology or checkpoint problem the user can fix."""

    exit_code = 3
