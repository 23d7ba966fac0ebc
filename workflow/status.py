"""`pipelora-k8s status NAME`: what the cluster and the run folder say about one job.

The job spec is read back from the release's ConfigMap, so `status` needs only the name; the
training progress comes from the run's progress file in storage (read with the local credentials).
The MPIJob is created suspended and resumed by the dataprep Job once the data is committed, so
a failed dataprep is reported as such: the job is over, and no GPU was ever held for it.
"""

from __future__ import annotations

import time
from typing import Any

import yaml

from pipelora.config import JobSpec, spec_from_dict
from pipelora.errors import PipeloraError
from pipelora.layout import PROGRESS_NAME
from pipelora.workflow.kube import Kube, KubeError
from pipelora.workflow.logs import COMPONENT, DATAPREP_CONTAINER, INSTANCE, RELEASE_CONTAINER
from pipelora.workflow.names import ReleaseNames


class DataprepFailed(PipeloraError):
    """The dataprep Job failed: the data will not appear and training will not start."""

    exit_code = 4


def find_release_spec(kube: Kube, name: str) -> JobSpec | None:
    """The resolved job spec the release runs with (its ConfigMap), or None when there is no such release."""
    config_map = ReleaseNames(name).config_map
    cm = kube.config_map(config_map)
    if cm is None:
        return None
    text = (cm.get("data") or {}).get("job.yaml", "")
    return spec_from_dict(yaml.safe_load(text) or {}, source=f"ConfigMap {config_map}")


def release_spec(kube: Kube, name: str) -> JobSpec:
    """The resolved job spec the release runs with (its ConfigMap)."""
    spec = find_release_spec(kube, name)
    if spec is None:
        raise KubeError(f"no pipelora job named {name} in namespace {kube.namespace} "
                        "(see `pipelora-k8s list`, or pass --namespace)")
    return spec


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


def is_suspended(mpijob: dict | None) -> bool:
    """True while the MPIJob is held back (its pods, and so its GPUs, not created)."""
    if mpijob is None:
        return False
    run_policy = (mpijob.get("spec") or {}).get("runPolicy") or {}
    return bool(run_policy.get("suspend")) or job_phase(mpijob) == "Suspended"


def _last_line(text: str | None) -> str | None:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    return last[len("error: "):] if last.startswith("error: ") else last


def dataprep_container_failure(pods: list[dict]) -> str | None:
    """The last failed exit of the dataprep Job's containers (newest pod first): its message, else its code.

    The pod runs dataprep, then the step that resumes the MPIJob; either can be what failed.
    """
    def created(pod: dict) -> str:
        return str((pod.get("metadata") or {}).get("creationTimestamp") or "")

    for pod in sorted(pods, key=created, reverse=True):
        status = pod.get("status") or {}
        for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            if container.get("name") not in (DATAPREP_CONTAINER, RELEASE_CONTAINER):
                continue
            for state in (container.get("state"), container.get("lastState")):
                ended = (state or {}).get("terminated")
                if not ended or not ended.get("exitCode"):
                    continue
                message = _last_line(ended.get("message"))
                if message:
                    return message
                why = f" ({ended['reason']})" if ended.get("reason") else ""
                return f"the {container['name']} container exited with code {ended['exitCode']}{why}"
    return None


def dataprep_failure(job: dict | None, pods: list[dict] | None = None) -> str | None:
    """Why the dataprep Job failed, in one line; None unless it has a true `Failed` condition."""
    failed = next((c for c in _conditions(job) if c.get("type") == "Failed" and c.get("status") == "True"), None)
    if failed is None:
        return None
    job_reason = ": ".join(str(failed[k]) for k in ("reason", "message") if failed.get(k)) or "the Job failed"
    container = dataprep_container_failure(pods or [])
    return f"{container} (Job {job_reason})" if container else job_reason


def dataprep_problem(job: dict | None, mpijob: dict | None, pods: list[dict] | None = None) -> str | None:
    """`dataprep failed: …; no GPUs were allocated` while the MPIJob is still held back (or absent)."""
    if mpijob is not None and not is_suspended(mpijob):
        return None
    reason = dataprep_failure(job, pods)
    return None if reason is None else f"dataprep failed: {reason}; no GPUs were allocated"


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
    """The run's progress file, or {"error": sentence} when storage cannot be read from here."""
    from pipelora.storage import storage_for

    uri = spec.layout.progress
    try:
        storage = storage_for(spec, uri)
        if not storage.exists(uri):
            return None
        return storage.read_json(uri)
    except PipeloraError as exc:
        return {"error": str(exc)}


def collect_status(kube: Kube, name: str) -> dict[str, Any]:
    spec = release_spec(kube, name)
    names = ReleaseNames(name)
    dataprep, mpijob = kube.job(names.dataprep_job), kube.mpijob(names.mpijob)
    raw_pods = kube.pods(f"{INSTANCE}={name}")
    pods = sorted((_pod_row(p) for p in raw_pods), key=lambda r: (r["component"], r["name"]))
    dataprep_pods = [p for p in raw_pods if ((p.get("metadata") or {}).get("labels") or {}).get(COMPONENT) == "dataprep"]
    return {
        "name": name,
        "namespace": kube.namespace,
        "run": spec.run_uri,
        "tensorboard": spec.layout.tensorboard,
        "topology": {"stages": spec.parallel.stages, "nodes": spec.parallel.nodes,
                     "gpus_per_node": spec.parallel.gpus_per_node},
        "dataprep": {"phase": job_phase(dataprep), "conditions": _conditions(dataprep)},
        "mpijob": {"phase": job_phase(mpijob), "conditions": _conditions(mpijob), "suspended": is_suspended(mpijob)},
        "pods": pods,
        "progress": read_progress(spec),
        "problem": dataprep_problem(dataprep, mpijob, dataprep_pods),
    }


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _suspended_words(status: dict[str, Any]) -> str | None:
    """Why a suspended MPIJob waits, when dataprep explains it; None when something else holds it (a queue)."""
    if status.get("problem"):
        return "suspended (dataprep failed; no GPUs were allocated)"
    phase = status["dataprep"]["phase"]
    if phase in ("Running", "Pending"):
        return "suspended (waiting for dataprep)"
    return None


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
        shown = f"{part['phase']}{detail}"
        if key == "mpijob" and part.get("suspended"):
            shown = _suspended_words(status) or shown
        lines.append(f"  {label:<13} {shown}")
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
        lines.append(f"  progress: no {PROGRESS_NAME} yet (training has not started)")
    elif "error" in progress:
        lines.append(f"  progress: unavailable from here ({progress['error']})")
    else:
        age = now - float(progress.get("updated_at") or now)
        words = [f"  progress: {progress.get('state', '?')} step {progress.get('step', 0)}/"
                 f"{progress.get('max_steps', '?')}"]
        for key in ("loss", "eval_loss"):
            if isinstance(progress.get(key), (int, float)):
                words.append(f"{key} {progress[key]:.4f}")
        if isinstance(progress.get("tokens_per_s_device"), (int, float)):
            words.append(f"tok/s/dev {progress['tokens_per_s_device']:.0f}")
        if isinstance(progress.get("mfu"), (int, float)):
            words.append(f"mfu {100 * progress['mfu']:.1f}%")
        words.append(f"eta {format_eta(progress.get('eta_s'))} (updated {int(age)}s ago)")
        lines.append(" ".join(words))
    if status.get("tensorboard"):
        lines.append(f"  tensorboard: tensorboard --logdir {status['tensorboard']}")
    return "\n".join(lines)
