"""Input files (JSON array, JSONL, Parquet) give the same shards; the generated dataset; real data."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from pipelora.dataprep import open_shards
from pipelora.dataprep.generate import CAPITALS, learnable_examples, write_learnable_dataset
from pipelora.dataprep.pipeline import run_dataprep
from pipelora.dataprep.readers import PARQUET_BATCH, DatasetFile, read_records


def test_json_jsonl_and_parquet_give_identical_shards(tmp_path, make_spec):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = learnable_examples(150, seed=5)
    for r in records[::7]:
        del r["input"]  # `input` may be absent
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps(records, indent=1))
    as_jsonl = tmp_path / "b.jsonl"
    as_jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    as_parquet = tmp_path / "c.parquet"
    schema = pa.schema([("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), as_parquet, row_group_size=40)  # input: null
    jsonl_named_json = tmp_path / "d.json"
    jsonl_named_json.write_text(as_jsonl.read_text())
    manifests = [run_dataprep(make_spec(path, name=f"in{i}", eval_fraction=0.1)).manifest
                 for i, path in enumerate((as_json, as_jsonl, as_parquet, jsonl_named_json))]
    assert len({json.dumps(m["files"], sort_keys=True) for m in manifests}) == 1
    assert all(m["stats"]["examples"] == 150 for m in manifests)


def test_parquet_is_read_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = 2 * PARQUET_BATCH + 5
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": f"i{i}", "output": f"o{i}"} for i in range(count)]), path,
                   row_group_size=1000)
    stream = read_records(DatasetFile(str(path), path, "parquet", "", path.stat().st_size))
    first = next(stream)
    assert first.value == {"instruction": "i0", "output": "o0"} and first.where.endswith("row 0")
    rest = list(stream)
    assert len(rest) == count - 1 and rest[-1].value["output"] == f"o{count - 1}"


def test_generated_dataset_is_correct_and_seeded(tmp_path):
    records = learnable_examples(300, seed=11)
    assert records == learnable_examples(300, seed=11) != learnable_examples(300, seed=12)
    kinds = Counter(r["instruction"].split()[0] for r in records)
    assert kinds == {"Add": 100, "Reverse": 100, "What": 100}
    for r in records:
        if r["instruction"] == "Add the two numbers.":
            a, b = map(int, r["input"].split(" + "))
            assert int(r["output"]) == a + b
        elif r["instruction"].startswith("Reverse"):
            assert r["output"].split() == r["input"].split()[::-1]
        else:
            country = r["instruction"].removeprefix("What is the capital of ").rstrip("?")
            assert r["output"] == f"The capital of {country} is {CAPITALS[country]}."
    path = write_learnable_dataset(tmp_path / "out" / "g.jsonl", examples=50, seed=11)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:50]


def test_make_dataset_command(tmp_path, capsys):
    from pipelora.workflow.cli import main

    out = tmp_path / "g.jsonl"
    with pytest.raises(SystemExit) as info:
        main(["make-dataset", "--out", str(out), "--examples", "30", "--seed", "11"])
    assert info.value.code == 0
    assert f"wrote 30 examples to {out}" in capsys.readouterr().out
    assert [json.loads(line) for line in out.read_text().splitlines()] == learnable_examples(30, seed=11)


def test_messages_dataset_packs_and_masks(write_jsonl, make_spec, tokenizer, monkeypatch):
    import pipelora.dataprep.encoder as encoder

    records = []
    for i in range(40):
        records.append({"messages": [
            {"role": "system", "content": "Answer with a number."},
            {"role": "user", "content": f"What is {i} + 1?"},
            {"role": "assistant", "content": str(i + 1)},
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": str(2 * (i + 1))},
        ]})
    spec = make_spec(write_jsonl(records), format="messages", template="chat")
    manifest = run_dataprep(spec, workers=0).manifest
    monkeypatch.setattr(encoder, "MIN_SLICE", 4)  # encode in two worker processes: the same bytes
    in_workers = run_dataprep(make_spec(spec.dataset.uri, format="messages", template="chat", name="workers"),
                              workers=2).manifest
    assert in_workers["files"] == manifest["files"]
    assert manifest["stats"]["examples"] == 40 and manifest["stats"]["packing_efficiency"] > 0.85
    ds = open_shards(spec.layout.data)
    replies = []
    for i in range(len(ds)):
        row = ds[i]
        starts = np.flatnonzero(row["position_ids"] == 0).tolist() + [len(row["input_ids"])]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            if row["input_ids"][a] != 1:
                continue  # padding
            labels = row["labels"][a:b]
            assert labels[0] == -100
            replies.append(tokenizer.decode(labels[labels != -100]))
    # every conversation trains on exactly its two replies, each with its EOS
    expected = [f"{i + 1}</s> {2 * (i + 1)}</s>" for i in range(40)]
    assert sorted(r.strip() for r in replies) == sorted(expected)


def test_real_alpaca_data(shared_data, make_spec, tokenizer):
    path = shared_data / "alpaca_zh_demo.json"
    spec = make_spec(path, seq_len=1024, eval_fraction=0.02, name="zh")
    manifest = run_dataprep(spec).manifest
    stats = manifest["stats"]
    records = json.loads(path.read_text(encoding="utf-8"))
    assert stats["records"] == len(records) == 1000
    assert stats["skipped"] == 0
    assert stats["examples"] == 1000 and stats["truncated"] + stats["dropped"] <= 50
    assert stats["packing_efficiency"] >= 0.98
    assert manifest["splits"]["eval"]["examples"] == 20
    # decoded rows hold the real multi-byte text, each sequence starting with the Alpaca preamble
    ds = open_shards(spec.layout.data)
    row = ds[0]
    starts = np.flatnonzero(row["position_ids"] == 0)
    text = tokenizer.decode(row["input_ids"][starts[0] : starts[1]], skip_special_tokens=True)
    assert text.startswith("Below is an instruction")
    assert any(r["output"][:20] in text for r in records)
