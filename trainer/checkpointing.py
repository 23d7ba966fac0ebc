"""A rank's side of checkpoints and the final adapter: resume, save and export.

Every method here is collective (every rank calls it, in the same order): rank 0 picks the
checkpoint to resume from and commits what every rank uploaded, so no rank can resume from, or
announce, a checkpoint another rank did not see whole.

Saving does not hold training up for the upload. At the checkpoint's step boundary each rank
copies its part (LoRA, optimizer and scheduler state, RNG) to host memory and goes on training;
a background thread turns the copy into files and uploads them. After each following step the
ranks agree (one tiny all-reduce) whether every upload is done, and once they are, they gather
what was written and rank 0 commits it: it confirms the run's lease, writes the commit marker
and prunes. Every collective runs on the training thread, at points every rank reaches together;
the background thread only talks to storage. A new checkpoint, the end of training and a
preemption first finish the checkpoint under way (its marker written, or its failure raised on
every rank); after a failure nothing more is committed, so an interrupted save stays invisible.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from pipelora.layout import RunLayout
from pipelora.lease import FencedStorage, Lease, LeaseHeld, LeaseLost
from pipelora.storage import ObjectInfo, Storage, StorageError
from pipelora.trainer import checkpoint as ckpt
from pipelora.trainer import compat
from pipelora.trainer.adapter import adapter_config, write_adapter
from pipelora.trainer.checkpoint import CheckpointMeta, History, StageSnapshot
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.plan import Plan
from pipelora.trainer.progress import emit
from pipelora.trainer.stage import StageModel

# "1": upload and commit before the next step (the behaviour before asynchronous saves), for
# comparison (bench/checkpoint_stall.py) and for debugging a storage problem step by step.
SYNC_ENV = "PIPELORA_SYNC_CHECKPOINTS"

# Errors that carry one message and rebuild from it, so every rank can raise the one a rank (or a
# background thread) met; anything else becomes a TrainerError naming what failed.
_PORTABLE = (StorageError, LeaseHeld, LeaseLost, TrainerError)


def portable_error(error: BaseException, what: str) -> Exception:
    """`error` as an exception to send to every rank (collectives pickle it)."""
    for kind in _PORTABLE:
        if isinstance(error, kind):
            return kind(str(error))  # the base class: a subclass may take other arguments
    return TrainerError(f"{what} failed: {type(error).__name__}: {error}")


@dataclass
class _InFlight:
    """One checkpoint on its way: this rank's upload, and rank 0's part of the marker."""

    step: int
    upload: Future[list[ObjectInfo]]
    meta: CheckpointMeta | None  # rank 0's, for the marker


class CheckpointUploads:
    """Uploads of checkpoint parts on a background thread, committed once every rank's part is in place.

    `start` (at a checkpoint step), `poll` (at every other step) and `finish` are collective;
    `abandon` (after a failure) is not.
    """

    def __init__(self, storage: Storage, layout: RunLayout, *, rank: int, device: torch.device, keep: int,
                 lease: Lease | None = None, asynchronous: bool = True) -> None:
        self.storage, self.layout, self.rank, self.device, self.keep = storage, layout, rank, device, keep
        self.lease = lease  # rank 0's: confirmed right before each marker is written
        self.asynchronous = asynchronous
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._flight: _InFlight | None = None

    @property
    def pending(self) -> int | None:
        """The step of the checkpoint on its way, if any."""
        return self._flight.step if self._flight else None

    def start(self, step: int, snapshot: StageSnapshot, meta: CheckpointMeta | None) -> None:
        """Upload `snapshot` in the background (after finishing the previous checkpoint)."""
        self.finish()
        self._flight = _InFlight(step, self._pool.submit(self._upload, step, snapshot), meta)
        if not self.asynchronous:
            self.finish()

    def poll(self) -> None:
        """Commit the checkpoint on its way if every rank's upload is done; otherwise carry on at once."""
        import torch.distributed as dist

        flight = self._flight
        if flight is None:
            return
        busy = torch.tensor([float(not flight.upload.done())], device=self.device)
        dist.all_reduce(busy, op=dist.ReduceOp.MAX)
        if busy.item() == 0:
            self._commit(flight)

    def finish(self) -> None:
        """Wait for the checkpoint on its way and commit it; its failure is raised on every rank."""
        if self._flight is not None:
            self._commit(self._flight)

    def abandon(self) -> None:
        """After a failure, when no collective can run: the checkpoint on its way is never committed
        (its uploaded files stay unnamed by any marker, so nothing reads them)."""
        self._flight = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the steps -----------------------------------------------------------------------------------
    def _upload(self, step: int, snapshot: StageSnapshot) -> list[ObjectInfo]:
        return ckpt.upload(self.storage, self.layout, step, snapshot.files())

    def _commit(self, flight: _InFlight) -> None:
        """Every rank's objects to rank 0, which writes the marker (if the run's lease is still this
        attempt's) and prunes; any rank's failure is raised on every rank."""
        import torch.distributed as dist

        self._flight = None
        error = flight.upload.exception()  # waits for this rank's upload
        mine: Any = (portable_error(error, f"uploading checkpoint step {flight.step}") if error is not None
                     else [(i.uri, i.size, i.sha256) for i in flight.upload.result()])
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        failures = [part for part in everyone if isinstance(part, BaseException)]
        if failures:
            raise failures[0]
        outcome: list[Any] = [None]
        if self.rank == 0:
            assert flight.meta is not None
            objects = [ObjectInfo(*t) for part in everyone for t in part]
            try:
                if self.lease is not None:
                    self.lease.confirm(f"commit checkpoint step {flight.step}")
                ckpt.commit(self.storage, self.layout, objects, flight.meta)
                outcome = [ckpt.prune(self.storage, self.layout, keep=self.keep)]
            except Exception as exc:
                outcome = [portable_error(exc, f"committing checkpoint step {flight.step}")]
        dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        if self.rank == 0:
            removed = outcome[0]
            emit(f"checkpoint step {flight.step} committed at {self.layout.checkpoint(flight.step)}"
                 + (f"; pruned {removed}" if removed else ""))


