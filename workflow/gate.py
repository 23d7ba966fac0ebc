"""Resume the job's MPIJob once its data is committed: no GPU is held while dataprep runs.

The chart creates the MPIJob with `spec.runPolicy.suspend: true`, so the MPI Operator creates
no worker or launcher pod. The dataprep Job's pod runs dataprep, then this step, with a service
account allowed only to get and patch this one MPIJob: it checks the manifest (written last,
so its presence means the data is complete) and clears `suspend`. A failed dataprep never gets
here, so the MPIJob stays suspended and `status` says why.
"""

from __future__ import annotations

from collections.abc import Callable

from pipelora.config import JobSpec
from pipelora.errors import PipeloraError
from pipelora.storage import storage_for
from pipelora.workflow.kube import Kube
from pipelora.workflow.names import ReleaseNames
from pipelora.workflow.status import is_suspended


class GateError(PipeloraError):
    """The MPIJob cannot be released (no committed data, or no such MPIJob)."""


def release_training(spec: JobSpec, kube: Kube, *, echo: Callable[[str], None] = print) -> bool:
    """Resume the MPIJob `spec.name` if the data manifest is committed; True when this call resumed it."""
    manifest, name = spec.layout.manifest, ReleaseNames(spec.name).mpijob
    marker = storage_for(spec, manifest).read_marker(manifest)
    if marker is None:
        raise GateError(f"the data manifest {manifest} is not committed, so MPIJob {name} stays suspended; "
                        "run dataprep to completion first (it writes the manifest last)")
    mpijob = kube.mpijob(name)
    if mpijob is None:
        raise GateError(f"MPIJob {name} was not found in namespace {kube.namespace}; "
                        "was the release deleted, or installed under another name?")
    rows = ", ".join(f"{split} {info.get('rows', '?')} rows" for split, info in (marker.get("splits") or {}).items())
    data = f"data committed at {manifest}" + (f" ({rows})" if rows else "")
    if not is_suspended(mpijob):
        echo(f"{data}; MPIJob {name} is already running")
        return False
    kube.resume_mpijob(name)
    echo(f"{data}; resumed MPIJob {name} in namespace {kube.namespace}: training starts")
    return True
