"""`pipelora-k8s status NAME`: what the cluster and the run folder say about one job.

The job spec is read back from the release's ConfigMap, so `status` needs only the name; the
training progress comes from `<run>/progress.json` in storage (read with the local credentials).
"""

from __future__ import annotations

import time
from typing import Any

import yaml

from pipelora.config import JobSpec, spec_from_dict
from pipelora.errors import PipeloraError
from pipelora.workflow.kube import Kube, KubeError

COMPONENT = "app.kubernetes.io/component"


def release_spec(kube: Kube, name: str) -> JobSpec:
    """The resolved job spec the release runs with (its ConfigMap)."""
    cm = kube.config_map(f"{name}-spec")
    if cm is None:
        raise KubeError(f"no pipelora job named {name} in namespace {kube.namespace} "
                        "(see `pipelora-k8s list`, or pass --namespace)")
    text = (cm.get("data") or {}).get("job.yaml", "")
    return spec_from_dict(yaml.safe_load(text) or {}, source=f"ConfigMap {name}-spec")


def _conditions(obj: dict | None) -> list[dict[str, Any]]:
    status = (obj or {}).get("status") or {}
    return [
        {k: c.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime")}
        for c in status.get("conditions") or []
    ]


def job_phase(obj: dict | None) -> str:
    """One word for a Job or MPIJob: its last true terminal/running condition."""
    if obj is None:
        return "absent"
    conds = {c["type"]: c for c in _conditions(obj) if c.get("status") == "True"}
    for phase in ("Failed", "Succeeded", "Complete", "Suspended", "Restarting", "Running", "Created"):
        if phase in conds:
            return "Succeeded" if phase == "Complete" else phase
    status = obj.get("status") or {}
    if status.get("active"):
        return "Running"
    return "Pending"


def _pod_row(pod: dict) -> dict[str, Any]:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    waiting = next((c["state"]["waiting"].get("reason") for c in containers
                    if (c.get("state") or {}).get("waiting")), None)
    return {
        "name": meta.get("name"),
        "component": (meta.get("labels") or {}).get(COMPONENT, "?"),
        "phase": status.get("phase", "Unknown"),
        "ready": f"{sum(1 for c in containers if c.get('ready'))}/{len(containers)}",
        "restarts": sum(int(c.get("restartCount") or 0) for c in containers),
        "node": (pod.get("spec") or {}).get("nodeName"),
        "reason": waiting or status.get("reason"),
    }


def read_progress(spec: JobSpec) -> dict[str, Any] | None:
    """`progress.json` of the run, or {"error": sentence} when storage cannot be read from here."""
    from pipelora.storage import storage_for

    uri = spec.run_path("progress.json")
    try:
        storage = storage_for(spec, uri)
        if not storage.exists(uri):
            return None
        return storage.read_json(uri)
    except PipeloraError as exc:
        return {"error": str(exc)}


def collect_status(kube: Kube, name: str) -> dict[str, Any]:
    spec = release_spec(kube, name)
    dataprep, mpijob = kube.job(f"{name}-dataprep"), kube.mpijob(name)
    pods = sorted((_pod_row(p) for p in kube.pods(f"app.kubernetes.io/instance={name}")),
                  key=lambda r: (r["component"], r["name"]))
    return {
        "name": name,
        "namespace": kube.namespace,
        "run": spec.run_uri,
        "topology": {"stages": spec.parallel.stages, "nodes": spec.parallel.nodes,
                     "gpus_per_node": spec.parallel.gpus_per_node},
        "dataprep": {"phase": job_phase(dataprep), "conditions": _conditions(dataprep)},
        "mpijob": {"phase": job_phase(mpijob), "conditions": _conditions(mpijob)},
        "pods": pods,
        "progress": read_progress(spec),
    }


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_status(status: dict[str, Any], *, now: float | None = None) -> str:
    """The human view: one line per object, a pod table, and the training progress."""
    now = time.time() if now is None else now
    t = status["topology"]
    lines = [
        f"job {status['name']} (namespace {status['namespace']}): {t['stages']} stages on "
        f"{t['nodes']} node(s) x {t['gpus_per_node']} GPU(s); run folder {status['run']}",
    ]
    for key, label in (("dataprep", "dataprep Job"), ("mpijob", "MPIJob")):
        part = status[key]
        last = next((c for c in reversed(part["conditions"]) if c.get("status") == "True"), None)
        detail = f" ({last['reason']}: {last['message']})" if last and last.get("reason") and last.get("message") else ""
        lines.append(f"  {label:<13} {part['phase']}{detail}")
    if status["pods"]:
        lines.append("  pods:")
        for p in status["pods"]:
            extra = f"  {p['reason']}" if p["reason"] else ""
            lines.append(f"    {p['name']:<40} {p['component']:<9} {p['phase']:<10} ready {p['ready']:<4} "
                         f"restarts {p['restarts']}{extra}")
    else:
        lines.append("  pods: none yet")
    progress = status["progress"]
    if progress is None:
        lines.append("  progress: no progress.json yet (training has not started)")
    elif "error" in progress:
        lines.append(f"  progress: unavailable from here ({progress['error']})")
    else:
        age = now - float(progress.get("updated_at") or now)
        words = [f"  progress: {progress.get('state', '?')} step {progress.get('step', 0)}/"
                 f"{progress.get('max_steps', '?')}"]
        for key in ("loss", "eval_loss"):
            if isinstance(progress.get(key), (int, float)):
                words.append(f"{key} {progress[key]:.4f}")
        words.append(f"eta {format_eta(progress.get('eta_s'))} (updated {int(age)}s ago)")
        lines.append(" ".join(words))
    return "\n".join(lines)
