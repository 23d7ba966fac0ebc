"""`pipelora-k8s export`: the adapter of any committed step, and base + adapter merged into a
Hugging Face folder that transformers loads and that computes what PEFT computes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from pipelora.config import JobSpec, spec_from_dict
from pipelora.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunLayout
from pipelora.storage import LocalStorage, ObjectInfo, open_storage
from pipelora.trainer import checkpoint as ckpt
from pipelora.trainer import export as exporter
from pipelora.trainer.adapter import adapter_config, write_adapter
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.init_model import write_random_model
from pipelora.trainer.layers import LoraSettings, lora_state
from pipelora.trainer.local import build_local_model
from pipelora.trainer.lora import resolve_targets

TARGETS = resolve_targets("all-linear")
R, ALPHA = 4, 8.0
STEP = 4
TOLERANCE = 1e-5  # relative to the largest logit
SHARD_BYTES = 3 * 1024 * 1024


def _lora_tensors(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """LoRA weights of the model's every adapted layer, all non-zero (B included)."""
    model = build_local_model(open_storage(str(model_dir)), str(model_dir),
                              lora=LoraSettings(tuple(TARGETS), R, ALPHA, 0.0, 0))
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=gen) * 0.05 for name, p in lora_state(model).items()}


def _spec_dict(storage_uri: str, model_uri: str, **storage: Any) -> dict[str, Any]:
    return {
        "name": "exported", "storage": {"uri": storage_uri, **storage}, "model": {"uri": model_uri},
        "dataset": {"uri": "x.jsonl"}, "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": "all-linear"},
    }


def _spec(storage_uri: str, model_uri: str, **storage: Any) -> JobSpec:
    return spec_from_dict(_spec_dict(storage_uri, model_uri, **storage))


def _write_run(spec: JobSpec, final: dict[str, torch.Tensor], at_step: dict[str, torch.Tensor]) -> None:
    """What training leaves: the final adapter, and a committed checkpoint whose LoRA weights are
    split over two stage files as two stages write them."""
    storage = open_storage(spec.storage.uri, endpoint_url=spec.storage.endpoint_url)
    layout = spec.layout
    config = adapter_config(base_model=spec.model.uri, r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS)
    write_adapter(storage, layout.adapter, tensors=final, config=config)
    names = sorted(at_step)
    half = [n for n in names if ".layers.0." in n or ".layers.1." in n]
    parts = {ckpt.lora_name(0): {n: at_step[n] for n in half},
             ckpt.lora_name(1): {n: at_step[n] for n in names if n not in half}}
    objects = ckpt.upload(storage, layout, STEP, {k: save_safetensors(v) for k, v in parts.items()})
    meta = ckpt.new_meta(step=STEP, stages=2, data_parallel=1, bounds=(0, 3, 6), data_position={}, losses=[],
                         eval_losses=[])
    ckpt.commit(storage, layout, objects, meta)


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, Path]:
    """A run over a sharded tiny model (Mistral: untied head; Qwen2: tied head and q/k/v biases)."""
    tmp = tmp_path_factory.mktemp(f"export-{request.param}")
    model = write_random_model(tmp / "model", family=request.param, preset="tiny", seed=2,
                               max_shard_bytes=SHARD_BYTES)
    spec = _spec(str(tmp / "runs"), str(model))
    _write_run(spec, _lora_tensors(model, 1), _lora_tensors(model, 2))
    return spec, model


