"""`pipelora-k8s logs NAME [--stage K]`: the launcher's log (every rank), or the pods of one stage.

Ranks are placed as DeepSpeed's pipeline topology places them (rank = stage × dp + dp index)
and mpirun fills each worker's slots in order (`--map-by slot`), so the worker pods hosting
stage K are known from the spec alone.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from pipelora.config import JobSpec
from pipelora.workflow.kube import Kube, KubeError

LAUNCHER_CONTAINER, WORKER_CONTAINER, DATAPREP_CONTAINER = "launcher", "worker", "dataprep"


def stage_ranks(spec: JobSpec, stage: int) -> list[int]:
    """Global ranks of 1-based `stage`."""
    return spec.parallel.ranks_of_stage(stage - 1)


def stage_workers(spec: JobSpec, stage: int) -> list[int]:
    """Indices of the worker pods hosting 1-based `stage`."""
    if not 1 <= stage <= spec.parallel.stages:
        raise KubeError(f"--stage {stage} is out of range; this job has stages 1..{spec.parallel.stages}")
    return sorted({rank // spec.parallel.gpus_per_node for rank in stage_ranks(spec, stage)})


def stage_tag(spec: JobSpec, stage: int) -> str:
    return f"[stage {stage}/{spec.parallel.stages} "


def newest_pod(kube: Kube, name: str, component: str) -> str | None:
    pods = kube.pods(f"app.kubernetes.io/instance={name},app.kubernetes.io/component={component}")
    if not pods:
        return None
    pods.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    return pods[-1]["metadata"]["name"]


def _merge(streams: list[Iterator[str]]) -> Iterator[str]:
    """Interleave several (possibly endless) line streams as lines arrive."""
    if len(streams) == 1:
        yield from streams[0]
        return
    q: queue.Queue = queue.Queue()
    done = object()

    def pump(stream: Iterator[str]) -> None:
        try:
            for line in stream:
                q.put(line)
        except Exception as exc:  # noqa: BLE001 - surfaced in the consumer thread
            q.put(exc)
        finally:
            q.put(done)

    for stream in streams:
        threading.Thread(target=pump, args=(stream,), daemon=True).start()
    remaining = len(streams)
    while remaining:
        item = q.get()
        if item is done:
            remaining -= 1
        elif isinstance(item, Exception):
            raise item
        else:
            yield item


def log_lines(kube: Kube, spec: JobSpec, *, stage: int | None = None, component: str | None = None,
              follow: bool = False, tail: int | None = None) -> Iterator[str]:
    """The lines to show; `stage` selects the worker pods of that stage and keeps only its lines."""
    name = spec.name
    if stage is not None:
        pods = [f"{name}-worker-{i}" for i in stage_workers(spec, stage)]
        tag = stage_tag(spec, stage)
        streams = [kube.pod_log(p, container=WORKER_CONTAINER, follow=follow, tail_lines=tail) for p in pods]
        return (line for line in _merge(streams) if tag in line)
    if component in (None, "launcher"):
        pod = newest_pod(kube, name, "launcher")
        if pod is not None:
            return kube.pod_log(pod, container=LAUNCHER_CONTAINER, follow=follow, tail_lines=tail)
        if component == "launcher":
            raise KubeError(f"job {name} has no launcher pod yet; it starts when the workers are ready "
                            f"(see `pipelora-k8s status {name}`)")
    if component == "worker":
        pods = [f"{name}-worker-{i}" for i in range(spec.parallel.nodes)]
        return _merge([kube.pod_log(p, container=WORKER_CONTAINER, follow=follow, tail_lines=tail) for p in pods])
    pod = newest_pod(kube, name, "dataprep")
    if pod is None:
        raise KubeError(f"job {name} has no dataprep or launcher pod yet (see `pipelora-k8s status {name}`)")
    return kube.pod_log(pod, container=DATAPREP_CONTAINER, follow=follow, tail_lines=tail)
