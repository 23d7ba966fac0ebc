"""Fixtures for dataprep tests: the real Mistral tokenizer in a model folder, and spec builders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder holding only the tokenizer files (as dataprep needs no weights)."""
    from pipelora.dataprep.tokenizer import write_mistral_tokenizer

    return write_mistral_tokenizer(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Write records (dicts, or raw str/bytes lines) as a JSONL file under tmp_path."""

    def _write(records: list[Any], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = []
        for record in records:
            if isinstance(record, bytes):
                lines.append(record)
            elif isinstance(record, str):
                lines.append(record.encode())
            else:
                lines.append(json.dumps(record, ensure_ascii=False).encode())
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path

    return _write


@pytest.fixture
def make_spec(tmp_path: Path, tokenizer_dir: Path) -> Callable[..., Any]:
    """A JobSpec over a local run folder; keyword `dataset` entries override the dataset section."""
    from pipelora.config import spec_from_dict

    def _make(dataset_uri: str | Path, *, name: str = "dp", storage: str | None = None, seed: int = 1234,
              model: str | None = None, endpoint_url: str | None = None, **dataset: Any) -> Any:
        tree = {
            "name": name,
            "storage": {"uri": storage or str(tmp_path / "runs"), "endpoint_url": endpoint_url},
            "model": {"uri": model or str(tokenizer_dir)},
            "dataset": {"uri": str(dataset_uri), "seq_len": 256, "eval_fraction": 0.0, **dataset},
            "parallel": {"stages": 1, "micro_batches": 2},
            "training": {"seed": seed},
        }
        return spec_from_dict(tree)

    return _make
