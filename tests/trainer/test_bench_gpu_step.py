"""bench/gpu_step.py measures a GPU; here its dry run on CPU checks the script and its MFU arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_step.py"


def test_the_dry_run_reports_mfu_from_the_trainer_flops_count_on_packed_rows() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--preset", "tiny", "--attention", "dense",
                           "--steps", "2", "--seq-len", "128", "--mean-sequence", "24"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = {row["figure"]: row for row in map(json.loads, done.stdout.splitlines())}
    meta = figures["dense_tokens_per_s"]
    assert meta["sequences_per_micro_batch"] >= 3 and meta["seq_len"] == 128
    tps, gflop = figures["dense_tokens_per_s"]["value"], figures["model_gflop_per_token"]["value"]
    rate = figures["matmul_tflops"]["value"] * 1e12
    assert tps > 0 and gflop > 0
    assert abs(figures["dense_mfu_percent"]["value"] - 100 * tps * gflop * 1e9 / rate) <= 0.01 * figures[
        "dense_mfu_percent"]["value"] + 1e-3
    assert abs(figures["dense_tokens_per_s"]["value"] * figures["dense_step_s"]["value"] - 4 * 128) < 1


def test_flex_is_refused_on_cpu_with_the_reason() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--preset", "tiny", "--steps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert "flex attention has no backward pass on CPU: use --attention dense with --device cpu" in done.stderr
