"""status and logs over real HTTP, against a local server answering the Kubernetes REST paths they use."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from pipelora.config import JobSpec, spec_from_dict
from pipelora.storage import open_storage
from pipelora.workflow.cli import main
from pipelora.workflow.logs import stage_workers

NS = "ml"
NAME = "demo"


def demo_spec(storage: Path) -> dict[str, Any]:
    return {
        "name": NAME,
        "storage": {"uri": str(storage)},
        "model": {"uri": "s3://bucket/models/m"},
        "dataset": {"uri": "s3://bucket/data/a.json"},
        "parallel": {"stages": 4, "nodes": 2, "gpus_per_node": 2, "micro_batches": 8},
    }


def pod(name: str, component: str, *, phase: str = "Running", created: str = "2026-01-01T00:00:00Z",
        ready: bool = True, restarts: int = 0, waiting: str | None = None) -> dict[str, Any]:
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    return {
        "metadata": {"name": name, "namespace": NS, "creationTimestamp": created,
                     "labels": {"app.kubernetes.io/instance": NAME, "app.kubernetes.io/component": component}},
        "spec": {"nodeName": "node-a", "containers": [{"name": component, "image": "x"}]},
        "status": {"phase": phase, "containerStatuses": [
            {"name": component, "ready": ready, "restartCount": restarts, "image": "x", "imageID": "",
             "state": state}]},
    }


WORKER_LOGS = {
    "demo-worker-0": ["[stage 1/4 dp 0/1] step 1/10 loss 2.000", "[stage 2/4 dp 0/1] step 1/10 loss 2.000"],
    "demo-worker-1": ["[stage 3/4 dp 0/1] step 1/10 loss 2.000", "[stage 4/4 dp 0/1] step 1/10 loss 2.000",
                      "[stage 3/4 dp 0/1] step 2/10 loss 1.500"],
}
LAUNCHER_LOG = [f"[1,{r}]<stdout>:[stage {r + 1}/4 dp 0/1] step 1/10 loss 2.000" for r in range(4)]
DATAPREP_LOG = ["dataprep: 52002 records -> 1210 packed rows", "data committed"]


class FakeApi(BaseHTTPRequestHandler):
    """Answers the GETs status/logs make; records each (path, query) for assertions."""

    objects: dict[str, Any] = {}
    requests: list[tuple[str, dict[str, list[str]]]] = []

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.requests.append((url.path, query))
        assert self.headers.get("Authorization") == "Bearer test-token"
        base = f"/api/v1/namespaces/{NS}/pods/"
        if url.path.startswith(base) and url.path.endswith("/log"):
            name = url.path[len(base):-len("/log")]
            lines = (LAUNCHER_LOG if name.startswith("demo-launcher") else
                     DATAPREP_LOG if name.startswith("demo-dataprep") else WORKER_LOGS.get(name))
            if lines is None:
                return self._send(404, json.dumps({"kind": "Status", "code": 404}).encode())
            return self._send(200, ("\n".join(lines) + "\n").encode(), "text/plain")
        if url.path == f"/api/v1/namespaces/{NS}/pods":
            selector = dict(kv.split("=") for kv in query["labelSelector"][0].split(","))
            items = [p for p in self.objects["pods"]
                     if all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())]
            return self._send(200, json.dumps({"kind": "PodList", "items": items}).encode())
        if url.path in self.objects:
            return self._send(200, json.dumps(self.objects[url.path]).encode())
        return self._send(404, json.dumps({"kind": "Status", "code": 404, "reason": "NotFound"}).encode())


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A running fake API server and a kubeconfig pointing at it (KUBECONFIG set); yields the storage root."""
    storage = tmp_path / "store"
    spec = spec_from_dict(demo_spec(storage))
    FakeApi.requests = []
    FakeApi.objects = {
        f"/api/v1/namespaces/{NS}/configmaps/{NAME}-spec": {"kind": "ConfigMap", "data": {"job.yaml": spec.to_yaml()}},
        f"/apis/batch/v1/namespaces/{NS}/jobs/{NAME}-dataprep": {"kind": "Job", "status": {
            "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}},
        f"/apis/kubeflow.org/v2beta1/namespaces/{NS}/mpijobs/{NAME}": {"kind": "MPIJob", "status": {"conditions": [
            {"type": "Created", "status": "True", "reason": "MPIJobCreated", "message": "created"},
            {"type": "Running", "status": "True", "reason": "MPIJobRunning", "message": "MPIJob ml/demo is running"}]}},
        "pods": [pod("demo-dataprep-x1y2z", "dataprep", phase="Succeeded", ready=False),
                 pod("demo-launcher-old00", "launcher", created="2026-01-01T00:00:00Z", phase="Failed", ready=False),
                 pod("demo-launcher-new11", "launcher", created="2026-01-01T01:00:00Z"),
                 pod("demo-worker-0", "worker"),
                 pod("demo-worker-1", "worker", restarts=2, ready=False, waiting="CrashLoopBackOff")],
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}},
                     {"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u", "namespace": NS}},
                     {"name": "unreachable", "context": {"cluster": "dead", "user": "u"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    yield storage
    server.shutdown()


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_status_reports_conditions_pods_and_progress(api: Path, capsys: pytest.CaptureFixture) -> None:
    progress_file = Path(spec_from_dict(demo_spec(api)).layout.progress)
    progress_file.parent.mkdir(parents=True)
    progress = {"step": 40, "max_steps": 100, "loss": 1.25, "eval_loss": 1.5, "lr": 1e-4, "tokens_per_s": 900,
                "tokens_per_s_device": 225.0, "mfu": 0.4123,
                "eta_s": 3725, "updated_at": time.time(), "state": "running", "losses": [[1, 2.0], [40, 1.25]],
                "eval_losses": [[20, 1.7], [40, 1.5]]}
    progress_file.write_text(json.dumps(progress))
    code, out, err = cli(["status", NAME], capsys)
    assert code == 0, err
    assert f"job {NAME} (namespace {NS}): 4 stages on 2 node(s) x 2 GPU(s)" in out
    assert "dataprep Job  Succeeded" in out
    assert "MPIJob        Running (MPIJobRunning: MPIJob ml/demo is running)" in out
    assert "demo-worker-1" in out and "CrashLoopBackOff" in out and "restarts 2" in out
    assert "progress: running step 40/100 loss 1.2500 eval_loss 1.5000 tok/s/dev 225 mfu 41.2% eta 1:02:05" in out
    tensorboard = spec_from_dict(demo_spec(api)).layout.tensorboard
    assert f"tensorboard: tensorboard --logdir {tensorboard}" in out

    code, out, err = cli(["status", NAME, "-o", "json", "--namespace", NS, "--context", "test"], capsys)
    info = json.loads(out)
    assert info["mpijob"]["phase"] == "Running" and info["dataprep"]["phase"] == "Succeeded"
    assert [p["name"] for p in info["pods"] if p["component"] == "launcher"] == [
        "demo-launcher-new11", "demo-launcher-old00"]
    assert info["progress"]["step"] == 40
    assert (f"/api/v1/namespaces/{NS}/pods", {"labelSelector": [f"app.kubernetes.io/instance={NAME}"]}) in FakeApi.requests


def test_status_of_unknown_job_is_one_sentence(api: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = cli(["status", "nope"], capsys)
    assert code != 0
    assert err.strip() == f"error: no pipelora job named nope in namespace {NS} (see `pipelora-k8s list`, or pass --namespace)"


def test_logs_default_to_the_newest_launcher(api: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = cli(["logs", NAME], capsys)
    assert code == 0, err
    assert out.splitlines() == LAUNCHER_LOG
    log_requests = [(p, q) for p, q in FakeApi.requests if p.endswith("/log")]
    assert log_requests[-1][0] == f"/api/v1/namespaces/{NS}/pods/demo-launcher-new11/log"
    assert log_requests[-1][1]["container"] == ["launcher"]


def test_logs_of_one_stage_come_from_its_worker(api: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = cli(["logs", NAME, "--stage", "3", "--follow"], capsys)
    assert code == 0, err
    assert out.splitlines() == ["[stage 3/4 dp 0/1] step 1/10 loss 2.000", "[stage 3/4 dp 0/1] step 2/10 loss 1.500"]
    path, query = [(p, q) for p, q in FakeApi.requests if p.endswith("/log")][-1]
    assert path == f"/api/v1/namespaces/{NS}/pods/demo-worker-1/log"
    assert query["follow"] == ["true"] and query["container"] == ["worker"]
    code, out, err = cli(["logs", NAME, "--stage", "5"], capsys)
    assert code != 0 and "--stage 5 is out of range; this job has stages 1..4" in err


def test_logs_of_all_workers_interleave(api: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = cli(["logs", NAME, "--component", "worker"], capsys)
    assert code == 0, err
    assert sorted(out.splitlines()) == sorted(WORKER_LOGS["demo-worker-0"] + WORKER_LOGS["demo-worker-1"])


def test_stage_placement_follows_rank_order(tmp_path: Path) -> None:
    spec = spec_from_dict({**demo_spec(tmp_path), "parallel": {"stages": 8, "nodes": 2, "gpus_per_node": 4,
                                                               "micro_batches": 16}})
    assert [stage_workers(spec, s) for s in range(1, 9)] == [[0]] * 4 + [[1]] * 4
    spec = spec_from_dict({**demo_spec(tmp_path), "parallel": {"stages": 2, "nodes": 4, "gpus_per_node": 2,
                                                               "micro_batches": 8}})
    # 2 stages x 4 replicas, 2 ranks a node: each node hosts one whole pipeline, so every stage is on every node.
    assert stage_workers(spec, 1) == [0, 1, 2, 3] and stage_workers(spec, 2) == [0, 1, 2, 3]
    spec = spec_from_dict({**demo_spec(tmp_path), "parallel": {"stages": 2, "nodes": 2, "gpus_per_node": 2,
                                                               "micro_batches": 8}})
    assert spec.parallel.ranks_of_stage(0) == [0, 2] and spec.parallel.ranks_of_stage(1) == [1, 3]
    assert [spec.parallel.stage_of_rank(r) for r in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_unreachable_cluster_is_one_sentence(api: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = cli(["status", NAME, "--context", "unreachable"], capsys)
    assert code != 0
    assert err.startswith("error: cannot reach the Kubernetes API at http://127.0.0.1:9")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_kubeconfig_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code, out, err = cli(["logs", NAME], capsys)
    assert code != 0
    assert err.startswith("error: no Kubernetes configuration found")


@pytest.fixture
def recording_helm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """helm that renders for real but records `upgrade` instead of installing (there is no cluster)."""
    from pipelora.workflow import helm

    real = helm.find_helm()
    record = tmp_path / "helm-calls"
    script = tmp_path / "helm-wrapper"
    script.write_text(
        "#!/bin/sh\n"
        f"if [ \"$1\" = upgrade ]; then echo \"$@\" >> {record}; "
        "while [ $# -gt 0 ]; do [ \"$1\" = -f ] && cp \"$2\" " + str(tmp_path / "values.yaml") + "; shift; done; "
        "echo 'NOTES: submitted'; exit 0; fi\n"
        f"exec {real} \"$@\"\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PIPELORA_HELM", str(script))
    return record


@pytest.mark.parametrize("final", ["Succeeded", "Failed"])
def test_submit_installs_then_waits_for_the_end(api: Path, recording_helm: Path, tmp_path: Path, final: str,
                                                capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(demo_spec(api)))
    path = f"/apis/kubeflow.org/v2beta1/namespaces/{NS}/mpijobs/{NAME}"
    FakeApi.objects[path] = {"kind": "MPIJob", "status": {"conditions": [
        {"type": "Running", "status": "False"}, {"type": final, "status": "True", "reason": f"MPIJob{final}"}]}}
    code, out, err = cli(["submit", "--config", str(config), "--context", "test", "-n", NS, "--wait"], capsys)
    calls = recording_helm.read_text().split()
    assert calls[:3] == ["upgrade", "--install", NAME]
    assert calls[-4:] == ["--kube-context", "test", "--namespace", NS]
    values = yaml.safe_load((tmp_path / "values.yaml").read_text())
    assert values["parallel"] == {"nodes": 2, "gpusPerNode": 2}
    assert "NOTES: submitted" in out
    assert out.splitlines()[-1] == f"MPIJob {NAME}: {final}"
    assert LAUNCHER_LOG[0] in out  # the launcher's log is shown even when the job ended before following it
    if final == "Succeeded":
        assert code == 0, err
    else:
        assert code == 1 and err.strip() == (f"error: job {NAME} failed; see `pipelora-k8s status {NAME}` "
                                             f"and `pipelora-k8s logs {NAME}`")


def test_status_still_reports_the_cluster_when_storage_is_unreachable(api: Path, capsys: pytest.CaptureFixture) -> None:
    data = {**demo_spec(api), "storage": {"uri": "s3://bucket/runs", "endpoint_url": "http://127.0.0.1:9"}}
    FakeApi.objects[f"/api/v1/namespaces/{NS}/configmaps/{NAME}-spec"] = {
        "kind": "ConfigMap", "data": {"job.yaml": spec_from_dict(data).to_yaml()}}
    code, out, err = cli(["status", NAME], capsys)
    assert code == 0, err
    assert "MPIJob        Running" in out
    progress = next(line for line in out.splitlines() if "progress:" in line)
    assert progress.startswith("  progress: unavailable from here (cannot ")
    assert f"{spec_from_dict(data).layout.progress}: S3 endpoint http://127.0.0.1:9 is unreachable" in progress


# -- a failed dataprep: the MPIJob stays suspended and status says so --------------------------------

JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs/{NAME}-dataprep"
MPIJOB_PATH = f"/apis/kubeflow.org/v2beta1/namespaces/{NS}/mpijobs/{NAME}"
SUSPENDED_MPIJOB = {"kind": "MPIJob", "spec": {"runPolicy": {"suspend": True}}, "status": {"conditions": [
    {"type": "Created", "status": "True", "reason": "MPIJobCreated", "message": "created"},
    {"type": "Suspended", "status": "True", "reason": "MPIJobSuspended", "message": "MPIJob ml/demo is suspended"}]}}
FAILED_JOB = {"kind": "Job", "status": {"failed": 3, "conditions": [
    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
     "message": "Job has reached the specified backoff limit"}]}}


def failed_dataprep_pod(name: str, created: str, message: str | None, exit_code: int = 1,
                        reason: str = "Error") -> dict[str, Any]:
    """A dataprep Job pod whose `dataprep` init container ended badly (the `release` container never ran)."""
    out = pod(name, "dataprep", phase="Failed", created=created, ready=False)
    out["spec"]["initContainers"] = [{"name": "dataprep", "image": "x"}]
    out["spec"]["containers"] = [{"name": "release", "image": "x"}]
    ended = {"exitCode": exit_code, "reason": reason, **({"message": message} if message else {})}
    out["status"]["initContainerStatuses"] = [{"name": "dataprep", "ready": False, "restartCount": 0, "image": "x",
                                              "imageID": "", "state": {"terminated": ended}}]
    out["status"]["containerStatuses"] = [{"name": "release", "ready": False, "restartCount": 0, "image": "x",
                                          "imageID": "", "state": {"waiting": {"reason": "PodInitializing"}}}]
    return out


@pytest.mark.parametrize("mpijob", ["suspended", "absent"])
def test_status_of_a_failed_dataprep_says_why_and_that_no_gpu_was_held(api: Path, mpijob: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    FakeApi.objects[JOB_PATH] = FAILED_JOB
    if mpijob == "absent":
        del FakeApi.objects[MPIJOB_PATH]
    else:
        FakeApi.objects[MPIJOB_PATH] = SUSPENDED_MPIJOB
    FakeApi.objects["pods"] = [
        failed_dataprep_pod("demo-dataprep-aaaaa", "2026-01-01T00:00:00Z", "an older attempt"),
        failed_dataprep_pod("demo-dataprep-bbbbb", "2026-01-01T00:05:00Z",
                            "Traceback (most recent call last):\n  ...\nerror: dataset s3://bucket/data/a.json "
                            "does not exist; check dataset.uri\n"),
    ]
    code, out, err = cli(["status", NAME], capsys)
    reason = ("dataprep failed: dataset s3://bucket/data/a.json does not exist; check dataset.uri "
              "(Job BackoffLimitExceeded: Job has reached the specified backoff limit); no GPUs were allocated")
    assert code == 4
    assert err.strip() == f"error: {reason}"
    assert "dataprep Job  Failed (BackoffLimitExceeded: Job has reached the specified backoff limit)" in out
    if mpijob == "suspended":
        assert "MPIJob        suspended (dataprep failed; no GPUs were allocated)" in out
    else:
        assert "MPIJob        absent" in out
    code, out, err = cli(["status", NAME, "-o", "json"], capsys)
    assert code == 4 and json.loads(out)["problem"] == reason


def test_a_dataprep_killed_without_a_message_reports_its_exit(api: Path, capsys: pytest.CaptureFixture) -> None:
    FakeApi.objects[JOB_PATH] = FAILED_JOB
    FakeApi.objects[MPIJOB_PATH] = SUSPENDED_MPIJOB
    FakeApi.objects["pods"] = [failed_dataprep_pod("demo-dataprep-ccccc", "2026-01-01T00:00:00Z", None,
                                                   exit_code=137, reason="OOMKilled")]
    code, out, err = cli(["status", NAME], capsys)
    assert code == 4
    assert err.strip() == ("error: dataprep failed: the dataprep container exited with code 137 (OOMKilled) "
                           "(Job BackoffLimitExceeded: Job has reached the specified backoff limit); "
                           "no GPUs were allocated")


def test_a_failed_dataprep_beside_a_running_mpijob_is_not_called_gpu_free(api: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """With gating off the MPIJob runs anyway (its launcher's wait-for-data is the guard): no such claim."""
    FakeApi.objects[JOB_PATH] = FAILED_JOB
    code, out, err = cli(["status", NAME], capsys)
    assert code == 0, err
    assert "dataprep Job  Failed" in out and "MPIJob        Running" in out
    assert "no GPUs" not in out + err


def test_status_shows_the_mpijob_waiting_for_dataprep(api: Path, capsys: pytest.CaptureFixture) -> None:
    FakeApi.objects[JOB_PATH] = {"kind": "Job", "status": {"active": 1}}
    FakeApi.objects[MPIJOB_PATH] = SUSPENDED_MPIJOB
    FakeApi.objects["pods"] = [pod("demo-dataprep-x1y2z", "dataprep")]
    code, out, err = cli(["status", NAME], capsys)
    assert code == 0, err
    assert "dataprep Job  Running" in out
    assert "MPIJob        suspended (waiting for dataprep)" in out
    assert json.loads(cli(["status", NAME, "-o", "json"], capsys)[1])["mpijob"]["suspended"] is True


# -- logs after the pods are gone: the ranks' lines in storage --------------------------------------------


def use_spec(storage: Path, **parallel: int) -> JobSpec:
    """Make the release's ConfigMap hold a spec with this topology; returns it."""
    spec = spec_from_dict({**demo_spec(storage), "parallel": {"micro_batches": 8, **parallel}})
    FakeApi.objects[f"/api/v1/namespaces/{NS}/configmaps/{NAME}-spec"] = {
        "kind": "ConfigMap", "data": {"job.yaml": spec.to_yaml()}}
    return spec


def store_rank_logs(spec: JobSpec, steps: int = 2) -> list[str]:
    """Stamped lines of every rank, one per stage per step, as the ranks' durable logs leave them;
    returns every line in time order."""
    storage = open_storage(spec.storage.uri)
    p = spec.parallel
    texts: dict[int, str] = {r: "" for r in range(p.world_size)}
    ordered = []
    for step in range(1, steps + 1):
        for rank in reversed(range(p.world_size)):  # the last stage reports first: time, not rank, orders
            stage, dp = p.stage_of_rank(rank)
            line = f"[stage {stage + 1}/{p.stages} dp {dp}/{p.data_parallel}] step {step}/10 loss 1.000"
            stamp = f"2026-01-01T00:0{step}:{10 + len(ordered):02d}.000Z"
            texts[rank] += f"{stamp} {line}\n"
            ordered.append(line)
    for rank, text in texts.items():
        storage.write_bytes(spec.layout.rank_log(rank), text.encode())
    return ordered


def log_requests() -> list[str]:
    return [p for p, _ in FakeApi.requests if p.endswith("/log")]


def test_logs_come_from_storage_when_the_pods_are_gone(api: Path, capsys: pytest.CaptureFixture) -> None:
    spec = use_spec(api, stages=2, nodes=2, gpus_per_node=2)  # 2 stages x 2 replicas: stage 1 is ranks 0 and 2
    lines = store_rank_logs(spec)
    FakeApi.objects["pods"] = [pod("demo-dataprep-x1y2z", "dataprep", phase="Succeeded", ready=False)]
    note = f"(from storage: {spec.layout.logs}, the pods are gone)"

    code, out, err = cli(["logs", NAME], capsys)
    assert code == 0, err
    assert out.splitlines() == lines and err.strip() == note
    code, out, err = cli(["logs", NAME, "--stage", "1"], capsys)
    assert code == 0, err
    assert out.splitlines() == [line for line in lines if line.startswith("[stage 1/2 ")]
    assert {line.split()[3] for line in out.splitlines()} == {"0/2]", "1/2]"}  # both replicas of the stage
    assert err.strip() == note
    code, out, err = cli(["logs", NAME, "--component", "worker", "--tail", "3"], capsys)
    assert code == 0, err
    assert out.splitlines() == lines[-3:]
    code, out, err = cli(["logs", NAME, "--stage", "3"], capsys)
    assert code != 0 and "--stage 3 is out of range; this job has stages 1..2" in err
    assert log_requests() == []  # no pod was asked for a log it cannot have


def test_logs_fall_back_when_a_listed_pod_is_gone_by_the_time_it_is_read(api: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    spec = use_spec(api, stages=4, nodes=2, gpus_per_node=2)
    lines = store_rank_logs(spec, steps=1)
    FakeApi.objects["pods"] = [pod("demo-evicted-launcher", "launcher")]  # its log answers 404
    code, out, err = cli(["logs", NAME], capsys)
    assert code == 0, err
    assert out.splitlines() == lines
    assert err.strip() == f"(from storage: {spec.layout.logs}, the pods are gone)"
    assert log_requests() == [f"/api/v1/namespaces/{NS}/pods/demo-evicted-launcher/log"]


def test_logs_before_training_show_dataprep_and_say_where_they_come_from(api: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    FakeApi.objects["pods"] = [pod("demo-dataprep-x1y2z", "dataprep")]
    code, out, err = cli(["logs", NAME], capsys)
    assert code == 0, err
    assert out.splitlines() == DATAPREP_LOG
    assert err.strip() == "(from pod demo-dataprep-x1y2z: no launcher pod, and no rank logs in storage yet)"
    code, out, err = cli(["logs", NAME, "--stage", "2"], capsys)
    assert code != 0
    assert err.strip() == (f"error: job {NAME} has no stage 2's worker pods yet and no logs in storage at "
                           f"{spec_from_dict(demo_spec(api)).layout.logs}; see `pipelora-k8s status {NAME}`")


def test_logs_of_a_deleted_release_need_the_spec_file(api: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    spec = spec_from_dict(demo_spec(api))
    lines = store_rank_logs(spec)
    del FakeApi.objects[f"/api/v1/namespaces/{NS}/configmaps/{NAME}-spec"]
    FakeApi.objects["pods"] = []
    code, out, err = cli(["logs", NAME], capsys)
    assert code != 0 and "pass --config job.yaml to read its logs from storage" in err
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(demo_spec(api)))
    code, out, err = cli(["logs", NAME, "--config", str(config), "--stage", "4"], capsys)
    assert code == 0, err
    assert out.splitlines() == [line for line in lines if line.startswith("[stage 4/4 ")]
    assert err.strip() == f"(from storage: {spec.layout.logs}, the release {NAME} is gone from namespace {NS})"
    code, out, err = cli(["logs", NAME, "--config", str(config), "--context", "unreachable"], capsys)
    assert code == 0, err
    assert out.splitlines() == lines
    assert err.strip() == f"(from storage: {spec.layout.logs}, the cluster cannot be reached)"
    code, out, err = cli(["logs", "other", "--config", str(config)], capsys)
    assert code == 2 and f"is job '{NAME}', not 'other'" in err


def test_a_failed_release_step_is_named_as_the_reason(api: Path, capsys: pytest.CaptureFixture) -> None:
    """Dataprep succeeded but resuming the MPIJob was refused: that refusal is what status shows."""
    FakeApi.objects[JOB_PATH] = FAILED_JOB
    FakeApi.objects[MPIJOB_PATH] = SUSPENDED_MPIJOB
    refused = failed_dataprep_pod("demo-dataprep-ddddd", "2026-01-01T00:00:00Z", None)
    refused["status"]["initContainerStatuses"][0]["state"] = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    refused["status"]["containerStatuses"][0]["state"] = {"terminated": {
        "exitCode": 1, "reason": "Error", "message": "error: the cluster refused to let you patch MPIJob demo "
                                                     "(403 Forbidden); check your credentials and RBAC\n"}}
    FakeApi.objects["pods"] = [refused]
    code, out, err = cli(["status", NAME], capsys)
    assert code == 4
    assert err.strip() == ("error: dataprep failed: the cluster refused to let you patch MPIJob demo (403 Forbidden); "
                           "check your credentials and RBAC (Job BackoffLimitExceeded: Job has reached the specified "
                           "backoff limit); no GPUs were allocated")


def test_submit_wait_stops_when_dataprep_failed(api: Path, recording_helm: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(demo_spec(api)))
    FakeApi.objects[JOB_PATH] = FAILED_JOB
    FakeApi.objects[MPIJOB_PATH] = SUSPENDED_MPIJOB
    FakeApi.objects["pods"] = [failed_dataprep_pod("demo-dataprep-eeeee", "2026-01-01T00:00:00Z",
                                                   "error: dataset.uri s3://bucket/data/a.json does not exist")]
    code, out, err = cli(["submit", "--config", str(config), "--context", "test", "-n", NS, "--wait"], capsys)
    assert code == 4
    assert err.strip() == ("error: dataprep failed: dataset.uri s3://bucket/data/a.json does not exist (Job "
                           "BackoffLimitExceeded: Job has reached the specified backoff limit); no GPUs were allocated")
