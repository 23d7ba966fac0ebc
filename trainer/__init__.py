"""pipelora.trainer: DeepSpeed pipeline-parallel LoRA training, one process per rank.

`pipelora-k8s train` runs `loop.train(spec)`; `init-model` writes random-weight models. Modules:
ranks (launcher environment), weights (per-tensor ranged reads), layers/lora/partition (the
per-stage model), pipeline (DeepSpeed glue), data (micro-batch streams), checkpoint, adapter,
progress, local (the whole model in one process, for checks). Importing this package is cheap.
"""
