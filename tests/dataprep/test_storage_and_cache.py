"""S3 in and out through a real moto server, and the fingerprint cache (no-op, refuse, --overwrite)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelora.dataprep import open_shards
from pipelora.dataprep.generate import write_learnable_dataset
from pipelora.dataprep.pipeline import run_dataprep
from pipelora.storage import open_storage


def test_s3_round_trip_matches_local_run(s3_endpoint, s3_bucket, tmp_path, tokenizer_dir, make_spec):
    data = write_learnable_dataset(tmp_path / "learn.jsonl", examples=200, seed=2)
    s3 = open_storage("s3://x", endpoint_url=s3_endpoint)
    s3.upload_file(data, f"s3://{s3_bucket}/datasets/learn.jsonl")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        s3.upload_file(tokenizer_dir / name, f"s3://{s3_bucket}/models/tiny/{name}")
    s3.write_bytes(f"s3://{s3_bucket}/models/tiny/model.safetensors", b"weights are never fetched")

    remote = make_spec(f"s3://{s3_bucket}/datasets/learn.jsonl", name="remote", storage=f"s3://{s3_bucket}/runs",
                       model=f"s3://{s3_bucket}/models/tiny", endpoint_url=s3_endpoint, eval_fraction=0.05)
    local = make_spec(data, name="local", eval_fraction=0.05)
    remote_manifest = run_dataprep(remote, shard_rows=8).manifest
    local_manifest = run_dataprep(local, shard_rows=8).manifest
    assert remote_manifest["fingerprint"] == local_manifest["fingerprint"]
    assert remote_manifest["files"] == local_manifest["files"]
    names = {o.uri.rsplit("/", 1)[1] for o in s3.list(f"s3://{s3_bucket}/runs/remote/data")}
    assert names == {*remote_manifest["files"], "manifest.json"}

    cache = tmp_path / "cache"
    ds = open_shards(remote.layout.data, endpoint_url=s3_endpoint, cache_dir=cache)
    ref = open_shards(local.layout.data)
    assert len(ds) == len(ref) > 8
    order = ds.shuffled(3, 1)
    expected = ref.shuffled(3, 1)
    for i in range(len(ds)):
        for key in ("input_ids", "labels", "position_ids"):
            assert np.array_equal(order[i][key], expected[i][key])
    cached = sorted(p.name for p in cache.iterdir())
    assert cached == sorted(f"{m['sha256']}.safetensors" for n, m in remote_manifest["files"].items() if n.startswith("train"))


def test_no_manifest_on_s3_says_run_dataprep(s3_endpoint, s3_bucket):
    from pipelora.dataprep import ShardsError

    with pytest.raises(ShardsError, match="run dataprep first"):
        open_shards(f"s3://{s3_bucket}/runs/none/data", endpoint_url=s3_endpoint)


def run_cli(argv, capsys):
    from pipelora.workflow.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_fingerprint_no_op_refuse_and_overwrite(tmp_path, tokenizer_dir, capsys):
    data = write_learnable_dataset(tmp_path / "learn.jsonl", examples=120, seed=4)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: cache\nstorage: {{uri: {tmp_path / 'runs'}}}\nmodel: {{uri: {tokenizer_dir}}}\n"
        f"dataset: {{uri: {data}, seq_len: 128, eval_fraction: 0.1}}\nparallel: {{stages: 1, micro_batches: 2}}\n"
    )
    manifest_path = tmp_path / "runs" / "cache" / "data" / "manifest.json"

    code, out, _ = run_cli(["dataprep", "--config", str(job)], capsys)
    assert code == 0
    assert out.startswith("dataprep: 120 examples, ") and "(train " in out and "skipped 0" in out
    first = json.loads(manifest_path.read_text())
    stamp = manifest_path.stat().st_mtime_ns

    code, out, _ = run_cli(["dataprep", "--config", str(job)], capsys)
    assert code == 0 and "already prepared from these inputs" in out and "nothing to do" in out
    assert manifest_path.stat().st_mtime_ns == stamp

    code, _, err = run_cli(["dataprep", "--config", str(job), "--set", "dataset.seq_len=96"], capsys)
    assert code == 1 and err.startswith("error: ") and "rerun with --overwrite" in err
    assert json.loads(manifest_path.read_text()) == first

    # the dataset changed on disk: a new fingerprint too
    data.write_text(data.read_text() + json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
    code, _, err = run_cli(["dataprep", "--config", str(job)], capsys)
    assert code == 1 and "rerun with --overwrite" in err

    code, out, _ = run_cli(["dataprep", "--config", str(job), "--set", "dataset.seq_len=96", "--overwrite"], capsys)
    assert code == 0 and out.startswith("dataprep: 121 examples")
    second = json.loads(manifest_path.read_text())
    assert second["seq_len"] == 96 and second["fingerprint"] != first["fingerprint"]
    left = sorted(p.name for p in manifest_path.parent.iterdir())
    assert left == sorted([*second["files"], "manifest.json"])  # no stale shard of the first run remains


def test_interrupted_leftovers_are_replaced(tmp_path, make_spec, write_jsonl):
    spec = make_spec(write_jsonl([{"instruction": "Say hi.", "output": "hi"}]))
    data_dir = Path(spec.layout.data)
    data_dir.mkdir(parents=True)
    (data_dir / "train-00007.safetensors").write_bytes(b"half written")
    manifest = run_dataprep(spec).manifest
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([*manifest["files"], "manifest.json"])
