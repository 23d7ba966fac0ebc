"""The rendered release, run pod by pod in podman as the MPI Operator v0.8.2 and the kubelet run it.

`pipelora-k8s render --stages 2 --nodes 2 --gpus-per-node 1` prints the release; `podrun.Cluster`
creates its objects and runs them as containers of the trainer image built from the Dockerfile:
the dataprep Job (dataprep, then `release` resuming the suspended MPIJob through the API with the
release's own service account and Role), the operator's hostfile, ssh Secret, worker pods and
launcher Job, DNS names for Ready pods only, retries, and cleanPodPolicy. Storage is a moto S3
server the pods reach at the rendered `storage.endpoint_url`. The tiny model trains on CPU.

Each scenario is one release, run once per module and checked by the tests below it:
- a release runs to completion (S3 credentials from a Secret, as `cluster.s3_secret` renders);
- the same with credentials only in the pods' environment, as EKS IRSA sets them;
- a worker preempted mid-run (deleted gracefully: SIGTERM, then the grace period): every rank commits
  one checkpoint at the next step boundary, the attempt fails, the next resumes, and the final
  adapter equals the uninterrupted release's byte for byte;
- a worker killed outright mid-run: the launcher's next attempt resumes from the last commit;
- dataprep fails on a dataset that does not exist: no worker ever starts, and `status` says why.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from podrun import Cluster, IrsaWebhook, Network, Outcome, Podman
from podrun.kubelet import PodRunner

from pipelora.workflow.rules import parse_manifests

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "pipelora-k8s")
TOPOLOGY = ["--stages", "2", "--nodes", "2", "--gpus-per-node", "1"]
# The controllers' back-off base: 10 s in Kubernetes (the kubelet's restarts, the Job controller's
# retries); shorter here so a retried attempt costs seconds, with the same doubling.
BACKOFF_BASE_S = 2.0
RUN_TIMEOUT_S = 600
ROLE_ARN = "arn:aws:iam::123456789012:role/pipelora-e2e"
STEPS_KILLED = 40  # enough steps after the first commit for the kill to land mid-run
# The completed release and the preempted one (compared with it byte for byte): steps take a fraction
# of a second here, so enough of them that the SIGTERM sent once worker 1 logs its first step lands
# mid-run, at whatever speed this machine trains.
STEPS_COMPLETE = 20
STEP_LINE = re.compile(r"\[stage (\d)/2 dp 0/1\] step (\d+)/(\d+) loss ")


def job_spec(name: str, *, bucket: str, endpoint: str, image: str, max_steps: int = 6,
             checkpoint_every: int = 3) -> dict[str, Any]:
    """A CPU job of the tiny model; the topology comes from the command line (TOPOLOGY)."""
    return {
        "name": name,
        "storage": {"uri": f"s3://{bucket}/runs", "endpoint_url": endpoint, "region": "us-east-1"},
        "model": {"uri": f"s3://{bucket}/models/tiny-mistral"},
        "dataset": {"uri": f"s3://{bucket}/datasets/learnable.jsonl", "format": "alpaca", "template": "alpaca",
                    "seq_len": 64, "eval_fraction": 0.1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "parallel": {"micro_batch_size": 2, "micro_batches": 4},
        "training": {"max_steps": max_steps, "lr": 2.0e-3, "warmup_steps": 1, "checkpoint_every_steps": checkpoint_every,
                     "keep_checkpoints": 2, "eval_every_steps": checkpoint_every, "eval_batches": 2,
                     "activation_checkpointing": False, "dtype": "fp32"},
        "cluster": {
            "image": image,
            "image_pull_policy": "Never",
            "s3_secret": "pipelora-s3",
            "values": {
                "gpu": {"enabled": False},
                "env": [{"name": "DS_ACCELERATOR", "value": "cpu"}, {"name": "OMP_NUM_THREADS", "value": "1"}],
                "dataprep": {"resources": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}}},
                "launcher": {"resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}},
                "worker": {"shmSize": "1Gi", "terminationGracePeriodSeconds": 30,
                           "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}},
            },
        },
    }


@dataclass
class Release:
    """One release run in a cluster, and what it left behind."""

    name: str
    config: Path
    manifests: list[dict[str, Any]]
    cluster: Cluster
    outcome: Outcome
    bucket: str
    s3: Any
    notes: dict[str, Any] = field(default_factory=dict)

    def object(self, kind: str, name: str | None = None) -> dict[str, Any]:
        return next(o for o in self.manifests if o["kind"] == kind and (name is None or o["metadata"]["name"] == name))

    def worker(self, index: int) -> PodRunner:
        return self.cluster.pod(f"{self.name}-worker-{index}")

    def launcher_attempts(self) -> list[PodRunner]:
        return self.cluster.pods_of(f"{self.name}-launcher")

    def keys(self, prefix: str) -> list[str]:
        return run_keys(self.s3, self.bucket, self.name, prefix)

    def committed_steps(self) -> list[int]:
        return committed_steps(self.s3, self.bucket, self.name)

    def explain(self) -> str:
        """The cluster's events and the tail of every pod's containers' logs, for assertion messages."""
        parts = [self.outcome.timeline()]
        for pod in self.cluster.history:
            for status in [*pod.init, *pod.main]:
                lines = pod.log(status.name).splitlines()
                shown = lines if len(lines) <= 40 else [*lines[:12], "[...]", *lines[-25:]]
                parts.append(f"--- {pod.name}/{status.name} (restarts {status.restart_count}) ---\n" + "\n".join(shown))
        return "\n".join(parts)


