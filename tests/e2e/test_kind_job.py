"""The job the kind workflow submits renders into a release the MPI Operator accepts, on CPU pods."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipelora.config import load_spec
from pipelora.workflow import helm
from pipelora.workflow.rules import check_release
from pipelora.workflow.values import chart_values

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_kind_job_renders_for_cpu_workers_with_minio() -> None:
    spec = load_spec(HERE / "kind-job.yaml", overrides={"parallel.stages": 2, "parallel.nodes": 2})
    objects = check_release(helm.template(spec.name, chart_values(spec)))
    mpijob = next(o for o in objects if o["kind"] == "MPIJob")
    worker = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 2 and mpijob["spec"]["slotsPerWorker"] == 1
    container = worker["template"]["spec"]["containers"][0]
    assert container["image"] == "pipelora-k8s:e2e-cpu" and container["imagePullPolicy"] == "Never"
    assert "nvidia.com/gpu" not in yaml.safe_dump(container["resources"])
    launcher = mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"]
    assert launcher[launcher.index("-np") + 1] == "2"
    for name in ("DS_ACCELERATOR", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert name in launcher  # forwarded by name to the ranks started over ssh
    assert spec.storage.endpoint_url == "http://minio.minio.svc.cluster.local:9000"


def test_workflow_submits_this_job_and_checks_the_adapter() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "e2e-kind.yml").read_text())
    steps = workflow["jobs"]["e2e"]["steps"]
    runs = "\n".join(step.get("run", "") for step in steps)
    assert "pipelora-k8s submit --config tests/e2e/kind-job.yaml --stages 2 --nodes 2 --wait" in runs
    assert "s3://pipelora/runs/kind-e2e/adapter/adapter_model.safetensors" in runs
    assert any(str(step.get("uses", "")).startswith("helm/kind-action@") for step in steps)
    spec = load_spec(HERE / "kind-job.yaml")
    assert f"s3://pipelora/runs/{spec.name}/" in runs
