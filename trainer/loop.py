"""The training run of one rank: plan, build the stage, resume, then the loop over optimizer steps.

Every check a user can fail happens in `plan`, before the process group forms, identically on
every rank, so each rank reports the same one error and exits; a failure after that exits the
rank non-zero, and the launcher (mpirun) ends the job. The roles around the loop live in their
own modules: `stage` (what a rank trains), `checkpointing` (resume, save, export), `evaluation`,
`grad_dump` (a debugging option) and `progress` (what the run reports).

Once the process group forms, rank 0 takes the run's lease (`pipelora.lease`): a second attempt
on a live run stops there, with the holder named on every rank. The lease is renewed while the
attempt runs, confirmed before every commit marker and adapter file, and released on the way out
(finished, preempted or failed), so the launcher's next attempt takes over at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from pipelora.config import JobSpec
from pipelora.errors import PipeloraError
from pipelora.lease import Lease, LeaseLost
from pipelora.storage import Storage, StorageError, storage_for
from pipelora.trainer import compat, grad_dump
from pipelora.trainer.checkpoint import CheckpointMeta
from pipelora.trainer.checkpointing import Checkpointing, portable_error
from pipelora.trainer.data import MicroBatchStream
from pipelora.trainer.errors import Preempted
from pipelora.trainer.evaluation import Evaluation
from pipelora.trainer.memory_report import StageMemory
from pipelora.trainer.plan import Plan, plan
from pipelora.trainer.progress import Progress, emit, peak_memory_gib, step_line, utilisation
from pipelora.trainer.rank_output import RankOutput
from pipelora.trainer.schedule import lr_factor
from pipelora.trainer.stage import StageModel, build_stage, init_distributed
from pipelora.trainer.step_boundary import StepBoundary
from pipelora.trainer.tensorboard import TensorBoardLog


def _open_train_stream(plan_: Plan, consumed: int) -> MicroBatchStream | None:
    """The train micro-batches from `consumed` on, for the stages that read rows (first and last)."""
    if not (plan_.is_first or plan_.is_last):
        return None
    from pipelora.dataprep import open_shards

    spec = plan_.spec
    p = spec.parallel
    train = open_shards(spec.layout.data, split="train", endpoint_url=spec.storage.endpoint_url)
    return MicroBatchStream(train, dp_rank=plan_.dp_rank, dp_size=p.data_parallel,
                            micro_batch_size=p.micro_batch_size, seed=spec.training.seed, consumed=consumed,
                            inputs=plan_.is_first, labels=plan_.is_last)


def step_boundary(plan_: Plan) -> StepBoundary:
    t = plan_.spec.training
    return StepBoundary(every_steps=t.checkpoint_every_steps, every_minutes=t.checkpoint_every_minutes,
                        max_steps=t.max_steps, device=plan_.device)


class Trainer:
    """One rank's part of the run, ready to loop: built, resumed, its data open."""

    def __init__(self, plan_: Plan, *, storage: Storage, model: StageModel, checkpoints: Checkpointing,
                 resumed: CheckpointMeta | None, stream: MicroBatchStream | None, evaluation: Evaluation,
                 progress: Progress | None, lease: Lease | None = None,
                 tensorboard: TensorBoardLog | None = None) -> None:
        self.plan: Plan = plan_
        self.spec: JobSpec = plan_.spec
        self.storage: Storage = storage
        self.rank: int = plan_.info.rank
        self.model: StageModel = model
        self.checkpoints: Checkpointing = checkpoints
        self.start_step: int = resumed.step if resumed else 0
        self.stream: MicroBatchStream | None = stream  # None on stages that read no rows
        self.evaluation: Evaluation = evaluation
        self.progress: Progress | None = progress  # rank 0 only
        self.lease: Lease | None = lease  # rank 0 only
        self.tensorboard: TensorBoardLog | None = tensorboard  # rank 0 only

    @classmethod
    def start(cls, plan_: Plan, *, lease: Lease | None = None) -> Trainer:
        """Build the stage, resume from the newest checkpoint, open the data (in that order)."""
        spec = plan_.spec
        storage = storage_for(spec, spec.run_uri)
        model = build_stage(plan_)
        checkpoints = Checkpointing(plan_, model, storage, lease=lease)
        resumed = checkpoints.resume()
        stream = _open_train_stream(plan_, resumed.consumed_micro_batches if resumed else 0)
        evaluation = Evaluation(plan_, model.engine)
        progress = None
        tensorboard = None
        if plan_.info.rank == 0:
            progress = Progress(storage, spec.layout.progress, max_steps=spec.training.max_steps)
            progress.restore(resumed.losses if resumed else [], resumed.eval_losses if resumed else [])
            progress.write(force=True, state="running")
            tensorboard = TensorBoardLog(storage, spec.layout.tensorboard)
        return cls(plan_, storage=storage, model=model, checkpoints=checkpoints, resumed=resumed, stream=stream,
                   evaluation=evaluation, progress=progress, lease=lease, tensorboard=tensorboard)

    def run(self, boundary: StepBoundary | None = None) -> None:
        """Train from the step after the resumed one to `training.max_steps`, then export the adapter."""
        t, p = self.spec.training, self.spec.parallel
        progress, engine, optimizer = self.progress, self.model.engine, self.model.optimizer
        dump = None
        if self.start_step == 0:
            dump = grad_dump.arm(optimizer, lora=self.model.lora, stage=self.plan.stage, dp_rank=self.plan.dp_rank)
        tokens_per_step = p.micro_batch_size * p.micro_batches * p.data_parallel * self.spec.dataset.seq_len
        step_times: list[float] = []
        stall = CheckpointStall()
        boundary = boundary or step_boundary(self.plan)
        boundary.install()
        memory = StageMemory(self.plan)
        try:
            for step in range(self.start_step + 1, t.max_steps + 1):
                began = time.perf_counter()
                lr = t.lr * lr_factor(step - 1, warmup=t.warmup_steps, total=t.max_steps, kind=t.schedule)
                loss = float(engine.train_batch(data_iter=self.stream))
                if dump is not None:
                    dump.remove()
                    dump = None
                elapsed = time.perf_counter() - began
                with stall.measure():
                    # The checkpoint uploaded while this step trained is committed before the step is
                    # announced: a log line past a checkpoint's next step means that checkpoint is safe.
                    self.checkpoints.poll()
                step_times.append(elapsed)
                recent = step_times[-20:]
                mean = sum(recent) / len(recent)
                eta = mean * (t.max_steps - step)
                tps = tokens_per_step / elapsed
                rates = utilisation(self.plan, tps)  # tokens/s per device and MFU
                emit(step_line(stage=self.plan.stage, stages=p.stages, dp=self.plan.dp_rank, dps=p.data_parallel,
                               step=step, max_steps=t.max_steps, loss=loss, lr=lr, tokens_per_s=tps,
                               mem_gib=peak_memory_gib(), eta_s=eta, **rates))
                if progress:
                    progress.step(step=step, loss=loss, lr=lr, tokens_per_s=tps, eta_s=eta,
                                  grad_norm=optimizer.last_grad_norm, **rates)
                    progress.write()
                if self.tensorboard:
                    self.tensorboard.step(step, loss=loss, lr=lr, grad_norm=optimizer.last_grad_norm,
                                          tokens_per_s_per_device=rates.get("tokens_per_s_device") or tps / p.world_size,
                                          step_time_s=elapsed, mfu=rates.get("mfu"))
                if self.evaluation.due(step):
                    eval_loss = self.evaluation.run()
                    if self.rank == 0:
                        emit(f"{self.plan.tag} step {step}/{t.max_steps} eval_loss {eval_loss:.4f}")
                    if progress:
                        progress.eval(step=step, loss=eval_loss)
                        progress.write(force=True)
                    if self.tensorboard:
                        self.tensorboard.eval(step, loss=eval_loss)
                decision = boundary.decide(step)
                if self.lease is not None:
                    self.lease.raise_if_lost(f"train past step {step}")  # a newer attempt owns the run
                if decision.checkpoint:
                    with stall.measure(checkpoint=True):
                        self.checkpoints.save(step, data_position=self.stream.state() if self.stream else {},
                                              losses=progress.state["losses"] if progress else [],
                                              eval_losses=progress.state["eval_losses"] if progress else [])
                        boundary.checkpointed()
                        if decision.stop:
                            self.checkpoints.finish()  # committed before anyone says so
                if decision.stop:
                    self._preempted(step, boundary)
            with stall.measure(at_exit=True):
                self.checkpoints.finish()
            if self.stream is not None and self.rank == 0 and step_times:
                emit(f"data wait {self.stream.wait_s:.3f}s of {sum(step_times):.3f}s training")
            if self.rank == 0 and step_times:
                emit(f"step agreement {boundary.allreduce_s:.3f}s of {sum(step_times):.3f}s training")
            if step_times:
                emit(f"{self.plan.tag} {stall.line(sum(step_times))}")
                emit(memory.line())
            self.checkpoints.export_adapter()
            if progress:
                progress.write(force=True, state="finished")
        except Preempted:
            raise
        except LeaseLost:
            self.checkpoints.abandon()
            raise  # the run's progress is the newer attempt's to write now
        except BaseException:
            self.checkpoints.abandon()  # nothing more is committed: the next attempt resumes from the last marker
            if progress:
                try:
                    progress.write(force=True, state="failed")
                except StorageError:
                    pass
            raise
        finally:
            boundary.uninstall()
            if dump is not None:
                dump.remove()
            if self.stream is not None:
                self.stream.close()
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _preempted(self, step: int, boundary: StepBoundary) -> None:
        """Every rank committed `step`; say how long since the signal, then leave (the next attempt resumes)."""
        waited = boundary.seconds_since_signal()
        cause = (f"{waited:.1f}s after {boundary.signal_name} on this rank" if waited is not None
                 else "signalled on another rank")
        emit(f"{self.plan.tag} preempted at step {step}, checkpoint committed ({cause})")
        if self.progress:
            self.progress.write(force=True, state="preempted")
        raise Preempted(step)


