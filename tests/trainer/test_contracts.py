"""The trainer's side of the project's contracts: run paths only through `pipelora.layout`, library
internals only through `compat` (with its version check), the gradient dump outside the optimizer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelora import launch, layout
from pipelora.storage import LocalStorage, ObjectInfo
from pipelora.trainer import compat, grad_dump
from pipelora.trainer.adapter import write_adapter
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.optim import ClippedAdamW

TRAINER = Path(__file__).resolve().parents[2] / "trainer"
# Names no trainer file may spell (in code, comments or docstrings): their home is pipelora.layout
# (run paths) or pipelora.launch (the cluster's hostfile).
STRAY_NAMES = (
    layout.MANIFEST_NAME, layout.PROGRESS_NAME, layout.CHECKPOINT_MARKER, layout.ADAPTER_WEIGHTS,
    layout.ADAPTER_CONFIG, layout.step_dir_name(0).rstrip("0"), launch.CLUSTER_HOSTFILE,
)
# Folder names that are also plain words: refused as a string literal or a component of one.
STRAY_WORDS = (layout.DATA_DIR, layout.CHECKPOINTS_DIR, layout.ADAPTER_DIR, layout.LOGS_DIR, layout.TENSORBOARD_DIR,
               layout.LEASE_NAME)


def _sources() -> list[Path]:
    files = sorted(TRAINER.rglob("*.py"))
    assert len(files) > 10, TRAINER
    return files


def test_the_trainer_spells_no_run_path_of_its_own() -> None:
    assert STRAY_NAMES[5] == "step-"
    found = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            found += [f"{path.name}:{number}: {name}" for name in STRAY_NAMES if name in line]
        tree = ast.parse(text)
        exports = {id(n) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
                   for n in ast.walk(node.value)}  # module names, not paths
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in exports:
                parts = set(node.value.strip("/").split("/"))
                found += [f"{path.name}:{node.lineno}: {word!r}" for word in STRAY_WORDS if word in parts]
            if isinstance(node, ast.Constant) and node.value == launch.MASTER_PORT:
                found.append(f"{path.name}:{node.lineno}: {launch.MASTER_PORT}")
    assert found == [], "use pipelora.layout / pipelora.launch instead:\n" + "\n".join(found)


def test_private_library_names_are_used_only_in_compat() -> None:
    private = re.compile(r"__compatible_ops__|\b_partition_layers\b|\._set_bounds\b|\._topo\b|\.global_steps\b|"
                         r"\._attn_implementation\b|\bposition_embeddings=|\bdeepspeed\.runtime\b|"
                         r"\btransformers\.models\b")
    found = [f"{path.name}: {match}" for path in _sources() if path.name != "compat.py"
             for match in private.findall(path.read_text(encoding="utf-8"))]
    assert found == []


def _lowest() -> dict[str, str | None]:
    return {package: low for package, (low, _) in compat.SUPPORTED.items()}


def test_versions_outside_the_tested_range_are_refused_by_name() -> None:
    assert compat.version_problems(_lowest()) == []
    compat.check_versions(_lowest())
    with pytest.raises(TrainerError) as err:
        compat.check_versions({**_lowest(), "deepspeed": "0.16.4"})
    message = str(err.value)
    low, high = compat.SUPPORTED["deepspeed"]
    assert message.startswith(f"deepspeed 0.16.4 is installed but the trainer supports deepspeed>={low},<{high}: ")
    assert f"pip install 'deepspeed>={low},<{high}' 'transformers>=" in message
    assert "\n" not in message
    both = compat.version_problems({"deepspeed": high, "transformers": "4.46.3"})
    assert [p.split()[0:2] for p in both] == [["deepspeed", high], ["transformers", "4.46.3"]]
    assert "is not installed" in compat.version_problems({"deepspeed": low})[0]
    assert compat.version_problems({"deepspeed": "unknown", "transformers": _lowest()["transformers"]}) != []


def test_version_strings_are_compared_by_their_release_numbers() -> None:
    assert compat.parse_version("0.19.8+cpu") == (0, 19, 8)
    assert compat.parse_version("5.24.0.dev0") == (5, 24, 0)
    assert compat.parse_version("v2.13.0") == (2, 13, 0)
    assert compat.parse_version("dev") is None
    low, high = compat.SUPPORTED["deepspeed"]
    patch_above = f"{low.rsplit('.', 1)[0]}.99"  # a later patch release of the tested one
    assert compat.version_problems({**_lowest(), "deepspeed": patch_above}) == []
    assert compat.version_problems({**_lowest(), "deepspeed": f"{high}.0"}) != []


def test_the_installed_libraries_are_the_supported_ones() -> None:
    compat.check_versions()  # what the tests run on is what `SUPPORTED` claims was tested


def test_grad_dump_writes_first_step_gradients_before_clipping_once(tmp_path: Path) -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    optimizer = ClippedAdamW([weight], lr=0.1, max_norm=1e-3, data_parallel=1)
    env = {grad_dump.ENV_VAR: str(tmp_path / "dump")}
    handle = grad_dump.arm(optimizer, lora={name: weight}, stage=1, dp_rank=0, env=env)
    assert handle is not None
    weight.grad = torch.full((3,), 2.0)
    optimizer.step()
    assert weight.grad.norm() == pytest.approx(1e-3, rel=1e-3)  # the optimizer clipped after the dump
    weight.grad = torch.full((3,), 5.0)
    optimizer.step()  # a second step: the dump holds the first step's gradients only
    handle.remove()
    dumped = load_file(str(tmp_path / "dump" / "stage-01.safetensors"))
    assert list(dumped) == [name] and torch.equal(dumped[name], torch.full((3,), 2.0))
    assert grad_dump.arm(optimizer, lora={name: weight}, stage=1, dp_rank=1, env=env) is None  # one replica writes
    assert grad_dump.arm(optimizer, lora={name: weight}, stage=1, dp_rank=0, env={}) is None  # off by default


def test_the_adapter_file_that_marks_completion_is_written_last(tmp_path: Path) -> None:
    written: list[str] = []

    class Recording(LocalStorage):
        def write_bytes(self, uri: str, data: bytes) -> ObjectInfo:
            written.append(uri.rsplit("/", 1)[-1])
            return super().write_bytes(uri, data)

    run = layout.RunLayout(str(tmp_path))
    write_adapter(Recording(), run.adapter, tensors={"w": torch.ones(2)}, config={"r": 4})
    assert sorted(written) == sorted([layout.ADAPTER_WEIGHTS, layout.ADAPTER_CONFIG])
    assert written[-1] == layout.ADAPTER_COMPLETE_FILE
    assert Path(run.adapter_complete).is_file() and Path(run.adapter_weights).is_file()
