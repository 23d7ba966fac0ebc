"""Every supported model family against plain transformers + PEFT, on tiny random models that
transformers itself writes (`save_pretrained`, sharded).

The pipeline is built as two stages would build it (each stage's items from its own reader, so
a tied head really reads the embedding on the last stage) and chained in one process, in fp32.
Its loss and every LoRA gradient on a packed row of two sequences must equal those of
`AutoModelForCausalLM` + `peft.get_peft_model` run on each sequence alone: that checks the
family's layers, its mask (a sliding window confined to each packed sequence), RoPE, embedding
scale, soft-capping and tied head at once.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelora import families
from pipelora.config import ConfigError, check_against_model, spec_from_dict
from pipelora.rows import IGNORE_INDEX
from pipelora.storage import LocalStorage, open_storage
from pipelora.trainer.adapter import adapter_config, write_adapter
from pipelora.trainer.attention import block_causal_mask
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.layers import (
    LocalModel,
    LoraSettings,
    build_layer,
    causal_lm_loss,
    lora_state,
)
from pipelora.trainer.lora import resolve_targets
from pipelora.trainer.partition import balanced_partition
from pipelora.trainer.presets import FAMILIES, preset_config
from pipelora.trainer.weights import CheckpointReader, read_model_config

TARGETS = tuple(resolve_targets("all-linear"))
LORA = LoraSettings(TARGETS, 4, 8.0, 0.0, 11)
LENGTHS = (37, 27)  # one packed row of 64 tokens: both sequences longer than the tiny Gemma window (16)
TOLERANCE = 1e-5  # relative to the largest value compared

# case → (init-model family, config overrides): every family, Llama 3 with a tied and an untied head.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral": ("mistral", {"sliding_window": 24}),
    "llama2": ("llama", {"tie_word_embeddings": False}),
    "llama3-tied": ("llama3", {}),
    "llama3-untied": ("llama3", {"tie_word_embeddings": False}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
}


def hf_written_model(folder: Path, family: str, overrides: dict[str, Any], *, seed: int = 0) -> Path:
    """A tiny model as transformers writes it: its own init, every parameter (norms, biases)
    nudged off its init value, saved in several shards."""
    from transformers import AutoModelForCausalLM

    config = preset_config(family, "tiny")  # type: ignore[arg-type]
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save_pretrained(str(folder), max_shard_size="4MB")
    return folder


@pytest.fixture(scope="module", params=list(CASES))
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    family, overrides = CASES[request.param]
    folder = hf_written_model(tmp_path_factory.mktemp("families") / request.param, family, overrides)
    return request.param, folder


def two_stage_model(folder: Path) -> LocalModel:
    """The items of a 2-stage cut, each stage built from its own reader, chained."""
    storage = open_storage(str(folder))
    config = read_model_config(storage, str(folder))
    partition = balanced_partition(config, stages=2, seq_len=sum(LENGTHS))
    items = []
    for stage in range(2):
        reader = CheckpointReader(storage, str(folder))
        items += [build_layer(i, config=config, reader=reader, dtype=torch.float32, device=torch.device("cpu"),
                              lora=LORA) for i in partition.items(stage)]
    return LocalModel(items)


def nonzero_lora(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """LoRA weights with B off zero (at PEFT's init B = 0, and every lora_A gradient would be zero)."""
    params = lora_state(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in params.items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return params


def peft_model(folder: Path, ours: dict[str, torch.nn.Parameter]) -> Any:
    """transformers + PEFT with the same LoRA weights as ours."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0,  # type: ignore[arg-type]
                                            target_modules=list(TARGETS)))
    theirs = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    assert theirs.keys() == ours.keys()
    with torch.no_grad():
        for name, param in theirs.items():
            param.copy_(ours[name])
    return model


def packed_row() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, position_ids and labels of one row holding two sequences (the first token of
    each and a short prompt unlabelled, as dataprep writes them)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 32000, (1, sum(LENGTHS)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    labels = ids.clone()
    start = 0
    for n in LENGTHS:
        labels[0, start : start + 5] = IGNORE_INDEX
        start += n
    return ids, pos, labels


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def test_loss_and_every_lora_gradient_equal_transformers_and_peft_sequence_by_sequence(family_model) -> None:
    case, folder = family_model
    ours_model = two_stage_model(folder).train()
    ours = nonzero_lora(ours_model)
    theirs_model = peft_model(folder, ours).train()
    ids, pos, labels = packed_row()

    loss = causal_lm_loss(ours_model(ids, pos), labels)
    loss.backward()

    # transformers' own loss on each sequence alone, weighted by its labelled tokens
    total, count = torch.zeros(()), 0
    start = 0
    for n in LENGTHS:
        seq_labels = labels[:, start : start + n]
        out = theirs_model(input_ids=ids[:, start : start + n], labels=seq_labels)
        tokens = int((seq_labels[:, 1:] != IGNORE_INDEX).sum())
        total = total + out.loss * tokens
        count += tokens
        start += n
    expected = total / count
    expected.backward()

    assert abs(float(loss) - float(expected)) <= TOLERANCE * abs(float(expected)), (case, float(loss), float(expected))
    theirs = {n.replace(".default", ""): p for n, p in theirs_model.named_parameters() if p.requires_grad}
    assert len(ours) == 2 * len(TARGETS) * read_model_config(open_storage(str(folder)), str(folder)).num_hidden_layers
    for name, param in ours.items():
        assert param.grad is not None and param.grad.abs().max() > 0, (case, name)
        err = relative_error(param.grad, theirs[name].grad)
        assert err <= TOLERANCE, (case, name, err)


def test_packed_row_equals_its_sequences_run_alone(family_model) -> None:
    case, folder = family_model
    model = two_stage_model(folder).eval()
    nonzero_lora(model)
    ids, pos, _ = packed_row()
    with torch.no_grad():
        together = model(ids, pos)
        start = 0
        for n in LENGTHS:
            alone = model(ids[:, start : start + n], torch.arange(n)[None])
            assert relative_error(together[:, start : start + n], alone) <= TOLERANCE, (case, start)
            start += n


def test_exported_adapter_loads_in_peft_and_reproduces_the_trainer_logits(family_model, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    case, folder = family_model
    model = two_stage_model(folder).eval()
    tensors = nonzero_lora(model)
    out = tmp_path / "adapter"
    config = adapter_config(base_model=str(folder), r=LORA.r, alpha=LORA.alpha, dropout=0.0, targets=list(TARGETS))
    write_adapter(LocalStorage(), str(out), tensors=dict(tensors), config=config)
    ids = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(5))
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
        ours = model(ids, torch.arange(40).repeat(2, 1))
    assert relative_error(ours, peft_logits) <= TOLERANCE, case
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter changes the model


def test_tied_heads_are_read_from_the_embedding_by_the_last_stage(tmp_path: Path) -> None:
    folder = hf_written_model(tmp_path / "tied", "qwen2", {})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # transformers does not write a tied head
    storage = open_storage(str(folder))
    config = read_model_config(storage, str(folder))
    reader = CheckpointReader(storage, str(folder))
    head = build_layer(config.num_hidden_layers + 1, config=config, reader=reader, dtype=torch.float32,
                       device=torch.device("cpu"), lora=LORA)
    embed = reader.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    assert torch.equal(head.lm_head.weight, embed)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_bf16_gemma_rounds_as_transformers_does(family: str, tmp_path: Path) -> None:
    """In bf16 the embedding scale is rounded to bf16 (sqrt(128) = 11.3137 becomes 11.3125) and the
    eager mask uses bf16's lowest value, exactly as transformers does (tiny shapes: bf16 is slow here)."""
    from transformers import AutoModelForCausalLM

    from pipelora.trainer.init_model import write_random_model
    from pipelora.trainer.local import build_local_model

    folder = write_random_model(tmp_path / family, family=family, preset="tiny", seed=1,  # type: ignore[arg-type]
                                dtype=torch.bfloat16)
    ours = build_local_model(open_storage(str(folder)), str(folder), lora=LORA, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()(input_ids=ids).logits
        got = ours(ids, torch.arange(24)[None])
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


# -- the family table ------------------------------------------------------------------------------------
def spec_for(model: Path) -> Any:
    return spec_from_dict({"name": "families", "storage": {"uri": str(model.parent)}, "model": {"uri": str(model)},
                           "dataset": {"uri": "x.jsonl"}})


def _config_only(tmp_path: Path, name: str, **fields: Any) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(fields))
    return folder


def test_an_unknown_model_type_is_refused_with_the_supported_list(tmp_path: Path) -> None:
    folder = _config_only(tmp_path, "gpt2", model_type="gpt2", hidden_size=64)
    with pytest.raises(ConfigError) as info:
        check_against_model(spec_for(folder))
    (message,) = info.value.messages
    assert message == (f"model.uri: {folder}/config.json has model_type 'gpt2', which the trainer does not support; "
                       "point model.uri at a mistral, llama, qwen2, qwen3, gemma2 or gemma3_text model")
    with pytest.raises(TrainerError, match="model_type 'gpt2'.*mistral, llama, qwen2, qwen3, gemma2 or gemma3_text"):
        read_model_config(open_storage(str(folder)), str(folder))


def test_gemma3_with_a_vision_tower_points_at_its_text_model(tmp_path: Path) -> None:
    folder = _config_only(tmp_path, "gemma3", model_type="gemma3")
    with pytest.raises(ConfigError, match=r"vision tower; its text-only form \(model_type gemma3_text"):
        check_against_model(spec_for(folder))


def test_a_bidirectional_gemma_is_refused(tmp_path: Path) -> None:
    folder = _config_only(tmp_path, "embedding-gemma", model_type="gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(ConfigError, match="use_bidirectional_attention: bidirectional attention"):
        check_against_model(spec_for(folder))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_family_passes_validate(family: str, tmp_path: Path) -> None:
    folder = tmp_path / family
    preset_config(family, "tiny").save_pretrained(folder)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_against_model(spec_for(folder)) is True
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert model_type in families.supported_model_types()


def test_every_table_entry_names_classes_transformers_has() -> None:
    from pipelora.trainer.compat import family_classes

    for model_type in families.FAMILIES:
        layer, norm, rotary = family_classes(type("Config", (), {"model_type": model_type})())
        assert layer.__name__.endswith("DecoderLayer") and norm.__name__.endswith("RMSNorm")
        assert rotary.__name__.endswith("RotaryEmbedding")


def test_layer_windows_follow_each_family() -> None:
    gemma2 = preset_config("gemma2", "tiny")
    assert [families.layer_window(gemma2, i) for i in range(4)] == [16, None, 16, None]
    gemma3 = preset_config("gemma3", "7b")
    assert [families.layer_window(gemma3, i) for i in range(6)] == [1024] * 5 + [None]
    assert families.layer_window(preset_config("mistral", "7b"), 3) == 4096
    assert families.layer_window(preset_config("llama3", "tiny"), 0) is None
    assert families.layer_window(preset_config("qwen2", "7b"), 0) is None  # use_sliding_window is off


def test_a_window_and_packing_intersect_in_the_mask() -> None:
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    mask = block_causal_mask(pos, sliding_window=3)[0, 0]
    assert mask[4].tolist() == [False, False, True, True, True] + [False] * 5  # the window within sequence 1
    assert mask[6].tolist() == [False] * 5 + [True, True] + [False] * 3  # never back into sequence 1
    assert mask[9].tolist() == [False] * 7 + [True] * 3


def test_llama3_rope_scaling_as_hub_configs_spell_it(tmp_path: Path) -> None:
    """Hub config.json files of Llama 3.x carry `rope_scaling` and `rope_theta`; transformers 5
    reads them as `rope_parameters`, and so does the trainer."""
    from transformers import AutoModelForCausalLM

    from pipelora.trainer.local import build_local_model

    folder = hf_written_model(tmp_path / "llama3", "llama3", {})
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (folder / "config.json").write_text(json.dumps(config))
    ours = read_model_config(open_storage(str(folder)), str(folder))
    assert ours.rope_parameters["rope_type"] == "llama3" and ours.rope_parameters["factor"] == 32.0
    model = build_local_model(open_storage(str(folder)), str(folder), lora=LORA).eval()
    ids = torch.randint(0, 32000, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)(input_ids=ids).logits
        got = model(ids, torch.arange(48)[None])
    assert relative_error(got, expected) <= TOLERANCE


@pytest.mark.slow
def test_gemma2_trains_under_mpirun_on_two_stages_as_on_one(s3_world, tmp_path: Path) -> None:
    """The family furthest from Mistral (scaled embedding, eager soft-capped attention, alternating
    windows, tied head on the last stage) through DeepSpeed's pipeline: 2 stages equal 1 stage in
    losses and first-step LoRA gradients, and the adapter reproduces the trainer's logits in PEFT."""
    import boto3
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipelora.trainer.init_model import write_random_model
    from pipelora.trainer.local import load_local_adapter

    model = write_random_model(tmp_path / "gemma2", family="gemma2", preset="tiny", seed=3,
                               max_shard_bytes=3 * 1024 * 1024)
    client = boto3.client("s3", endpoint_url=s3_world.endpoint, region_name="us-east-1")
    for path in model.iterdir():
        client.upload_file(str(path), s3_world.bucket, f"models/tiny-gemma2/{path.name}")
    model_uri = f"s3://{s3_world.bucket}/models/tiny-gemma2"
    runs: dict[int, dict[str, Any]] = {}
    for stages in (1, 2):
        name = f"gemma2-{stages}-stage"
        spec = s3_world.spec(name, **{"model.uri": model_uri, "parallel.stages": stages,
                                      "parallel.gpus_per_node": stages, "training.max_steps": 3,
                                      "training.eval_every_steps": 3})
        dump = tmp_path / f"grads-{stages}"
        done = s3_world.train(stages, s3_world.write_spec(spec), PIPELORA_GRAD_DUMP=str(dump))
        assert done.returncode == 0, done.stderr[-3000:]
        grads: dict[str, torch.Tensor] = {}
        for path in sorted(dump.glob("stage-*.safetensors")):
            grads.update(load_file(str(path)))
        runs[stages] = {"grads": grads, "progress": s3_world.read_json(f"runs/{name}/progress.json")}
    one, two = runs[1], runs[2]
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) == 4 * 7 * 2
    for name, g in one["grads"].items():
        assert torch.allclose(g, two["grads"][name], atol=1e-5, rtol=0), name
    losses = [[loss for _, loss in run["progress"]["losses"]] for run in (one, two)]
    assert len(losses[0]) == 3 and all(abs(a - b) < 1e-5 for a, b in zip(*losses, strict=True))
    assert losses[1][-1] < losses[1][0]

    adapter_uri = f"s3://{s3_world.bucket}/runs/gemma2-2-stage/adapter"
    storage = open_storage(adapter_uri, endpoint_url=s3_world.endpoint)
    local = tmp_path / "adapter"
    for path in storage.list(adapter_uri):
        storage.download_file(path.uri, local / path.uri.rsplit("/", 1)[-1])
    ours = load_local_adapter(storage, model_uri, adapter_uri)
    ids = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(2))
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, str(local)).eval()(input_ids=ids).logits
        our_logits = ours(ids, torch.arange(40).repeat(2, 1))
    assert relative_error(our_logits, peft_logits) <= TOLERANCE


