"""pipelora.workflow: the CLI, the Helm chart's values, the cluster clients and the local runner.

Nothing imports this package except the CLI entry point; it reaches dataprep and the trainer only
through the commands it runs (`pipelora-k8s dataprep`, `pipelora-k8s train`).
"""