def _logits(folder: str | Path, ids: torch.Tensor, adapter: str | Path | None = None, *, merge: bool = False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


IDS = torch.randint(0, 32000, (2, 33), generator=torch.Generator().manual_seed(9))


def test_merged_model_loads_in_transformers_and_computes_what_peft_computes(run) -> None:
    spec, model = run
    result = exporter.export_merged(spec)
    out = Path(result.out)
    assert result.out == f"{spec.layout.run_uri}/export/merged"
    merged = _logits(out, IDS)
    assert _relative_error(merged, _logits(model, IDS, spec.layout.adapter)) <= TOLERANCE
    assert _relative_error(merged, _logits(model, IDS, spec.layout.adapter, merge=True)) <= TOLERANCE
    assert _relative_error(merged, _logits(model, IDS)) > 1e-3  # the adapter is in there

    # sharded as the base is, every shard in the index, dtypes and unadapted tensors unchanged
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shards and len(shards) >= 2
    base_index = model / "model.safetensors.index.json"
    assert len(shards) == len(set(json.loads(base_index.read_text())["weight_map"].values()))
    assert set(index["weight_map"]) == set(json.loads(base_index.read_text())["weight_map"])
    base = _all(model)
    ours = _all(out)
    assert ours.keys() == base.keys()
    assert all(ours[k].dtype == base[k].dtype and ours[k].shape == base[k].shape for k in base)
    assert torch.equal(ours["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    # config and tokenizer copied as they are
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (model / name).read_bytes(), name

    # committed: the marker names every file with its size and sha256, and they verify
    storage = LocalStorage()
    marker = storage.verify_committed(result.marker)
    written = {p.name for p in out.iterdir()} - {Path(result.marker).name}
    assert set(marker["files"]) == written
    assert marker["kind"] == "merged" and marker["merged_tensors"] == len(
        [n for n in base if n.endswith("_proj.weight")])


def _all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in folder.glob("*.safetensors"):
        out.update(load_file(str(path)))
    return out


class Recording(LocalStorage):
    """Local storage that records the order of base-shard reads and output uploads."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        if start > 8:  # tensor bytes; headers (offsets 0 and 8, a few kB) are read up front to check the adapter
            self.events.append(("read", uri.rsplit("/", 1)[-1]))
        return super().read_range(uri, start, length)

    def upload_file(self, path: str | Path, uri: str) -> ObjectInfo:
        self.events.append(("upload", uri.rsplit("/", 1)[-1]))
        return super().upload_file(path, uri)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_merge_holds_one_weight_at_a_time_and_goes_shard_by_shard(dtype: torch.dtype, tmp_path: Path) -> None:
    # a small vocabulary, so that the embedding and head do not fill shards of their own
    model = write_random_model(tmp_path / "model", family="mistral", preset="tiny", seed=2, dtype=dtype,
                               max_shard_bytes=600_000 // (2 if dtype == torch.bfloat16 else 1),
                               overrides={"vocab_size": 1000})
    lora = _lora_tensors(model, 3)
    config = adapter_config(base_model=str(model), r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS)
    adapter = exporter.Adapter(lora, config, "test", None)
    storage = Recording()
    holdings = exporter.Holdings()
    result = exporter.merge_into(storage, str(model), adapter, storage, str(tmp_path / "merged"), holdings=holdings)

    base_files = sorted(p.name for p in model.glob("model-*.safetensors"))
    sizes = {p.name: p.stat().st_size for p in model.glob("model-*.safetensors")}
    counts = {}
    for name in base_files:
        with safe_open(str(model / name), "pt") as fh:
            counts[name] = len(list(fh.keys()))
    assert len(base_files) >= 3 and max(counts.values()) > 3
    # at most one base weight, its delta and the merged weight at once; a shard's worth never
    assert holdings.peak_tensors <= 3 < max(counts.values())
    assert holdings.peak_bytes <= max(sizes.values())
    adapter_bytes = sum(t.numel() * 4 for t in lora.values())
    assert holdings.peak_bytes < 2 * max(sizes.values()) + adapter_bytes
    assert holdings.tensors == 0 and holdings.bytes == 0  # everything was freed
    # shard i is read, written and uploaded before shard i+1 is read
    order = [(kind, name) for kind, name in storage.events if name.startswith("model-")]
    phases: list[str] = []
    for kind, name in order:
        label = f"{kind}:{name.split('-')[1]}"
        if not phases or phases[-1] != label:
            phases.append(label)
    expected = [f"{kind}:{i + 1:05d}" for i in range(len(base_files)) for kind in ("read", "upload")]
    assert phases == expected
    assert result.shards == len(base_files)

    merged = _all(tmp_path / "merged")
    base = _all(model)
    name = "model.layers.2.mlp.down_proj.weight"
    a = lora[f"base_model.model.{name[:-len('.weight')]}.lora_A.weight"]
    b = lora[f"base_model.model.{name[:-len('.weight')]}.lora_B.weight"]
    assert merged[name].dtype == dtype
    assert torch.equal(merged[name], (base[name].float() + b @ a * (ALPHA / R)).to(dtype))


def test_a_checkpoint_step_exports_as_an_adapter_and_merged(run) -> None:
    spec, model = run
    layout = spec.layout
    adapter = exporter.export_adapter(spec, step=STEP)
    assert adapter.out == f"{layout.run_uri}/export/adapter-step-{STEP:08d}"
    merged = exporter.export_merged(spec, step=STEP)
    assert merged.out == f"{layout.run_uri}/export/merged-step-{STEP:08d}"
    LocalStorage().verify_committed(adapter.marker)
    assert sorted(adapter.files) == sorted([ADAPTER_WEIGHTS, ADAPTER_CONFIG])
    got = _logits(merged.out, IDS)
    assert _relative_error(got, _logits(model, IDS, adapter.out)) <= TOLERANCE
    # the step's weights, not the final adapter's
    assert _relative_error(got, _logits(model, IDS, layout.adapter)) > 1e-3
    final = exporter.export_adapter(spec, overwrite=True)
    assert final.out == f"{layout.run_uri}/export/adapter"
    assert load_file(f"{final.out}/{ADAPTER_WEIGHTS}").keys() == load_file(layout.adapter_weights).keys()
    config = json.loads(Path(adapter.out, ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (R, ALPHA, sorted(TARGETS))


def test_refusals_are_one_sentence_each(run, tmp_path: Path) -> None:
    spec, model = run
    with pytest.raises(TrainerError, match=rf"no committed checkpoint at step 7 .*committed steps: {STEP}\)"):
        exporter.export_adapter(spec, step=7)
    out = str(tmp_path / "mine")
    exporter.export_adapter(spec, out=out)
    with pytest.raises(TrainerError, match="already holds a committed export; pass --overwrite"):
        exporter.export_adapter(spec, out=out)
    exporter.export_adapter(spec, out=out, overwrite=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(TrainerError, match="is not empty; pass --overwrite"):
        exporter.export_merged(spec, out=str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep"
    fresh = _spec(str(tmp_path / "runs"), str(model))
    with pytest.raises(TrainerError, match="no final adapter at .*: the run has not finished; train the run first"):
        exporter.export_merged(fresh)


def test_leftovers_of_an_interrupted_export_are_cleared_from_the_run_folder(run) -> None:
    spec, _ = run
    out = Path(exporter.default_out(spec, merge=True, step=None)).with_name("merged-step-00000099")
    out.mkdir(parents=True, exist_ok=True)
    # an interrupted merge of the final adapter into its own default folder
    target = Path(exporter.default_out(spec, merge=True, step=None))
    LocalStorage().delete_prefix(str(target))
    target.mkdir(parents=True)
    (target / "model-00001-of-00009.safetensors").write_bytes(b"partial")
    result = exporter.export_merged(spec)
    assert not (target / "model-00001-of-00009.safetensors").exists()
    LocalStorage().verify_committed(result.marker)


def test_export_command_is_registered_and_commits(run, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipelora.workflow.cli import cli

    spec, _ = run
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(_spec_dict(spec.storage.uri, spec.model.uri)), encoding="utf-8")
    out = tmp_path / "cli-merged"
    result = CliRunner().invoke(cli, ["export", "--config", str(config), "--merge", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"to {out} (committed: " in result.output
    LocalStorage().verify_committed(result.output.split("committed: ")[1].rstrip(")\n"))
    result = CliRunner().invoke(cli, ["export", "--config", str(config), "--step", "3"])
    assert result.exit_code != 0 and "no committed checkpoint at step 3" in str(result.exception or result.output)


def test_merged_export_between_s3_folders(s3_endpoint: str, tmp_path: Path) -> None:
    """Base model and run on S3 (ranged reads, multipart uploads), the merged model back on S3."""
    import boto3

    model = write_random_model(tmp_path / "model", family="llama3", preset="tiny", seed=4, max_shard_bytes=SHARD_BYTES)
    bucket = f"export-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for path in model.iterdir():
        client.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    spec = _spec(f"s3://{bucket}/runs", f"s3://{bucket}/models/tiny", endpoint_url=s3_endpoint)
    _write_run(spec, _lora_tensors(model, 5), _lora_tensors(model, 6))
    result = exporter.export_merged(spec)
    storage = open_storage(result.out, endpoint_url=s3_endpoint)
    marker = storage.verify_committed(result.marker)
    local = tmp_path / "downloaded"
    for name in marker["files"]:
        storage.download_file(f"{result.out}/{name}", local / name)
    adapter = tmp_path / "adapter"
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        storage.download_file(f"{RunLayout(spec.layout.run_uri).adapter}/{name}", adapter / name)
    assert _relative_error(_logits(local, IDS), _logits(model, IDS, adapter)) <= TOLERANCE


@pytest.mark.slow
def test_a_trained_run_exports_merged_through_the_command(s3_world, tmp_path: Path) -> None:
    """Train 2 stages under mpirun on S3, then `pipelora-k8s export --merge` for the final adapter
    and for a checkpoint step: transformers loads each merged model and matches PEFT."""
    import subprocess
    import sys

    cli = str(Path(sys.executable).parent / "pipelora-k8s")

    spec = s3_world.spec("export-trained")
    config = s3_world.write_spec(spec)
    done = s3_world.train(2, config)
    assert done.returncode == 0, done.stderr[-3000:]
    run_uri = f"s3://{s3_world.bucket}/runs/export-trained"
    storage = open_storage(run_uri, endpoint_url=s3_world.endpoint)

    def fetch(uri: str, dest: Path, names: list[str]) -> Path:
        for name in names:
            storage.download_file(f"{uri}/{name}", dest / name)
        return dest

    adapter = fetch(f"{run_uri}/adapter", tmp_path / "adapter", [ADAPTER_WEIGHTS, ADAPTER_CONFIG])
    ids = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(4))
    for step in (None, 6):
        args = [cli, "export", "--config", str(config), "--merge"] + ([] if step is None else ["--step", str(step)])
        out = subprocess.run(args, env=s3_world.env(), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        uri = f"{run_uri}/export/merged" + ("" if step is None else f"-step-{step:08d}")
        marker = storage.verify_committed(f"{uri}/{exporter.EXPORT_MARKER}")
        merged = fetch(uri, tmp_path / f"merged-{step}", sorted(marker["files"]))
        # the final adapter is the step-6 state: both merges equal PEFT with the final adapter
        got = _logits(merged, ids)
        assert _relative_error(got, _logits(s3_world.model_dir, ids, adapter)) <= TOLERANCE
        assert _relative_error(got, _logits(s3_world.model_dir, ids)) > 1e-3
