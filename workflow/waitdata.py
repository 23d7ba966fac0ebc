"""Block until the run's data manifest is committed: the MPIJob launcher's first step.

The dataprep Job and the MPIJob start together; ranks must not start reading shards that are
still being written, and the manifest is written last (Storage.commit), so its presence is the signal.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pipelora.config import JobSpec
from pipelora.errors import PipeloraError
from pipelora.storage import storage_for


class DataTimeout(PipeloraError):
    exit_code = 3


def manifest_uri(spec: JobSpec) -> str:
    return spec.run_path("data", "manifest.json")


def wait_for_data(
    spec: JobSpec,
    *,
    timeout_s: float,
    interval_s: float = 10.0,
    echo: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Poll storage until the manifest exists and parses; returns it. Raises DataTimeout after `timeout_s`."""
    uri = manifest_uri(spec)
    storage = storage_for(spec, uri)
    start = time.monotonic()
    announced = False
    while True:
        marker = storage.read_marker(uri)
        if marker is not None:
            splits = marker.get("splits", {})
            rows = ", ".join(f"{k} {v.get('rows', '?')} rows" for k, v in splits.items())
            echo(f"data ready: {uri}" + (f" ({rows})" if rows else ""))
            return marker
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise DataTimeout(
                f"no data manifest at {uri} after {int(waited)}s; check the dataprep Job "
                f"(`pipelora-k8s logs {spec.name} --component dataprep`)"
            )
        if not announced:
            echo(f"waiting for the data manifest {uri} (dataprep writes it last)")
            announced = True
        sleep(min(interval_s, max(timeout_s - waited, 0.1)))
