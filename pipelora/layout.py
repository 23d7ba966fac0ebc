"""The one definition of where a run's artifacts live in object storage.

Every part (dataprep, trainer, workflow) and every tool outside the project finds a run's data,
checkpoints, adapter, progress, logs and lease through `RunLayout`; nothing else spells these
names, so a change here is a change everywhere (a test greps the tree for stray literals).

    <storage.uri>/<name>/data/manifest.json                      written last: the data is complete
    <storage.uri>/<name>/data/<split>-<NNNNN>.safetensors
    <storage.uri>/<name>/checkpoints/step-<NNNNNNNN>/…           per-stage LoRA, optimizer, RNG
    <storage.uri>/<name>/checkpoints/step-<NNNNNNNN>/COMMITTED   written last, after every rank uploaded
    <storage.uri>/<name>/adapter/adapter_model.safetensors + adapter_config.json (the config last)
    <storage.uri>/<name>/progress.json
    <storage.uri>/<name>/logs/rank-<RRRRR>.log
    <storage.uri>/<name>/tensorboard/
    <storage.uri>/<name>/lease
    <storage.uri>/<name>/export/merged[-step-<NNNNNNNN>]/        `export --merge` (+ COMMITTED)
    <storage.uri>/<name>/export/adapter[-step-<NNNNNNNN>]/       `export` (+ COMMITTED)
    <storage.uri>/_hub/models/<org>/<name>/<sha>/                hf:// models mirrored once
    <storage.uri>/_hub/models/<org>/<name>/<sha>/COMMITTED       written last, after every file of the mirror
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelora.storage import join_uri

DATA_DIR = "data"
MANIFEST_NAME = "manifest.json"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_MARKER = "COMMITTED"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The adapter's config is written after its weights: a folder holding the config is complete.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_COMPLETE_FILE = ADAPTER_CONFIG
PROGRESS_NAME = "progress.json"
LOGS_DIR = "logs"
TENSORBOARD_DIR = "tensorboard"
LEASE_NAME = "lease"
# Beside the lease, short-lived: a local store's lock while the lease is swapped, and the object an
# S3 store is probed with once to learn whether it honours conditional writes.
LEASE_LOCK_NAME = f"{LEASE_NAME}.lock"
LEASE_PROBE_PREFIX = f"{LEASE_NAME}.probe-"
EXPORT_DIR = "export"
MERGED_NAME = "merged"
# An export (merged model or adapter copy) is committed like a checkpoint: its marker goes last.
EXPORT_MARKER = CHECKPOINT_MARKER
HUB_DIR = "_hub"
HUB_MODELS_DIR = "models"
# Written last into a mirrored hf:// model's folder, naming every file with its size and sha256.
HUB_MARKER = CHECKPOINT_MARKER

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_RANK_LOG = re.compile(r"^rank-(\d{5})\.log$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a checkpoint folder name, or None for anything else in `checkpoints/`."""
    match = _STEP_DIR.match(name.rstrip("/"))
    return int(match.group(1)) if match else None


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


def rank_log_name(rank: int) -> str:
    return f"rank-{rank:05d}.log"


def parse_rank_log(name: str) -> int | None:
    """The rank of a log object's name, or None for anything else in `logs/`."""
    match = _RANK_LOG.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder, `<storage.uri>/<name>`."""

    run_uri: str

    @classmethod
    def of(cls, storage_uri: str, name: str) -> RunLayout:
        return cls(join_uri(storage_uri, name))

    # -- data ---------------------------------------------------------------------------------
    @property
    def data(self) -> str:
        return join_uri(self.run_uri, DATA_DIR)

    @property
    def manifest(self) -> str:
        return join_uri(self.data, MANIFEST_NAME)

    def shard(self, split: str, index: int) -> str:
        return join_uri(self.data, shard_name(split, index))

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoints(self) -> str:
        return join_uri(self.run_uri, CHECKPOINTS_DIR)

    def checkpoint(self, step: int) -> str:
        return join_uri(self.checkpoints, step_dir_name(step))

    def checkpoint_marker(self, step: int) -> str:
        return join_uri(self.checkpoint(step), CHECKPOINT_MARKER)

    # -- adapter --------------------------------------------------------------------------------
    @property
    def adapter(self) -> str:
        return join_uri(self.run_uri, ADAPTER_DIR)

    @property
    def adapter_weights(self) -> str:
        return join_uri(self.adapter, ADAPTER_WEIGHTS)

    @property
    def adapter_config(self) -> str:
        return join_uri(self.adapter, ADAPTER_CONFIG)

    @property
    def adapter_complete(self) -> str:
        """The object whose presence means the adapter is whole (written last)."""
        return join_uri(self.adapter, ADAPTER_COMPLETE_FILE)

    # -- what a running job reports ---------------------------------------------------------------
    @property
    def progress(self) -> str:
        return join_uri(self.run_uri, PROGRESS_NAME)

    @property
    def logs(self) -> str:
        return join_uri(self.run_uri, LOGS_DIR)

    def rank_log(self, rank: int) -> str:
        return join_uri(self.logs, rank_log_name(rank))

    @property
    def tensorboard(self) -> str:
        return join_uri(self.run_uri, TENSORBOARD_DIR)

    @property
    def lease(self) -> str:
        return join_uri(self.run_uri, LEASE_NAME)

    @property
    def lease_lock(self) -> str:
        return join_uri(self.run_uri, LEASE_LOCK_NAME)

    def lease_probe(self, token: str) -> str:
        return join_uri(self.run_uri, LEASE_PROBE_PREFIX + token)

    # -- exports ------------------------------------------------------------------------------
    def export(self, *, merge: bool, step: int | None = None) -> str:
        """The default folder of `pipelora-k8s export`: merged weights or a copy of the adapter."""
        name = MERGED_NAME if merge else ADAPTER_DIR
        if step is not None:
            name = f"{name}-{step_dir_name(step)}"
        return join_uri(self.run_uri, EXPORT_DIR, name)

    # -- what `run --fresh` clears: everything the trainer writes, never the prepared data ----------
    @property
    def training_outputs(self) -> tuple[str, ...]:
        return (self.checkpoints, self.adapter, self.progress, self.logs, self.tensorboard)


def hub_model_uri(storage_uri: str, org: str, name: str, sha: str) -> str:
    """The shared mirror of an hf:// model at one commit, reused by every run in `storage_uri`."""
    return join_uri(storage_uri, HUB_DIR, HUB_MODELS_DIR, org, name, sha)


def hub_model_marker(storage_uri: str, org: str, name: str, sha: str) -> str:
    """The object whose presence means the mirror at `hub_model_uri(...)` is whole (written last)."""
    return join_uri(hub_model_uri(storage_uri, org, name, sha), HUB_MARKER)
