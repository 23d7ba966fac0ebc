"""End to end on this machine: `pipelora-k8s run` from nothing (tiny model and dataset made on the
way) through dataprep and a 2-stage mpirun, leaving a committed adapter, checkpoint and loss curve."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from pipelora.config import load_spec
from pipelora.launch import RELAY_DIR_ENV
from pipelora.runlog import read_rank_logs
from pipelora.storage import open_storage

pytestmark = pytest.mark.slow
STEPS = 4


def write_config(root: Path, name: str, *, steps: int = STEPS) -> Path:
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "name": name,
        "storage": {"uri": str(root / "runs")},
        "model": {"uri": str(root / "models" / "tiny-mistral")},
        "dataset": {"uri": str(root / "datasets" / "learnable.jsonl"), "seq_len": 64, "eval_fraction": 0.1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "parallel": {"stages": 2, "nodes": 1, "gpus_per_node": 2, "micro_batch_size": 2, "micro_batches": 4},
        "training": {"max_steps": steps, "lr": 2.0e-3, "warmup_steps": 1, "checkpoint_every_steps": 2,
                     "keep_checkpoints": 1, "eval_every_steps": 2, "eval_batches": 2,
                     "activation_checkpointing": False, "dtype": "fp32"},
    }))
    return config


CLI = str(Path(sys.executable).parent / "pipelora-k8s")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One run shared by the assertions below; returns (config, run folder, combined output)."""
    root = tmp_path_factory.mktemp("local-run")
    config = write_config(root, "e2e-local")
    # what the launcher sets on a cluster: each rank appends its lines here for its pod's entrypoint
    env = {**os.environ, "OMP_NUM_THREADS": "1", RELAY_DIR_ENV: str(root / "relay")}
    proc = subprocess.run(
        [CLI, "run", "--config", str(config)],
        cwd=root, env=env, capture_output=True, text=True, timeout=1200,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return config, root / "runs" / "e2e-local", output


def test_run_leaves_a_committed_adapter_and_checkpoint(local_run: tuple[Path, Path, str]) -> None:
    config, run, output = local_run
    adapter = run / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
    storage = open_storage(str(run))
    checkpoints = storage.list_dirs(str(run / "checkpoints"))
    assert checkpoints == [f"step-{STEPS:08d}"]
    storage.verify_committed(str(run / "checkpoints" / checkpoints[0] / "COMMITTED"))
    storage.verify_committed(str(run / "data" / "manifest.json"))
    assert f"adapter       {run}/adapter" in output


def test_progress_and_loss_curve(local_run: tuple[Path, Path, str]) -> None:
    _, run, output = local_run
    progress = json.loads((run / "progress.json").read_text())
    assert progress["state"] == "finished"
    assert progress["step"] == STEPS == progress["max_steps"]
    assert [s for s, _ in progress["losses"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in progress["eval_losses"]] == [2, 4]
    png = (run / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert f"loss curve    {run}/loss_curve.png" in output


def test_every_stage_logs_tagged_lines_through_mpirun(local_run: tuple[Path, Path, str]) -> None:
    _, _, output = local_run
    for stage in (1, 2):
        steps = [line for line in output.splitlines() if f"[stage {stage}/2 dp 0/1] step " in line and " loss " in line]
        assert len([s for s in steps if "eval_loss" not in s]) == STEPS, f"stage {stage}: {steps}"
    # mpirun's --tag-output prefix shows which rank wrote each line
    assert "[1,0]<stdout>:[stage 1/2" in output and "[1,1]<stdout>:[stage 2/2" in output


def test_ranks_relay_their_lines_and_keep_them_in_storage(local_run: tuple[Path, Path, str]) -> None:
    _, run, _ = local_run
    storage = open_storage(str(run))
    for rank, stage in ((0, 1), (1, 2)):
        relayed = (run.parent.parent / "relay" / f"rank-{rank:05d}.log").read_text().splitlines()
        steps = {line.split(" step ")[1].split("/")[0] for line in relayed
                 if line.startswith(f"[stage {stage}/2 dp 0/1] step ") and " loss " in line}
        assert steps == {str(s) for s in range(1, STEPS + 1)}, relayed
        durable = read_rank_logs(storage, load_spec(run / "local" / "job.yaml").layout, [rank])
        assert [line for line in durable if " step " in line and " loss " in line] == \
            [line for line in relayed if " step " in line and " loss " in line]


def test_ctrl_c_commits_a_checkpoint_and_the_rerun_resumes(tmp_path: Path) -> None:
    config = write_config(tmp_path, "e2e-interrupt", steps=6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([CLI, "run", "--config", str(config)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "[stage 2/2 dp 0/1] step 2/6 " in line:
                proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground command
                break
        lines += proc.communicate(timeout=600)[0].splitlines(keepends=True)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert proc.returncode == 75, output[-4000:]
    found = re.search(r"preempted at step (\d+), checkpoint committed; run the same command again", output)
    assert found, output[-4000:]
    step = int(found.group(1))
    run = tmp_path / "runs" / "e2e-interrupt"
    assert (run / "checkpoints" / f"step-{step:08d}" / "COMMITTED").exists()
    again = subprocess.run([CLI, "run", "--config", str(config)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=1200)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert f"(step {step})" in again.stdout and "resumed from" in again.stdout
    progress = json.loads((run / "progress.json").read_text())
    assert progress["state"] == "finished" and [s for s, _ in progress["losses"]] == list(range(1, 7))


def test_the_executed_commands_are_the_charts(local_run: tuple[Path, Path, str]) -> None:
    """The argv the runner printed is the cluster's, with only the local paths and flags changed."""
    from pipelora.workflow.commands import job_commands

    config, run, output = local_run
    spec = load_spec(run / "local" / "job.yaml")
    assert spec == load_spec(config)
    cluster = job_commands(spec)
    dataprep = next(line for line in output.splitlines() if line.startswith("==> dataprep: ")).split()[2:]
    assert dataprep == [*cluster.dataprep[:-1], str(run / "local" / "job.yaml")]
    train = next(line for line in output.splitlines() if line.startswith("==> train: ")).split()[2:]
    assert train[-4:-1] == cluster.launcher[-4:-1] and train[-1] == str(run / "local" / "job.yaml")
    assert train[:5] == ["mpirun", "--hostfile", str(run / "local" / "hostfile"), "-np", "2"]
    assert (run / "local" / "hostfile").read_text() == "localhost slots=2\n"


def test_rank_zero_keeps_tensorboard_events_in_the_run_folder(local_run: tuple[Path, Path, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, _ = local_run
    events = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    progress = json.loads((run / "progress.json").read_text())
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in losses] == [s for s, _ in progress["losses"]]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(losses, progress["losses"], strict=True))
    assert [e.step for e in acc.Scalars("eval/loss")] == [s for s, _ in progress["eval_losses"]]
    tags = set(acc.Tags()["scalars"])
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s_per_device", "train/mfu", "train/step_time_s"} <= tags
    assert all(0 < e.value < 1 for e in acc.Scalars("train/mfu"))
