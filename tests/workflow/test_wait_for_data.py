"""The launcher's first step: wait for dataprep's committed manifest in S3 (moto over HTTP)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from pipelora.config import spec_from_dict
from pipelora.storage import storage_for
from pipelora.workflow.cli import main


def write_spec(tmp_path: Path, s3_endpoint: str, bucket: str) -> tuple[Path, object]:
    data = {
        "name": "waiter",
        "storage": {"uri": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint},
        "model": {"uri": f"s3://{bucket}/models/m"},
        "dataset": {"uri": f"s3://{bucket}/data/a.jsonl"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, spec_from_dict(data)


def commit_manifest(spec) -> None:  # noqa: ANN001
    storage = storage_for(spec, spec.run_uri)
    shard = storage.write_bytes(spec.run_path("data", "train-00000.safetensors"), b"shard bytes")
    storage.commit(spec.run_path("data", "manifest.json"), [shard],
                   extra={"seq_len": 64, "splits": {"train": {"rows": 12, "shards": ["train-00000.safetensors"]}}})


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_times_out_with_one_sentence_when_no_data(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    config, _ = write_spec(tmp_path, s3_endpoint, s3_bucket)
    code, out, err = run_cli(["wait-for-data", "--config", str(config), "--timeout", "0.6", "--interval", "0.2"],
                             capsys)
    assert code == 3
    assert f"waiting for the data manifest s3://{s3_bucket}/runs/waiter/data/manifest.json" in out
    assert err.startswith(f"error: no data manifest at s3://{s3_bucket}/runs/waiter/data/manifest.json after 0s")
    assert "pipelora-k8s logs waiter --component dataprep" in err


def test_returns_once_the_manifest_is_committed(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                capsys: pytest.CaptureFixture) -> None:
    config, spec = write_spec(tmp_path, s3_endpoint, s3_bucket)
    # the shard alone (no manifest yet) must not count as data
    storage_for(spec, spec.run_uri).write_bytes(spec.run_path("data", "train-00000.safetensors"), b"partial")
    timer = threading.Timer(1.0, commit_manifest, args=(spec,))
    timer.start()
    try:
        code, out, err = run_cli(["wait-for-data", "--config", str(config), "--timeout", "60",
                                  "--interval", "0.2"], capsys)
    finally:
        timer.join()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("waiting for the data manifest")
    assert lines[-1] == f"data ready: s3://{s3_bucket}/runs/waiter/data/manifest.json (train 12 rows)"
