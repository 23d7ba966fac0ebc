"""Asynchronous checkpoint upload: training goes on while a checkpoint uploads, and only a checkpoint
every rank uploaded whole is ever committed.

In one process (a gloo group of one rank, local storage whose writes wait on an event) the
order of events is checked step by step; under mpirun, an HTTP proxy in front of the moto server
holds one rank's upload while the run goes on, and that rank is killed with the upload pending.
"""

from __future__ import annotations

import http.client
import re
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil
import pytest
import torch

from pipelora.layout import RunLayout
from pipelora.storage import LocalStorage, ObjectInfo, StorageError
from pipelora.trainer import checkpoint as ckpt
from pipelora.trainer.checkpointing import CheckpointUploads
from pipelora.trainer.optim import ClippedAdamW

HANG_GUARD_S = 120  # a wait that never ends fails the test instead of hanging it; not a performance bound


class HeldStorage(LocalStorage):
    """Local storage that logs every write and delete; writes under `held` wait for `release`
    (an upload over a slow link), or fail with `fail` set."""

    def __init__(self, held: str, events: list[str]) -> None:
        self.held, self.events = held, events
        self.began = threading.Event()  # a held write is waiting
        self.release = threading.Event()
        self.fail: str | None = None

    def write_bytes(self, uri: str, data: bytes) -> ObjectInfo:
        if uri.startswith(self.held + "/"):
            if self.fail and uri.endswith(self.fail):
                raise StorageError(f"cannot write {uri}: S3 answered SlowDown")
            self.events.append(f"waits {uri}")
            self.began.set()
            self.events.append(f"released {uri}" if self.release.wait(HANG_GUARD_S) else "hang guard")
        info = super().write_bytes(uri, data)
        self.events.append(f"wrote {uri}")
        return info

    def delete_prefix(self, prefix: str) -> int:
        self.events.append(f"deleted {prefix}")
        return super().delete_prefix(prefix)


