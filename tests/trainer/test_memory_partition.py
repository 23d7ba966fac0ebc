"""Memory-aware partitions: the fastest cut whose every stage fits, 1F1B in-flight activations included."""

from __future__ import annotations

import pytest

from pipelora.trainer.memory import GIB, RESERVE_BYTES, ModelShape, RunShape, estimate_stages
from pipelora.trainer.partition import balanced_partition, device_budget, memory_aware_partition
from pipelora.trainer.presets import preset_config

MIB = 1024**2


def small_run(**kw: object) -> RunShape:
    """The CPU benchmark's job: the ~100M small preset, fp32, LoRA r=16 on every linear layer."""
    base = dict(seq_len=512, micro_batches=8, stages=2, gpus_per_node=2, dtype_bytes=4, device="cpu")
    return RunShape(**{**base, **kw})  # type: ignore[arg-type]


def layers_of(bounds: tuple[int, ...], stage: int, layers: int) -> int:
    return sum(1 for i in range(bounds[stage], bounds[stage + 1]) if 1 <= i <= layers)


@pytest.mark.parametrize(("preset", "run"), [
    ("small", small_run()),
    # Mistral 7B on 4 GPUs at seq_len 4096 without activation checkpointing (about 50 GiB on stage 1)
    ("7b", RunShape(seq_len=4096, micro_batches=16, stages=4, gpus_per_node=4, dtype_bytes=2, lora_dropout=True)),
])
def test_the_memory_aware_cut_respects_a_bound_the_compute_only_cut_violates(preset: str, run: RunShape) -> None:
    model = ModelShape.from_config(preset_config("mistral", preset))  # type: ignore[arg-type]
    stages, layers = run.stages, model.layers
    fastest = memory_aware_partition(model, run, budget_bytes=None)
    worst = max(fastest.peaks)
    assert fastest.peaks[0] == worst  # stage 1 holds `stages` micro-batches and the embedding
    budget = int(0.9 * worst)
    bound = memory_aware_partition(model, run, budget_bytes=budget)
    assert bound.fits and max(bound.peaks) <= budget < worst
    assert layers_of(bound.bounds, 0, layers) < layers_of(fastest.bounds, 0, layers)
    # the price: the slowest stage is slower than in the fastest cut, never faster
    slowest = max(fastest.stage_cost(s) for s in range(stages))
    assert max(bound.stage_cost(s) for s in range(stages)) >= slowest
    # and the peaks the partition reports are the memory model's
    reserve = RESERVE_BYTES[run.device]
    assert bound.peaks == tuple(s.peak_bytes for s in estimate_stages(model, run, bound.bounds, reserve_bytes=reserve))


def test_without_a_bound_the_cut_is_the_fastest_and_equally_fast_cuts_go_to_the_leanest() -> None:
    model = ModelShape.from_config(preset_config("mistral", "tiny"))
    run = RunShape(seq_len=64, micro_batches=4, stages=2, gpus_per_node=2, dtype_bytes=4, device="cpu")
    part = memory_aware_partition(model, run, budget_bytes=None)
    candidates = []
    for split in range(2, 5):  # stage 1 = items [0, split), each side with a decoder layer
        bounds = (0, split, 6)
        ests = estimate_stages(model, run, bounds)
        candidates.append((max(e.flops_per_token for e in ests), max(e.peak_bytes for e in ests), bounds))
    best_time = min(c[0] for c in candidates)
    assert part.bounds == min((c for c in candidates if c[0] <= best_time * (1 + 1e-9)), key=lambda c: c[1])[2]


def test_a_bound_no_cut_meets_gives_the_leanest_cut_and_says_so() -> None:
    model = ModelShape.from_config(preset_config("mistral", "small"))
    part = memory_aware_partition(model, small_run(), budget_bytes=64 * MIB)
    assert not part.fits
    table = part.table()
    assert "no cut fits 0.06 GiB per rank" in table and "pred. peak GiB" in table
    leanest = min(max(estimate_stages(model, small_run(), (0, s, 10)), key=lambda e: e.peak_bytes).peak_bytes
                  for s in range(2, 9))
    assert max(part.peaks) == leanest


def test_the_trainer_partition_with_the_spec_shows_cost_and_memory(monkeypatch) -> None:
    from pipelora.config import spec_from_dict

    spec = spec_from_dict({
        "name": "mem", "storage": {"uri": "runs"}, "model": {"uri": "m"},
        "dataset": {"uri": "d.jsonl", "seq_len": 512},
        "parallel": {"stages": 2, "gpus_per_node": 2, "micro_batches": 8},
        "lora": {"dropout": 0.0}, "training": {"activation_checkpointing": False, "dtype": "fp32"}})
    config = preset_config("mistral", "small")
    monkeypatch.delenv("PIPELORA_GPU_MEMORY_GIB", raising=False)
    free = balanced_partition(config, stages=2, seq_len=512, spec=spec)
    assert free.bounds == balanced_partition(config, stages=2, seq_len=512).bounds  # CPU: no bound
    assert free.budget is None and len(free.peaks) == 2
    monkeypatch.setenv("PIPELORA_GPU_MEMORY_GIB", str(0.9 * free.peaks[0] / GIB))
    assert device_budget("cpu") == int(0.9 * free.peaks[0] / GIB * GIB)
    bound = balanced_partition(config, stages=2, seq_len=512, spec=spec)
    assert bound.fits and bound.bounds[1] < free.bounds[1]
    table = bound.table()
    assert table.startswith("stage  items") and "pred. peak GiB" in table and "est. GFLOP/token" in table
    assert "every stage's predicted peak fits" in table


def test_the_spec_gpu_memory_binds_the_cut_on_gpus_only(monkeypatch) -> None:
    """`cluster.gpu_memory_gib` is the cluster's card: the trainer's cut fits it on a GPU, a local CPU run
    is not held to it, and `PIPELORA_GPU_MEMORY_GIB` still overrides it."""
    monkeypatch.delenv("PIPELORA_GPU_MEMORY_GIB", raising=False)
    assert device_budget("cpu", 24.0) is None
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda _: pytest.fail("the spec's value comes first"))
    assert device_budget("cuda", 24.0) == 24 * GIB
    monkeypatch.setenv("PIPELORA_GPU_MEMORY_GIB", "40")
    assert device_budget("cuda", 24.0) == 40 * GIB
