"""Errors a user can cause in dataprep or when reading shards: one sentence each."""

from __future__ import annotations

from pipelora.errors import PipeloraError


class DataprepError(PipeloraError):
    """A dataset, tokenizer or output problem the user can fix."""


class BadInputError(DataprepError):
    """Too many malformed records (more than dataset.max_bad_fraction)."""


class OutputExistsError(DataprepError):
    """Prepared data with another fingerprint is already there and --overwrite was not given."""


class ShardsError(PipeloraError):
    """Shards are missing (dataprep has not run) or do not match their manifest."""