def run_keys(s3: Any, bucket: str, name: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"runs/{name}/{prefix}")
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def committed_steps(s3: Any, bucket: str, name: str) -> list[int]:
    """Steps whose checkpoint has its COMMITTED marker."""
    return sorted(int(m.group(1)) for key in run_keys(s3, bucket, name, "checkpoints/")
                  if (m := re.search(r"/step-(\d+)/COMMITTED$", key)))


def render(spec: dict[str, Any], folder: Path) -> tuple[Path, list[dict[str, Any]]]:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "job.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run([CLI, "render", "--config", str(config), *TOPOLOGY], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return config, parse_manifests(proc.stdout)


def run_release(spec: dict[str, Any], *, folder: Path, podman: Podman, network: Network, image: str,
                bucket: str, s3: Any, secrets: dict[str, dict[str, str]] | None = None,
                webhooks: list[Any] | None = None,
                on_step: Callable[[Cluster], None] | None = None) -> Release:
    config, manifests = render(spec, folder)
    cluster = Cluster(podman=podman, network=network, image=image, workdir=folder / "cluster",
                      backoff_base_s=BACKOFF_BASE_S, webhooks=webhooks)
    for name, data in (secrets or {}).items():
        cluster.create_secret(name, data)
    cluster.apply(manifests)
    release = Release(spec["name"], config, manifests, cluster, Outcome("Pending", "", {}, []), bucket, s3)
    try:
        release.outcome = cluster.run(timeout_s=RUN_TIMEOUT_S, on_step=on_step)
    except BaseException:
        cluster.close()
        raise
    return release


S3_SECRET = {"pipelora-s3": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}}


@pytest.fixture(scope="module")
def launch(podman: Podman, pod_network: Network, trainer_image: str, pod_s3: Any, pod_bucket: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Release]]:
    """`launch(name, spec_changes=..., **run_release options)`: one release in a cluster of its own."""
    made: list[Release] = []

    def start(name: str, *, change: Callable[[dict[str, Any]], None] | None = None,
              max_steps: int = 6, checkpoint_every: int = 3, **options: Any) -> Release:
        spec = job_spec(name, bucket=pod_bucket, endpoint=pod_s3.endpoint, image=trainer_image,
                        max_steps=max_steps, checkpoint_every=checkpoint_every)
        if change is not None:
            change(spec)
        release = run_release(spec, folder=tmp_path_factory.mktemp(name), podman=podman, network=pod_network,
                              image=trainer_image, bucket=pod_bucket, s3=pod_s3.client(), **options)
        made.append(release)
        return release

    yield start
    for release in made:
        # The events and every container's log tail, beside the release's files (kept by pytest).
        (release.config.parent / "timeline.txt").write_text(release.explain())
        release.cluster.close()


# -- a release runs to completion ---------------------------------------------------------------
@pytest.fixture(scope="module")
def completed(launch: Callable[..., Release]) -> Release:
    return launch("pods-complete", max_steps=STEPS_COMPLETE, secrets=S3_SECRET)


