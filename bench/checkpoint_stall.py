"""Checkpoint stall: how long the training loop is held up per checkpoint, synchronous against
asynchronous upload, on the same job in one run.

The trainer reports, per stage, the time its loop spent in checkpoint code: at checkpoint steps
(sync: serialise, upload, commit; async: finish the previous checkpoint, copy the state to host
memory), after the other steps (async: agree whether the uploads are done, commit) and at exit
(the last checkpoint, which nothing can overlap). The stall per checkpoint is the slowest stage's
(a pipeline waits for its slowest stage):

    sync:  (at checkpoint steps + after other steps) / checkpoints
    async: at checkpoint steps / checkpoints + after other steps / (checkpoints - 1)

(the last async checkpoint's upload and commit fall at exit, as in sync they fall at its step).
Also reported: the whole loop's time (steps + stalls) async over sync, which includes what the
background upload costs the training thread on shared cores. `PIPELORA_SYNC_CHECKPOINTS=1` selects
the synchronous path. Storage is a moto S3 server over HTTP (default) or a local folder.

    python bench/checkpoint_stall.py --preset small --lora-r 64 --steps 8 --every 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from common import CLI, free_port, model_and_dataset, mpirun, run

STALL = re.compile(r"^\[stage (\d+)/\d+ dp \d+/\d+\] checkpoint stall ([\d.]+)s at (\d+) checkpoint steps, "
                   r"([\d.]+)s between them, ([\d.]+)s finishing at exit, of ([\d.]+)s training$", re.M)


class Moto:
    """A moto S3 server process on a free loopback port, with one bucket."""

    def __init__(self) -> None:
        import boto3

        self.port = free_port()
        self.env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                    "AWS_DEFAULT_REGION": "us-east-1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    sys.exit("the moto server did not start")
                time.sleep(0.1)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = f"bench-{uuid.uuid4().hex[:8]}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="bench", aws_secret_access_key="bench")
        self.client.create_bucket(Bucket=self.bucket)

    def copy_prefix(self, source: str, target: str) -> None:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=source):
            for item in page.get("Contents", []):
                key = item["Key"]
                self.client.copy_object(Bucket=self.bucket, Key=target + key[len(source):],
                                        CopySource={"Bucket": self.bucket, "Key": key})

    def checkpoint_mib(self, run_name: str) -> float:
        """The size of one committed checkpoint (the newest) of `run_name`."""
        prefix = f"runs/{run_name}/checkpoints/"
        sizes: dict[str, int] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                folder = item["Key"][len(prefix):].split("/")[0]
                sizes[folder] = sizes.get(folder, 0) + int(item["Size"])
        return sizes[max(sizes)] / 1024**2 if sizes else 0.0

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def train(workdir: Path, base: dict[str, Any], *, name: str, sync: bool, moto: Moto | None) -> dict[str, Any]:
    spec = json.loads(json.dumps(base))
    spec["name"] = name
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(spec))
    if moto is not None:
        moto.copy_prefix("runs/prepared/data/", f"runs/{name}/data/")
    else:
        import shutil

        shutil.copytree(workdir / "runs" / "prepared" / "data", workdir / "runs" / name / "data")
    stages = spec["parallel"]["stages"]
    env = {**(moto.env if moto else os.environ), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    env.pop("PIPELORA_SYNC_CHECKPOINTS", None)
    if sync:
        env["PIPELORA_SYNC_CHECKPOINTS"] = "1"
    out = run([*mpirun(stages), CLI, "train", "--config", str(config)], env=env)
    stalls = {int(s): (float(at), int(n), float(between), float(at_exit), float(training))
              for s, at, n, between, at_exit, training in STALL.findall(out)}
    if len(stalls) != stages:
        sys.exit(f"expected a checkpoint stall line per stage in the output of {name}:\n{out[-3000:]}")
    per_stage = []
    for at, n, between, at_exit, training in stalls.values():
        at_step = (at + between) / n if sync else at / n
        after = 0.0 if sync else (between / (n - 1) if n > 1 else 0.0)
        per_stage.append({"per_checkpoint": at_step + after, "at_step": at_step, "after": after,
                          "loop": training + at + between + at_exit, "checkpoints": n, "at_exit": at_exit})
    return {
        "stall_per_checkpoint_s": max(p["per_checkpoint"] for p in per_stage),
        "at_step_s": max(p["at_step"] for p in per_stage),
        "after_s": max(p["after"] for p in per_stage),
        "loop_s": max(p["loop"] for p in per_stage),
        "at_exit_s": max(p["at_exit"] for p in per_stage),
        "checkpoints": per_stage[0]["checkpoints"],
        "checkpoint_mib": moto.checkpoint_mib(name) if moto else _local_checkpoint_mib(workdir / "runs" / name),
    }


def _local_checkpoint_mib(run_dir: Path) -> float:
    folders = sorted((run_dir / "checkpoints").iterdir())
    return sum(p.stat().st_size for p in folders[-1].iterdir()) / 1024**2 if folders else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--lora-r", type=int, default=64, help="LoRA rank: sets the checkpoint's size")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--every", type=int, default=2, help="checkpoint_every_steps")
    parser.add_argument("--repeats", type=int, default=2, help="sync/async pairs, interleaved; medians are reported")
    parser.add_argument("--storage", choices=["s3", "local"], default="s3")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pipelora-bench-ckpt-"))
    model, dataset = model_and_dataset(workdir, args.preset)
    moto = Moto() if args.storage == "s3" else None
    try:
        storage: dict[str, Any] = ({"uri": f"s3://{moto.bucket}/runs", "endpoint_url": moto.endpoint} if moto
                                   else {"uri": str(workdir / "runs")})
        base = {
            "name": "prepared", "storage": storage, "model": {"uri": str(model)},
            "dataset": {"uri": str(dataset), "seq_len": args.seq_len, "eval_fraction": 0.0},
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0},
            "parallel": {"stages": 2, "nodes": 1, "gpus_per_node": 2, "micro_batch_size": 1,
                         "micro_batches": args.micro_batches},
            "training": {"max_steps": args.steps, "checkpoint_every_steps": args.every, "keep_checkpoints": 2,
                         "eval_every_steps": 10**6, "activation_checkpointing": False, "dtype": "fp32",
                         "warmup_steps": 1},
        }
        prep = workdir / "prepare.yaml"
        prep.write_text(yaml.safe_dump(base))
        run([CLI, "dataprep", "--config", str(prep)], env=moto.env if moto else None)
        load_before = os.getloadavg()[0]
        pairs = []
        for i in range(args.repeats):
            sync = train(workdir, base, name=f"sync-{i}", sync=True, moto=moto)
            asyn = train(workdir, base, name=f"async-{i}", sync=False, moto=moto)
            pairs.append((sync, asyn))
        load_after = os.getloadavg()[0]
    finally:
        if moto is not None:
            moto.close()

    def median(key: str, which: int) -> float:
        return statistics.median(pair[which][key] for pair in pairs)

    ratios = sorted(a["stall_per_checkpoint_s"] / s["stall_per_checkpoint_s"] for s, a in pairs)
    figures = {
        "stall_per_checkpoint_sync_s": median("stall_per_checkpoint_s", 0),
        "stall_per_checkpoint_async_s": median("stall_per_checkpoint_s", 1),
        "async_stall_at_checkpoint_step_s": median("at_step_s", 1),
        "async_stall_committing_later_s": median("after_s", 1),
        "stall_ratio_async_over_sync": statistics.median(ratios),
        "stall_ratio_min": ratios[0],
        "stall_ratio_max": ratios[-1],
        "loop_time_ratio_async_over_sync": statistics.median(a["loop_s"] / s["loop_s"] for s, a in pairs),
        "last_checkpoint_at_exit_async_s": median("at_exit_s", 1),
        "checkpoints_per_run": pairs[0][0]["checkpoints"],
        "checkpoint_mib": pairs[0][0]["checkpoint_mib"],
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    for name, value in figures.items():
        print(json.dumps({"figure": name, "value": round(value, 4) if isinstance(value, float) else value,
                          "storage": args.storage, "preset": args.preset, "lora_r": args.lora_r,
                          "steps": args.steps, "every": args.every}))


if __name__ == "__main__":
    main()
