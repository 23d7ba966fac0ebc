"""Packing invariants over a real run, the bin packer itself, the split and determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipelora.dataprep import open_shards
from pipelora.dataprep.generate import write_learnable_dataset
from pipelora.dataprep.packing import best_fit_decreasing
from pipelora.dataprep.pipeline import eval_target, run_dataprep
from pipelora.dataprep.records import AlpacaExample
from pipelora.dataprep.templates import alpaca_prompt

SEQ_LEN = 160


def segments(ds):
    """Every packed sequence of every row, as (ids, labels) tuples; padding segments left out."""
    out = []
    for i in range(len(ds)):
        row = ds[i]
        starts = np.flatnonzero(row["position_ids"] == 0).tolist() + [len(row["position_ids"])]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            ids, labels = row["input_ids"][a:b], row["labels"][a:b]
            assert (row["position_ids"][a:b] == np.arange(b - a)).all()
            if ids[0] == 1:  # a sequence starts with BOS; padding is EOS with no labels
                out.append((tuple(ids.tolist()), tuple(labels.tolist())))
            else:
                assert b == len(row["input_ids"]) and (ids == 2).all() and (labels == -100).all()
    return out


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, tokenizer_dir):
    from pipelora.config import spec_from_dict

    root = tmp_path_factory.mktemp("packed")
    data = write_learnable_dataset(root / "learn.jsonl", examples=600, seed=3)

    def spec(name, seed=1234):
        return spec_from_dict({
            "name": name, "storage": {"uri": str(root / "runs")}, "model": {"uri": str(tokenizer_dir)},
            "dataset": {"uri": str(data), "seq_len": SEQ_LEN, "eval_fraction": 0.1},
            "parallel": {"stages": 1, "micro_batches": 2}, "training": {"seed": seed},
        })

    first = spec("a")
    manifest = run_dataprep(first, shard_rows=32).manifest
    return {"spec": spec, "first": first, "manifest": manifest, "data": data}


def expected_sequences(tokenizer, path):
    import json

    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        prompt = tokenizer.encode(alpaca_prompt(AlpacaExample(r["instruction"], r["input"], r["output"])),
                                  add_special_tokens=False)
        reply = tokenizer.encode(r["output"], add_special_tokens=False)
        ids = (1, *prompt, *reply, 2)
        out.append((ids, (-100,) * (1 + len(prompt)) + (*reply, 2)))
    return out


def test_every_example_once_positions_restart_first_label_masked(packed_run, tokenizer):
    data_uri = packed_run["first"].layout.data
    train, evaluation = open_shards(data_uri, split="train"), open_shards(data_uri, split="eval")
    got = segments(train) + segments(evaluation)
    assert Counter(got) == Counter(expected_sequences(tokenizer, packed_run["data"]))
    assert all(labels[0] == -100 for _, labels in got)
    for ds in (train, evaluation):
        assert ds[0]["input_ids"].shape == (SEQ_LEN,)


def test_split_counts_and_manifest(packed_run):
    m = packed_run["manifest"]
    assert m["splits"]["eval"]["examples"] == eval_target(600, 0.1) == 60
    assert m["splits"]["train"]["examples"] == 540
    assert m["stats"]["examples"] == 600 and m["stats"]["skipped"] == 0
    rows = m["splits"]["train"]["rows"] + m["splits"]["eval"]["rows"]
    assert m["stats"]["rows"] == rows
    assert m["stats"]["packing_efficiency"] == pytest.approx(m["stats"]["tokens"] / (rows * SEQ_LEN), abs=1e-6)
    # bounded shards: 32 rows each, the last one holding the rest
    train = m["splits"]["train"]
    assert len(train["shards"]) == -(-train["rows"] // 32) > 1
    assert sum(train["shard_rows"]) == train["rows"] and set(train["shard_rows"][:-1]) == {32}
    assert set(m["files"]) == set(train["shards"]) | set(m["splits"]["eval"]["shards"])
    assert m["tokenizer"]["eos_id"] == 2 and m["tokenizer"]["bos_id"] == 1 and m["tokenizer"]["pad_id"] == 2


def test_same_seed_same_bytes_other_seed_other_order(packed_run):
    again = run_dataprep(packed_run["spec"]("b"), shard_rows=32).manifest
    other = run_dataprep(packed_run["spec"]("c", seed=99), shard_rows=32).manifest
    first = packed_run["manifest"]
    assert again["files"] == first["files"]
    assert other["fingerprint"] != first["fingerprint"]
    assert other["files"] != first["files"]


@pytest.mark.parametrize("seed", [0, 1])
def test_best_fit_decreasing_fills_rows(seed):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=5.3, sigma=0.6, size=4000).astype(int), 8, 1024)  # Alpaca-like
    bins = best_fit_decreasing(lengths, 1024, rng=np.random.default_rng(7))
    items = sorted(i for b in bins for i in b)
    assert items == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 1024
    assert lengths.sum() / (len(bins) * 1024) >= 0.98
    assert bins == best_fit_decreasing(lengths, 1024, rng=np.random.default_rng(7))


def test_best_fit_rejects_items_over_capacity():
    with pytest.raises(ValueError, match="exceeds the capacity"):
        best_fit_decreasing([10, 2000], 1024, rng=np.random.default_rng(0))


@pytest.mark.parametrize(("count", "fraction", "expected"), [(0, 0.1, 0), (1, 0.5, 0), (2, 0.01, 1), (30, 0.1, 3),
                                                             (1000, 0.01, 10), (1000, 0.0, 0)])
def test_eval_target(count, fraction, expected):
    assert eval_target(count, fraction) == expected


def test_small_windows_and_threads_keep_every_example(packed_run, tokenizer, monkeypatch):
    """Many read and pack windows (as on a large dataset) and several tokenizer processes."""
    import pipelora.dataprep.encoder as encoder
    import pipelora.dataprep.pipeline as pipeline

    monkeypatch.setattr(pipeline, "READ_WINDOW", 37)
    monkeypatch.setattr(encoder, "MIN_SLICE", 4)  # split even these small windows over the worker processes
    monkeypatch.setattr(pipeline, "PACK_WINDOW", 100)
    spec = packed_run["spec"]("windows")
    manifest = run_dataprep(spec, shard_rows=32, workers=3).manifest
    assert manifest["splits"]["eval"]["examples"] == 60 and manifest["splits"]["train"]["examples"] == 540
    data_uri = spec.layout.data
    got = segments(open_shards(data_uri, split="train")) + segments(open_shards(data_uri, split="eval"))
    assert Counter(got) == Counter(expected_sequences(tokenizer, packed_run["data"]))
    again = run_dataprep(packed_run["spec"]("windows-1"), shard_rows=32, workers=0).manifest
    assert again["files"] == manifest["files"]  # worker processes change nothing in the bytes