def test_release_completes_with_adapter_and_committed_checkpoint(completed: Release) -> None:
    assert completed.outcome.mpijob_phase == "Succeeded", completed.explain()
    assert completed.outcome.jobs[f"{completed.name}-dataprep"][0] == "Complete"
    assert completed.keys("adapter/") == [f"runs/{completed.name}/adapter/adapter_config.json",
                                          f"runs/{completed.name}/adapter/adapter_model.safetensors"]
    assert completed.committed_steps()[-1] == STEPS_COMPLETE
    marker = json.loads(completed.s3.get_object(
        Bucket=completed.bucket,
        Key=f"runs/{completed.name}/checkpoints/step-{STEPS_COMPLETE:08d}/COMMITTED")["Body"].read())
    assert marker, "the COMMITTED marker lists what it commits"
    progress = json.loads(completed.s3.get_object(Bucket=completed.bucket,
                                                  Key=f"runs/{completed.name}/progress.json")["Body"].read())
    assert progress["state"] == "finished" and progress["step"] == STEPS_COMPLETE


def test_gate_resumed_the_mpijob_through_the_api_with_the_release_role(completed: Release) -> None:
    """Suspended until dataprep committed the data; then the dataprep pod's `release` container, with
    the release's service account, was allowed exactly what the rendered Role grants."""
    assert completed.object("MPIJob")["spec"]["runPolicy"]["suspend"] is True
    assert completed.cluster.api is not None
    calls = [(who, verb, path.split("?")[0], code) for who, verb, path, code in completed.cluster.api.audit]
    sa = f"system:serviceaccount:default:{completed.name}"
    path = f"/apis/kubeflow.org/v2beta1/namespaces/default/mpijobs/{completed.name}"
    assert (sa, "patch", path, 200) in calls, calls
    events = completed.outcome.events
    resumed = next(i for i, e in enumerate(events) if "patched" in e and '"suspend": false' in e)
    first_worker = next(i for i, e in enumerate(events) if f"pod {completed.name}-worker-0 scheduled" in e)
    assert resumed < first_worker, completed.outcome.timeline()


def test_each_worker_log_shows_the_steps_of_its_own_stage(completed: Release) -> None:
    """`kubectl logs <worker>`: worker i hosts rank i, which is stage i+1 of 2."""
    for index in (0, 1):
        log = completed.worker(index).log("worker")
        steps = {(int(m.group(1)), int(m.group(2))) for m in STEP_LINE.finditer(log)}
        assert steps == {(index + 1, step) for step in range(1, STEPS_COMPLETE + 1)}, log[-4000:]


def test_launcher_log_shows_every_ranks_lines(completed: Release) -> None:
    attempts = completed.launcher_attempts()
    final = attempts[-1]
    assert final.phase == "Succeeded", completed.explain()
    log = final.log("launcher")
    for rank in (0, 1):
        tagged = [line for line in log.splitlines() if line.startswith(f"[1,{rank}]<stdout>:")]
        steps = {int(m.group(2)) for line in tagged if (m := STEP_LINE.search(line)) and m.group(1) == str(rank + 1)}
        assert steps == set(range(1, STEPS_COMPLETE + 1)), log[-4000:]


