"""Block until the run's data manifest is committed: the MPIJob launcher's first step.

Ranks must not start reading shards that are still being written, and the manifest is written
last (Storage.commit), so its presence is the signal. Where the MPIJob is not held suspended
until then (gating off, e.g. when a queue such as Kueue owns `suspend`), this is the guard: and
when it can ask the Kubernetes API, a failed dataprep Job ends the wait at once with its reason
instead of holding every GPU until the timeout.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from pipelora.config import JobSpec
from pipelora.errors import PipeloraError
from pipelora.storage import storage_for
from pipelora.workflow.kube import Kube, KubeError
from pipelora.workflow.names import ReleaseNames
from pipelora.workflow.status import DataprepFailed, dataprep_failure


class DataTimeout(PipeloraError):
    exit_code = 3


def manifest_uri(spec: JobSpec) -> str:
    return spec.layout.manifest


class DataprepWatch:
    """Asks the API whether the dataprep Job failed; quiet (and storage-only) when it cannot."""

    def __init__(self, kube: Kube, spec: JobSpec, *, echo: Callable[[str], None]) -> None:
        self.kube, self.spec, self.echo = kube, spec, echo
        self.job = ReleaseNames(spec.name).dataprep_job
        self._warned = False

    def failure(self) -> str | None:
        """The dataprep Job's failure reason, or None (running, done, absent, or the API did not answer)."""
        try:
            job = self.kube.job(self.job)
        except KubeError as exc:
            if not self._warned:
                self.echo(f"cannot check the dataprep Job {self.job} ({exc}); waiting on storage only")
                self._warned = True
            return None
        reason = dataprep_failure(job)
        if reason is None:
            return None
        try:  # the container's own last words, where the service account may list pods
            pods = self.kube.pods(ReleaseNames(self.spec.name).selector("dataprep"))
        except KubeError:
            pods = []
        return dataprep_failure(job, pods)


def wait_for_data(
    spec: JobSpec,
    *,
    timeout_s: float,
    interval_s: float = 10.0,
    echo: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    kube: Kube | None = None,
) -> dict:
    """Poll storage until the manifest exists and parses; returns it.

    Raises DataTimeout after `timeout_s`, and DataprepFailed as soon as `kube` (when given)
    shows the dataprep Job failed.
    """
    uri = manifest_uri(spec)
    storage = storage_for(spec, uri)
    watch = DataprepWatch(kube, spec, echo=echo) if kube is not None else None
    start = time.monotonic()
    announced = False
    while True:
        marker = storage.read_marker(uri)
        if marker is not None:
            splits = marker.get("splits", {})
            rows = ", ".join(f"{k} {v.get('rows', '?')} rows" for k, v in splits.items())
            echo(f"data ready: {uri}" + (f" ({rows})" if rows else ""))
            return marker
        if not announced:
            where = f", and watching the Job {watch.job}" if watch is not None else ""
            echo(f"waiting for the data manifest {uri} (dataprep writes it last{where})")
            announced = True
        if watch is not None:
            reason = watch.failure()
            if reason is not None:
                raise DataprepFailed(f"dataprep failed: {reason}; the data manifest {uri} will not appear "
                                     f"(`pipelora-k8s logs {spec.name} --component dataprep` shows why)")
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise DataTimeout(
                f"no data manifest at {uri} after {int(waited)}s; check the dataprep Job "
                f"(`pipelora-k8s logs {spec.name} --component dataprep`)"
            )
        sleep(min(interval_s, max(timeout_s - waited, 0.1)))


def worker_state(host: str, port: int, *, timeout_s: float = 2.0) -> tuple[str, str] | None:
    """None once `host` accepts a connection on `port`; otherwise (where, why): the name with the
    addresses it resolves to, and the error (a stale or missing DNS record reads differently from a
    slow sshd)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"{host} (no address)", f"does not resolve ({exc.strerror or exc})"
    where = f"{host} ({', '.join(sorted({str(info[4][0]) for info in infos}))})"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return where, f"port {port}: {exc.strerror or exc}"


def wait_for_workers(
    hosts: list[str],
    *,
    port: int,
    timeout_s: float,
    interval_s: float = 1.0,
    echo: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    probe: Callable[[str, int], tuple[str, str] | None] = worker_state,
) -> None:
    """Block until every worker's name resolves and its sshd accepts a connection.

    The MPI Operator (v0.8.2) creates the launcher of a job created suspended at once (zero of zero
    workers are "all Ready"), and on resume starts it together with the workers, so
    `launcherCreationPolicy: WaitForWorkersReady` holds nothing back: mpirun would find names that
    do not resolve yet and fail the attempt. The launcher therefore waits for its workers itself.
    Its log is where a stuck attempt is diagnosed, so it says what it waits on (a name without an
    address, or an address nobody answers on) each time a worker's address changes.
    """
    start = time.monotonic()
    pending = list(hosts)
    said: dict[str, str] = {}
    echo(f"waiting for {len(hosts)} worker(s) to accept ssh on port {port}")
    while pending:
        states = {host: probe(host, port) for host in pending}
        waiting = {host: state for host, state in states.items() if state is not None}
        pending = list(waiting)
        if not pending:
            break
        for host, (where, why) in waiting.items():
            if said.get(host) != where:
                said[host] = where
                echo(f"still waiting for {where}: {why}")
        waited = time.monotonic() - start
        if waited >= timeout_s:
            reasons = "; ".join(f"{where}: {why}" for where, why in waiting.values())
            raise WorkersTimeout(f"worker(s) {', '.join(pending)} did not accept ssh on port {port} within "
                                 f"{int(waited)}s ({reasons}); see `kubectl describe pod {pending[0].split('.')[0]}`")
        sleep(min(interval_s, max(timeout_s - waited, 0.1)))
    echo(f"workers ready: {', '.join(hosts)}")


class WorkersTimeout(PipeloraError):
    exit_code = 3
