"""Pure parts of the trainer: partitioning, rank discovery, LR schedule, data order, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelora.layout import RunLayout
from pipelora.storage import ObjectInfo, StorageError, open_storage
from pipelora.trainer import checkpoint as ckpt
from pipelora.trainer.data import MicroBatchStream
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.partition import balanced_partition, item_costs
from pipelora.trainer.presets import preset_config
from pipelora.trainer.ranks import discover
from pipelora.trainer.schedule import lr_factor


def test_partition_balances_compute_and_counts_the_lm_head() -> None:
    config = preset_config("mistral", "small")
    costs = item_costs(config, seq_len=512)
    assert costs[-1] > 3 * costs[1] and costs[0] < 0.01 * costs[1]  # head ~ several layers; embedding ~ free
    part = balanced_partition(config, stages=2, seq_len=512)
    assert part.bounds[0] == 0 and part.bounds[-1] == config.num_hidden_layers + 2
    loads = [part.stage_cost(s) for s in range(2)]
    assert max(loads) / min(loads) < 1.2  # 8 layers and a head of ~3 layers cannot split evenly in two
    assert part.bounds[1] - 1 > config.num_hidden_layers / 2  # the head's stage holds fewer decoder layers
    table = part.table()
    assert "embed, layers 0-5" in table and "norm+head" in table


def test_every_stage_gets_a_decoder_layer_and_too_many_stages_is_an_error() -> None:
    config = preset_config("mistral", "tiny")
    part = balanced_partition(config, stages=4, seq_len=64)
    for s in range(4):
        assert any(1 <= i <= 4 for i in part.items(s))
    with pytest.raises(TrainerError, match="5 .*has 4 decoder layers"):
        balanced_partition(config, stages=5, seq_len=64)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (3, 8, 1)),
        ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, (2, 4, 0)),
        ({"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "1"}, (5, 6, 1)),
        ({}, (0, 1, 0)),
    ],
)
def test_rank_discovery_from_each_launcher(env: dict[str, str], expected: tuple[int, int, int]) -> None:
    info = discover({**env, "PIPELORA_HOSTFILE": "/nonexistent"})
    assert (info.rank, info.world_size, info.local_rank) == expected
    assert (info.master_addr, info.master_port) == ("127.0.0.1", 29500)


def test_master_address_from_the_hostfile_or_the_environment(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# workers\njob-worker-0.job.ns.svc slots=4\njob-worker-1.job.ns.svc slots=4\n")
    assert discover({"PIPELORA_HOSTFILE": str(hostfile)}).master_addr == "job-worker-0.job.ns.svc"
    info = discover({"PIPELORA_HOSTFILE": str(hostfile), "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "2345"})
    assert (info.master_addr, info.master_port) == ("10.0.0.7", 2345)


def test_lr_schedules_warm_up_then_decay() -> None:
    assert [lr_factor(s, warmup=4, total=20, kind="cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, warmup=4, total=20, kind="cosine") == 1.0
    assert lr_factor(12, warmup=4, total=20, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(12, warmup=4, total=20, kind="linear") == pytest.approx(0.5)
    assert lr_factor(19, warmup=4, total=20, kind="constant") == 1.0
    assert lr_factor(19, warmup=4, total=20, kind="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))


class FakeRows:
    """Rows numbered by their index, with the shard reader's view semantics (shuffle, partition)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        v = int(self.ids[i])
        return {"input_ids": np.full(4, v, np.int32), "labels": np.full(4, v, np.int32),
                "position_ids": np.array([0, 1, 0, 1], np.int32)}

    def shuffled(self, seed: int, epoch: int) -> FakeRows:
        return FakeRows(self.ids[np.random.default_rng([seed, epoch]).permutation(len(self.ids))])

    def partition(self, rank: int, world: int) -> FakeRows:
        n = len(self.ids) // world
        return FakeRows(self.ids[rank * n : (rank + 1) * n])


def test_stream_resumes_at_the_exact_next_micro_batch_across_epochs() -> None:
    rows = FakeRows(np.arange(8))
    full = MicroBatchStream(rows, dp_rank=1, dp_size=2, micro_batch_size=2, seed=3)
    seen = [next(full)[0][0][:, 0].tolist() for _ in range(7)]  # 2 micro-batches per epoch: crosses epochs
    full.close()
    resumed = MicroBatchStream(rows, dp_rank=1, dp_size=2, micro_batch_size=2, seed=3, consumed=4)
    assert [next(resumed)[0][0][:, 0].tolist() for _ in range(3)] == seen[4:]
    assert resumed.state() == {"consumed_micro_batches": 7, "epoch": 3, "row_in_epoch": 2}
    resumed.close()
    epoch0 = set(rows.shuffled(3, 0).partition(1, 2).ids.tolist())
    assert {v for mb in seen[:2] for v in mb} == epoch0
    assert seen[:2] != seen[2:4]  # a new shuffle every epoch


