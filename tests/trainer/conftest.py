"""Shared artifacts of the trainer tests, built once per session: a tiny model and packed shards
on a moto S3 server, and a helper that runs `pipelora-k8s train` under a real mpirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mpi import mpirun_prefix
from net import free_port
from specs import with_overrides

BIN = Path(sys.executable).parent
CLI = str(BIN / "pipelora-k8s")
HANG_GUARD_S = 600  # a hung collective fails the test instead of the suite; not a performance bound


@dataclass
class S3World:
    endpoint: str
    bucket: str
    model_uri: str
    model_dir: Path
    data_source: str  # a run folder whose data/ the runs copy
    dataset: Path
    tmp: Path

    def spec(self, name: str, **overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": name,
            "storage": {"uri": f"s3://{self.bucket}/runs", "endpoint_url": self.endpoint},
            "model": {"uri": self.model_uri},
            "dataset": {"uri": str(self.dataset), "seq_len": 64, "eval_fraction": 0.05},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
            "parallel": {"stages": 2, "nodes": 1, "gpus_per_node": 2, "micro_batch_size": 2, "micro_batches": 4},
            "training": {"max_steps": 6, "lr": 2.0e-3, "warmup_steps": 2, "schedule": "cosine", "seed": 7,
                         "checkpoint_every_steps": 2, "keep_checkpoints": 2, "eval_every_steps": 3,
                         "eval_batches": 2, "activation_checkpointing": False, "dtype": "fp32",
                         "max_grad_norm": 0.05},  # small: clipping acts on every step
        }
        return with_overrides(spec, overrides)

    def write_spec(self, spec: dict[str, Any], *, copy_data: bool = True) -> Path:
        path = self.tmp / f"{spec['name']}.yaml"
        path.write_text(yaml.safe_dump(spec), encoding="utf-8")
        if copy_data:
            self.copy_data(spec["name"])
        return path

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def copy_data(self, name: str) -> None:
        s3 = self.client()
        prefix = f"runs/{self.data_source}/data/"
        for item in s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", []):
            key = item["Key"]
            s3.copy_object(Bucket=self.bucket, Key=f"runs/{name}/data/{key[len(prefix):]}",
                           CopySource={"Bucket": self.bucket, "Key": key})

    def read_json(self, key: str) -> Any:
        return json.loads(self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def keys(self, prefix: str) -> list[str]:
        return sorted(o["Key"] for o in self.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", []))

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
                "PIPELORA_CACHE": str(self.tmp / "cache"), "PYTHONUNBUFFERED": "1", **extra}

    def train_cmd(self, np_: int, config: Path) -> list[str]:
        return [*mpirun_prefix(np_), "-x", "OMP_NUM_THREADS", "-x", "MASTER_PORT", CLI, "train", "--config", str(config)]

    def train(self, np_: int, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.train_cmd(np_, config), env=self.env(**env), capture_output=True, text=True,
                              timeout=HANG_GUARD_S)


def _upload_folder(client: Any, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    """A real gloo process group of one rank, so the collectives of the save path run as they are."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Mistral, split over several safetensors files (so the index path is used)."""
    from pipelora.trainer.init_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny-mistral", family="mistral", preset="tiny",
                              seed=3, max_shard_bytes=3 * 1024 * 1024)


@pytest.fixture(scope="session")
def s3_world(s3_endpoint: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> S3World:
    """Model and dataprep shards on the moto server, prepared once for every mpirun test."""
    import boto3

    tmp = tmp_path_factory.mktemp("trainer-s3")
    bucket = f"trainer-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    _upload_folder(client, bucket, tiny_model, "models/tiny-mistral")
    dataset = tmp / "learnable.jsonl"
    subprocess.run([CLI, "make-dataset", "--out", str(dataset), "--examples", "300", "--seed", "1"], check=True,
                   capture_output=True, timeout=HANG_GUARD_S)
    world = S3World(s3_endpoint, bucket, f"s3://{bucket}/models/tiny-mistral", tiny_model, "source", dataset, tmp)
    config = world.write_spec(world.spec("source"), copy_data=False)
    done = subprocess.run([CLI, "dataprep", "--config", str(config)], env=world.env(), capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    return world
