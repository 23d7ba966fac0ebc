"""`pipelora-k8s train` under real mpirun, reading model and shards from a moto S3 server."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from net import free_port
from rank_lines import memory_lines
from safetensors.torch import load_file

from pipelora.storage import open_storage
from pipelora.trainer.local import load_local_adapter

pytestmark = pytest.mark.slow

LINE = re.compile(r"^\[stage (\d+)/(\d+) dp (\d+)/(\d+)\] step (\d+)/(\d+) loss ([\d.]+) lr (\S+) tok/s (\d+) "
                  r"mem ([\d.]+)GiB eta (\d+:\d\d:\d\d)(?: tok/s/dev (\d+) mfu ([\d.]+)%)?$", re.M)


def step_lines(stdout: str) -> list[tuple[int, int, int, float]]:
    """(stage, dp, step, loss) of every per-step log line."""
    return [(int(m[1]), int(m[3]), int(m[5]), float(m[7])) for m in LINE.finditer(stdout)]


def check(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def dumped_grads(folder: Path) -> dict[str, torch.Tensor]:
    grads: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("stage-*.safetensors")):
        grads.update(load_file(str(path)))
    return grads


@pytest.fixture(scope="module")
def one_and_two_stages(s3_world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same job on 1 stage (1 rank) and on 2 stages (2 ranks), first-step gradients dumped."""
    out: dict[str, Any] = {}
    for name, stages in (("one-stage", 1), ("two-stage", 2)):
        spec = s3_world.spec(name, **{"parallel.stages": stages, "parallel.gpus_per_node": stages})
        dump = tmp_path_factory.mktemp(f"grads-{name}")
        done = check(s3_world.train(stages, s3_world.write_spec(spec), PIPELORA_GRAD_DUMP=str(dump)))
        out[name] = {"done": done, "grads": dumped_grads(dump),
                     "progress": s3_world.read_json(f"runs/{name}/progress.json")}
    return out


def test_two_stages_equal_one_stage_in_losses_and_first_step_lora_gradients(one_and_two_stages) -> None:
    one, two = one_and_two_stages["one-stage"], one_and_two_stages["two-stage"]
    assert len(one["grads"]) == len(two["grads"]) == 4 * 7 * 2  # layers x all-linear x (A, B)
    assert one["grads"].keys() == two["grads"].keys()
    nonzero = 0
    for name, g in one["grads"].items():
        assert torch.allclose(g, two["grads"][name], atol=1e-5, rtol=0), name
        nonzero += int(g.abs().max() > 0)
    assert nonzero >= 4 * 7  # every lora_B gets a gradient at step 1 (lora_A's is zero while B is zero)
    l1 = one["progress"]["losses"]
    l2 = two["progress"]["losses"]
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 7))
    for (_, a), (_, b) in zip(l1, l2, strict=True):
        assert abs(a - b) < 1e-5
    assert l2[-1][1] < l2[0][1]  # it learns
    # The global norm (clipped against on every step) is computed over both stages, as on one stage.
    n1, n2 = one["progress"]["grad_norm"], two["progress"]["grad_norm"]
    assert n1 > 0.05 and abs(n1 - n2) <= 1e-5 * n1


