"""The spec against the model it names: family and LoRA targets, read from the model's config.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from net import free_port

from pipelora import families
from pipelora.config import ConfigError, SpecWarning, check_against_model, spec_from_dict


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mistral folder as `init-model` writes it (config and tokenizer; the weights are not read)."""
    out = tmp_path_factory.mktemp("models") / "tiny-mistral"
    proc = subprocess.run(
        [sys.executable, "-c", "from pipelora.workflow.cli import main; main()", "init-model", "--family", "mistral",
         "--preset", "tiny", "--no-weights", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def spec_for(model_uri: str, *, targets: Any = "all-linear", **storage: Any) -> Any:
    return spec_from_dict({
        "name": "check-model",
        "storage": {"uri": "runs", **storage},
        "model": {"uri": model_uri},
        "dataset": {"uri": "runs/datasets/x.jsonl"},
        "lora": {"target_modules": targets},
    })


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], list(families.LINEAR_NAMES["mistral"])])
def test_targets_the_family_has_pass(tiny_mistral: Path, targets: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_against_model(spec_for(str(tiny_mistral), targets=targets)) is True


def test_a_target_the_family_lacks_is_rejected(tiny_mistral: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A second supported family with fused projections makes `qkv_proj` a name the spec accepts
    # before the model is known, and one a Mistral decoder layer does not have.
    monkeypatch.setitem(families.LINEAR_NAMES, "phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    spec = spec_for(f"file://{tiny_mistral}", targets=["q_proj", "qkv_proj"])
    with pytest.raises(ConfigError) as info:
        check_against_model(spec)
    assert info.value.messages == [
        f"lora.target_modules names qkv_proj, which a mistral decoder layer does not have "
        f"(model file://{tiny_mistral}/config.json); use all-linear or some of "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    ]
    assert str(info.value).startswith("invalid job spec:\n  - lora.target_modules names qkv_proj")


def test_an_unsupported_model_type_is_rejected(tiny_mistral: Path, tmp_path: Path) -> None:
    model = tmp_path / "gpt2"
    shutil.copytree(tiny_mistral, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ConfigError) as info:
        check_against_model(spec_for(str(model)))
    assert info.value.messages == [
        f"model.uri: {model}/config.json has model_type 'gpt2', which the trainer does not support; "
        "point model.uri at a mistral, llama, qwen2, qwen3, gemma2 or gemma3_text model"
    ]


def test_a_model_not_there_yet_is_unchecked_not_an_error(tmp_path: Path) -> None:
    with pytest.warns(SpecWarning) as record:
        assert check_against_model(spec_for(str(tmp_path / "absent"))) is False
    (warning,) = record
    assert str(warning.message) == (
        f"could not check the model ({tmp_path}/absent/config.json does not exist); its model_type and "
        "lora.target_modules are checked when training starts"
    )


def test_unreachable_storage_is_unchecked_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("PIPELORA_S3_MAX_ATTEMPTS", "1")
    spec = spec_for("s3://models/tiny-mistral", endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.warns(SpecWarning, match=r"^could not check the model \(cannot .*unreachable"):
        assert check_against_model(spec) is False
