"""The training run of one rank: build the stage, resume, train, evaluate, checkpoint, export.

Every check a user can fail (world size, model files, stage count, data) happens before the
process group forms, identically on every rank, so each rank reports the same one error and
exits; a failure after that exits the rank non-zero, and the launcher (mpirun) ends the job.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipelora.config import JobSpec
from pipelora.storage import Storage, StorageError, join_uri, storage_for
from pipelora.trainer import checkpoint as ckpt
from pipelora.trainer.adapter import adapter_config, write_adapter
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.layers import LoraSettings, lora_state
from pipelora.trainer.lora import resolve_targets
from pipelora.trainer.partition import Partition, balanced_partition
from pipelora.trainer.progress import Progress, emit, peak_memory_gib, step_line
from pipelora.trainer.ranks import RankInfo, discover, export_torch_env
from pipelora.trainer.schedule import lr_factor
from pipelora.trainer.weights import CheckpointReader, read_model_config


@dataclass
class Plan:
    """Everything decided before the process group forms (identical on every rank)."""

    spec: JobSpec
    info: RankInfo
    config: Any
    partition: Partition
    targets: list[str]
    stage: int
    dp_rank: int
    device: torch.device
    dtype: torch.dtype
    manifest: dict[str, Any]
    reader: CheckpointReader

    @property
    def tag(self) -> str:
        return (f"[stage {self.stage + 1}/{self.partition.stages} dp {self.dp_rank}/"
                f"{self.spec.parallel.data_parallel}]")


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def plan(spec: JobSpec, info: RankInfo | None = None) -> Plan:
    """Validate the job against the launch, the model and the data; no collective calls."""
    info = info or discover()
    p = spec.parallel
    if info.world_size != p.world_size:
        raise TrainerError(
            f"the launcher started {info.world_size} rank{'s' if info.world_size != 1 else ''} but the spec asks for "
            f"parallel.nodes x parallel.gpus_per_node = {p.nodes} x {p.gpus_per_node} = {p.world_size}; "
            f"start {p.world_size} ranks (mpirun -np {p.world_size}) or change the spec"
        )
    model_storage = storage_for(spec, spec.model.uri)
    config = read_model_config(model_storage, spec.model.uri)
    targets = resolve_targets(spec.lora.target_modules)
    partition = balanced_partition(config, stages=p.stages, seq_len=spec.dataset.seq_len)
    reader = CheckpointReader(model_storage, spec.model.uri)  # fails here, on every rank, without weights
    data_uri = spec.run_path("data")
    manifest = storage_for(spec, data_uri).read_marker(join_uri(data_uri, "manifest.json"))
    if manifest is None:
        raise TrainerError(f"no prepared data at {data_uri}: run dataprep first (pipelora-k8s dataprep --config ...)")
    if int(manifest.get("seq_len", -1)) != spec.dataset.seq_len:
        raise TrainerError(
            f"the data at {data_uri} has seq_len {manifest.get('seq_len')} but dataset.seq_len is "
            f"{spec.dataset.seq_len}; run dataprep again with --overwrite"
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    stage, dp_rank = p.stage_of_rank(info.rank)
    return Plan(spec, info, config, partition, targets, stage, dp_rank, device, _dtype(spec.training.dtype, device),
                manifest, reader)


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that first clips by the global gradient norm over all pipeline stages.

    DeepSpeed's own clipping reduces the norm over the tensor-parallel group only, so each stage
    would clip by its own norm; here the squared norms of every rank are summed (the replicas
    hold equal, already averaged gradients, hence the division by the data-parallel size).
    """

    def __init__(self, params: list[torch.nn.Parameter], *, max_norm: float, data_parallel: int, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.data_parallel = data_parallel
        self.last_grad_norm = 0.0
        self.grad_hook: Any = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        import torch.distributed as dist

        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.grad_hook is not None:
            self.grad_hook()
        squared = torch.zeros(1, dtype=torch.float64, device=grads[0].device if grads else "cpu")
        for g in grads:
            squared += g.double().pow(2).sum()
        if dist.is_initialized():
            dist.all_reduce(squared)
            squared /= self.data_parallel
        norm = float(squared.sqrt())
        self.last_grad_norm = norm
        if self.max_norm > 0 and norm > self.max_norm:
            scale = self.max_norm / (norm + 1e-6)
            for g in grads:
                g.mul_(scale)
        return super().step(closure)


def _init_distributed(plan_: Plan) -> None:
    if plan_.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(plan_.device)
    export_torch_env(plan_.info)
    import deepspeed

    if plan_.device.type == "cpu" and os.environ.get("PIPELORA_DS_SHM_COMM", "0") != "1":
        # DeepSpeed's CPU shared-memory all-reduce is a C++ op compiled on first use (minutes on a
        # small machine, per fresh container); gloo carries the tiny LoRA all-reduce just as well.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if plan_.device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False)


def _ds_config(spec: JobSpec) -> dict[str, Any]:
    p = spec.parallel
    return {
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.micro_batches,
        "train_batch_size": p.micro_batch_size * p.micro_batches * p.data_parallel,
        "gradient_clipping": 0.0,  # done by ClippedAdamW across all stages
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 0},
        "wall_clock_breakdown": False,
    }