class Checkpointing:
    """Resume, save and export the state of one rank's stage."""

    def __init__(self, plan_: Plan, model: StageModel, storage: Storage, *, lease: Lease | None = None,
                 asynchronous: bool | None = None) -> None:
        self.plan: Plan = plan_
        self.model: StageModel = model
        self.storage: Storage = storage
        self.layout: RunLayout = plan_.spec.layout
        self.rank: int = plan_.info.rank
        self.lease: Lease | None = lease  # rank 0's: every commit marker and adapter file is fenced by it
        if asynchronous is None:
            asynchronous = os.environ.get(SYNC_ENV, "0") != "1"
        self.uploads = CheckpointUploads(storage, self.layout, rank=self.rank, device=plan_.device,
                                         keep=plan_.spec.training.keep_checkpoints, lease=lease,
                                         asynchronous=asynchronous)

    def resume(self) -> CheckpointMeta | None:
        """Load the newest committed checkpoint (chosen by rank 0 for everyone); None to start afresh."""
        import torch.distributed as dist

        choice: list[int | None] = [None]
        if self.rank == 0:
            steps = ckpt.committed_steps(self.storage, self.layout)
            choice = [steps[-1] if steps else None]
        dist.broadcast_object_list(choice, src=0)
        step = choice[0]
        if step is None:
            return None
        found = ckpt.open_committed(self.storage, self.layout, step)
        partition = self.plan.partition
        found.meta.check_compatible(stages=partition.stages, data_parallel=self.plan.spec.parallel.data_parallel,
                                    bounds=partition.bounds, where=found.folder)
        weights = found.lora(self.plan.stage)
        with torch.no_grad():
            for name, param in self.model.lora.items():
                if name not in weights:
                    raise TrainerError(f"checkpoint {found.folder} lacks {name}; the LoRA settings changed")
                param.copy_(weights[name].to(param.device))
        state = found.optim(self.plan.stage)
        self.model.optimizer.load_state_dict(state["optimizer"])
        self.model.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(found.rng(self.rank))
        compat.set_global_steps(self.model.engine, step)
        emit(f"{self.plan.tag} resumed from {found.folder} (step {step})")
        return found.meta

    def save(self, step: int, *, data_position: dict[str, int], losses: History, eval_losses: History) -> None:
        """Checkpoint `step`: finish the previous checkpoint, copy this rank's part to host memory and
        upload it in the background; rank 0 commits once every rank's part is in place (`poll`, `finish`).

        `data_position` and the histories matter on rank 0 only (the marker is its to write).
        """
        plan_, model = self.plan, self.model
        self.uploads.finish()  # one checkpoint at a time: at most one snapshot in host memory
        snapshot = ckpt.snapshot(stage=plan_.stage, rank=self.rank, write_stage=plan_.dp_rank == 0,
                                 lora=model.lora, optimizer=model.optimizer, scheduler=model.scheduler)
        meta = None
        if self.rank == 0:
            meta = ckpt.new_meta(step=step, stages=plan_.partition.stages,
                                 data_parallel=plan_.spec.parallel.data_parallel, bounds=plan_.partition.bounds,
                                 data_position=dict(data_position), losses=[list(x) for x in losses],
                                 eval_losses=[list(x) for x in eval_losses])
        self.uploads.start(step, snapshot, meta)

    def poll(self) -> None:
        """At a step boundary without a checkpoint: commit the one under way if every rank uploaded it."""
        self.uploads.poll()

    def finish(self) -> None:
        """Commit the checkpoint under way before going on (end of training, preemption)."""
        self.uploads.finish()

    def abandon(self) -> None:
        """After a failure: leave the checkpoint under way uncommitted (see CheckpointUploads.abandon)."""
        self.uploads.abandon()

    def export_adapter(self) -> None:
        """Gather every stage's LoRA weights on rank 0, which writes the PEFT adapter (each file fenced by
        the run's lease); its failure is raised on every rank."""
        import torch.distributed as dist

        plan_ = self.plan
        payload = {k: v.detach().cpu() for k, v in self.model.lora.items()} if plan_.dp_rank == 0 else {}
        gathered: list[Any] | None = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        outcome: list[Any] = [None]
        if gathered is not None:
            tensors: dict[str, torch.Tensor] = {}
            for part in gathered:
                tensors.update(part)
            lora = plan_.spec.lora
            config = adapter_config(base_model=plan_.spec.model.uri, r=lora.r, alpha=lora.alpha,
                                    dropout=lora.dropout, targets=plan_.targets)
            storage = (FencedStorage(self.storage, self.lease, action="write the adapter") if self.lease
                       else self.storage)
            try:
                write_adapter(storage, self.layout.adapter, tensors=tensors, config=config)
                emit(f"adapter ({len(tensors)} tensors) written to {self.layout.adapter}")
            except _PORTABLE as exc:
                outcome = [portable_error(exc, "writing the adapter")]
        dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
