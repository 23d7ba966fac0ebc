"""A rank's lines, relayed through its worker pod's entrypoint to `kubectl logs`.

A rank that sshd started has no handle on the pod's stdout (PID 1's). It appends each line to
its own file in the pod's runtime folder; the entrypoint follows those files and prints them.
Appending to a local file never blocks on the reader, so a slow or dead relay cannot stall a
rank; a rank that cannot write says so once on stderr instead of losing lines silently.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import TextIO

from pipelora.launch import RELAY_DIR_ENV


def relay_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.log"


class RankRelay:
    """Appends this rank's lines to `<dir>/rank-<RRRRR>.log` (one write per line)."""

    def __init__(self, directory: str | Path, rank: int) -> None:
        self.path = Path(directory) / relay_file_name(rank)
        self._lock = threading.Lock()
        self._fh: TextIO | None = None
        self._failed = False

    def write(self, line: str) -> None:
        with self._lock:
            if self._failed:
                return
            try:
                if self._fh is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._fh = open(self.path, "a", encoding="utf-8", buffering=1)
                self._fh.write(line + "\n")
            except OSError as exc:
                self._failed = True
                sys.stderr.write(f"pipelora: cannot relay this rank's lines to its pod log through {self.path}: "
                                 f"{exc.strerror or exc}; they still reach the launcher's log\n")
                sys.stderr.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def relay_from_env(rank: int) -> RankRelay | None:
    """The relay the launcher asked for (`mpirun -x PIPELORA_RANK_RELAY_DIR=…`), if any."""
    directory = os.environ.get(RELAY_DIR_ENV)
    return RankRelay(directory, rank) if directory else None
