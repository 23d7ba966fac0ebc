"""CPU pipeline benchmark: 2 stages against 1 stage on the same job, one core per stage.

Prints one JSON line per figure and, with --write, appends a `## trainer` section to
docs/benchmarks.md. Figures (DESIGN.md targets): throughput ratio 2/1 stages at 8 micro-batches
(>= 1.6; ideal 2m/(m+p-1) = 1.78), each rank's peak memory over the one-stage peak (<= 0.6),
weight bytes each stage read from storage, and the share of step time spent waiting for data
(<= 2%).

    python bench/pipeline.py --preset small --seq-len 128 --steps 6 --repeats 3 --write
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

CLI = str(Path(sys.executable).parent / "pipelora-k8s")
STEP = re.compile(r"^\[stage (\d+)/\d+ dp \d+/\d+\] step (\d+)/\d+ loss \S+ lr \S+ tok/s (\d+) mem ([\d.]+)GiB", re.M)
READ = re.compile(r"^\[stage (\d+)/\d+ dp \d+/\d+\] rank \d+: .*read ([\d.]+) MiB of weights.*base mem ([\d.]+)GiB",
                  re.M)
WAIT = re.compile(r"^data wait ([\d.]+)s of ([\d.]+)s training", re.M)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str], **kw: Any) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def train(workdir: Path, base: dict[str, Any], *, stages: int) -> dict[str, Any]:
    spec = json.loads(json.dumps(base))
    spec["name"] = f"bench-{stages}-stage"
    spec["parallel"].update(stages=stages, gpus_per_node=stages)
    config = workdir / f"{spec['name']}.yaml"
    config.write_text(yaml.safe_dump(spec))
    data = workdir / "runs" / "prepared" / "data"
    target = workdir / "runs" / spec["name"] / "data"
    shutil.rmtree(workdir / "runs" / spec["name"], ignore_errors=True)
    shutil.copytree(data, target)
    mpirun = ["mpirun", "--oversubscribe", "-np", str(stages), "-x", "OMP_NUM_THREADS", "-x", "MASTER_PORT"]
    if os.geteuid() == 0:
        mpirun.insert(1, "--allow-run-as-root")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    out = run([*mpirun, CLI, "train", "--config", str(config)], env=env)
    steps = [(int(s), int(k), int(t), float(m)) for s, k, t, m in STEP.findall(out)]
    warm = 2  # the first steps pay for allocation and buffer set-up
    rates = [t for s, k, t, _ in steps if s == 1 and k > warm]
    mem = {s: max(m for s2, _, _, m in steps if s2 == s) for s in {s for s, *_ in steps}}
    wait = WAIT.search(out)
    reads = READ.findall(out)
    return {
        "tokens_per_s": statistics.median(rates),
        "peak_mem_gib": mem,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="1-stage/2-stage pairs; the median ratio is reported")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--write", action="store_true", help="append the results to docs/benchmarks.md")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pipelora-bench-"))
    model = workdir / f"model-{args.preset}"
    if not (model / "config.json").exists():
        run([CLI, "init-model", "--family", "mistral", "--preset", args.preset, "--out", str(model)])
    dataset = workdir / "learnable.jsonl"
    if not dataset.exists():
        run([CLI, "make-dataset", "--out", str(dataset), "--examples", "2000"])
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
    pairs = [(train(workdir, base, stages=1), train(workdir, base, stages=2)) for _ in range(args.repeats)]
    load_after = os.getloadavg()[0]
    ratios = sorted(two["tokens_per_s"] / one["tokens_per_s"] for one, two in pairs)
    one, two = pairs[len(pairs) // 2]

    def model_mem(run: dict[str, Any], stage: int) -> float:  # peak above the runtime's own footprint
        return run["peak_mem_gib"][stage] - run["base_mem_gib"][stage]

    total_mib = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1024**2
    figures = {
        "throughput_ratio_2_over_1_stage": statistics.median(ratios),
        "throughput_ratio_min": ratios[0],
        "throughput_ratio_max": ratios[-1],
        "ideal_ratio_for_this_partition": ideal_ratio(model, seq_len=args.seq_len, micro_batches=args.micro_batches),
        "tokens_per_s_1_stage": one["tokens_per_s"],
        "tokens_per_s_2_stages": two["tokens_per_s"],
        "peak_mem_ratio_stage1": two["peak_mem_gib"][1] / one["peak_mem_gib"][1],
        "peak_mem_ratio_stage2": two["peak_mem_gib"][2] / one["peak_mem_gib"][1],
        "model_mem_ratio_stage1": model_mem(two, 1) / model_mem(one, 1),
        "model_mem_ratio_stage2": model_mem(two, 2) / model_mem(one, 1),
        "weights_mib_total": total_mib,
        "weights_mib_read_stage1": two["read_mib"].get(1),
        "weights_mib_read_stage2": two["read_mib"].get(2),
        "data_wait_fraction_2_stages": two["data_wait_fraction"],
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
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
        f"{args.micro_batches} --steps {args.steps} --repeats {args.repeats} --write` on {os.cpu_count()} CPU cores, one core "
        "(OMP_NUM_THREADS=1) per rank; random-weight Mistral-shaped model, fp32, LoRA r=16 on all linear layers. "
        "peak_mem_ratio: each 2-stage rank's peak RSS over the 1-stage rank's; model_mem_ratio: the same above "
        "each process's footprint before its layers were built (the torch/DeepSpeed runtime). load_average: the "
        "machine's 1-minute load around the runs; with other work on the cores the throughput ratio is not the "
        "pipeline's. ideal_ratio_for_this_partition: the estimated stage costs' bound (total / slowest stage x "
        "m/(m+1)); the cut is contiguous, so a 100M model's 8 layers and head cannot split evenly.\n\n"
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