class CheckpointStall:
    """How long the training loop was held up by checkpoints: at checkpoint steps (finishing the
    previous checkpoint, copying the state), after the other steps (agreeing whether the uploads are
    done, committing), and finishing the last checkpoint at exit (nothing left to overlap it with)."""

    def __init__(self) -> None:
        self.at_checkpoints = 0.0
        self.between = 0.0
        self.at_exit = 0.0
        self.checkpoints = 0

    @contextlib.contextmanager
    def measure(self, *, checkpoint: bool = False, at_exit: bool = False) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - began
            if at_exit:
                self.at_exit += took
            elif checkpoint:
                self.at_checkpoints += took
                self.checkpoints += 1
            else:
                self.between += took

    def line(self, training_s: float) -> str:
        return (f"checkpoint stall {self.at_checkpoints:.3f}s at {self.checkpoints} checkpoint steps, "
                f"{self.between:.3f}s between them, {self.at_exit:.3f}s finishing at exit, "
                f"of {training_s:.3f}s training")


def take_lease(plan_: Plan) -> Lease | None:
    """Rank 0 takes the run's lease (and renews it from then on); every rank raises the same error when it
    cannot, so a second attempt on a live run stops before building anything. Collective."""
    import torch.distributed as dist

    spec = plan_.spec
    lease: Lease | None = None
    outcome: list[Any] = [None]
    if plan_.info.rank == 0:
        try:
            lease = Lease.acquire(storage_for(spec, spec.run_uri), spec.layout, run=spec.name)
            emit(lease.describe())
            lease.start_renewing(warn=emit)
        except PipeloraError as exc:
            outcome = [portable_error(exc, "taking the lease")]
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return lease


def train(spec: JobSpec) -> None:
    """Run this rank of the job described by `spec` (started once per rank by the launcher)."""
    compat.check_versions()
    plan_ = plan(spec)
    boundary = step_boundary(plan_)
    boundary.install()  # a SIGTERM while the stage builds is kept for the first step boundary
    with RankOutput(spec, plan_.info.rank):
        init_distributed(plan_)
        lease = take_lease(plan_)
        try:
            Trainer.start(plan_, lease=lease).run(boundary)
        finally:
            if lease is not None:
                lease.release()  # finished, preempted or failed: the next attempt may take over at once
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
