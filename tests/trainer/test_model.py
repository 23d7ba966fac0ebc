"""The model side of the trainer, in one process: init-model, per-stage loading, masks, LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelora.storage import open_storage
from pipelora.trainer.attention import block_causal_mask
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.init_model import write_random_model
from pipelora.trainer.layers import LoraSettings, build_layer
from pipelora.trainer.local import build_local_model
from pipelora.trainer.lora import resolve_targets
from pipelora.trainer.partition import balanced_partition
from pipelora.trainer.presets import preset_config
from pipelora.trainer.weights import CheckpointReader, read_model_config

LORA = LoraSettings(tuple(resolve_targets("all-linear")), 4, 8.0, 0.0, 0)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("llama") / "tiny-llama", family="llama", preset="tiny", seed=5)


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def test_tiny_mistral_is_a_sharded_hugging_face_folder_with_the_mistral_tokenizer(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    index = json.loads((tiny_model / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((tiny_model / f).is_file() for f in files)
    assert "lm_head.weight" in index["weight_map"]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    assert tokenizer.vocab_size == 32000 and tokenizer.eos_token_id == 2
    model = _hf(tiny_model)
    assert model.config.num_hidden_layers == 4 and model.config.vocab_size == 32000


def test_random_weights_depend_on_seed_and_name_not_on_sharding(tiny_model: Path, tmp_path: Path) -> None:
    single = write_random_model(tmp_path / "one-file", family="mistral", preset="tiny", seed=3)
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    a = read_all(single)
    b = read_all(tiny_model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = read_all(write_random_model(tmp_path / "seed-4", family="mistral", preset="tiny", seed=4))
    assert not torch.equal(other["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(open_storage(str(folder)), str(folder))
    names = [n for f in {"model.safetensors"} | set(_index_files(folder)) for n in _names(folder, f)]
    return reader.read(names)


def _index_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []


def _names(folder: Path, file: str) -> list[str]:
    from safetensors import safe_open

    if not (folder / file).exists():
        return []
    with safe_open(str(folder / file), "pt") as fh:
        return list(fh.keys())


def test_7b_preset_writes_the_config_only_without_weights(tmp_path: Path) -> None:
    out = write_random_model(tmp_path / "m7b", family="mistral", preset="7b", weights=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (4096, 32, 8)
    assert config["intermediate_size"] == 14336 and config["vocab_size"] == 32000
    assert not list(out.glob("*.safetensors")) and (out / "tokenizer.model").is_file()


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_pipeline_layers_reproduce_transformers_logits(family: str, tiny_model: Path, tiny_llama: Path) -> None:
    folder = tiny_model if family == "mistral" else tiny_llama
    ours = build_local_model(open_storage(str(folder)), str(folder), lora=LORA).eval()
    ids = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40).repeat(2, 1)
    with torch.no_grad():
        expected = _hf(folder)(input_ids=ids).logits
        got = ours(ids, pos)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_tied_llama_head_reads_the_embedding(tiny_llama: Path) -> None:
    config = json.loads((tiny_llama / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _names(tiny_llama, "model.safetensors")


def test_packed_row_equals_its_sequences_run_alone(tiny_model: Path) -> None:
    model = build_local_model(open_storage(str(tiny_model)), str(tiny_model), lora=LORA).eval()
    gen = torch.Generator().manual_seed(1)
    first, second = torch.randint(0, 32000, (1, 23), generator=gen), torch.randint(0, 32000, (1, 17), generator=gen)
    packed = torch.cat([first, second], dim=1)
    pos = torch.cat([torch.arange(23), torch.arange(17)])[None]
    with torch.no_grad():
        together = model(packed, pos)
        alone_1 = model(first, torch.arange(23)[None])
        alone_2 = model(second, torch.arange(17)[None])
    assert torch.allclose(together[:, :23], alone_1, atol=1e-5)
    assert torch.allclose(together[:, 23:], alone_2, atol=1e-5)


def test_block_causal_mask_confines_attention_to_each_sequence() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = block_causal_mask(pos)[0, 0]
    assert mask[2].tolist() == [True, True, True, False, False, False]
    assert mask[4].tolist() == [False, False, False, True, True, False]
    assert mask[5].tolist() == [False, False, False, False, False, True]
    windowed = block_causal_mask(torch.arange(6)[None], sliding_window=2)[0, 0]
    assert windowed[5].tolist() == [False, False, False, False, True, True]


def test_a_stage_reads_only_its_own_tensors_from_s3(s3_world) -> None:
    storage = open_storage(s3_world.model_uri, endpoint_url=s3_world.endpoint)
    config = read_model_config(storage, s3_world.model_uri)
    partition = balanced_partition(config, stages=2, seq_len=64)
    total = sum(p.stat().st_size for p in s3_world.model_dir.glob("*.safetensors"))
    read = []
    for stage in range(2):
        reader = CheckpointReader(storage, s3_world.model_uri)
        layers = [build_layer(i, config=config, reader=reader, dtype=torch.float32, device=torch.device("cpu"),
                              lora=LORA) for i in partition.items(stage)]
        own = sum(p.numel() * 4 for layer in layers for p in layer.parameters() if not p.requires_grad)
        assert own <= reader.bytes_read <= own + 64 * 1024  # its tensors, plus headers
        read.append(reader.bytes_read)
    assert all(r < 0.6 * total for r in read)
    assert sum(read) < total + 64 * 1024


def test_lora_targets_are_validated() -> None:
    assert resolve_targets(["v_proj", "q_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(TrainerError, match="lm_head"):
        resolve_targets(["q_proj", "lm_head"])


def test_missing_weights_are_one_clear_error(tmp_path: Path) -> None:
    preset_config("mistral", "tiny").save_pretrained(tmp_path)
    with pytest.raises(TrainerError, match="no weights in"):
        CheckpointReader(open_storage(str(tmp_path)), str(tmp_path))


def test_activation_checkpointing_gives_the_same_lora_gradients(tiny_model: Path) -> None:
    from pipelora.trainer.layers import LocalModel, causal_lm_loss, lora_state

    storage = open_storage(str(tiny_model))
    config = read_model_config(storage, str(tiny_model))
    reader = CheckpointReader(storage, str(tiny_model))
    lora = LoraSettings(LORA.targets, 4, 8.0, 0.1, 0)
    ids = torch.randint(0, 32000, (2, 32), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(32).repeat(2, 1)
    grads = []
    for checkpointing in (False, True):
        model = LocalModel([build_layer(i, config=config, reader=reader, dtype=torch.float32,
                                        device=torch.device("cpu"), lora=lora,
                                        activation_checkpointing=checkpointing) for i in range(6)]).train()
        params = lora_state(model)
        with torch.no_grad():  # a non-zero B, so that lora_A gets gradients too
            for name, p in params.items():
                if "lora_B" in name:
                    p.fill_(0.01)
        torch.manual_seed(0)  # the same dropout masks, recomputed identically under checkpointing
        causal_lm_loss(model(ids, pos), ids).backward()
        grads.append({k: p.grad.clone() for k, p in params.items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name].abs().max() > 0, name
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_init_model_command_is_registered_and_writes_the_folder(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipelora.workflow.cli import cli

    result = CliRunner().invoke(cli, ["init-model", "--family", "llama", "--preset", "7b", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "config and tokenizer only" in result.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 32


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_init_model_writes_each_family_and_the_pipeline_reproduces_its_logits(family: str, tmp_path: Path) -> None:
    folder = write_random_model(tmp_path / family, family=family, preset="tiny", seed=2,  # type: ignore[arg-type]
                                max_shard_bytes=3 * 1024 * 1024)
    assert (folder / "model.safetensors.index.json").is_file()
    ours = build_local_model(open_storage(str(folder)), str(folder), lora=LORA).eval()
    ids = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _hf(folder)(input_ids=ids).logits
        got = ours(ids, torch.arange(40).repeat(2, 1))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_random_biases_are_random_and_norm_scales_one(tmp_path: Path) -> None:
    tensors = read_all(write_random_model(tmp_path / "qwen2", family="qwen2", preset="tiny", seed=1))
    assert tensors["model.layers.0.self_attn.q_proj.bias"].std() > 0.01
    assert torch.equal(tensors["model.layers.0.input_layernorm.weight"], torch.ones(128))


@pytest.mark.parametrize(("family", "model_type"), [("llama3", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"),
                                                    ("gemma2", "gemma2"), ("gemma3", "gemma3_text")])
def test_init_model_takes_the_new_families(family: str, model_type: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipelora.workflow.cli import cli

    result = CliRunner().invoke(cli, ["init-model", "--family", family, "--preset", "7b", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == model_type and config["vocab_size"] == 32000
