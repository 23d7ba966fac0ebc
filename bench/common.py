"""What the CPU benchmarks share: the CLI, a free port, mpirun's prefix, a command that must succeed,
and the random-weight model and learnable dataset every benchmark trains on (made once per workdir)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

CLI = str(Path(sys.executable).parent / "pipelora-k8s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mpirun(np_: int, *exported: str) -> list[str]:
    """mpirun with `np_` ranks on this machine, exporting OMP_NUM_THREADS, MASTER_PORT and `exported`."""
    cmd = ["mpirun", "--oversubscribe", "-np", str(np_)]
    for name in ("OMP_NUM_THREADS", "MASTER_PORT", *exported):
        cmd += ["-x", name]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd


def run(cmd: list[str], **kw: Any) -> str:
    """The command's stdout; on failure the benchmark ends with the command and its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def model_and_dataset(workdir: Path, preset: str, *, examples: int = 2000) -> tuple[Path, Path]:
    """A Mistral-shaped random model of `preset` and the learnable dataset, written once under `workdir`."""
    model = workdir / f"model-{preset}"
    if not (model / "config.json").exists():
        run([CLI, "init-model", "--family", "mistral", "--preset", preset, "--out", str(model)])
    dataset = workdir / "learnable.jsonl"
    if not dataset.exists():
        run([CLI, "make-dataset", "--out", str(dataset), "--examples", str(examples)])
    return model, dataset
