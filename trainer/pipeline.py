"""DeepSpeed's pipeline module with our partition, topology and per-stage construction.

The DeepSpeed internals this needs (its topology class, the hook that cuts the model) are reached
through `pipelora.trainer.compat`.
"""

from __future__ import annotations

from typing import Any

import torch

from pipelora.trainer import compat
from pipelora.trainer.layers import DecoderPipe, EmbeddingPipe, HeadPipe, LoraSettings, causal_lm_loss
from pipelora.trainer.partition import Partition
from pipelora.trainer.weights import CheckpointReader


def topology(*, stages: int, data_parallel: int) -> Any:
    """Ranks laid out data-major: one pipeline's stages sit on consecutive ranks (so on one node
    where they fit), since activations cross stages every micro-batch while the LoRA gradient
    all-reduce across replicas is tiny."""
    return compat.data_major_topology(stages=stages, data_parallel=data_parallel)


def layer_specs(config: Any, reader: CheckpointReader, *, dtype: torch.dtype, device: torch.device,
                lora: LoraSettings, activation_checkpointing: bool) -> list[Any]:
    """One LayerSpec per pipeline item; DeepSpeed builds only those of the local stage."""
    from deepspeed.pipe import LayerSpec

    n = config.num_hidden_layers
    specs = [LayerSpec(EmbeddingPipe, config, reader, dtype, device)]
    specs += [LayerSpec(DecoderPipe, config, i, reader, dtype, device, lora, activation_checkpointing)
              for i in range(n)]
    specs.append(LayerSpec(HeadPipe, config, reader, dtype, device))
    return specs


def pipeline_module(specs: list[Any], partition: Partition, *, data_parallel: int) -> Any:
    """A PipelineModule cut at `partition.bounds` (DeepSpeed's own methods balance parameters,
    not compute)."""
    return compat.pipeline_module_cut_at(partition.bounds, layers=specs,
                                         topology=topology(stages=partition.stages, data_parallel=data_parallel),
                                         loss_fn=causal_lm_loss)
