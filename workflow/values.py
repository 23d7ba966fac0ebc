"""Job spec → Helm values of the chart.

`submit` and `render` write exactly these values, so the chart never re-derives anything from
the spec: the commands come from `commands.job_commands`, the topology from `spec.parallel`,
the Secrets' names from `spec.cluster`. `cluster.values` is merged last, key by key.
"""

from __future__ import annotations

import copy
from typing import Any

from pipelora.config import JobSpec
from pipelora.launch import POD_RUNTIME_DIR
from pipelora.workflow.commands import job_commands

CHART_PACKAGE = "pipelora.chart"


def split_image(image: str) -> tuple[str, str]:
    """`repo/name:tag` → (repo/name, tag); a registry port (`host:5000/x`) is not a tag."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return image, ""
    return name, tag


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge `extra` into a copy of `base`: mappings recursively, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def chart_values(spec: JobSpec) -> dict[str, Any]:
    """The values for one release of `spec`, with `cluster.values` applied last."""
    commands = job_commands(spec)
    repository, tag = split_image(spec.cluster.image)
    values: dict[str, Any] = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": spec.cluster.image_pull_policy},
        "jobSpec": spec.to_yaml(),
        "commands": {
            "dataprep": commands.dataprep,
            "waitForData": commands.wait_for_data,
            "launcher": commands.launcher,
            "worker": commands.worker,
            "workerReady": commands.worker_ready,
            "releaseTraining": commands.release_training,
        },
        "podRuntimeDir": POD_RUNTIME_DIR,
        "parallel": {"nodes": spec.parallel.nodes, "gpusPerNode": spec.parallel.gpus_per_node},
        "secrets": {
            "s3": {"name": spec.cluster.s3_secret or ""},
            "hfToken": {"name": spec.cluster.hf_token_secret or ""},
        },
    }
    return deep_merge(values, spec.cluster.values)
