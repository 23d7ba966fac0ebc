"""`pipelora-k8s plan` and the memory model behind it: exact numbers on a hand-sized model, the
activations autograd really keeps, and the refusal of a job that does not fit with a fix that does."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipelora.config import spec_from_dict
from pipelora.trainer.memory import (
    GIB,
    ModelShape,
    RunShape,
    estimate_stages,
    item_costs,
    model_flops_per_token,
    plan_job,
    plan_problems,
)

# A model small enough to count by hand: hidden 16, 4 heads of 4 over 2 KV heads, MLP 32, vocab 64.
HAND: dict[str, Any] = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
                        "tie_word_embeddings": False, "max_position_embeddings": 64}
# seq_len 16 x micro-batch 2 = 32 tokens, fp32 on CPU, LoRA r=2 on all seven linear layers, no dropout.
RUN = RunShape(seq_len=16, micro_batch_size=2, micro_batches=4, stages=2, nodes=1, gpus_per_node=2, dtype_bytes=4,
               lora_r=2, device="cpu")

LAYER_PARAMS = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16 + 3 * 16 * 32 + 2 * 16  # q k v o, gate up down, 2 norms = 2336
LAYER_LORA = 2 * ((16 + 16) + 2 * (16 + 8) + (16 + 16) + 3 * (16 + 32))  # r x (in + out) per target = 512
# Bytes per token a layer keeps: 2 norms (fp32 input + rsqrt) 2*(64+4); cos, sin 2*4*4; mask 16*4;
# q, k, v (repeated to 4 heads), output 4*4*4*4 + log-sum-exp 4*4; gate, silu, up 3*32*4;
# LoRA inputs q/k/v 16*4, gate/up 16*4, down 32*4; LoRA middles 7*2*4.
LAYER_ACT_PER_TOKEN = 136 + 32 + 64 + 256 + 16 + 384 + 256 + 56  # = 1200
HEAD_ACT_PER_TOKEN = 64 * 4 + 64 * 4 + 4 * 16 + 4 + 8  # logits, fp32 log-softmax, norm input, rsqrt, label


def test_items_of_a_hand_sized_model_have_exact_parameters_bytes_and_flops() -> None:
    model = ModelShape.from_config(HAND)
    assert (model.head_dim, model.kv_heads, model.layer_params()) == (4, 2, LAYER_PARAMS)
    items = item_costs(model, RUN)
    assert [i.name for i in items] == ["embed", "layer 0", "layer 1", "layer 2", "layer 3", "norm+head"]
    embed, layer, head = items[0], items[1], items[-1]
    assert (embed.params, layer.params, head.params) == (64 * 16, 2336, 64 * 16 + 16)
    assert sum(i.params for i in items) == 11408
    assert (embed.weight_bytes, layer.weight_bytes, head.weight_bytes) == (4096, 9344, 4160)
    assert (layer.lora_params, embed.lora_params, head.lora_params) == (LAYER_LORA, 0, 0) == (512, 0, 0)
    assert layer.act_bytes == LAYER_ACT_PER_TOKEN * 32 == 38400
    assert layer.act_ckpt_bytes == 16 * 4 * 32  # the layer's input only
    assert head.act_bytes == HEAD_ACT_PER_TOKEN * 32 == 18816
    assert (layer.work_bytes, layer.work_ckpt_bytes, head.work_bytes) == (38400, 76800, 8 * 64 * 32)
    # executed: frozen 2 x 2304 forward + 2 x 2304 input grads; LoRA 2 x 512 + 4 x 512; attention 4*4*4*16 x 3
    assert layer.flops == 4 * 2304 + 6 * 512 + 3 * 64 * 16 == 15360
    assert head.flops == 4 * 16 * 64 + 10 * 64
    assert model_flops_per_token(model, RUN) == 4 * 15360 + 4 * 16 * 64


def test_stage_estimates_count_in_flight_micro_batches_and_buffers() -> None:
    model = ModelShape.from_config(HAND)
    plan = plan_job(model, RUN)
    assert plan.bounds == (0, 3, 6)  # embed + 2 layers | 2 layers + head: the fastest cut
    one, two = plan.stages
    assert (one.in_flight, two.in_flight) == (2, 1)
    assert (one.params, two.params) == (1024 + 2 * 2336, 2 * 2336 + 1040)
    assert (one.weight_bytes, two.weight_bytes) == (22784, 22848)
    assert (one.lora_bytes, one.optimizer_bytes) == (8 * 1024, 8 * 1024)  # params + grads; AdamW's two moments
    assert (one.act_bytes, two.act_bytes) == (2 * 38400, 2 * 38400 + 18816)
    boundary = 32 * (16 * 4 + 8)  # hidden state + int64 position_ids
    assert one.buffer_bytes == 2 * 32 * 16 + 2 * boundary + 32 * 16 * 4  # ids x 2 buffers, outputs, grad buffer
    assert two.buffer_bytes == 2 * boundary + boundary  # inputs x 2 buffers, the receive buffer
    assert one.peak_bytes == 22784 + 16 * 1024 + 2 * 76800 + one.buffer_bytes + 38400 == 238848
    assert two.peak_bytes == 22848 + 16 * 1024 + 95616 + two.buffer_bytes + 38400 == 180160
    assert plan.bubble == pytest.approx(1 / 5)
    assert plan.traffic.between_stages == 4 * 32 * (2 * 16 * 4 + 8)  # 4 micro-batches, activations + gradients
    assert plan.traffic.across_nodes == 0
    spread = plan_job(model, RunShape(**{**RUN.__dict__, "nodes": 2, "gpus_per_node": 1}))
    assert spread.traffic.across_nodes == spread.traffic.between_stages


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_first_stage_holds_as_many_micro_batches_as_stages(stages: int) -> None:
    model = ModelShape.from_config(HAND)
    run = RunShape(**{**RUN.__dict__, "stages": stages, "gpus_per_node": stages, "micro_batches": 8})
    assert [s.in_flight for s in plan_job(model, run).stages] == list(range(stages, 0, -1))


class _RandomReader:
    """Stands in for a checkpoint: random tensors of the shapes a layer asks for."""

    def __init__(self, config: Any) -> None:
        from pipelora.trainer.compat import family_classes

        layer_cls, _, _ = family_classes(config)
        with torch.device("meta"):
            layer = layer_cls(config, 0)
        self.shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
        self.shapes.update({"lm_head.weight": (config.vocab_size, config.hidden_size),
                            "model.norm.weight": (config.hidden_size,)})

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return {n: 0.3 * torch.randn(self.shapes[n.split(".", 3)[3] if n.startswith("model.layers.") else n],
                                     generator=gen) for n in names}

    def has(self, name: str) -> bool:
        return True


def _saved_bytes(run: Any, exclude: set[int]) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


@pytest.mark.parametrize(("dtype", "dropout", "kv_heads"), [
    (torch.float32, 0.0, 2), (torch.bfloat16, 0.0, 2), (torch.float32, 0.1, 2), (torch.bfloat16, 0.1, 2),
    (torch.float32, 0.0, 1), (torch.float32, 0.0, 4),
])
def test_predicted_layer_activations_are_what_autograd_keeps(dtype: torch.dtype, dropout: float, kv_heads: int) -> None:
    from transformers import AutoConfig

    from pipelora.trainer.compat import set_attention_implementation
    from pipelora.trainer.layers import DecoderPipe, LoraSettings
    from pipelora.trainer.lora import resolve_targets

    shape = {**HAND, "num_key_value_heads": kv_heads}
    config = AutoConfig.for_model("llama", **{k: v for k, v in shape.items() if k != "model_type"})
    set_attention_implementation(config, "sdpa")
    lora = LoraSettings(tuple(resolve_targets("all-linear")), 2, 4.0, dropout, 0)
    pos = torch.cat([torch.arange(10), torch.arange(6)]).repeat(2, 1)  # two packed sequences per row
    run = RunShape(**{**RUN.__dict__, "dtype_bytes": 2 if dtype == torch.bfloat16 else 4, "lora_dropout": dropout > 0})
    predicted = item_costs(ModelShape.from_config(shape), run)[1]
    for ckpt in (False, True):
        layer = DecoderPipe(config, 0, _RandomReader(config), dtype, torch.device("cpu"), lora, ckpt)  # type: ignore[arg-type]
        hidden = torch.randn(2, 16, 16, dtype=dtype, requires_grad=True)
        exclude = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
        saved = _saved_bytes(lambda: layer((hidden, pos)), exclude)  # noqa: B023
        if ckpt:  # the checkpoint keeps the input and the position_ids every layer of the stage shares
            assert saved == predicted.act_ckpt_bytes + pos.numel() * 8
        else:
            assert saved == predicted.act_bytes


def _tiny(family: str) -> Any:
    from pipelora.trainer.compat import attention_implementation, set_attention_implementation
    from pipelora.trainer.presets import preset_config

    config = preset_config(family, "tiny")  # type: ignore[arg-type]
    set_attention_implementation(config, attention_implementation(config))  # eager where logits are capped
    return config


class _FamilyReader(_RandomReader):
    def __init__(self, config: Any) -> None:
        from pipelora.families import family_of

        super().__init__(config)
        self.layers = family_of(config).layers

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        shape = {n: self.shapes[n[len(self.layers) + 1:].split(".", 1)[1]] if n.startswith(self.layers + ".")
                 else self.shapes.get(n, self.shapes["lm_head.weight"]) for n in names}
        return {n: 0.1 * torch.randn(shape[n], generator=gen) for n in names}


FAMILIES = ["mistral", "llama", "llama3", "qwen2", "qwen3", "gemma2", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("dtype", "dropout", "targets"), [
    (torch.float32, 0.0, "all-linear"), (torch.bfloat16, 0.1, "all-linear"),
    (torch.float32, 0.0, ("q_proj", "v_proj", "down_proj")), (torch.bfloat16, 0.0, ("q_proj", "v_proj", "down_proj")),
])
def test_every_family_layer_has_the_parameters_and_keeps_the_activations_predicted(
        family: str, dtype: torch.dtype, dropout: float, targets: Any) -> None:
    from pipelora.trainer.compat import family_classes
    from pipelora.trainer.layers import DecoderPipe, LoraSettings
    from pipelora.trainer.lora import resolve_targets

    config = _tiny(family)
    with torch.device("meta"):
        meta = family_classes(config)[0](config, 0)
    model = ModelShape.from_config(config)
    assert model.layer_params() == sum(p.numel() for p in meta.parameters())
    names = tuple(resolve_targets("all-linear")) if targets == "all-linear" else targets
    lora = LoraSettings(names, 4, 8.0, dropout, 0)
    layer = DecoderPipe(config, 0, _FamilyReader(config), dtype, torch.device("cpu"), lora)  # type: ignore[arg-type]
    hidden = torch.randn(2, 32, config.hidden_size, dtype=dtype, requires_grad=True)
    pos = torch.cat([torch.arange(20), torch.arange(12)]).repeat(2, 1)
    exclude = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    run = RunShape(seq_len=32, micro_batch_size=2, dtype_bytes=2 if dtype == torch.bfloat16 else 4, lora_r=4,
                   lora_targets=targets, lora_dropout=dropout > 0, device="cpu")
    assert _saved_bytes(lambda: layer((hidden, pos)), exclude) == item_costs(model, run)[1].act_bytes


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_the_head_keeps_its_logits_and_log_softmax_as_predicted(family: str) -> None:
    from pipelora.trainer.layers import HeadPipe, causal_lm_loss

    config = _tiny(family)
    head = HeadPipe(config, _FamilyReader(config), torch.float32, torch.device("cpu"))  # type: ignore[arg-type]
    hidden = torch.randn(2, 32, config.hidden_size, requires_grad=True)
    exclude = {p.untyped_storage().data_ptr() for p in head.parameters()}
    held: list[torch.Tensor] = []

    def forward() -> None:
        held.append(head((hidden, None)))  # DeepSpeed holds the last stage's output until its backward
        causal_lm_loss(held[0], torch.randint(0, config.vocab_size, (2, 32)))

    saved = _saved_bytes(forward, exclude) + held[0].untyped_storage().nbytes()
    predicted = item_costs(ModelShape.from_config(config), RunShape(seq_len=32, micro_batch_size=2, dtype_bytes=4,
                                                                   device="cpu"))[-1].act_bytes
    assert saved <= predicted <= saved * 32 / 31 + 1024  # the loss reads 31 of each row's 32 positions


def _write_job(tmp_path: Path, config: dict[str, Any], **parallel: Any) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(config))
    spec = {"name": "plan-test", "storage": {"uri": str(tmp_path / "runs")}, "model": {"uri": str(model)},
            "dataset": {"uri": str(tmp_path / "data.jsonl"), "seq_len": 4096},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "parallel": {"stages": 8, "nodes": 2, "gpus_per_node": 4, "micro_batch_size": 1, "micro_batches": 16,
                         **parallel},
            "training": {"activation_checkpointing": False, "dtype": "bf16"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _seven_b() -> dict[str, Any]:
    from pipelora.trainer.presets import preset_config

    return dict(preset_config("mistral", "7b").to_dict())


def _plan(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from pipelora.workflow.cli import main

    with pytest.raises(SystemExit) as done:
        main(["plan", *argv])
    out = capsys.readouterr()
    return int(done.value.code or 0), out.out, out.err


def test_plan_prints_every_stage_and_a_job_that_fits_exits_zero(tmp_path: Path, capsys) -> None:
    job = _write_job(tmp_path, _seven_b())
    code, out, err = _plan(["--config", str(job), "--gpu-memory-gib", "80", "--gpu-tflops", "989",
                            "--set", "training.activation_checkpointing=true"], capsys)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line[:5].strip().isdigit()]
    assert len(rows) == 8 and "embed" in rows[0] and "norm+head" in rows[-1]
    assert [int(r.split()[-5]) for r in rows] == list(range(8, 0, -1))  # micro-batches in flight, stage by stage
    assert "bubble: (p-1)/(m+p-1) = 7/23 = 30.4%" in out
    assert "tokens/s" in out and "MFU" in out and "across nodes" in out
    assert "fits: every stage's predicted peak is within 80 GiB" in out


def test_an_infeasible_job_is_refused_with_fixes_the_planner_accepts(tmp_path: Path, capsys) -> None:
    job = _write_job(tmp_path, _seven_b())
    code, out, err = _plan(["--config", str(job), "--gpu-memory-gib", "24"], capsys)
    assert code != 0
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: stage ") and " GiB of 24 GiB" in message
    stage = int(message.split()[2])
    assert f"{stage:>5}  " in out and "*" in out  # the table marks the stage that does not fit
    fixes = message.split(": use ", 1)[1].split(", or ")
    assert any(f.startswith("--stages ") for f in fixes)
    assert "--set training.activation_checkpointing=true" in fixes
    assert any(f.startswith("--set dataset.seq_len=") for f in fixes)
    for fix in fixes:
        code, out, err = _plan(["--config", str(job), "--gpu-memory-gib", "24", *shlex.split(fix)], capsys)
        assert code == 0, f"{fix}: {err}"
        assert "fits: every stage's predicted peak is within 24 GiB" in out


def test_validate_and_submit_can_ask_the_same_question_without_torch(tmp_path: Path) -> None:
    spec = spec_from_dict(yaml.safe_load(_write_job(tmp_path, _seven_b()).read_text()))
    problems = plan_problems(spec, _seven_b(), gpu_memory_gib=24)
    assert len(problems) == 1 and problems[0].startswith("stage ") and "training.activation_checkpointing=true" in problems[0]
    assert plan_problems(spec, _seven_b(), gpu_memory_gib=141) == []


def test_plan_reads_the_config_from_storage_or_says_where_to_point_it(tmp_path: Path, capsys) -> None:
    job = _write_job(tmp_path, HAND, stages=2, nodes=1, gpus_per_node=2)
    code, out, _ = _plan(["--config", str(job), "--json", "--set", "dataset.seq_len=16", "--device", "cpu"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["bounds"] == [0, 3, 6] and data["model"]["layers"] == 4
    assert [s["in_flight"] for s in data["stages"]] == [2, 1]
    (tmp_path / "model" / "config.json").unlink()
    code, _, err = _plan(["--config", str(job)], capsys)
    assert code != 0 and "--model-config" in err


def test_more_stages_than_layers_is_one_sentence() -> None:
    from pipelora.trainer.errors import TrainerError

    with pytest.raises(TrainerError, match="has 4 decoder layers; use at most 4 stages"):
        plan_job(ModelShape.from_config(HAND), RunShape(**{**RUN.__dict__, "stages": 5}))


def test_estimates_add_up_for_any_cut() -> None:
    model = ModelShape.from_config(HAND)
    stages = estimate_stages(model, RUN, (0, 2, 6))
    assert sum(s.params for s in stages) == 11408
    assert sum(s.flops_per_token for s in stages) == sum(i.flops for i in item_costs(model, RUN))
    assert all(s.peak_bytes < GIB for s in stages)


@pytest.mark.parametrize("family", ["mistral", "llama3"])  # an untied head, and a head tied to the embedding
@pytest.mark.parametrize("stages", [2, 4])
def test_predicted_weight_bytes_per_stage_are_the_bytes_each_stage_reads(family: str, stages: int,
                                                                         tmp_path: Path) -> None:
    from pipelora.storage import open_storage
    from pipelora.trainer.init_model import write_random_model
    from pipelora.trainer.layers import LoraSettings, build_layer
    from pipelora.trainer.lora import resolve_targets
    from pipelora.trainer.partition import balanced_partition
    from pipelora.trainer.weights import CheckpointReader, read_model_config

    folder = tmp_path / family
    write_random_model(folder, family=family, preset="tiny")
    storage = open_storage(str(folder))
    config = read_model_config(storage, str(folder))
    partition = balanced_partition(config, stages=stages, seq_len=64)
    run = RunShape(seq_len=64, stages=stages, dtype_bytes=4, device="cpu")
    predicted = [s.weight_bytes for s in estimate_stages(ModelShape.from_config(config), run, partition.bounds)]
    lora = LoraSettings(tuple(resolve_targets("all-linear")), 4, 8.0, 0.0, 0)
    read = []
    for stage in range(stages):
        reader = CheckpointReader(storage, str(folder))
        for item in partition.items(stage):
            build_layer(item, config=config, reader=reader, dtype=torch.float32, device=torch.device("cpu"), lora=lora)
        read.append(reader.tensor_bytes)
    assert read == predicted
    if family == "llama3":  # the tied head's stage reads the embedding too: more than the file holds
        assert sum(read) == sum(f.stat().st_size for f in folder.glob("*.safetensors")) - _headers(folder) + (
            config.vocab_size * config.hidden_size * 4)


def _headers(folder: Path) -> int:
    """Bytes of the safetensors headers (8-byte length + JSON) of a model folder."""
    return sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in folder.glob("*.safetensors"))