def test_labels_never_target_the_start_of_the_next_packed_sequence() -> None:
    stream = MicroBatchStream(FakeRows(np.arange(4)), dp_rank=0, dp_size=1, micro_batch_size=1, seed=0,
                              inputs=False, labels=True)
    inputs, labels = next(stream)
    stream.close()
    assert inputs is None
    assert labels[0].tolist()[0] == -100 and labels[0].tolist()[2] == -100 and labels[0, 1] >= 0


def test_too_little_data_is_one_clear_error() -> None:
    with pytest.raises(TrainerError, match="fewer than one micro-batch"):
        MicroBatchStream(FakeRows(np.arange(3)), dp_rank=0, dp_size=2, micro_batch_size=2, seed=0)


def test_pruning_keeps_the_newest_committed_and_never_touches_uncommitted(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    layout = RunLayout(str(tmp_path))
    for step in (2, 4, 6, 8):
        info = storage.write_bytes(f"{layout.checkpoint(step)}/stage-00-lora.safetensors", b"x" * step)
        if step != 8:
            storage.commit(layout.checkpoint_marker(step), [info], {"step": step})
    assert ckpt.committed_steps(storage, layout) == [2, 4, 6]
    assert ckpt.prune(storage, layout, keep=2) == [2]
    assert ckpt.committed_steps(storage, layout) == [4, 6]
    assert storage.exists(f"{layout.checkpoint(8)}/stage-00-lora.safetensors")
    assert not storage.exists(f"{layout.checkpoint(2)}/stage-00-lora.safetensors")


def _meta(step: int = 2) -> ckpt.CheckpointMeta:
    return ckpt.CheckpointMeta(step=step, stages=2, data_parallel=1, bounds=(0, 3, 6), consumed_micro_batches=8,
                               epoch=1, row_in_epoch=4, losses=[[1, 10.5], [2, 9.25]], eval_losses=[[2, 9.5]],
                               saved_at=123.0)


def test_a_modified_checkpoint_file_is_refused(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    layout = RunLayout(str(tmp_path))
    from safetensors.torch import save

    info = storage.write_bytes(f"{layout.checkpoint(2)}/stage-00-lora.safetensors", save({"w": torch.ones(2)}))
    ckpt.commit(storage, layout, [ObjectInfo(info.uri, info.size, info.sha256)], _meta())
    assert torch.equal(ckpt.open_committed(storage, layout, 2).lora(0)["w"], torch.ones(2))
    storage.write_bytes(f"{layout.checkpoint(2)}/stage-00-lora.safetensors", save({"w": torch.zeros(2)}))
    with pytest.raises(StorageError, match="does not match the sha256"):
        ckpt.open_committed(storage, layout, 2).lora(0)


def test_checkpoint_meta_round_trips_through_the_committed_marker(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    layout = RunLayout(str(tmp_path))
    meta = _meta(4)
    info = storage.write_bytes(f"{layout.checkpoint(4)}/rank-00000-rng.pt", b"rng")
    ckpt.commit(storage, layout, [info], meta)
    marker = storage.read_marker(layout.checkpoint_marker(4))
    assert marker is not None and set(marker) == {*meta.to_marker(), "files"}
    assert marker["bounds"] == [0, 3, 6] and marker["consumed_micro_batches"] == 8
    assert ckpt.open_committed(storage, layout, 4).meta == meta
    with pytest.raises(TrainerError, match="has no stages, bounds"):
        ckpt.CheckpointMeta.from_marker({"step": 4, "data_parallel": 1}, where="ckpt")


def test_a_checkpoint_of_another_cut_is_refused_in_one_sentence() -> None:
    meta = _meta()
    meta.check_compatible(stages=2, data_parallel=1, bounds=(0, 3, 6), where="s3://b/run/ckpt")
    with pytest.raises(TrainerError) as err:
        meta.check_compatible(stages=2, data_parallel=2, bounds=(0, 4, 6), where="s3://b/run/ckpt")
    assert str(err.value) == (
        "checkpoint s3://b/run/ckpt was written with 2 stages x 1 data-parallel (items [0, 3, 6]), this run has "
        "2 x 2 ([0, 4, 6]); resume with the same parallel settings or use a new run name"
    )


def test_new_meta_records_the_data_position_of_the_stream() -> None:
    meta = ckpt.new_meta(step=6, stages=1, data_parallel=1, bounds=(0, 6),
                         data_position={"consumed_micro_batches": 24, "epoch": 2, "row_in_epoch": 8},
                         losses=[[6, 1.0]], eval_losses=[])
    assert (meta.consumed_micro_batches, meta.epoch, meta.row_in_epoch) == (24, 2, 8)
    assert meta.saved_at > 0


def test_log_lines_follow_the_documented_format_and_reach_the_relay(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipelora.launch import RELAY_DIR_ENV
    from pipelora.rankrelay import relay_from_env
    from pipelora.trainer.progress import add_sink, emit, remove_sink, step_line

    line = step_line(stage=2, stages=8, dp=0, dps=1, step=120, max_steps=1000, loss=1.2341, lr=1.9e-4,
                     tokens_per_s=5120.4, mem_gib=41.23, eta_s=42 * 60 + 10)
    assert line == "[stage 3/8 dp 0/1] step 120/1000 loss 1.234 lr 1.9e-04 tok/s 5120 mem 41.2GiB eta 0:42:10"
    monkeypatch.setenv(RELAY_DIR_ENV, str(tmp_path / "ranks"))
    relay = relay_from_env(3)
    assert relay is not None
    add_sink(relay)
    try:
        emit(line)
    finally:
        remove_sink(relay)
        relay.close()
    assert capsys.readouterr().out == line + "\n"
    assert (tmp_path / "ranks" / "rank-00003.log").read_text() == line + "\n"


def test_a_relay_that_cannot_write_says_so_once_and_never_raises(tmp_path: Path, capsys) -> None:
    from pipelora.rankrelay import RankRelay

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    relay = RankRelay(blocker, 0)
    relay.write("one")
    relay.write("two")
    err = capsys.readouterr().err
    assert err.count("cannot relay this rank's lines") == 1 and str(blocker) in err



def test_step_lines_keep_the_documented_fields_then_carry_tokens_per_device_and_mfu() -> None:
    import re

    from pipelora.trainer.progress import step_line

    documented = "[stage 3/8 dp 0/1] step 120/1000 loss 1.234 lr 1.9e-04 tok/s 5120 mem 41.2GiB eta 0:42:10"
    line = step_line(stage=2, stages=8, dp=0, dps=1, step=120, max_steps=1000, loss=1.2341, lr=1.9e-4,
                     tokens_per_s=5120.4, mem_gib=41.23, eta_s=42 * 60 + 10, tokens_per_s_device=640.05, mfu=0.41347)
    assert line == documented + " tok/s/dev 640 mfu 41.3%"
    # the parser of tests/trainer/test_mpirun.py reads lines with and without the new fields
    parser = re.compile(r"^\[stage (\d+)/(\d+) dp (\d+)/(\d+)\] step (\d+)/(\d+) loss ([\d.]+) lr (\S+) tok/s (\d+) "
                        r"mem ([\d.]+)GiB eta (\d+:\d\d:\d\d)(?: tok/s/dev (\d+) mfu ([\d.]+)%)?$", re.M)
    both = parser.findall(f"{documented}\n{line}\n")
    assert [m[11:] for m in both] == [("", ""), ("640", "41.3")]


def test_mfu_is_model_flops_times_tokens_per_device_over_the_device_rate(monkeypatch, capsys) -> None:
    from types import SimpleNamespace

    from pipelora.config import spec_from_dict
    from pipelora.trainer.memory import ModelShape, RunShape, model_flops_per_token
    from pipelora.trainer.progress import utilisation

    spec = spec_from_dict({"name": "mfu", "storage": {"uri": "runs"}, "model": {"uri": "m"},
                           "dataset": {"uri": "d.jsonl", "seq_len": 256},
                           "parallel": {"stages": 2, "gpus_per_node": 4, "micro_batches": 8}})
    config = preset_config("mistral", "small")
    plan_ = SimpleNamespace(spec=spec, config=config, device=torch.device("cpu"), dtype=torch.float32,
                            info=SimpleNamespace(world_size=4), tag="[stage 1/2 dp 0/2]")
    monkeypatch.setenv("PIPELORA_GPU_TFLOPS", "0.5")
    got = utilisation(plan_, 2000.0)  # type: ignore[arg-type]
    flops = model_flops_per_token(ModelShape.from_config(config), RunShape.from_spec(spec, device="cpu"))
    # 4 N_frozen (decoder linears + LM head) + 6 N_lora + 12 L H d S, per token
    lin = 768 * 768 * 2 + 768 * 256 * 2 + 3 * 768 * 2048
    lora = 16 * (2 * (768 + 768) + 2 * (768 + 256) + 3 * (768 + 2048))
    assert flops == 8 * (4 * lin + 6 * lora + 12 * 12 * 64 * 256) + 4 * 768 * 32000
    assert got == {"tokens_per_s_device": 500.0, "mfu": pytest.approx(flops * 500.0 / 0.5e12)}
    assert "MFU against 0.500 TFLOP/s (PIPELORA_GPU_TFLOPS)" in capsys.readouterr().out


def test_the_measured_matmul_rate_is_a_positive_rate() -> None:
    from pipelora.trainer.progress import matmul_flops

    assert matmul_flops(torch.device("cpu"), torch.float32, seconds=0.01) > 1e6