class Trainer:
    """One rank's part of the run."""

    def __init__(self, plan_: Plan) -> None:
        self.plan = plan_
        self.spec = plan_.spec
        self.storage: Storage = storage_for(self.spec, self.spec.run_uri)
        self.checkpoints_uri = self.spec.run_path("checkpoints")
        self.is_first = plan_.stage == 0
        self.is_last = plan_.stage == plan_.partition.stages - 1
        self.rank = plan_.info.rank

    # -- set-up ---------------------------------------------------------------------------------
    def build(self) -> None:
        import deepspeed

        from pipelora.trainer.pipeline import layer_specs, pipeline_module

        spec, plan_ = self.spec, self.plan
        base_mem = peak_memory_gib()  # the runtime alone (torch, DeepSpeed), before any layer exists
        torch.manual_seed(spec.training.seed)
        if self.rank == 0:
            emit(f"pipeline partition ({plan_.partition.stages} stages x {spec.parallel.data_parallel} data-parallel, "
                 f"seq_len {spec.dataset.seq_len}):\n{plan_.partition.table()}")
        self.reader = plan_.reader
        lora = LoraSettings(tuple(plan_.targets), spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.training.seed)
        specs = layer_specs(plan_.config, self.reader, dtype=plan_.dtype, device=plan_.device, lora=lora,
                            activation_checkpointing=spec.training.activation_checkpointing)
        module = pipeline_module(specs, plan_.partition, data_parallel=spec.parallel.data_parallel)
        self.lora = lora_state(module)
        params = list(self.lora.values())
        t = spec.training
        self.optimizer = ClippedAdamW(params, lr=t.lr, weight_decay=t.weight_decay, max_norm=t.max_grad_norm,
                                      data_parallel=spec.parallel.data_parallel)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup=t.warmup_steps, total=t.max_steps, kind=t.schedule))
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=self.optimizer,
                                                    lr_scheduler=self.scheduler, config=_ds_config(spec))
        emit(f"{plan_.tag} rank {self.rank}: {plan_.partition.describe(plan_.stage)}; "
             f"{sum(p.numel() for p in params)} LoRA parameters; read {self.reader.bytes_read / 1024**2:.1f} MiB of "
             f"weights from {spec.model.uri}; base mem {base_mem:.2f}GiB")

    def _open_data(self, consumed: int) -> None:
        from pipelora.dataprep import open_shards
        from pipelora.trainer.data import MicroBatchStream

        self.stream = None
        self.eval_data = None
        if not (self.is_first or self.is_last):
            return
        data_uri = self.spec.run_path("data")
        endpoint = self.spec.storage.endpoint_url
        train = open_shards(data_uri, split="train", endpoint_url=endpoint)
        p = self.spec.parallel
        self.stream = MicroBatchStream(train, dp_rank=self.plan.dp_rank, dp_size=p.data_parallel,
                                       micro_batch_size=p.micro_batch_size, seed=self.spec.training.seed,
                                       consumed=consumed, inputs=self.is_first, labels=self.is_last)
        if self._eval_rows() > 0:
            self.eval_data = open_shards(data_uri, split="eval", endpoint_url=endpoint)

    def _eval_rows(self) -> int:
        return int(self.plan.manifest.get("splits", {}).get("eval", {}).get("rows", 0) or 0)

    # -- resume -----------------------------------------------------------------------------------
    def resume(self) -> dict[str, Any]:
        """Load the newest committed checkpoint (chosen by rank 0 for everyone), if any."""
        import torch.distributed as dist

        choice = [None]
        if self.rank == 0:
            steps = ckpt.committed_steps(self.storage, self.checkpoints_uri)
            choice = [steps[-1] if steps else None]
        dist.broadcast_object_list(choice, src=0)
        step = choice[0]
        if step is None:
            return {"step": 0, "consumed_micro_batches": 0, "losses": [], "eval_losses": []}
        found = ckpt.open_committed(self.storage, self.checkpoints_uri, step)
        extra = found.marker
        want = {"stages": self.plan.partition.stages, "data_parallel": self.spec.parallel.data_parallel,
                "bounds": list(self.plan.partition.bounds)}
        have = {k: extra.get(k) for k in want}
        if have != want:
            raise TrainerError(
                f"checkpoint {found.folder} was written with {have['stages']} stages x {have['data_parallel']} "
                f"data-parallel (items {have['bounds']}), this run has {want['stages']} x {want['data_parallel']} "
                f"({want['bounds']}); resume with the same parallel settings or use a new run name"
            )
        weights = found.lora(self.plan.stage)
        with torch.no_grad():
            for name, param in self.lora.items():
                if name not in weights:
                    raise TrainerError(f"checkpoint {found.folder} lacks {name}; the LoRA settings changed")
                param.copy_(weights[name].to(param.device))
        state = found.optim(self.plan.stage)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(found.rng(self.rank))
        self.engine.global_steps = step
        emit(f"{self.plan.tag} resumed from {found.folder} (step {step})")
        return extra

    # -- saving -------------------------------------------------------------------------------------
    def save(self, step: int, progress: Progress | None) -> None:
        import torch.distributed as dist

        folder = ckpt.step_dir(self.checkpoints_uri, step)
        files = ckpt.stage_files(stage=self.plan.stage, rank=self.rank, write_stage=self.plan.dp_rank == 0,
                                 lora=self.lora, optimizer=self.optimizer, scheduler=self.scheduler)
        infos = ckpt.upload(self.storage, folder, files)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [(i.uri, i.size, i.sha256) for i in infos])
        if self.rank == 0:
            from pipelora.storage import ObjectInfo

            objects = [ObjectInfo(*t) for part in gathered for t in part]
            extra = {
                "step": step, "stages": self.plan.partition.stages, "data_parallel": self.spec.parallel.data_parallel,
                "bounds": list(self.plan.partition.bounds), **(self.stream.state() if self.stream else {}),
                "losses": progress.state["losses"] if progress else [],
                "eval_losses": progress.state["eval_losses"] if progress else [],
                "saved_at": time.time(),
            }
            self.storage.commit(join_uri(folder, ckpt.MARKER), objects, extra)
            removed = ckpt.prune(self.storage, self.checkpoints_uri, keep=self.spec.training.keep_checkpoints)
            emit(f"checkpoint step {step} committed at {folder}" + (f"; pruned {removed}" if removed else ""))
        dist.barrier()

    def export_adapter(self) -> None:
        import torch.distributed as dist

        payload = {k: v.detach().cpu() for k, v in self.lora.items()} if self.plan.dp_rank == 0 else {}
        gathered: list[Any] = [None] * dist.get_world_size() if self.rank == 0 else None  # type: ignore[assignment]
        dist.gather_object(payload, gathered, dst=0)
        if self.rank == 0:
            tensors: dict[str, torch.Tensor] = {}
            for part in gathered:
                tensors.update(part)
            lora = self.spec.lora
            config = adapter_config(base_model=self.spec.model.uri, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                    targets=self.plan.targets)
            uri = self.spec.run_path("adapter")
            write_adapter(self.storage, uri, tensors=tensors, config=config)
            emit(f"adapter ({len(tensors)} tensors) written to {uri}")
        dist.barrier()

    # -- the loop -----------------------------------------------------------------------------------
    def evaluate(self) -> float:
        from pipelora.trainer.data import eval_batches

        p, t = self.spec.parallel, self.spec.training
        it = None
        if self.eval_data is not None:
            it = eval_batches(self.eval_data, dp_rank=self.plan.dp_rank, dp_size=p.data_parallel,
                              micro_batch_size=p.micro_batch_size, count=t.eval_batches,
                              inputs=self.is_first, labels=self.is_last)
        loss = self.engine.eval_batch(it, num_micro_batches=t.eval_batches)
        return float(loss)

    def run(self) -> None:
        self.build()
        state = self.resume()
        start = int(state.get("step", 0))
        self._open_data(int(state.get("consumed_micro_batches", 0)))
        t, p = self.spec.training, self.spec.parallel
        progress = None
        if self.rank == 0:
            progress = Progress(self.storage, self.spec.run_path("progress.json"), max_steps=t.max_steps)
            progress.restore(state.get("losses", []), state.get("eval_losses", []))
            progress.write(force=True, state="running")
        grad_dump = os.environ.get("PIPELORA_GRAD_DUMP")
        if grad_dump and start == 0:
            self.optimizer.grad_hook = self._grad_dumper(grad_dump)
        tokens_per_step = p.micro_batch_size * p.micro_batches * p.data_parallel * self.spec.dataset.seq_len
        has_eval = self._eval_rows() > 0
        step_times: list[float] = []
        try:
            for step in range(start + 1, t.max_steps + 1):
                began = time.perf_counter()
                lr = t.lr * lr_factor(step - 1, warmup=t.warmup_steps, total=t.max_steps, kind=t.schedule)
                loss = float(self.engine.train_batch(data_iter=self.stream))
                self.optimizer.grad_hook = None
                elapsed = time.perf_counter() - began
                step_times.append(elapsed)
                recent = step_times[-20:]
                mean = sum(recent) / len(recent)
                eta = mean * (t.max_steps - step)
                tps = tokens_per_step / elapsed
                emit(step_line(stage=self.plan.stage, stages=p.stages, dp=self.plan.dp_rank, dps=p.data_parallel,
                               step=step, max_steps=t.max_steps, loss=loss, lr=lr, tokens_per_s=tps,
                               mem_gib=peak_memory_gib(), eta_s=eta))
                if progress:
                    progress.step(step=step, loss=loss, lr=lr, tokens_per_s=tps, eta_s=eta,
                                  grad_norm=self.optimizer.last_grad_norm)
                    progress.write()
                if has_eval and (step % t.eval_every_steps == 0 or step == t.max_steps):
                    eval_loss = self.evaluate()
                    if self.rank == 0:
                        emit(f"{self.plan.tag} step {step}/{t.max_steps} eval_loss {eval_loss:.4f}")
                    if progress:
                        progress.eval(step=step, loss=eval_loss)
                        progress.write(force=True)
                if step % t.checkpoint_every_steps == 0 or step == t.max_steps:
                    self.save(step, progress)
            if self.stream is not None and self.rank == 0 and step_times:
                emit(f"data wait {self.stream.wait_s:.3f}s of {sum(step_times):.3f}s training")
            self.export_adapter()
            if progress:
                progress.write(force=True, state="finished")
        except BaseException:
            if progress:
                try:
                    progress.write(force=True, state="failed")
                except StorageError:
                    pass
            raise
        finally:
            if self.stream is not None:
                self.stream.close()

    def _grad_dumper(self, folder: str) -> Any:
        """Write this stage's first-step LoRA gradients (before clipping), for equivalence checks."""
        from safetensors.torch import save_file

        def dump() -> None:
            if self.plan.dp_rank != 0:
                return
            grads = {k: v.grad.detach().cpu().contiguous() for k, v in self.lora.items() if v.grad is not None}
            os.makedirs(folder, exist_ok=True)
            save_file(grads, os.path.join(folder, f"stage-{self.plan.stage:02d}.safetensors"))

        return dump


def train(spec: JobSpec) -> None:
    """Run this rank of the job described by `spec` (started once per rank by the launcher)."""
    plan_ = plan(spec)
    _init_distributed(plan_)
    Trainer(plan_).run()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
