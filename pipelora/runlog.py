"""Every rank's log lines, kept in object storage so they outlive the pods that printed them.

A worker pod's log goes when the MPI Operator cleans it up at the end of the job, and a failed
launcher attempt's pod goes at its TTL; `pipelora-k8s logs` then reads the run's logs folder
(`RunLayout.logs`) instead. Object stores cannot append, and a run's log is small, so the whole
object is rewritten from memory every few seconds while there is something new. Each stored line starts with a UTC
timestamp so the ranks can be merged in time order; readers strip it again.

Uploads happen on a daemon thread and never raise into the caller: training must not stop
because a log could not be saved. A failure is reported once on stderr and retried at the
next flush.
"""

from __future__ import annotations

import heapq
import re
import sys
import threading
from collections.abc import Iterable
from datetime import datetime, timezone

from pipelora.layout import RunLayout, parse_rank_log
from pipelora.storage import Storage, StorageError

STAMP_LENGTH = len("2026-11-30T04:12:33.123Z ")
_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z ")

# One stored line: (timestamp, text). The timestamp sorts as text (fixed-width ISO 8601, UTC).
Entry = tuple[str, str]


def utc_stamp(moment: datetime | None = None) -> str:
    """`2026-11-30T04:12:33.123Z`: fixed width, so stamps compare as strings."""
    moment = (moment or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_entries(text: str) -> list[Entry]:
    """The (timestamp, line) pairs of one stored log.

    A line without a stamp (written by something else) keeps the time of the line before it,
    so it stays next to its neighbours when ranks are merged.
    """
    entries: list[Entry] = []
    stamp = ""
    for line in text.splitlines():
        if _STAMP.match(line):
            stamp, line = line[: STAMP_LENGTH - 1], line[STAMP_LENGTH:]
        entries.append((stamp, line))
    return entries


def merge_entries(per_rank: dict[int, list[Entry]]) -> list[str]:
    """The lines of several ranks in time order; equal times keep rank order, each rank its own order."""
    ordered = [per_rank[rank] for rank in sorted(per_rank)]
    return [line for _, line in heapq.merge(*ordered, key=lambda entry: entry[0])]


class DurableLog:
    """Lines of one rank, rewritten to `uri` every `flush_every_s` while something is new.

    What the object already holds (an earlier attempt of the same rank) is kept in front of the
    new lines, so a restarted launcher does not erase the log of the attempt that failed.
    """

    def __init__(self, storage: Storage, uri: str, *, flush_every_s: float = 5.0) -> None:
        self.storage, self.uri, self.flush_every_s = storage, uri, flush_every_s
        self._lines: list[str] = []
        self._written = 0  # how many of `_lines` the stored object holds
        self._earlier: bytes | None = None  # the object as found before the first upload
        self._lock = threading.Lock()  # guards `_lines`
        self._upload_lock = threading.Lock()  # one upload at a time
        self._failing = False
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"durable-log {uri}", daemon=True)
        self._thread.start()

    # -- what the rank calls ------------------------------------------------------------------
    def write(self, line: str) -> None:
        """Keep `line` (several if it holds newlines), stamped with the current UTC time."""
        stamp = utc_stamp()
        parts = line.rstrip("\n").split("\n")
        with self._lock:
            self._lines.extend(f"{stamp} {part.rstrip(chr(13))}\n" for part in parts)

    def flush(self) -> bool:
        """Upload now if anything is new; True when the stored object holds every line written."""
        with self._upload_lock:
            with self._lock:
                count = len(self._lines)
                if count == self._written:
                    return True
                body = "".join(self._lines[:count]).encode("utf-8")
            try:
                if self._earlier is None:
                    self._earlier = self._read_earlier()
                self.storage.write_bytes(self.uri, self._earlier + body)
            except Exception as exc:  # never into the training loop: report once, retry next flush
                self._report(exc)
                return False
            self._written = count
            self._failing = False
            return True

    def close(self) -> None:
        """Stop the flushing thread and upload what is left; safe to call again, from atexit or an except block."""
        if not self._closed:
            self._closed = True
            self._stop.set()
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=max(self.flush_every_s, 1.0) + 60.0)
        self.flush()

    def __enter__(self) -> DurableLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the background side ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.flush_every_s):
            self.flush()

    def _read_earlier(self) -> bytes:
        if not self.storage.exists(self.uri):
            return b""
        data = self.storage.read_bytes(self.uri)
        return data if not data or data.endswith(b"\n") else data + b"\n"

    def _report(self, exc: Exception) -> None:
        if self._failing:
            return
        self._failing = True
        detail = str(exc) if isinstance(exc, StorageError) else f"{type(exc).__name__}: {exc}"
        try:
            print(f"warning: cannot save this rank's log to {self.uri} ({detail}); "
                  "the lines are kept and retried at the next flush", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass


def read_rank_entries(storage: Storage, layout: RunLayout, ranks: Iterable[int] | None = None
                      ) -> dict[int, list[Entry]]:
    """Every stored rank log (or those of `ranks`) as (timestamp, line) pairs, by rank."""
    wanted = None if ranks is None else set(ranks)
    folder = layout.logs.rstrip("/").rsplit("/", 1)[-1]
    out: dict[int, list[Entry]] = {}
    for info in storage.list(layout.logs):
        head, _, name = info.uri.rpartition("/")
        rank = parse_rank_log(name)
        if rank is None or head.rpartition("/")[2] != folder or (wanted is not None and rank not in wanted):
            continue  # not a rank log, in a sub-folder, or not asked for
        out[rank] = parse_entries(storage.read_bytes(info.uri).decode("utf-8", "replace"))
    return out


def read_rank_logs(storage: Storage, layout: RunLayout, ranks: list[int] | None) -> list[str]:
    """The stored lines of `ranks` (every rank when None), merged in time order, without their stamps."""
    return merge_entries(read_rank_entries(storage, layout, ranks))
