"""pipelora.dataprep: dataset → template → tokens → masks → packed shards + manifest; the shard reader.

Importing this package is cheap (numpy only): the trainer imports `open_shards` on every rank.
"""

from pipelora.dataprep.errors import BadInputError, DataprepError, OutputExistsError, ShardsError
from pipelora.dataprep.shards import ShardDataset, open_shards, read_manifest

__all__ = [
    "BadInputError",
    "DataprepError",
    "OutputExistsError",
    "ShardDataset",
    "ShardsError",
    "open_shards",
    "read_manifest",
    "write_mistral_tokenizer",
    "run_dataprep",
]


def __getattr__(name: str):
    """Heavy entry points (transformers) load only when asked for."""
    if name == "write_mistral_tokenizer":
        from pipelora.dataprep.tokenizer import write_mistral_tokenizer

        return write_mistral_tokenizer
    if name == "run_dataprep":
        from pipelora.dataprep.pipeline import run_dataprep

        return run_dataprep
    raise AttributeError(name)