def test_workers_were_cleaned_and_their_lines_stay_in_storage(completed: Release, tmp_path: Path) -> None:
    """cleanPodPolicy Running deleted the workers; `pipelora-k8s logs NAME --stage 2` (through the API)
    then reads stage 2's lines from storage."""
    assert all(completed.worker(i).deleted for i in (0, 1))
    assert completed.cluster.api is not None
    kubeconfig = completed.cluster.api.kubeconfig(tmp_path / "kubeconfig")
    proc = subprocess.run([CLI, "logs", completed.name, "--stage", "2"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "KUBECONFIG": str(kubeconfig)}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "from storage" in proc.stderr
    steps = {(int(m.group(1)), int(m.group(2))) for m in STEP_LINE.finditer(proc.stdout)}
    assert steps == {(2, step) for step in range(1, STEPS_COMPLETE + 1)}, proc.stdout[-3000:]


# -- credentials only in the pods' environment (IRSA) -------------------------------------------
@pytest.fixture(scope="module")
def irsa(launch: Callable[..., Release], pod_s3: Any) -> Release:
    def change(spec: dict[str, Any]) -> None:
        del spec["cluster"]["s3_secret"]
        spec["cluster"]["values"]["serviceAccount"] = {"annotations": {"eks.amazonaws.com/role-arn": ROLE_ARN}}

    return launch("pods-irsa", change=change, webhooks=[IrsaWebhook(sts_endpoint=pod_s3.endpoint)])


def test_ranks_use_s3_credentials_from_the_worker_pods_environment(irsa: Release, pod_s3: Any) -> None:
    """No Secret: the EKS pod identity webhook gives each pod a role and a token file. mpirun forwards
    no AWS variable to the ranks, which ssh starts without the pod's environment; the ranks still read
    the model and write checkpoints, exchanging the token for credentials from their own pod."""
    assert irsa.outcome.mpijob_phase == "Succeeded", irsa.explain()
    assert irsa.committed_steps()[-1] == 6 and irsa.keys("adapter/")
    launcher = irsa.object("MPIJob")["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert not [arg for arg in launcher["command"] if arg.startswith("AWS_")]
    assert "AWS_ACCESS_KEY_ID" not in yaml.safe_dump(irsa.manifests)
    for index in (0, 1):
        worker = irsa.worker(index)
        env = {e["name"]: e.get("value") for e in worker.spec["containers"][0]["env"]}
        assert env["AWS_ROLE_ARN"] == ROLE_ARN
        ip = irsa.cluster.pod_ip(worker.name)
        assert ip is not None and pod_s3.requests_from(ip) >= 1, f"no AssumeRoleWithWebIdentity from worker {index} ({ip})"
        steps = {int(m.group(2)) for m in STEP_LINE.finditer(worker.log("worker"))}
        assert steps == set(range(1, 7))


# -- a worker preempted ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preempted(launch: Callable[..., Release], completed: Release) -> Release:
    """The completed release's job under another name; worker 1 is deleted (SIGTERM) once it trained a step."""
    notes: dict[str, Any] = {}
    name = "pods-preempted"

    def on_step(cluster: Cluster) -> None:
        if "deleted" in notes:
            return
        worker = cluster.pods.get(f"{name}-worker-1")
        if worker is None or worker.main[0].state != "running":
            return
        if STEP_LINE.search(worker.log("worker")):
            notes["attempt"] = cluster.pods_of(f"{name}-launcher")[-1].name
            notes["deleted"] = True
            cluster.delete_pod(f"{name}-worker-1")  # as an eviction or a spot preemption does

    release = launch(name, max_steps=STEPS_COMPLETE, secrets=S3_SECRET, on_step=on_step)
    release.notes = notes
    return release


def test_preempted_worker_checkpoints_every_rank_and_the_next_attempt_ends_identical(
        preempted: Release, completed: Release) -> None:
    notes = preempted.notes
    assert notes.get("deleted"), "worker 1 was never deleted: " + preempted.explain()
    assert preempted.outcome.mpijob_phase == "Succeeded", preempted.explain()
    first = preempted.cluster.pod(notes["attempt"])
    assert first.phase == "Failed", preempted.explain()
    # the deleted worker's entrypoint forwarded SIGTERM to its rank, which committed and said so
    gone = preempted.cluster.pods_named(f"{preempted.name}-worker-1")[0]
    log = gone.log("worker")
    assert "SIGTERM: forwarding to 1 rank(s) on this pod" in log, log[-3000:]
    stopped = re.findall(r"\[stage 2/2 dp 0/1\] preempted at step (\d+), checkpoint committed \(([\d.]+)s after "
                         r"SIGTERM on this rank\)", log)
    assert stopped, log[-3000:]
    step = int(stopped[0][0])
    assert 1 <= step < STEPS_COMPLETE  # mid-run, not at the end
    launcher = first.log("launcher")
    assert f"[stage 1/2 dp 0/1] preempted at step {step}, checkpoint committed (signalled on another rank)" in launcher
    final = preempted.launcher_attempts()[-1]
    assert f"(step {step})" in final.log("launcher") and "resumed from" in final.log("launcher")
    # the operator created worker 1 again (same name, a new pod); its DNS name followed the new address
    again = preempted.cluster.pods_named(f"{preempted.name}-worker-1")
    assert len(again) == 2 and again[1] is preempted.worker(1), preempted.explain()
    records = re.findall(rf"DNS: {preempted.name}-worker-1\.\S+ -> (\S+) ", preempted.outcome.timeline())
    assert len(records) >= 2 and records[-1] == preempted.cluster.pod_ip(again[1].name), records
    # and the next attempt's init container let mpirun start only once that new pod was Ready
    events = preempted.outcome.events
    published = max(i for i, e in enumerate(events) if f"DNS: {preempted.name}-worker-1." in e and " -> " in e)
    started = next(i for i, e in enumerate(events) if f"pod {final.name} running" in e)
    assert published < started, preempted.outcome.timeline()
    assert "workers ready: " in final.log("wait-for-data"), final.log("wait-for-data")
    ours = preempted.s3.get_object(Bucket=preempted.bucket,
                                   Key=f"runs/{preempted.name}/adapter/adapter_model.safetensors")["Body"].read()
    reference = completed.s3.get_object(Bucket=completed.bucket,
                                        Key=f"runs/{completed.name}/adapter/adapter_model.safetensors")["Body"].read()
    assert ours == reference  # byte for byte: at most the step in flight was lost, and it was redone exactly


# -- a worker killed outright --------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed(launch: Callable[..., Release], pod_bucket: str, pod_s3: Any) -> Release:
    """`podman kill` of worker 1's container once a checkpoint is committed, during the first attempt."""
    notes: dict[str, Any] = {}
    name = "pods-killed"
    s3 = pod_s3.client()

    def on_step(cluster: Cluster) -> None:
        attempts = cluster.pods_of(f"{name}-launcher")
        if "killed_at_steps" not in notes:
            worker = cluster.pods.get(f"{name}-worker-1")
            if not attempts or worker is None or worker.main[0].state != "running":
                return
            committed = committed_steps(s3, pod_bucket, name)
            if committed:
                worker.kill("worker")
                notes["killed_at_steps"] = committed
                notes["attempt"] = attempts[-1].name
        elif "committed_after_failure" not in notes and cluster.pod(notes["attempt"]).finished:
            notes["committed_after_failure"] = committed_steps(s3, pod_bucket, name)

    release = launch(name, max_steps=STEPS_KILLED, checkpoint_every=5, secrets=S3_SECRET, on_step=on_step)
    release.notes = notes
    return release


def test_killed_worker_fails_the_attempt_and_the_next_resumes_from_the_last_commit(killed: Release) -> None:
    notes = killed.notes
    assert "killed_at_steps" in notes, "the worker was never killed: " + killed.explain()
    assert killed.outcome.mpijob_phase == "Succeeded", killed.explain()
    attempts = killed.launcher_attempts()
    first = killed.cluster.pod(notes["attempt"])
    assert first.phase == "Failed", killed.explain()
    worker = killed.worker(1).main[0]
    assert worker.restart_count >= 1 and worker.last is not None and worker.last[0] == 137
    last_commit = notes["committed_after_failure"][-1]
    assert last_commit >= notes["killed_at_steps"][-1]
    final = attempts[-1]
    assert final.phase == "Succeeded" and final is not first
    log = final.log("launcher")
    resumed = re.findall(r"resumed from \S+/step-(\d+) \(step (\d+)\)", log)
    assert resumed and {int(step) for _, step in resumed} == {last_commit}, log[-4000:]
    steps = {int(m.group(2)) for m in STEP_LINE.finditer(log)}
    assert steps == set(range(last_commit + 1, STEPS_KILLED + 1)), log[-4000:]
    assert killed.committed_steps()[-1] == STEPS_KILLED and killed.keys("adapter/")


# -- dataprep fails -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_dataset(launch: Callable[..., Release]) -> Release:
    def change(spec: dict[str, Any]) -> None:
        spec["dataset"]["uri"] = spec["dataset"]["uri"].replace("learnable.jsonl", "missing.jsonl")

    return launch("pods-nodata", change=change, secrets=S3_SECRET)


def test_failed_dataprep_starts_no_worker_and_says_why(bad_dataset: Release, tmp_path: Path) -> None:
    outcome = bad_dataset.outcome
    condition = outcome.jobs[f"{bad_dataset.name}-dataprep"]
    assert condition is not None and condition[:2] == ("Failed", "BackoffLimitExceeded"), bad_dataset.explain()
    assert outcome.mpijob_phase == "Suspended"
    started = [p.name for p in bad_dataset.cluster.history if "-worker-" in p.name or "-launcher-" in p.name]
    assert not started, outcome.timeline()
    attempts = bad_dataset.cluster.pods_of(f"{bad_dataset.name}-dataprep")
    assert len(attempts) == bad_dataset.object("Job")["spec"]["backoffLimit"] + 1
    missing = bad_dataset.object("ConfigMap")["data"]["job.yaml"]
    uri = yaml.safe_load(missing)["dataset"]["uri"]
    assert uri.endswith("/missing.jsonl")
    for attempt in attempts:
        assert uri in attempt.log("dataprep").strip().splitlines()[-1]
    assert bad_dataset.cluster.api is not None
    kubeconfig = bad_dataset.cluster.api.kubeconfig(tmp_path / "kubeconfig")
    proc = subprocess.run([CLI, "status", bad_dataset.name], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KUBECONFIG": str(kubeconfig)}, check=False)
    report = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no GPUs were allocated" in report, report
    assert re.search(rf"dataprep failed: .*{re.escape(uri)}", report), report