def several_sequences_per_row() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 64 tokens: four sequences (one shorter than every window, some longer), and one
    sequence with a short padding segment, as dataprep packs them."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 32000, (2, 64), generator=gen)
    rows = [(20, 9, 23, 12), (57, 7)]
    pos = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])
    return ids, pos


def test_flex_attention_on_packed_rows_equals_the_dense_path(family_model, monkeypatch) -> None:
    """The CUDA kernel's mask and score modification, run here through flex_attention's eager
    reference (forward only: flex_attention has no backward on CPU); the gradients are compared
    where CUDA runs it (tests/trainer/test_attention.py)."""
    from pipelora.trainer import attention

    case, folder = family_model
    model = two_stage_model(folder).eval()
    nonzero_lora(model)
    config = model.items[1].config
    ids, pos = several_sequences_per_row()
    calls: list[torch.device] = []
    kernel = attention._flex_kernel

    def counted(device: torch.device) -> Any:
        calls.append(device)
        return kernel(device)

    monkeypatch.setattr(attention, "_flex_kernel", counted)
    with torch.no_grad():
        assert attention.kernel_of(config) == attention.DENSE
        dense = model(ids, pos)
        assert calls == []
        monkeypatch.setenv(attention.ATTENTION_ENV, "flex")
        assert attention.use_kernel(config, torch.device("cpu")) == attention.FLEX
        flex = model(ids, pos)
    assert len(calls) == config.num_hidden_layers  # every layer attended through flex_attention
    err = relative_error(flex, dense)
    assert err <= TOLERANCE, (case, err)
