"""`pipelora-k8s logs NAME [--stage K]`: from the pods while they exist, from storage after.

Ranks are placed as DeepSpeed's pipeline topology places them (rank = data-parallel index ×
stages + stage, `ParallelSpec.stage_of_rank`) and mpirun fills each worker's slots in order
(`--map-by slot`), so the worker pods hosting stage K are known from the spec alone.

The MPI Operator deletes the worker pods when the job ends and a launcher pod goes at its TTL,
but every rank also keeps its lines in the run's logs folder (`pipelora.runlog`). When the pods
that printed the lines are gone, that folder is what is shown, and stderr says so.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pipelora.config import JobSpec
from pipelora.errors import PipeloraError
from pipelora.workflow.kube import Kube, KubeError, KubeNotFound, PodLog
from pipelora.workflow.names import ReleaseNames

LAUNCHER_CONTAINER, WORKER_CONTAINER, DATAPREP_CONTAINER = "launcher", "worker", "dataprep"
# The dataprep Job pod's second step: resume the MPIJob once the data is committed.
RELEASE_CONTAINER = "release"
INSTANCE, COMPONENT = "app.kubernetes.io/instance", "app.kubernetes.io/component"
STORAGE_POLL_S = 5.0


class NoLogs(PipeloraError):
    """Neither a pod nor storage holds the lines asked for."""


@dataclass
class LogView:
    """The lines to show and where they come from (`source` goes to stderr once, before them)."""

    source: str
    lines: Iterable[str]


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


def _name(pod: dict) -> str:
    return str((pod.get("metadata") or {}).get("name") or "")


def _component(pod: dict) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(COMPONENT)


def _newest(pods: list[dict], component: str) -> dict | None:
    mine = [p for p in pods if _component(p) == component]
    mine.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    return mine[-1] if mine else None


def newest_pod(kube: Kube, name: str, component: str) -> str | None:
    pod = _newest(kube.pods(ReleaseNames(name).selector(component)), component)
    return None if pod is None else _name(pod)


def _merge(streams: list[Iterable[str]]) -> Iterator[str]:
    """Interleave several (possibly endless) line streams as lines arrive."""
    if len(streams) == 1:
        yield from streams[0]
        return
    q: queue.Queue = queue.Queue()
    done = object()

    def pump(stream: Iterable[str]) -> None:
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


def _open_all(kube: Kube, pods: list[str], container: str, *, follow: bool, tail: int | None) -> list[PodLog] | None:
    """Open every pod's log; None when one of the pods is gone by now."""
    opened: list[PodLog] = []
    try:
        for pod in pods:
            opened.append(kube.pod_log(pod, container=container, follow=follow, tail_lines=tail))
    except KubeNotFound:
        for stream in opened:
            stream.close()
        return None
    return opened


def _dataprep_lines(kube: Kube, pod: dict, *, follow: bool, tail: int | None) -> Iterator[str]:
    """The dataprep container's log, then (where the pod has it) the step that resumes the MPIJob."""
    yield from kube.pod_log(_name(pod), container=DATAPREP_CONTAINER, follow=follow, tail_lines=tail)
    containers = {c.get("name") for c in ((pod.get("spec") or {}).get("containers") or [])}
    if RELEASE_CONTAINER in containers:
        try:
            stream = kube.pod_log(_name(pod), container=RELEASE_CONTAINER, follow=follow, tail_lines=tail)
        except KubeError:
            return  # it never started: dataprep failed, so there is nothing to resume
        yield from stream


def pod_view(kube: Kube, spec: JobSpec, *, stage: int | None = None, component: str | None = None,
             follow: bool = False, tail: int | None = None) -> LogView | None:
    """The lines from the pods; None when the pods that would hold them do not exist (any more)."""
    name = spec.name
    pods = kube.pods(f"{INSTANCE}={name}")
    present = {_name(p) for p in pods}
    if stage is not None or component == "worker":
        indices = stage_workers(spec, stage) if stage is not None else list(range(spec.parallel.nodes))
        wanted = [ReleaseNames(name).worker_pod(i) for i in indices]
        if not all(w in present for w in wanted):
            return None
        streams = _open_all(kube, wanted, WORKER_CONTAINER, follow=follow, tail=tail)
        if streams is None:
            return None
        lines = _merge(list(streams))
        if stage is not None:
            tag = stage_tag(spec, stage)
            lines = (line for line in lines if tag in line)
        return LogView(f"(from {'pod' if len(wanted) == 1 else 'pods'} {', '.join(wanted)})", lines)
    if component == "dataprep":
        pod = _newest(pods, "dataprep")
        if pod is None:
            raise NoLogs(f"job {name} has no dataprep pod (a finished Job's pod is removed at its TTL); "
                         f"see `pipelora-k8s status {name}`")
        return LogView(f"(from pod {_name(pod)})", _dataprep_lines(kube, pod, follow=follow, tail=tail))
    launcher = _newest(pods, "launcher")
    if launcher is None:
        return None
    opened = _open_all(kube, [_name(launcher)], LAUNCHER_CONTAINER, follow=follow, tail=tail)
    return None if opened is None else LogView(f"(from pod {_name(launcher)})", opened[0])


