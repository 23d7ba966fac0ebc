"""Rank 0's TensorBoard event files, kept in the run folder in storage as training goes.

Pods have no shared filesystem, so the writer keeps its event files in a local scratch folder and
uploads them (whole: an event file is small and only grows) to the run's TensorBoard folder
(`RunLayout.tensorboard`) every `flush_every_s`, and at the end. TensorBoard's `--logdir <that URI>`
then works for local and s3:// runs alike (for S3 it reads the usual AWS variables, and
`S3_ENDPOINT` for MinIO/Ceph).
An upload that fails never stops training: it is reported once and retried at the next flush.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from pipelora.storage import Storage, join_uri

FLUSH_EVERY_S = 30.0


class TensorBoardLog:
    """Scalars of the run (loss, eval loss, lr, grad norm, tokens/s per device, MFU, step time)."""

    def __init__(self, storage: Storage, uri: str, *, flush_every_s: float = FLUSH_EVERY_S) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.storage, self.uri = storage, uri
        self.local = Path(tempfile.mkdtemp(prefix="pipelora-tensorboard-"))
        self.writer: Any = SummaryWriter(str(self.local), flush_secs=max(int(flush_every_s), 1))
        self._lock = threading.Lock()
        self._failing = False
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(flush_every_s,), name="tensorboard-upload",
                                        daemon=True)
        self._thread.start()

    def step(self, step: int, *, loss: float, lr: float, grad_norm: float, tokens_per_s_per_device: float,
             step_time_s: float, mfu: float | None = None) -> None:
        with self._lock:
            if mfu is not None:
                self.writer.add_scalar("train/mfu", mfu, step)
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
            self.writer.add_scalar("train/tokens_per_s_per_device", tokens_per_s_per_device, step)
            self.writer.add_scalar("train/step_time_s", step_time_s, step)

    def eval(self, step: int, *, loss: float) -> None:
        with self._lock:
            self.writer.add_scalar("eval/loss", loss, step)

    def upload(self) -> bool:
        """Flush the event files and upload them; True when storage holds everything written."""
        with self._lock:
            self.writer.flush()
            files = sorted(p for p in self.local.rglob("*") if p.is_file())
            try:
                for path in files:
                    self.storage.upload_file(path, join_uri(self.uri, path.relative_to(self.local).as_posix()))
            except Exception as exc:  # never into the training loop
                if not self._failing:
                    self._failing = True
                    print(f"warning: cannot upload TensorBoard events to {self.uri} ({exc}); retried at the next "
                          "flush", file=sys.stderr, flush=True)
                return False
            self._failing = False
            return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=120)
        self.upload()
        with self._lock:
            self.writer.close()
        shutil.rmtree(self.local, ignore_errors=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.upload()
