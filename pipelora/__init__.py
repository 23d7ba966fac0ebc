"""pipelora-k8s: pipeline-parallel LoRA fine-tuning with DeepSpeed, as a Kubernetes batch workflow.

The package itself stays light to import (the CLI imports it on every command), so it imports
none of its modules: its public entries are the core modules every part shares, used by name
(`from pipelora.config import JobSpec`), and the three parts, `dataprep`, `trainer` and `workflow`.
"""

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # the core every part shares
    "cli_common",
    "config",
    "errors",
    "families",
    "launch",
    "layout",
    "podenv",
    "rankrelay",
    "rows",
    "safetensors_header",
    "storage",
    # the three parts
    "dataprep",
    "trainer",
    "workflow",
]