def test_two_stage_run_logs_checkpoints_and_progress(one_and_two_stages, s3_world) -> None:
    stdout = one_and_two_stages["two-stage"]["done"].stdout
    lines = step_lines(stdout)
    assert sorted({(s, d) for s, d, _, _ in lines}) == [(1, 0), (2, 0)]
    for step in range(1, 7):
        losses = {loss for _, _, s, loss in lines if s == step}
        assert len(losses) == 1  # both stages report the same loss
    assert "norm+head" in stdout and "stage  items" in stdout  # the partition table
    assert len(re.findall(r"rank \d: .*; attention dense; base mem", stdout)) == 2  # CPU keeps the dense masks
    memory = memory_lines(stdout)
    assert sorted(memory) == [1, 2] and memory[1].in_flight == 2 and memory[2].in_flight == 1  # 1F1B
    assert all(m.peak_gib > m.grew_gib > 0 and m.predicted_gib > 0 for m in memory.values()), memory
    progress = one_and_two_stages["two-stage"]["progress"]
    assert progress["state"] == "finished" and progress["step"] == progress["max_steps"] == 6
    assert [s for s, _ in progress["eval_losses"]] == [3, 6]
    keys = s3_world.keys("runs/two-stage/checkpoints/")
    assert sorted({k.split("/")[3] for k in keys}) == ["step-00000004", "step-00000006"]  # keep_checkpoints 2
    marker = s3_world.read_json("runs/two-stage/checkpoints/step-00000006/COMMITTED")
    assert sorted(marker["files"]) == ["rank-00000-rng.pt", "rank-00001-rng.pt", "stage-00-lora.safetensors",
                                       "stage-00-optim.pt", "stage-01-lora.safetensors", "stage-01-optim.pt"]
    assert marker["step"] == 6 and marker["consumed_micro_batches"] == 24


