"""`validate` and `submit` run `plan`'s fit check when the GPU's memory is known (before installing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CLI = str(Path(sys.executable).parent / "pipelora-k8s")


@pytest.fixture(scope="module")
def mistral_7b_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral 7B's config (no weights) at seq 4096 without activation checkpointing, 8 stages."""
    root = tmp_path_factory.mktemp("fit")
    subprocess.run([CLI, "init-model", "--preset", "7b", "--out", str(root / "mistral-7b")], check=True,
                   capture_output=True)
    config = root / "job.yaml"
    config.write_text(yaml.safe_dump({
        "name": "fit-check", "storage": {"uri": str(root / "runs")}, "model": {"uri": str(root / "mistral-7b")},
        "dataset": {"uri": str(root / "data.jsonl"), "seq_len": 4096},
        "parallel": {"stages": 8, "nodes": 2, "gpus_per_node": 4, "micro_batches": 16},
        "training": {"activation_checkpointing": False},
    }))
    return config


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


def test_validate_refuses_a_job_whose_stages_do_not_fit(mistral_7b_job: Path) -> None:
    done = run("validate", "--config", str(mistral_7b_job), "--gpu-memory-gib", "24")
    assert done.returncode == 2
    assert "stage 4 needs 24.1 GiB of 24 GiB" in done.stderr
    assert "--set training.activation_checkpointing=true" in done.stderr
    fixed = run("validate", "--config", str(mistral_7b_job), "--gpu-memory-gib", "24",
                "--set", "training.activation_checkpointing=true")
    assert fixed.returncode == 0, fixed.stderr
    assert run("validate", "--config", str(mistral_7b_job), "--gpu-memory-gib", "80").returncode == 0
    assert run("validate", "--config", str(mistral_7b_job)).returncode == 0  # memory unknown: not checked


def test_submit_refuses_before_rendering_anything(mistral_7b_job: Path) -> None:
    done = run("submit", "--config", str(mistral_7b_job), "--dry-run", "--gpu-memory-gib", "24")
    assert done.returncode == 2 and "stage 4 needs" in done.stderr
    assert done.stdout == ""  # no manifests


def test_the_spec_can_name_the_clusters_gpu_memory_once(mistral_7b_job: Path) -> None:
    """`cluster.gpu_memory_gib` in job.yaml: validate, submit and plan check against it without a flag,
    and the flag (or PIPELORA_GPU_MEMORY_GIB) still wins."""
    on_24 = ("--set", "cluster.gpu_memory_gib=24")
    refused = run("validate", "--config", str(mistral_7b_job), *on_24)
    assert refused.returncode == 2 and "stage 4 needs 24.1 GiB of 24 GiB" in refused.stderr
    submitted = run("submit", "--config", str(mistral_7b_job), "--dry-run", *on_24)
    assert submitted.returncode == 2 and "stage 4 needs" in submitted.stderr and submitted.stdout == ""
    planned = run("plan", "--config", str(mistral_7b_job), *on_24)
    assert planned.returncode == 3 and "24 GiB per GPU" in planned.stdout
    assert run("validate", "--config", str(mistral_7b_job), *on_24, "--gpu-memory-gib", "80").returncode == 0
    assert run("validate", "--config", str(mistral_7b_job), "--set", "cluster.gpu_memory_gib=0.5").returncode == 2
