"""pipelora-k8s: pipeline-parallel LoRA fine-tuning with DeepSpeed, as a Kubernetes batch workflow."""

__version__ = "0.1.0"
