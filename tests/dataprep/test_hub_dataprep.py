"""`pipelora-k8s dataprep` over hf:// sources, against the fake hub in `tests/support/fake_hub.py`.

dataprep runs as the CLI process the chart starts (with `HF_ENDPOINT` and `HF_TOKEN` in its
environment, as `datasets` reads the endpoint when it is imported); the hub runs in this process,
so the tests count what was asked of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

SUPPORT = Path(__file__).resolve().parents[1] / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

from fake_hub import FakeHub  # noqa: E402
from net import free_port  # noqa: E402

from pipelora.layout import HUB_MARKER, hub_model_uri  # noqa: E402

CLI = str(Path(sys.executable).parent / "pipelora-k8s")
TOKEN, UNGRANTED = "hf_test_token", "hf_not_granted"
MODEL = "acme/tiny-mistral"
MIRRORED = {"config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


@pytest.fixture(scope="module")
def source_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Mistral as `init-model` writes it, in two safetensors shards with an index."""
    out = tmp_path_factory.mktemp("hub-model") / "tiny"
    proc = subprocess.run([CLI, "init-model", "--preset", "tiny", "--out", str(out), "--max-shard-mb", "20"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == MIRRORED
    return out


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    from pipelora.dataprep.generate import learnable_examples

    return learnable_examples(80, seed=3)


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture
def hub(source_model: Path, records: list[dict[str, Any]]) -> Iterator[FakeHub]:
    fake = FakeHub(tokens={TOKEN, UNGRANTED}).start()
    files = {p.name: p.read_bytes() for p in source_model.iterdir()}
    fake.add_repo("model", MODEL, {**files, "pytorch_model.bin": b"\0" * 4096, "README.md": b"# tiny\n"})
    fake.add_repo("dataset", "acme/alpaca", {
        "README.md": b"# alpaca-format records\n",
        "data/train-00000-of-00001.parquet": parquet_bytes(records[:60]),
        "data/test-00000-of-00001.parquet": parquet_bytes(records[60:]),
    })
    fake.add_repo("dataset", "acme/alpaca-json", {"alpaca_data.json": json.dumps(records, indent=1).encode()})
    fake.add_repo("dataset", "acme/gated-set", {"data/train-00000-of-00001.parquet": parquet_bytes(records)},
                  gated=True)
    yield fake
    fake.stop()
    assert fake.unknown == [], f"the fake hub was asked for paths it does not implement: {fake.unknown}"


def write_job(tmp_path: Path, *, model: str, dataset: str, storage: Path, name: str = "hubrun") -> Path:
    job = {"name": name, "storage": {"uri": str(storage)}, "model": {"uri": model},
           "dataset": {"uri": dataset, "seq_len": 256, "eval_fraction": 0.1},
           "parallel": {"stages": 1, "micro_batches": 2}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def hub_env(hub: FakeHub, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1",
               HF_UPDATE_DOWNLOAD_COUNTS="0", HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra)
    return env


def dataprep(job: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "dataprep", "--config", str(job), "--workers", "0", *args], capture_output=True,
                          text=True, timeout=600, env=env)


def test_dataprep_mirrors_the_model_once_pins_both_commits_and_the_trainer_reads_storage(
        hub: FakeHub, tmp_path: Path, source_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    job = write_job(tmp_path, model=f"hf://{MODEL}", dataset="hf://datasets/acme/alpaca", storage=store)
    env = hub_env(hub, tmp_path)
    model_sha = hub.repo("model", MODEL).refs["main"]
    data_sha = hub.repo("dataset", "acme/alpaca").refs["main"]

    first = dataprep(job, env)
    assert first.returncode == 0, first.stderr
    assert sorted(hub.file_downloads(MODEL)) == sorted(MIRRORED)  # each file once; no .bin, no README
    mirror = hub_model_uri(str(store), "acme", "tiny-mistral", model_sha)
    assert (Path(mirror) / HUB_MARKER).is_file()
    manifest = json.loads((store / "hubrun" / "data" / "manifest.json").read_text())
    assert manifest["model"] == {"uri": f"hf://{MODEL}", "repo": MODEL, "revision": "main", "sha": model_sha,
                                 "mirror": mirror}
    assert {k: manifest["dataset"][k] for k in ("uri", "repo", "revision", "sha", "split")} == {
        "uri": "hf://datasets/acme/alpaca", "repo": "acme/alpaca", "revision": "main", "sha": data_sha,
        "split": "train"}
    assert manifest["stats"]["records"] == 60
    assert not list((tmp_path / "hf-home").rglob("*.parquet"))  # streamed, not downloaded into a cache

    hub.reset_counts()
    second = dataprep(job, env)
    assert second.returncode == 0, second.stderr
    assert "already prepared from these inputs" in second.stdout
    assert hub.file_downloads(MODEL) == []  # the committed mirror is never downloaded again
    assert [r for r in hub.requests if MODEL in r[1]] == [("GET", f"/api/models/{MODEL}/revision/main")]

    # Every rank plans from storage alone: no Hub behind HF_ENDPOINT any more.
    from pipelora.config import load_spec
    from pipelora.trainer.plan import plan
    from pipelora.trainer.ranks import RankInfo

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    hub.reset_counts()
    planned = plan(load_spec(job), RankInfo(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                                           master_port=29500))
    assert planned.reader.model_uri == mirror
    from safetensors.numpy import load_file

    source = load_file(str(source_model / "model-00002-of-00002.safetensors"))
    name = sorted(source)[0]
    assert (planned.reader.read([name])[name].numpy() == source[name]).all()
    assert hub.requests == []

    # A new commit of the dataset is new input: refused without --overwrite, prepared with it.
    new_sha = hub.repo("dataset", "acme/alpaca").commit({
        "README.md": b"# alpaca-format records\n",
        "data/train-00000-of-00001.parquet": parquet_bytes(json.loads(json.dumps(
            [{"instruction": "Say hi.", "input": "", "output": "hi"}] * 10))),
    })
    hub.reset_counts()
    refused = dataprep(job, env)
    assert refused.returncode != 0
    assert "already holds data prepared from other inputs" in refused.stderr
    assert "Traceback" not in refused.stderr
    redone = dataprep(job, env, "--overwrite")
    assert redone.returncode == 0, redone.stderr
    manifest = json.loads((store / "hubrun" / "data" / "manifest.json").read_text())
    assert (manifest["dataset"]["sha"], manifest["stats"]["records"]) == (new_sha, 10)
    assert manifest["model"]["sha"] == model_sha
    assert hub.file_downloads(MODEL) == []


def test_the_model_commit_is_part_of_the_fingerprint(make_spec: Any, tmp_path: Path) -> None:
    from pipelora.dataprep.pipeline import fingerprint

    spec = make_spec(tmp_path / "data.jsonl")
    by_path = fingerprint(spec, dataset_id="d" * 64, tokenizer_digest="t")
    first = fingerprint(spec, dataset_id="d" * 64, tokenizer_digest="t", model_sha="a" * 40)
    again = fingerprint(spec, dataset_id="d" * 64, tokenizer_digest="t", model_sha="a" * 40)
    other = fingerprint(spec, dataset_id="d" * 64, tokenizer_digest="t", model_sha="b" * 40)
    assert first == again and len({by_path, first, other}) == 3


@pytest.mark.parametrize(("uri", "local_name", "chosen"), [
    ("hf://datasets/acme/alpaca", "train.parquet", slice(0, 60)),
    ("hf://datasets/acme/alpaca#test", "test.parquet", slice(60, 80)),
    ("hf://datasets/acme/alpaca-json@main", "alpaca_data.json", slice(0, 80)),
])
def test_a_streamed_dataset_gives_the_shards_the_same_records_give_from_a_file(
        hub: FakeHub, tmp_path: Path, source_model: Path, records: list[dict[str, Any]], uri: str, local_name: str,
        chosen: slice) -> None:
    from pipelora.config import load_spec
    from pipelora.dataprep.pipeline import run_dataprep

    local = tmp_path / local_name
    rows = records[chosen]
    local.write_bytes(parquet_bytes(rows) if local_name.endswith(".parquet") else json.dumps(rows).encode())
    from_file = run_dataprep(load_spec(write_job(tmp_path, model=str(source_model), dataset=str(local),
                                                 storage=tmp_path / "file-store")), workers=0).manifest

    job = write_job(tmp_path, model=str(source_model), dataset=uri, storage=tmp_path / "hub-store")
    proc = dataprep(job, hub_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    from_hub = json.loads((tmp_path / "hub-store" / "hubrun" / "data" / "manifest.json").read_text())

    assert from_hub["stats"]["records"] == len(rows)
    assert from_hub["files"] == from_file["files"]  # the same shard bytes (sizes and sha256)
    assert from_hub["splits"] == from_file["splits"]
    assert from_hub["tokenizer"] == from_file["tokenizer"]
    assert from_hub["fingerprint"] != from_file["fingerprint"]  # the inputs are named differently
    repo = uri.split("datasets/", 1)[1].split("@")[0].split("#")[0]
    assert from_hub["dataset"]["sha"] == hub.repo("dataset", repo).refs["main"]


@pytest.mark.parametrize(("case", "says"), [
    ("bad-token", "error: dataset.uri hf://datasets/acme/alpaca: the Hugging Face Hub refused the token in HF_TOKEN "
                  "(401: invalid credentials)"),
    ("gated-dataset", "error: dataset.uri hf://datasets/acme/gated-set: acme/gated-set is gated on the Hugging Face "
                      "Hub and the account of the token in HF_TOKEN has not been granted access; accept its terms at"),
    ("missing-split", "error: dataset.uri hf://datasets/acme/alpaca#validation: the dataset has no split "
                      "'validation'"),
    ("gated-model", "error: model.uri hf://acme/gated-model: acme/gated-model is gated on the Hugging Face Hub"),
    ("no-network", "error: dataset.uri hf://datasets/acme/alpaca: cannot reach the Hugging Face Hub at "
                   "http://127.0.0.1:"),
])
def test_hub_failures_end_dataprep_with_one_sentence_and_nothing_committed(
        hub: FakeHub, tmp_path: Path, source_model: Path, case: str, says: str) -> None:
    store = tmp_path / "store"
    model, dataset, extra = str(source_model), "hf://datasets/acme/alpaca", {}
    if case == "bad-token":
        extra = {"HF_TOKEN": "hf_revoked"}
    elif case == "gated-dataset":
        dataset, extra = "hf://datasets/acme/gated-set", {"HF_TOKEN": UNGRANTED}
    elif case == "missing-split":
        dataset = "hf://datasets/acme/alpaca#validation"
    elif case == "gated-model":
        hub.add_repo("model", "acme/gated-model", {p.name: p.read_bytes() for p in source_model.iterdir()},
                     gated=True)
        model = "hf://acme/gated-model"
    elif case == "no-network":
        extra = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    proc = dataprep(write_job(tmp_path, model=model, dataset=dataset, storage=store), hub_env(hub, tmp_path, **extra))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(says), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (store / "hubrun" / "data" / "manifest.json").exists()
    assert not list(store.rglob(HUB_MARKER))