def log_lines(kube: Kube, spec: JobSpec, *, stage: int | None = None, component: str | None = None,
              follow: bool = False, tail: int | None = None) -> Iterable[str]:
    """The lines from the pods only (what `submit --wait` follows); KubeError when there are none."""
    view = pod_view(kube, spec, stage=stage, component=component, follow=follow, tail=tail)
    if view is None:
        raise KubeError(f"job {spec.name} has no {component or 'launcher'} pod now "
                        f"(see `pipelora-k8s status {spec.name}`)")
    return view.lines


# -- storage ---------------------------------------------------------------------------------------


def _last(lines: list[str], tail: int | None) -> list[str]:
    return lines if tail is None else lines[max(len(lines) - tail, 0):]


def storage_view(spec: JobSpec, *, ranks: list[int] | None, why: str, follow: bool = False,
                 tail: int | None = None, finished: Callable[[], bool] = lambda: True,
                 poll_s: float = STORAGE_POLL_S, sleep: Callable[[float], None] = time.sleep) -> LogView | None:
    """The stored lines of `ranks` (all when None) in time order; None when storage has none.

    With `follow`, the objects are read again every `poll_s` until `finished()` says the run
    is over (then once more, for the ranks' last flush). `tail` keeps the last N lines of what
    is there at the start.
    """
    from pipelora.runlog import merge_entries, read_rank_entries
    from pipelora.storage import storage_for

    layout = spec.layout
    storage = storage_for(spec, layout.logs)
    over = follow and finished()
    first = read_rank_entries(storage, layout, ranks)
    if not first:
        return None
    source = f"(from storage: {layout.logs}, {why})"
    if not follow or over:
        return LogView(source, _last(merge_entries(first), tail))

    def follow_lines() -> Iterator[str]:
        per_rank, last_round = first, False
        lines = _last(merge_entries(first), tail)
        while True:
            yield from lines
            shown = {rank: len(entries) for rank, entries in per_rank.items()}
            if last_round:
                return
            last_round = finished()
            sleep(poll_s)
            per_rank = read_rank_entries(storage, layout, ranks)
            lines = merge_entries({rank: entries[shown.get(rank, 0):] for rank, entries in per_rank.items()})

    return LogView(source, follow_lines())


def run_over(kube: Kube | None, spec: JobSpec) -> Callable[[], bool]:
    """When `--follow` from storage stops: the run's progress says finished or failed, or its MPIJob ended or went."""
    from pipelora.workflow.status import job_phase, read_progress

    def over() -> bool:
        progress = read_progress(spec) or {}
        if progress.get("state") in ("finished", "failed"):
            return True
        if kube is None:
            return False
        try:
            return job_phase(kube.mpijob(ReleaseNames(spec.name).mpijob)) in ("Succeeded", "Failed", "absent")
        except KubeError:
            return False

    return over


def job_logs(kube: Kube | None, spec: JobSpec, *, stage: int | None = None, component: str | None = None,
             follow: bool = False, tail: int | None = None, why: str = "the pods are gone",
             finished: Callable[[], bool] = lambda: True, poll_s: float = STORAGE_POLL_S,
             sleep: Callable[[float], None] = time.sleep) -> LogView:
    """What `logs` shows: the pods while they exist, else the ranks' lines in storage.

    `kube` is None when the cluster or the release is gone; `why` then says which.
    """
    from pipelora.storage import StorageError

    name = spec.name
    if stage is not None:
        stage_workers(spec, stage)  # the range check, whichever source answers
    if kube is not None:
        view = pod_view(kube, spec, stage=stage, component=component, follow=follow, tail=tail)
        if view is not None:
            return view
    elif component == "dataprep":
        raise NoLogs(f"the dataprep log is kept only in its pod, and {why}")
    ranks = None if stage is None else stage_ranks(spec, stage)
    unreadable: StorageError | None = None
    try:
        stored = storage_view(spec, ranks=ranks, why=why, follow=follow, tail=tail, finished=finished,
                              poll_s=poll_s, sleep=sleep)
    except StorageError as exc:
        if kube is None or component is not None or stage is not None:
            raise
        stored, unreadable = None, exc  # no credentials here, say: dataprep's pod may still answer
    if stored is not None:
        return stored
    if kube is not None and component is None and stage is None:
        pods = kube.pods(f"{INSTANCE}={name}")
        dataprep = _newest(pods, "dataprep")
        if dataprep is not None:
            return LogView(f"(from pod {_name(dataprep)}: no launcher pod, and no rank logs in storage yet)",
                           _dataprep_lines(kube, dataprep, follow=follow, tail=tail))
        if unreadable is not None:
            raise unreadable
    where = spec.layout.logs
    if kube is None:
        raise NoLogs(f"no logs of job {name} in storage at {where}, and {why}")
    what = f"stage {stage}'s worker pods" if stage is not None else f"{component or 'launcher'} pod"
    raise NoLogs(f"job {name} has no {what} yet and no logs in storage at {where}; "
                 f"see `pipelora-k8s status {name}`")