class TinyTrainer:
    """A stage's trainable state (LoRA pair, the trainer's AdamW, its schedule) and one step of it."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.lora = {"a": torch.nn.Parameter(torch.randn(4, 3, generator=gen)),
                     "b": torch.nn.Parameter(torch.zeros(3, 4))}
        self.optimizer = ClippedAdamW(list(self.lora.values()), lr=0.1, max_norm=0.0, data_parallel=1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0 / (1 + s))
        self.step = 0

    def train_step(self) -> None:
        self.step += 1
        for i, p in enumerate(self.lora.values()):
            p.grad = torch.full_like(p, 0.1 * (self.step + i))
        self.optimizer.step()
        self.scheduler.step()

    def snapshot(self) -> ckpt.StageSnapshot:
        return ckpt.snapshot(stage=0, rank=0, write_stage=True, lora=self.lora, optimizer=self.optimizer,
                             scheduler=self.scheduler)

    def meta(self) -> ckpt.CheckpointMeta:
        return ckpt.new_meta(step=self.step, stages=1, data_parallel=1, bounds=(0, 3),
                             data_position={"consumed_micro_batches": 4 * self.step},
                             losses=[[s, 1.0 / s] for s in range(1, self.step + 1)], eval_losses=[])


def uploads_for(storage: HeldStorage, layout: RunLayout, *, keep: int = 3) -> CheckpointUploads:
    return CheckpointUploads(storage, layout, rank=0, device=torch.device("cpu"), keep=keep)


def test_a_slow_upload_does_not_hold_training_and_is_committed_only_once_done(one_rank, tmp_path: Path) -> None:
    layout = RunLayout.of(str(tmp_path), "run")
    events: list[str] = []
    storage = HeldStorage(layout.checkpoint(2), events)
    uploads = uploads_for(storage, layout)
    trainer = TinyTrainer()
    trainer.train_step()
    trainer.train_step()
    at_step_2 = {k: v.detach().clone() for k, v in trainer.lora.items()}
    moments_2 = {i: s["exp_avg"].clone() for i, s in enumerate(trainer.optimizer.state.values())}
    uploads.start(2, trainer.snapshot(), trainer.meta())
    assert storage.began.wait(HANG_GUARD_S)
    for _ in range(3):  # steps 3, 4, 5 while step 2's upload waits
        trainer.train_step()
        uploads.poll()
        events.append(f"step {trainer.step}")
        assert uploads.pending == 2
        assert not storage.exists(layout.checkpoint_marker(2))
    waiting = [e for e in events if e.startswith("waits")]
    assert len(waiting) == 1 and events.index(waiting[0]) < events.index("step 3")
    assert events[-3:] == ["step 3", "step 4", "step 5"]  # nothing was released, nothing else written
    storage.release.set()
    for _ in range(HANG_GUARD_S * 100):  # the following steps' boundaries move it on: agree, gather, commit
        if uploads.pending is None:
            break
        trainer.train_step()
        uploads.poll()
        time.sleep(0.01)
    assert uploads.pending is None
    marker = layout.checkpoint_marker(2)
    written = [e for e in events if e.startswith("wrote")]
    assert written[-1] == f"wrote {marker}"  # the marker last, after every file it names
    assert len(written) == 4
    committed = ckpt.open_committed(storage, layout, 2)
    assert committed.meta.step == 2 and committed.meta.consumed_micro_batches == 8
    saved = committed.lora(0)
    assert trainer.step > 5
    for name, value in at_step_2.items():  # the state of step 2, not the one training reached meanwhile
        assert torch.equal(saved[name], value) and not torch.equal(trainer.lora[name].detach(), value)
    state = committed.optim(0)
    for i, moment in moments_2.items():
        assert torch.equal(state["optimizer"]["state"][i]["exp_avg"], moment)
    assert state["scheduler"]["last_epoch"] == 2


def test_a_new_checkpoint_waits_for_the_previous_and_prunes_after_committing(one_rank, tmp_path: Path) -> None:
    layout = RunLayout.of(str(tmp_path), "run")
    events: list[str] = []
    storage = HeldStorage(layout.checkpoint(2), events)
    uploads = uploads_for(storage, layout, keep=1)
    trainer = TinyTrainer()
    trainer.train_step()
    trainer.train_step()
    uploads.start(2, trainer.snapshot(), trainer.meta())
    trainer.train_step()
    trainer.train_step()
    threading.Timer(0.2, storage.release.set).start()  # the order below holds however late this comes
    uploads.start(4, trainer.snapshot(), trainer.meta())
    uploads.finish()
    step4 = [i for i, e in enumerate(events) if e.startswith(f"wrote {layout.checkpoint(4)}/")]
    marker2 = events.index(f"wrote {layout.checkpoint_marker(2)}")
    assert marker2 < min(step4)
    marker4 = events.index(f"wrote {layout.checkpoint_marker(4)}")
    assert events.index(f"deleted {layout.checkpoint_marker(2)}") > marker4  # pruning after the commit
    assert ckpt.committed_steps(storage, layout) == [4]


def test_a_failed_upload_is_raised_and_never_committed(one_rank, tmp_path: Path) -> None:
    layout = RunLayout.of(str(tmp_path), "run")
    storage = HeldStorage(layout.checkpoint(2), [])
    storage.fail = ckpt.optim_name(0)
    storage.release.set()
    uploads = uploads_for(storage, layout)
    trainer = TinyTrainer()
    trainer.train_step()
    trainer.train_step()
    uploads.start(2, trainer.snapshot(), trainer.meta())
    with pytest.raises(StorageError, match=r"^cannot write .*stage-00-optim.pt: S3 answered SlowDown$"):
        uploads.finish()
    assert uploads.pending is None
    assert not storage.exists(layout.checkpoint_marker(2))
    assert ckpt.committed_steps(storage, layout) == []


# -- under mpirun: one rank's upload held by a proxy, then that rank killed -----------------------------


class HoldingProxy:
    """An HTTP proxy in front of the moto server that holds the requests matching `hold` until `release`
    is set, then forwards them, or drops them with `drop` set (their sender is gone)."""

    def __init__(self, upstream: str, hold: re.Pattern[str]) -> None:
        self.upstream = urlparse(upstream)
        self.hold = hold
        self.held = threading.Event()
        self.release = threading.Event()
        self.drop = False
        self.held_paths: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _forward(self) -> None:
                body = self._body()
                if self.command == "PUT" and proxy.hold.search(self.path):
                    proxy.held_paths.append(self.path)
                    proxy.held.set()
                    proxy.release.wait(HANG_GUARD_S)
                    if proxy.drop:
                        self.close_connection = True
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                if self.headers.get("Transfer-Encoding"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=HANG_GUARD_S)
                try:
                    conn.request(self.command, self.path, body=body if body else None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response_only(resp.status, resp.reason)
                    for key, value in resp.getheaders():
                        if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(key, value)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.drop = True
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


LINE = re.compile(r"^\[stage (\d)/2 dp 0/1\] step (\d+)/\d+ loss ([\d.]+) ")


def rank_pids(mpirun_pid: int) -> dict[int, psutil.Process]:
    ranks = {}
    for child in psutil.Process(mpirun_pid).children():
        ranks[int(child.environ()["OMPI_COMM_WORLD_RANK"])] = child
    return ranks


def test_a_rank_killed_during_its_upload_leaves_that_step_uncommitted_and_the_rerun_resumes_before_it(
        s3_world) -> None:
    name = "async-kill"
    folder = f"runs/{name}/checkpoints/step-00000004"
    proxy = HoldingProxy(s3_world.endpoint, re.compile(rf"/{re.escape(folder)}/rank-00001-rng\.pt"))
    spec = s3_world.spec(name, **{"lora.dropout": 0.1, "storage.endpoint_url": proxy.url})
    config = s3_world.write_spec(spec)
    proc = subprocess.Popen(s3_world.train_cmd(2, config), env=s3_world.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first: dict[tuple[int, int], str] = {}
    after_hold: list[int] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            m = LINE.match(line)
            if not m:
                continue
            first[(int(m[1]), int(m[2]))] = m[3]
            if proxy.held.is_set() and int(m[1]) == 2 and int(m[2]) > 4:
                # Rank 1 (stage 2) trained past step 4 while its own upload of step 4 was held.
                after_hold.append(int(m[2]))
                assert not proxy.release.is_set()
                assert not s3_world.keys(f"{folder}/COMMITTED")
                rank_pids(proc.pid)[1].send_signal(signal.SIGKILL)
                break
        proxy.drop = True  # the killed rank's request never reaches the store
        proxy.release.set()
        proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    assert after_hold and after_hold[0] >= 5, first
    assert proxy.held_paths and all("rank-00001-rng.pt" in p for p in proxy.held_paths)
    assert proc.returncode != 0
    committed = {k.split("/")[3] for k in s3_world.keys(f"runs/{name}/checkpoints/") if k.endswith("/COMMITTED")}
    assert committed == {"step-00000002"}  # step 4 had every file but rank 1's: never committed

    spec["storage"]["endpoint_url"] = s3_world.endpoint
    done = s3_world.train(2, s3_world.write_spec(spec, copy_data=False))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from s3://{s3_world.bucket}/runs/{name}/checkpoints/step-00000002 (step 2)" in done.stdout
    again = {(int(m[1]), int(m[2])): m[3] for m in map(LINE.match, done.stdout.splitlines()) if m}
    assert min(step for _, step in again) == 3
    overlap = set(first) & set(again)
    assert {step for _, step in overlap} >= {3, 4, 5}
    assert all(first[k] == again[k] for k in overlap)  # the same steps again, the same losses
    assert s3_world.read_json(f"runs/{name}/progress.json")["state"] == "finished"
