"""The shard reader: random access, equal per-rank partitions, seeded shuffles, integrity checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelora.dataprep import ShardsError, open_shards
from pipelora.dataprep.generate import write_learnable_dataset
from pipelora.dataprep.pipeline import run_dataprep


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir):
    from pipelora.config import spec_from_dict

    root = tmp_path_factory.mktemp("shards")
    data = write_learnable_dataset(root / "learn.jsonl", examples=300, seed=1)
    spec = spec_from_dict({
        "name": "reader", "storage": {"uri": str(root / "runs")}, "model": {"uri": str(tokenizer_dir)},
        "dataset": {"uri": str(data), "seq_len": 128, "eval_fraction": 0.1},
        "parallel": {"stages": 1, "micro_batches": 2},
    })
    run_dataprep(spec, shard_rows=10)
    return spec.layout.data


def all_rows(ds):
    return np.stack([ds[i]["input_ids"] for i in range(len(ds))])


def test_random_access_across_shards(prepared):
    from safetensors.numpy import load_file

    ds = open_shards(prepared)
    entry = ds.manifest["splits"]["train"]
    assert len(ds) == entry["rows"] and len(entry["shards"]) > 2
    direct = np.concatenate([load_file(f"{prepared}/{name}")["input_ids"] for name in entry["shards"]])
    assert (all_rows(ds) == direct).all()
    row = ds[-1]
    assert set(row) == {"input_ids", "labels", "position_ids"}
    assert all(v.dtype == np.int32 and v.shape == (128,) for v in row.values())
    assert ds.seq_len == 128
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_partition_gives_equal_disjoint_slices(prepared):
    ds = open_shards(prepared)
    for world in (1, 2, 3, 4):
        parts = [ds.partition(rank, world) for rank in range(world)]
        assert {len(p) for p in parts} == {len(ds) // world}
        per_rank = len(ds) // world
        assert (np.concatenate([all_rows(p) for p in parts]) == all_rows(ds)[: world * per_rank]).all()
    with pytest.raises(ValueError):
        ds.partition(2, 2)


def test_shuffle_is_a_seeded_permutation_and_views_compose(prepared):
    ds = open_shards(prepared)
    base = all_rows(ds)
    a, b, c = ds.shuffled(5, 0), ds.shuffled(5, 0), ds.shuffled(5, 1)
    assert (all_rows(a) == all_rows(b)).all()
    assert not (all_rows(a) == all_rows(c)).all()
    assert sorted(map(tuple, all_rows(a).tolist())) == sorted(map(tuple, base.tolist()))
    # every rank of a shuffled epoch sees a disjoint part of it, the same on every process
    parts = [open_shards(prepared).shuffled(5, 0).partition(r, 2) for r in range(2)]
    assert (np.concatenate([all_rows(p) for p in parts]) == all_rows(a)[: 2 * (len(ds) // 2)]).all()


def test_eval_split(prepared):
    ev = open_shards(prepared, split="eval")
    assert len(ev) == ev.manifest["splits"]["eval"]["rows"] > 0
    with pytest.raises(ShardsError, match="no 'test' split"):
        open_shards(prepared, split="test")


def test_missing_manifest_says_run_dataprep(tmp_path):
    with pytest.raises(ShardsError, match="run dataprep first"):
        open_shards(str(tmp_path / "nothing" / "data"))


def test_modified_shard_is_detected_on_first_read(prepared, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    name = manifest["splits"]["train"]["shards"][1]
    raw = bytearray((copy / name).read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit of token data
    (copy / name).write_bytes(bytes(raw))
    ds = open_shards(str(copy))
    assert ds[0]["input_ids"].shape == (128,)  # shard 0 is intact
    with pytest.raises(ShardsError, match="does not match the sha256"):
        ds[manifest["splits"]["train"]["shard_rows"][0]]


def test_manifest_without_row_counts_reads_them_from_the_shards(prepared, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["splits"].values():
        del entry["shard_rows"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert (all_rows(open_shards(str(copy))) == all_rows(open_shards(prepared))).all()


def _copy(prepared, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    return copy, json.loads((copy / "manifest.json").read_text())


def test_truncated_shard_is_named_with_both_sizes(prepared, tmp_path):
    copy, manifest = _copy(prepared, tmp_path)
    name = manifest["splits"]["train"]["shards"][0]
    raw = (copy / name).read_bytes()
    (copy / name).write_bytes(raw[:-16])
    with pytest.raises(ShardsError) as info:
        open_shards(str(copy))[0]
    message = str(info.value)
    assert f"{copy / name} is {len(raw) - 16} bytes but" in message and f"recorded {len(raw)}" in message
    assert "run dataprep again with --overwrite" in message and "\n" not in message


def test_shard_the_manifest_does_not_record_is_refused(prepared, tmp_path):
    copy, manifest = _copy(prepared, tmp_path)
    name = manifest["splits"]["train"]["shards"][0]
    del manifest["files"][name]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardsError, match=f"lists shard {name} but records no size or sha256"):
        open_shards(str(copy))[0]


def test_committed_shard_with_a_corrupt_header_is_one_sentence(prepared, tmp_path):
    import hashlib

    copy, manifest = _copy(prepared, tmp_path)
    name = manifest["splits"]["train"]["shards"][0]
    raw = bytearray((copy / name).read_bytes())
    raw[8] = ord("[")  # the header's JSON is no longer a map
    (copy / name).write_bytes(bytes(raw))
    manifest["files"][name] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardsError, match=f"shard {copy / name} is unreadable"):
        open_shards(str(copy))[0]


def test_stored_labels_are_final_every_sequence_start_is_ignored(prepared):
    from pipelora.rows import IGNORE_INDEX, mask_sequence_starts

    for split in ("train", "eval"):
        ds = open_shards(prepared, split=split)
        for i in range(len(ds)):
            row = ds[i]
            starts = row["position_ids"] == 0
            assert starts[0] and (row["labels"][starts] == IGNORE_INDEX).all()
            # a reader applying the contract again changes nothing
            again = mask_sequence_starts(row["labels"].copy(), row["position_ids"])
            assert np.array_equal(again, row["labels"])
