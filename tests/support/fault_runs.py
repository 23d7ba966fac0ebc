"""What the S3 fault tests run: a bucket on moto with a tiny model, a dataset and prepared data,
the `pipelora-k8s` commands pointed at moto or at a fault proxy, and a check of commit markers
at the moment they are written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mpi import mpirun_prefix
from net import free_port
from specs import with_overrides

BIN = Path(sys.executable).parent
CLI = str(BIN / "pipelora-k8s")
HANG_GUARD_S = 600  # a hung rank or collective fails the test instead of the suite; not a performance bound
BUCKET = "pipelora-faults"  # fixed: the proxy's schedule hashes request paths, so runs repeat it

# What the project's processes get behind the proxy: enough attempts to outlast the proxy's
# `max_streak` (2) plus a spurious timeout on a loaded machine, and a read timeout the `delay`
# faults (DELAY_S) exceed.
READ_TIMEOUT_S = 2.0
DELAY_S = 3.0
FAULT_ENV = {"PIPELORA_S3_MAX_ATTEMPTS": "5", "PIPELORA_S3_READ_TIMEOUT": str(READ_TIMEOUT_S),
             "PIPELORA_S3_CONNECT_TIMEOUT": "5"}


@dataclass
class FaultWorld:
    """A bucket on moto holding a tiny model, a dataset and one prepared run's data."""

    endpoint: str  # moto itself: what clean runs and the checks use
    tmp: Path
    data_source: str = "prepared"
    bucket: str = BUCKET
    fault_env: dict[str, str] = field(default_factory=lambda: dict(FAULT_ENV))

    @property
    def model_uri(self) -> str:
        return f"s3://{BUCKET}/models/tiny-mistral"

    @property
    def dataset_uri(self) -> str:
        return f"s3://{BUCKET}/inputs/learnable.jsonl"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def spec(self, name: str, *, endpoint: str | None = None, **overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": name,
            "storage": {"uri": f"s3://{BUCKET}/runs", "endpoint_url": endpoint or self.endpoint},
            "model": {"uri": self.model_uri},
            "dataset": {"uri": self.dataset_uri, "seq_len": 64, "eval_fraction": 0.05},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},
            "parallel": {"stages": 2, "nodes": 1, "gpus_per_node": 2, "micro_batch_size": 2, "micro_batches": 4},
            "training": {"max_steps": 6, "lr": 2.0e-3, "warmup_steps": 2, "schedule": "cosine", "seed": 7,
                         "checkpoint_every_steps": 2, "keep_checkpoints": 2, "eval_every_steps": 3,
                         "eval_batches": 2, "activation_checkpointing": False, "dtype": "fp32"},
        }
        return with_overrides(spec, overrides)

    def write_spec(self, spec: dict[str, Any]) -> Path:
        path = self.tmp / f"{spec['name']}.yaml"
        path.write_text(yaml.safe_dump(spec), encoding="utf-8")
        return path

    def copy_data(self, name: str) -> None:
        """The prepared shards and manifest, copied into run `name` (server-side, not through the proxy)."""
        s3 = self.client()
        prefix = f"runs/{self.data_source}/data/"
        for key in self.keys(prefix):
            s3.copy_object(Bucket=BUCKET, Key=f"runs/{name}/data/{key[len(prefix):]}",
                           CopySource={"Bucket": BUCKET, "Key": key})

    def keys(self, prefix: str) -> list[str]:
        s3 = self.client()
        out: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            out += [item["Key"] for item in page.get("Contents", [])]
        return sorted(out)

    def get(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def layout(self, name: str) -> Any:
        from pipelora.layout import RunLayout

        return RunLayout.of(f"s3://{BUCKET}/runs", name)

    def read(self, uri: str) -> bytes:
        """An object of this bucket by its s3:// URI, read from moto itself."""
        prefix = f"s3://{BUCKET}/"
        assert uri.startswith(prefix), uri
        return self.get(uri[len(prefix):])

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
                "PIPELORA_CACHE": str(self.tmp / "cache"), "PYTHONUNBUFFERED": "1", **self.fault_env, **extra}

    def dataprep(self, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLI, "dataprep", "--config", str(config)], env=self.env(**env), capture_output=True,
                              text=True, timeout=HANG_GUARD_S)

    def train_cmd(self, np_: int, config: Path) -> list[str]:
        return [*mpirun_prefix(np_), "-x", "OMP_NUM_THREADS", "-x", "MASTER_PORT", "-x", "PIPELORA_CACHE",
                *[arg for name in FAULT_ENV for arg in ("-x", name)], CLI, "train", "--config", str(config)]

    def train_env(self, config: Path, **env: str) -> dict[str, str]:
        # Each run gets its own shard cache, so every run reads its shards through its own endpoint.
        return self.env(PIPELORA_CACHE=str(self.tmp / f"cache-{config.stem}"), **env)

    def train(self, np_: int, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.train_cmd(np_, config), env=self.train_env(config, **env), capture_output=True,
                              text=True, timeout=HANG_GUARD_S)


class MarkerWitness:
    """A proxy observer: the moment a COMMITTED marker is about to reach the server, every object it
    names is read from the server (not through the proxy) and checked against the marker's size and
    sha256. `seen` holds (marker key, problems) for every marker written."""

    def __init__(self, world: FaultWorld) -> None:
        self.world = world
        self.seen: list[tuple[str, list[str]]] = []

    def __call__(self, method: str, path: str, body: bytes) -> None:
        prefix = f"/{BUCKET}/"
        if method != "PUT" or not path.startswith(prefix) or not path.endswith("/COMMITTED"):
            return
        key = path[len(prefix):]
        folder = key.rsplit("/", 1)[0]
        problems = []
        for name, meta in json.loads(body)["files"].items():
            try:
                data = self.world.get(f"{folder}/{name}")
            except Exception as exc:  # noqa: BLE001 - a missing object is a finding, not an error here
                problems.append(f"{name}: {type(exc).__name__}")
                continue
            if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                problems.append(f"{name}: {len(data)} bytes, expected {meta['size']} (sha256 checked too)")
        self.seen.append((key, problems))
