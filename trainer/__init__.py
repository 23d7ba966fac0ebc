"""pipelora.trainer: DeepSpeed pipeline-parallel LoRA training, one process per rank.

`pipelora-k8s train` runs `loop.train(spec)`; `init-model` writes random-weight models. Importing
this package is cheap: it imports none of its modules, so its public entries are its modules,
used by name (`from pipelora.trainer.loop import train`).
"""

__all__ = [
    # commands and the run of one rank
    "command",  # the `train` and `init-model` CLI commands
    "loop",  # train(spec): plan, build, resume, the loop over optimizer steps
    "plan",  # what every rank checks and decides before the process group forms
    "ranks",  # rank, world and rendezvous from the launcher's environment
    "stage",  # a rank's layers, LoRA parameters, optimizer, schedule and DeepSpeed engine
    "optim",  # AdamW clipped by the whole pipeline's gradient norm
    "schedule",  # learning-rate schedules
    "checkpointing",  # a rank's side of resume, save and adapter export
    "checkpoint",  # checkpoint files, the commit marker's schema and the resume compatibility rule
    "evaluation",  # the eval loss and when to take it
    "grad_dump",  # PIPELORA_GRAD_DUMP: first-step LoRA gradients, for debugging
    "progress",  # log lines and the run's progress file
    "memory_report",  # a stage's measured training memory against the plan's prediction
    # the per-stage model
    "weights",  # per-tensor ranged reads of a Hugging Face safetensors model
    "layers",  # embedding, decoder layers, norm + head as pipeline items
    "attention",  # the attention kernel for packed rows (flex on CUDA, dense masks elsewhere)
    "lora",  # LoRA with PEFT's math and names
    "partition",  # cost-balanced cut of the items into stages
    "pipeline",  # DeepSpeed's pipeline module with that cut
    "compat",  # the one seam to DeepSpeed and transformers internals, and the supported versions
    "data",  # micro-batch streams of packed shards
    "adapter",  # the final PEFT adapter
    "export",  # merged Hugging Face checkpoints and adapter copies of any committed step
    "local",  # the whole model in one process, for checks and inference
    "init_model",  # random-weight models in Hugging Face layout
    "presets",  # the shapes init-model writes
    "errors",  # TrainerError
]
