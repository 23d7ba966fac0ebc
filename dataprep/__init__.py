"""pipelora.dataprep: dataset → template → tokens → masks → packed shards + manifest; the shard reader.

Importing this package is cheap (numpy only): the trainer imports `open_shards` on every rank.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from pipelora.dataprep.errors import BadInputError, DataprepError, OutputExistsError, ShardsError
from pipelora.dataprep.generate import write_learnable_dataset
from pipelora.dataprep.shards import ShardDataset, open_shards, read_manifest

__all__ = [
    "BadInputError",
    "DataprepError",
    "DataprepResult",
    "OutputExistsError",
    "ShardDataset",
    "ShardsError",
    "open_shards",
    "read_manifest",
    "run_dataprep",
    "write_learnable_dataset",
    "write_mistral_tokenizer",
]

# Heavy entry points (they import transformers) load only when asked for.
_LAZY = {
    "DataprepResult": "pipelora.dataprep.pipeline",
    "run_dataprep": "pipelora.dataprep.pipeline",
    "write_mistral_tokenizer": "pipelora.dataprep.tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
