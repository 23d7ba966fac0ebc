"""The MPI Operator's own rules, checked on the rendered MPIJob before anything is submitted.

The CRD's schema does not catch these; the operator's controller does, by leaving the job
idle with only a Warning event. Checking the rendered object (not the values) also covers
anything changed through `cluster.values`.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipelora.config import DNS_1035
from pipelora.errors import PipeloraError

RESTART_POLICIES = ("Never", "OnFailure")
CLEAN_POD_POLICIES = ("None", "Running", "All")


class ManifestError(PipeloraError):
    """The rendered release would be rejected or ignored by the cluster."""

    exit_code = 2


def parse_manifests(text: str) -> list[dict[str, Any]]:
    """helm's multi-document output → the objects (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]


def controller_problems(mpijob: dict[str, Any]) -> list[str]:
    """One sentence per rule of the MPI Operator's controller that `mpijob` breaks."""
    name = str(mpijob.get("metadata", {}).get("name", ""))
    spec = mpijob.get("spec", {}) or {}
    replicas = spec.get("mpiReplicaSpecs", {}) or {}
    problems: list[str] = []
    launcher, worker = replicas.get("Launcher"), replicas.get("Worker")
    if launcher is None:
        problems.append(f"MPIJob {name} has no Launcher replica spec")
    elif launcher.get("replicas", 1) != 1:
        problems.append(f"MPIJob {name}: Launcher replicas is {launcher.get('replicas')}; it must be 1")
    if worker is None:
        problems.append(f"MPIJob {name} has no Worker replica spec")
    elif int(worker.get("replicas", 1)) < 1:
        problems.append(f"MPIJob {name}: Worker replicas is {worker.get('replicas')}; it must be at least 1 "
                        "(parallel.nodes)")
    for role, rs in (("Launcher", launcher), ("Worker", worker)):
        policy = (rs or {}).get("restartPolicy", "Never")
        if rs is not None and policy not in RESTART_POLICIES:
            problems.append(f"MPIJob {name}: {role} restartPolicy '{policy}' is not one of "
                            f"{', '.join(RESTART_POLICIES)}")
    clean = (spec.get("runPolicy", {}) or {}).get("cleanPodPolicy", "Running")
    if clean not in CLEAN_POD_POLICIES:
        problems.append(f"MPIJob {name}: runPolicy.cleanPodPolicy '{clean}' is not one of "
                        f"{', '.join(CLEAN_POD_POLICIES)}")
    last = f"{name}-worker-{max(int((worker or {}).get('replicas', 1)) - 1, 0)}"
    if len(last) > 63 or not DNS_1035.match(last):
        problems.append(f"MPIJob {name}: pod name {last} is not a DNS-1035 label (63 characters at most, "
                        "lower-case letters, digits and '-'); shorten the job name")
    return problems


def check_release(text: str) -> list[dict[str, Any]]:
    """Parse rendered manifests and raise ManifestError listing every controller-rule violation."""
    objects = parse_manifests(text)
    mpijobs = [o for o in objects if o.get("kind") == "MPIJob"]
    if not mpijobs:
        raise ManifestError("the rendered release has no MPIJob; check cluster.values overrides")
    problems = [p for job in mpijobs for p in controller_problems(job)]
    if problems:
        raise ManifestError("the MPI Operator would ignore this job:\n" + "\n".join(f"  - {p}" for p in problems))
    return objects
