"""Pure parts of the trainer: partitioning, rank discovery, LR schedule, data order, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelora.storage import ObjectInfo, open_storage
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
    assert max(loads) / min(loads) < 1.15
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
    root = str(tmp_path / "checkpoints")
    for step in (2, 4, 6, 8):
        folder = ckpt.step_dir(root, step)
        info = storage.write_bytes(f"{folder}/stage-00-lora.safetensors", b"x" * step)
        if step != 8:
            storage.commit(f"{folder}/{ckpt.MARKER}", [info], {"step": step})
    assert ckpt.committed_steps(storage, root) == [2, 4, 6]
    assert ckpt.prune(storage, root, keep=2) == [2]
    assert ckpt.committed_steps(storage, root) == [4, 6]
    assert storage.exists(f"{ckpt.step_dir(root, 8)}/stage-00-lora.safetensors")
    assert not storage.exists(f"{ckpt.step_dir(root, 2)}/stage-00-lora.safetensors")


def test_a_modified_checkpoint_file_is_refused(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    folder = ckpt.step_dir(str(tmp_path), 2)
    from safetensors.torch import save

    info = storage.write_bytes(f"{folder}/stage-00-lora.safetensors", save({"w": torch.ones(2)}))
    storage.commit(f"{folder}/{ckpt.MARKER}", [ObjectInfo(info.uri, info.size, info.sha256)], {"step": 2})
    assert torch.equal(ckpt.open_committed(storage, str(tmp_path), 2).lora(0)["w"], torch.ones(2))
    storage.write_bytes(f"{folder}/stage-00-lora.safetensors", save({"w": torch.zeros(2)}))
    with pytest.raises(TrainerError, match="does not match its sha256"):
        ckpt.open_committed(storage, str(tmp_path), 2).lora(0)


def test_log_lines_follow_the_documented_format_and_are_mirrored(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipelora.trainer.progress import emit, step_line

    line = step_line(stage=2, stages=8, dp=0, dps=1, step=120, max_steps=1000, loss=1.2341, lr=1.9e-4,
                     tokens_per_s=5120.4, mem_gib=41.23, eta_s=42 * 60 + 10)
    assert line == "[stage 3/8 dp 0/1] step 120/1000 loss 1.234 lr 1.9e-04 tok/s 5120 mem 41.2GiB eta 0:42:10"
    mirror = tmp_path / "mirror.log"
    monkeypatch.setenv("PIPELORA_MIRROR_LOG", str(mirror))
    emit(line)
    assert capsys.readouterr().out == line + "\n"
    assert mirror.read_text() == line + "\n"
    monkeypatch.setenv("PIPELORA_MIRROR_LOG", str(tmp_path / "missing-dir" / "x.log"))
    emit(line)  # an unwritable mirror is ignored