def test_exported_adapter_reproduces_the_trainer_logits_through_peft(one_and_two_stages, s3_world, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_uri = f"s3://{s3_world.bucket}/runs/two-stage/adapter"
    storage = open_storage(adapter_uri, endpoint_url=s3_world.endpoint)
    local = tmp_path / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        storage.download_file(f"{adapter_uri}/{name}", local / name)
    ours = load_local_adapter(storage, s3_world.model_uri, adapter_uri)
    base = AutoModelForCausalLM.from_pretrained(str(s3_world.model_dir)).eval()
    ids = torch.randint(0, 32000, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(local)).eval()(input_ids=ids).logits
        our_logits = ours(ids, torch.arange(48).repeat(2, 1))
    assert torch.allclose(peft_logits, our_logits, atol=1e-5), (peft_logits - our_logits).abs().max()
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter is trained, not the zero init


DROPOUT = {"lora.dropout": 0.1}  # dropout: a resumed run must also restore the RNG


@pytest.fixture(scope="module")
def uninterrupted(s3_world) -> dict[str, Any]:
    """The 2-stage run the interrupted ones must reproduce: its output, progress and adapter bytes."""
    done = check(s3_world.train(2, s3_world.write_spec(s3_world.spec("resume-ref", **DROPOUT))))
    adapter = s3_world.client().get_object(Bucket=s3_world.bucket,
                                           Key="runs/resume-ref/adapter/adapter_model.safetensors")["Body"].read()
    return {"done": done, "progress": s3_world.read_json("runs/resume-ref/progress.json"), "adapter": adapter}


def adapter_bytes(s3_world, name: str) -> bytes:
    key = f"runs/{name}/adapter/adapter_model.safetensors"
    return s3_world.client().get_object(Bucket=s3_world.bucket, Key=key)["Body"].read()


def test_sigterm_to_one_rank_checkpoints_every_rank_at_one_step(s3_world, uninterrupted) -> None:
    config = s3_world.write_spec(s3_world.spec("preempt", **DROPOUT))
    proc = subprocess.Popen(s3_world.train_cmd(2, config), env=s3_world.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    signalled = False
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if re.match(r"^\[stage 1/2 dp 0/1\] step 2/6 ", line):
                ranks = psutil.Process(proc.pid).children()
                assert len(ranks) == 2
                ranks[-1].send_signal(signal.SIGTERM)  # one rank only, as when one pod is evicted
                signalled = True
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert signalled, "the run never reached step 2"
    assert proc.returncode != 0, "a preempted run must not report success"
    stopped = re.findall(r"\[stage (\d)/2 dp 0/1\] preempted at step (\d+), checkpoint committed \((.*)\)", out)
    assert sorted(s for s, _, _ in stopped) == ["1", "2"], out + err
    steps = {int(n) for _, n, _ in stopped}
    assert len(steps) == 1  # the ranks agreed on one step
    step = steps.pop()
    assert 2 <= step < 6
    causes = {s: c for s, _, c in stopped}
    assert re.fullmatch(r"[\d.]+s after SIGTERM on this rank", causes["2"]) and causes["1"] == "signalled on another rank"
    marker = s3_world.read_json(f"runs/preempt/checkpoints/step-{step:08d}/COMMITTED")
    assert marker["step"] == step
    assert s3_world.read_json("runs/preempt/progress.json")["state"] == "preempted"
    assert "preempted at step" in err and "Traceback" not in err
    # every rank's lines also went to storage, the last one included
    durable = s3_world.client().get_object(Bucket=s3_world.bucket, Key="runs/preempt/logs/rank-00001.log")
    assert f"preempted at step {step}, checkpoint committed" in durable["Body"].read().decode()

    done = check(s3_world.train(2, config))
    assert f"resumed from s3://{s3_world.bucket}/runs/preempt/checkpoints/step-{step:08d} (step {step})" in done.stdout
    got = s3_world.read_json("runs/preempt/progress.json")
    assert got["losses"] == uninterrupted["progress"]["losses"]
    assert got["state"] == "finished"
    assert adapter_bytes(s3_world, "preempt") == uninterrupted["adapter"]  # byte for byte


def test_checkpoint_every_minutes_fires_without_the_step_count(s3_world) -> None:
    spec = s3_world.spec("timed", **{"training.max_steps": 3, "training.checkpoint_every_steps": 1000,
                                     "training.checkpoint_every_minutes": 0.0001, "training.eval_every_steps": 3})
    done = check(s3_world.train(2, s3_world.write_spec(spec)))
    committed = [int(n) for n in re.findall(r"checkpoint step (\d+) committed", done.stdout)]
    assert committed == [1, 2, 3]  # 6 ms: every step is slower than that, though 1000 steps never pass
    assert re.search(r"step agreement [\d.]+s of [\d.]+s training", done.stdout)


def test_resume_after_kill_minus_9_continues_exactly(s3_world, uninterrupted) -> None:
    reference, expected = uninterrupted["done"], uninterrupted["progress"]
    config = s3_world.write_spec(s3_world.spec("resume", **DROPOUT))
    proc = subprocess.Popen(s3_world.train_cmd(2, config), env=s3_world.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed = None
    ranks: list[psutil.Process] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if re.match(r"^\[stage \d/2 dp 0/1\] step 3/6 ", line):
                ranks = psutil.Process(proc.pid).children()
                assert len(ranks) == 2
                killed = ranks[0]
                killed.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=300)
        # mpirun ends the other rank too; a rank still exiting would hold the run's lease, rightly.
        psutil.wait_procs(ranks, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the run never reached step 3"
    assert proc.returncode != 0, "mpirun reported success after a rank was killed"
    # An interrupted save of a later step: no COMMITTED marker, so it must be ignored.
    client = s3_world.client()
    client.put_object(Bucket=s3_world.bucket, Key="runs/resume/checkpoints/step-00000006/stage-00-lora.safetensors",
                      Body=b"partial")
    done = check(s3_world.train(2, config))
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", done.stdout)
    assert resumed and int(resumed.group(1)) in (2, 4), done.stdout  # 4 only if saved before the kill landed
    assert min(step for _, _, step, _ in step_lines(done.stdout)) == int(resumed.group(1)) + 1
    got = s3_world.read_json("runs/resume/progress.json")
    assert got["losses"] == expected["losses"], (done.stdout, reference.stdout)  # bit-identical after the resume
    assert got["eval_losses"] == expected["eval_losses"]
    after = {(stage, step): loss for stage, _, step, loss in step_lines(done.stdout)}
    before = {(stage, step): loss for stage, _, step, loss in step_lines(reference.stdout)}
    assert after == {k: v for k, v in before.items() if k[1] > int(resumed.group(1))}
    marker = s3_world.read_json("runs/resume/checkpoints/step-00000006/COMMITTED")
    assert marker["files"]["stage-00-lora.safetensors"]["size"] > len(b"partial")


def test_two_stages_by_two_replicas_on_four_ranks(s3_world) -> None:
    spec = s3_world.spec("dp2", **{"parallel.gpus_per_node": 4, "training.max_steps": 3,
                                   "training.checkpoint_every_steps": 3, "training.eval_every_steps": 3})
    done = check(s3_world.train(4, s3_world.write_spec(spec)))
    lines = step_lines(done.stdout)
    assert sorted({(s, d) for s, d, _, _ in lines}) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for step in (1, 2, 3):
        assert len({loss for _, _, s, loss in lines if s == step}) == 1  # averaged over replicas, on every rank
    placements = re.findall(r"^\[stage (\d)/2 dp (\d)/2\] rank (\d):", done.stdout, re.M)
    placed = {int(r): (int(s), int(d)) for s, d, r in placements}
    assert placed == {0: (1, 0), 1: (2, 0), 2: (1, 1), 3: (2, 1)}  # a pipeline's stages on consecutive ranks
    marker = s3_world.read_json("runs/dp2/checkpoints/step-00000003/COMMITTED")
    assert marker["data_parallel"] == 2 and marker["stages"] == 2
    assert {f"rank-{r:05d}-rng.pt" for r in range(4)} <= set(marker["files"])
    assert s3_world.keys("runs/dp2/adapter/") == ["runs/dp2/adapter/adapter_config.json",
                                                  "runs/dp2/adapter/adapter_model.safetensors"]


@pytest.fixture(scope="module")
def one_layer_model(s3_world) -> str:
    """A model folder whose config has a single decoder layer (weights are never reached)."""
    import json

    config = json.loads((s3_world.model_dir / "config.json").read_text())
    config["num_hidden_layers"] = 1
    s3_world.client().put_object(Bucket=s3_world.bucket, Key="models/one-layer/config.json",
                                 Body=json.dumps(config).encode())
    return f"s3://{s3_world.bucket}/models/one-layer"


def _bad_cases(world, one_layer: str, port: int) -> dict[str, tuple[dict[str, Any], int, str]]:
    return {
        "missing-model": ({"model.uri": f"s3://{world.bucket}/models/absent"}, 2, "cannot read the model config"),
        "world-size": ({"parallel.gpus_per_node": 4}, 2, "started 2 ranks but the spec asks for"),
        "too-many-stages": ({"model.uri": one_layer}, 2, "has 1 decoder layer"),
        "unreachable-storage": ({"storage.endpoint_url": f"http://127.0.0.1:{port}"}, 2, "unreachable"),
    }


# S3 retries back off with random jitter: with several attempts the ranks would give up seconds
# apart, and mpirun ends the job (and the slower rank, before it reports) at the first failure.
_BAD_CASE_ENV = {"unreachable-storage": {"PIPELORA_S3_MAX_ATTEMPTS": "1"}}


@pytest.mark.parametrize("case", ["missing-model", "world-size", "too-many-stages", "unreachable-storage"])
def test_bad_input_is_one_clear_error_on_every_rank(case: str, s3_world, one_layer_model: str) -> None:
    port = free_port()
    overrides, ranks, message = _bad_cases(s3_world, one_layer_model, port)[case]
    name = f"bad-{case}"
    config = s3_world.write_spec(s3_world.spec(name, **overrides), copy_data=case != "unreachable-storage")
    done = s3_world.train(ranks, config, **_BAD_CASE_ENV.get(case, {}))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: [rank")]
    assert sorted(e.split("]")[0] for e in errors) == ["error: [rank 0", "error: [rank 1"], done.stderr[-3000:]
    assert all(message in e for e in errors), errors
    assert "Traceback" not in done.stderr
