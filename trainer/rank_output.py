"""Where a rank's lines go besides the launcher's log: its worker pod's log and the run's storage.

Through ssh a rank has no handle on its pod's stdout, so it appends its lines to the pod's relay
folder (when the launcher asks for it) and the worker entrypoint prints them: that is what
`kubectl logs <name>-worker-N` shows. Pods are deleted when a job ends, so every line also goes
to the run's durable log in storage (`RunLayout.rank_log`), flushed every few seconds, at exit and
on failure: that is what `pipelora-k8s logs` reads once the pods are gone.
"""

from __future__ import annotations

import atexit
import traceback
from types import TracebackType

from pipelora.config import JobSpec
from pipelora.rankrelay import RankRelay, relay_from_env
from pipelora.runlog import DurableLog
from pipelora.storage import storage_for
from pipelora.trainer.errors import Preempted
from pipelora.trainer.progress import add_sink, remove_sink

FLUSH_EVERY_S = 5.0


class RankOutput:
    """The relay and the durable log of one rank, attached to `emit` while open."""

    def __init__(self, spec: JobSpec, rank: int, *, flush_every_s: float = FLUSH_EVERY_S) -> None:
        self.relay: RankRelay | None = relay_from_env(rank)
        self.durable = DurableLog(storage_for(spec, spec.run_uri), spec.layout.rank_log(rank),
                                  flush_every_s=flush_every_s)
        for sink in self.sinks():
            add_sink(sink)
        atexit.register(self.close)

    def sinks(self) -> list[RankRelay | DurableLog]:
        return [s for s in (self.relay, self.durable) if s is not None]

    def failure(self, exc: BaseException) -> None:
        """The error that ends this rank, in both places (stderr reaches only the launcher)."""
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        for sink in self.sinks():
            sink.write(f"rank failed: {text}")

    def close(self) -> None:
        for sink in self.sinks():
            remove_sink(sink)
            sink.close()

    def __enter__(self) -> RankOutput:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and not isinstance(exc, (SystemExit, Preempted)):
            self.failure(exc)
        self.close()
