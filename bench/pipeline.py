"""CPU pipeline benchmark: 2 stages against 1 stage on the same job, one core per stage.

Prints one JSON line per figure and, with --write, appends a `## trainer` section to
docs/benchmarks.md. Figures (DESIGN.md targets): throughput ratio 2/1 stages at 8 micro-batches
(>= 1.6; ideal 2m/(m+p-1) = 1.78), each rank's peak memory over the one-stage peak (<= 0.6),
weight bytes each stage read from storage, and the share of step time spent waiting for data
(<= 2%); next to them, each stage's peak as `pipelora.trainer.memory` predicts it, the cut the
memory-aware partition would need for the 0.6 target and what that cut costs in throughput, and
(when the step lines carry it) MFU against the measured fp32 matmul rate of a core.

Each rank runs under a small wrapper that reports its peak resident memory (KiB) at exit, since
the step line's `mem` has 0.1 GiB steps. `--allocator-variant` adds pairs run with glibc's
`MALLOC_MMAP_THRESHOLD_=65536`, which returns freed blocks of 64 KiB and more to the system at
once: the difference is memory the allocator kept, not memory the model needs.

    python bench/pipeline.py --preset small --seq-len 128 --steps 6 --repeats 3 --write
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from common import CLI, free_port, model_and_dataset, mpirun, run

STEP = re.compile(r"^\[stage (\d+)/\d+ dp \d+/\d+\] step (\d+)/\d+ loss \S+ lr \S+ tok/s (\d+) mem ([\d.]+)GiB"
                  r" eta \S+(?: tok/s/dev (\d+) mfu ([\d.]+)%)?", re.M)
RSS = re.compile(r"^bench-rss rank (\d+) kib (\d+)$", re.M)
# Runs one rank of `pipelora-k8s` and reports its peak resident memory when it exits.
RANK = (
    "import atexit, os, resource, sys\n"
    "def report():\n"
    "    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "    sys.stdout.write(f\"bench-rss rank {os.environ.get('OMPI_COMM_WORLD_RANK', '0')} kib {kib}\\n\")\n"
    "    sys.stdout.flush()\n"
    "atexit.register(report)\n"
    "from pipelora.workflow.cli import main\n"
    "main(sys.argv[1:])\n"
)
READ = re.compile(r"^\[stage (\d+)/\d+ dp \d+/\d+\] rank \d+: .*read ([\d.]+) MiB of weights.*base mem ([\d.]+)GiB",
                  re.M)
WAIT = re.compile(r"^data wait ([\d.]+)s of ([\d.]+)s training", re.M)


def train(workdir: Path, base: dict[str, Any], *, stages: int, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    spec = json.loads(json.dumps(base))
    spec["name"] = f"bench-{stages}-stage"
    spec["parallel"].update(stages=stages, gpus_per_node=stages)
    config = workdir / f"{spec['name']}.yaml"
    config.write_text(yaml.safe_dump(spec))
    data = workdir / "runs" / "prepared" / "data"
    target = workdir / "runs" / spec["name"] / "data"
    shutil.rmtree(workdir / "runs" / spec["name"], ignore_errors=True)
    shutil.copytree(data, target)
    extra = dict(env_extra or {})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **extra}
    out = run([*mpirun(stages, *extra), sys.executable, "-c", RANK, "train", "--config", str(config)], env=env)
    steps = [(int(s), int(k), int(t), float(m), float(f) if f else None) for s, k, t, m, _, f in STEP.findall(out)]
    warm = 2  # the first steps pay for allocation and buffer set-up
    rates = [t for s, k, t, _, _ in steps if s == 1 and k > warm]
    mfus = [f for s, k, _, _, f in steps if s == 1 and k > warm and f is not None]
    peaks: dict[int, float] = {}
    for rank, kib in RSS.findall(out):
        stage = int(rank) % stages + 1
        peaks[stage] = max(peaks.get(stage, 0.0), int(kib) / 1024**2)
    wait = WAIT.search(out)
    reads = READ.findall(out)
    return {
        "tokens_per_s": statistics.median(rates),
        "mfu_percent": statistics.median(mfus) if mfus else None,
        "peak_mem_gib": peaks,
        "base_mem_gib": {int(s): float(b) for s, _, b in reads},
        "read_mib": {int(s): float(v) for s, v, _ in reads},
        "data_wait_fraction": float(wait.group(1)) / float(wait.group(2)) if wait else None,
    }


def ideal_ratio(model: Path, *, seq_len: int, micro_batches: int) -> float:
    """What 2 stages could reach with this cut and no communication cost: total/slowest x m/(m+p-1)."""
    from pipelora.storage import open_storage
    from pipelora.trainer.partition import balanced_partition
    from pipelora.trainer.weights import read_model_config

    config = read_model_config(open_storage(str(model)), str(model))
    part = balanced_partition(config, stages=2, seq_len=seq_len)
    slowest = max(part.stage_cost(s) for s in range(2))
    return sum(part.costs) / slowest * micro_batches / (micro_batches + 1)


def memory_model(model: Path, base: dict[str, Any]) -> dict[str, Any]:
    """What `pipelora.trainer.memory` predicts for the benchmark's job: each stage's peak (model tensors
    only, the runtime excluded) for 1 and 2 stages, and the cuts into 2 stages ordered by stage 1's size."""
    from pipelora.config import spec_from_dict
    from pipelora.storage import open_storage
    from pipelora.trainer.memory import ModelShape, RunShape, estimate_stages, item_costs
    from pipelora.trainer.partition import memory_aware_partition
    from pipelora.trainer.weights import read_model_config

    config = read_model_config(open_storage(str(model)), str(model))
    shape = ModelShape.from_config(config)

    def run_shape(stages: int) -> RunShape:
        spec = spec_from_dict({**base, "parallel": {**base["parallel"], "stages": stages, "gpus_per_node": stages}})
        return RunShape.from_spec(spec, device="cpu")

    one = memory_aware_partition(shape, run_shape(1), budget_bytes=None, reserve_bytes=0)
    two = memory_aware_partition(shape, run_shape(2), budget_bytes=None, reserve_bytes=0)
    items = item_costs(shape, run_shape(2))
    total = sum(i.flops for i in items)
    m = run_shape(2).micro_batches
    cuts = []
    for split in range(2, shape.layers + 1):  # stage 1 = embed + layers 0..split-2
        ests = estimate_stages(shape, run_shape(2), (0, split, len(items)))
        slowest = max(e.flops_per_token for e in ests)
        cuts.append({"stage1_layers": split - 1, "peaks_gib": [e.peak_bytes / 1024**3 for e in ests],
                     "ideal_ratio": total / slowest * m / (m + 1)})
    return {"one": one, "two": two, "cuts": cuts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="1-stage/2-stage pairs; the median ratio is reported")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--write", action="store_true", help="append the results to docs/benchmarks.md")
    parser.add_argument("--allocator-variant", action="store_true",
                        help="also run the pairs with MALLOC_MMAP_THRESHOLD_=65536 (allocator retention)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pipelora-bench-"))
    model, dataset = model_and_dataset(workdir, args.preset)
    base = {
        "name": "prepared", "storage": {"uri": str(workdir / "runs")}, "model": {"uri": str(model)},
        "dataset": {"uri": str(dataset), "seq_len": args.seq_len, "eval_fraction": 0.0},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "parallel": {"stages": 1, "nodes": 1, "gpus_per_node": 1, "micro_batch_size": 1,
                     "micro_batches": args.micro_batches},
        "training": {"max_steps": args.steps, "checkpoint_every_steps": 10**6, "eval_every_steps": 10**6,
                     "activation_checkpointing": False, "dtype": "fp32", "warmup_steps": 1},
    }
    prep = workdir / "prepare.yaml"
    prep.write_text(yaml.safe_dump(base))
    run([CLI, "dataprep", "--config", str(prep)])
    load_before = os.getloadavg()[0]
    variant = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    pairs, variant_pairs = [], []
    for _ in range(args.repeats):
        pairs.append((train(workdir, base, stages=1), train(workdir, base, stages=2)))
        if args.allocator_variant:
            variant_pairs.append((train(workdir, base, stages=1, env_extra=variant),
                                  train(workdir, base, stages=2, env_extra=variant)))
    load_after = os.getloadavg()[0]
    ratios = sorted(two["tokens_per_s"] / one["tokens_per_s"] for one, two in pairs)
    # the pair with the median ratio
    one, two = sorted(pairs, key=lambda p: p[1]["tokens_per_s"] / p[0]["tokens_per_s"])[len(pairs) // 2]

    def model_mem(run: dict[str, Any], stage: int) -> float:  # peak above the runtime's own footprint
        return run["peak_mem_gib"][stage] - run["base_mem_gib"][stage]

    def median_peak_ratio(runs: list[tuple[dict[str, Any], dict[str, Any]]], stage: int) -> float:
        return statistics.median(b["peak_mem_gib"][stage] / a["peak_mem_gib"][1] for a, b in runs)

    predicted = memory_model(model, base)
    gib = 1024**3
    one_pred = predicted["one"].peaks[0] / gib
    two_pred = [x / gib for x in predicted["two"].peaks]
    # the largest model memory a stage may reach for its RSS to stay within 0.6 of the one-stage RSS
    allowed = 0.6 * one["peak_mem_gib"][1] - two["base_mem_gib"][1]
    fitting = [c for c in predicted["cuts"] if max(c["peaks_gib"]) <= allowed * one_pred / model_mem(one, 1)]
    bound_cut = max(fitting, key=lambda c: c["ideal_ratio"]) if fitting else None

    total_mib = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1024**2
    figures = {
        "throughput_ratio_2_over_1_stage": statistics.median(ratios),
        "throughput_ratio_min": ratios[0],
        "throughput_ratio_max": ratios[-1],
        "ideal_ratio_for_this_partition": ideal_ratio(model, seq_len=args.seq_len, micro_batches=args.micro_batches),
        "tokens_per_s_1_stage": one["tokens_per_s"],
        "tokens_per_s_2_stages": two["tokens_per_s"],
        "mfu_percent_1_stage": one["mfu_percent"],
        "mfu_percent_2_stages": two["mfu_percent"],
        "peak_mem_gib_1_stage": one["peak_mem_gib"][1],
        "peak_mem_gib_stage1": two["peak_mem_gib"][1],
        "peak_mem_gib_stage2": two["peak_mem_gib"][2],
        "peak_mem_ratio_stage1": median_peak_ratio(pairs, 1),
        "peak_mem_ratio_stage2": median_peak_ratio(pairs, 2),
        "base_mem_gib_stage1": two["base_mem_gib"][1],
        "model_mem_ratio_stage1": model_mem(two, 1) / model_mem(one, 1),
        "model_mem_ratio_stage2": model_mem(two, 2) / model_mem(one, 1),
        "model_mem_gib_1_stage": model_mem(one, 1),
        "model_mem_gib_stage1": model_mem(two, 1),
        "model_mem_gib_stage2": model_mem(two, 2),
        "predicted_mem_gib_1_stage": one_pred,
        "predicted_mem_gib_stage1": two_pred[0],
        "predicted_mem_gib_stage2": two_pred[1],
        "predicted_mem_ratio_stage1": two_pred[0] / one_pred,
        "memory_aware_cut_without_bound": f"embed + {predicted['two'].bounds[1] - 1} layers, then the rest",
        "model_mem_gib_allowed_for_0.6_rss": allowed,
        "stage1_layers_for_0.6_rss": bound_cut["stage1_layers"] if bound_cut else "none fits",
        "ideal_ratio_for_0.6_rss_cut": bound_cut["ideal_ratio"] if bound_cut else None,
        "weights_mib_total": total_mib,
        "weights_mib_read_stage1": two["read_mib"].get(1),
        "weights_mib_read_stage2": two["read_mib"].get(2),
        "data_wait_fraction_2_stages": two["data_wait_fraction"],
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    if variant_pairs:
        v_ratios = sorted(b["tokens_per_s"] / a["tokens_per_s"] for a, b in variant_pairs)
        v_one, v_two = variant_pairs[len(variant_pairs) // 2]
        figures.update({
            "mmap64k_throughput_ratio_2_over_1_stage": statistics.median(v_ratios),
            "mmap64k_tokens_per_s_1_stage": statistics.median(a["tokens_per_s"] for a, _ in variant_pairs),
            "mmap64k_tokens_per_s_2_stages": statistics.median(b["tokens_per_s"] for _, b in variant_pairs),
            "mmap64k_peak_mem_gib_1_stage": v_one["peak_mem_gib"][1],
            "mmap64k_peak_mem_gib_stage1": v_two["peak_mem_gib"][1],
            "mmap64k_peak_mem_ratio_stage1": median_peak_ratio(variant_pairs, 1),
            "mmap64k_peak_mem_ratio_stage2": median_peak_ratio(variant_pairs, 2),
            "mmap64k_model_mem_gib_1_stage": model_mem(v_one, 1),
            "mmap64k_model_mem_gib_stage1": model_mem(v_two, 1),
            "mmap64k_model_mem_gib_stage2": model_mem(v_two, 2),
        })
    for name, value in figures.items():
        print(json.dumps({"figure": name, "value": round(value, 4) if isinstance(value, float) else value,
                          "preset": args.preset, "seq_len": args.seq_len, "micro_batches": args.micro_batches}))
    if args.write:
        write_markdown(figures, args)


def write_markdown(figures: dict[str, Any], args: argparse.Namespace) -> None:
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    path.parent.mkdir(exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items())
    section = (
        "\n## trainer\n\n"
        f"`python bench/pipeline.py --preset {args.preset} --seq-len {args.seq_len} --micro-batches "
        f"{args.micro_batches} --steps {args.steps} --repeats {args.repeats}"
        f"{' --allocator-variant' if args.allocator_variant else ''} --write` on {os.cpu_count()} CPU cores, one core "
        "(OMP_NUM_THREADS=1) per rank; random-weight Mistral-shaped model, fp32, LoRA r=16 on all linear layers. "
        "peak_mem: each rank's peak RSS (KiB from getrusage at exit); peak_mem_ratio: a 2-stage rank's over the "
        "1-stage rank's (median of the pairs); model_mem: the peak above the process's footprint before its "
        "layers were built (the torch/DeepSpeed runtime, base_mem); predicted_mem: `pipelora.trainer.memory`'s "
        "peak for the cut the trainer runs (model tensors only). model_mem_gib_allowed_for_0.6_rss: what a 2-stage "
        "rank's model memory may reach for its RSS to stay within 0.6 of the 1-stage RSS; "
        "stage1_layers_for_0.6_rss and ideal_ratio_for_0.6_rss_cut: the memory-aware cut (by the predicted peaks) "
        "that would fit it, and its throughput bound. mfu_percent: MFU the step lines report (against the measured "
        "fp32 matmul rate of the rank's core). mmap64k_*: the same runs with MALLOC_MMAP_THRESHOLD_=65536. load_average: the machine's "
        "1-minute load around the runs; with other work on the cores the throughput ratio is not the pipeline's. "
        "ideal_ratio_for_this_partition: the estimated stage costs' bound (total / slowest stage x m/(m+1)); the "
        "cut is contiguous, so a 100M model's 8 layers and head cannot split evenly.\n\n"
        "| figure | value |\n|---|---|\n" + rows + "\n"
    )
    head, sep, _ = text.partition("\n## trainer\n")
    if sep:  # replace our previous section, keep everything after it that belongs to others
        rest = text.split("\n## trainer\n", 1)[1]
        after = rest.split("\n## ", 1)
        text = head + section + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()
