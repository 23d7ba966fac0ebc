"""The launcher's first step: wait for dataprep's committed manifest in S3 (moto over HTTP), and stop
at once when the dataprep Job failed (a local server answers the Kubernetes REST paths it reads)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from pipelora.config import spec_from_dict
from pipelora.storage import storage_for
from pipelora.workflow.cli import main
from pipelora.workflow.helm import KubeTarget
from pipelora.workflow.kube import Kube
from pipelora.workflow.status import DataprepFailed
from pipelora.workflow.waitdata import wait_for_data


def write_spec(tmp_path: Path, s3_endpoint: str, bucket: str) -> tuple[Path, object]:
    data = {
        "name": "waiter",
        "storage": {"uri": f"s3://{bucket}/runs", "endpoint_url": s3_endpoint},
        "model": {"uri": f"s3://{bucket}/models/m"},
        "dataset": {"uri": f"s3://{bucket}/data/a.jsonl"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, spec_from_dict(data)


def commit_manifest(spec) -> None:  # noqa: ANN001
    storage = storage_for(spec, spec.run_uri)
    shard = storage.write_bytes(spec.layout.shard("train", 0), b"shard bytes")
    storage.commit(spec.layout.manifest, [shard],
                   extra={"seq_len": 64, "splits": {"train": {"rows": 12, "shards": ["train-00000.safetensors"]}}})


@pytest.fixture(autouse=True)
def _outside_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI asks the API only inside a pod; these tests run as if outside one, wherever they run."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_times_out_with_one_sentence_when_no_data(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    config, spec = write_spec(tmp_path, s3_endpoint, s3_bucket)
    code, out, err = run_cli(["wait-for-data", "--config", str(config), "--timeout", "0.6", "--interval", "0.2"],
                             capsys)
    assert code == 3
    assert spec.layout.manifest.startswith(f"s3://{s3_bucket}/runs/waiter/")
    assert f"waiting for the data manifest {spec.layout.manifest}" in out
    assert err.startswith(f"error: no data manifest at {spec.layout.manifest} after 0s")
    assert "pipelora-k8s logs waiter --component dataprep" in err


def test_returns_once_the_manifest_is_committed(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                capsys: pytest.CaptureFixture) -> None:
    config, spec = write_spec(tmp_path, s3_endpoint, s3_bucket)
    # the shard alone (no manifest yet) must not count as data
    storage_for(spec, spec.run_uri).write_bytes(spec.layout.shard("train", 0), b"partial")
    timer = threading.Timer(1.0, commit_manifest, args=(spec,))
    timer.start()
    try:
        code, out, err = run_cli(["wait-for-data", "--config", str(config), "--timeout", "60",
                                  "--interval", "0.2"], capsys)
    finally:
        timer.join()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("waiting for the data manifest")
    assert lines[-1] == f"data ready: {spec.layout.manifest} (train 12 rows)"


NS = "ml"
JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs/waiter-dataprep"
FAILED = {"kind": "Job", "status": {"failed": 1, "conditions": [
    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
     "message": "Job has reached the specified backoff limit"}]}}


class JobApi(BaseHTTPRequestHandler):
    """The dataprep Job and its pods; each GET path recorded."""

    objects: dict[str, Any] = {}
    paths: list[str] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlparse(self.path).path
        self.paths.append(path)
        if path == f"/api/v1/namespaces/{NS}/pods":
            code, obj = 200, {"kind": "PodList", "items": self.objects.get("pods", [])}
        elif path in self.objects:
            code, obj = 200, self.objects[path]
        else:
            code, obj = 404, {"kind": "Status", "code": 404}
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def job_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[JobApi]]:
    """The fake API with the dataprep Job running; KUBECONFIG has contexts `api` and `unreachable`."""
    JobApi.objects = {JOB_PATH: {"kind": "Job", "status": {"active": 1}}}
    JobApi.paths = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), JobApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "api",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}},
                     {"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "api", "context": {"cluster": "c", "user": "u", "namespace": NS}},
                     {"name": "unreachable", "context": {"cluster": "dead", "user": "u", "namespace": NS}}],
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    yield JobApi
    server.shutdown()


def test_a_dataprep_job_failing_mid_wait_ends_it_with_the_reason(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                                 job_api: type[JobApi]) -> None:
    _, spec = write_spec(tmp_path, s3_endpoint, s3_bucket)
    dataprep_pod = {"metadata": {"name": "waiter-dataprep-abcde", "creationTimestamp": "2026-01-01T00:00:00Z",
                                 "labels": {"app.kubernetes.io/component": "dataprep"}},
                    "status": {"initContainerStatuses": [{"name": "dataprep", "state": {"terminated": {
                        "exitCode": 1, "message": "error: tokenizer.model is missing in s3://b/models/m\n"}}}]}}

    def fail() -> None:  # once the waiter has seen the Job running
        while JOB_PATH not in job_api.paths:
            time.sleep(0.01)
        job_api.objects.update({JOB_PATH: FAILED, "pods": [dataprep_pod]})

    timer = threading.Thread(target=fail, daemon=True)
    timer.start()
    said: list[str] = []
    try:
        with pytest.raises(DataprepFailed) as exc:
            wait_for_data(spec, timeout_s=60, interval_s=0.1, echo=said.append,
                          kube=Kube.connect(KubeTarget(context="api")))
    finally:
        timer.join()
    assert str(exc.value).startswith("dataprep failed: tokenizer.model is missing in s3://b/models/m "
                                     "(Job BackoffLimitExceeded: Job has reached the specified backoff limit); "
                                     f"the data manifest {spec.layout.manifest} will not appear")
    assert exc.value.exit_code == 4
    assert said == [f"waiting for the data manifest {spec.layout.manifest} (dataprep writes it last, "
                    "and watching the Job waiter-dataprep)"]
    assert job_api.paths.count(JOB_PATH) >= 2


def test_committed_data_wins_over_the_job_state(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                job_api: type[JobApi]) -> None:
    """The manifest is checked first: a Job that failed after committing (e.g. its release step) does not stop training."""
    _, spec = write_spec(tmp_path, s3_endpoint, s3_bucket)
    commit_manifest(spec)
    job_api.objects[JOB_PATH] = FAILED
    marker = wait_for_data(spec, timeout_s=5, interval_s=0.1, echo=lambda _: None,
                           kube=Kube.connect(KubeTarget(context="api")))
    assert marker["splits"]["train"]["rows"] == 12


def test_an_unreachable_api_falls_back_to_polling_storage(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                          job_api: type[JobApi]) -> None:
    _, spec = write_spec(tmp_path, s3_endpoint, s3_bucket)
    said: list[str] = []
    timer = threading.Timer(1.0, commit_manifest, args=(spec,))
    timer.start()
    try:
        wait_for_data(spec, timeout_s=60, interval_s=0.2, echo=said.append,
                      kube=Kube.connect(KubeTarget(context="unreachable")))
    finally:
        timer.join()
    assert said[0].startswith("waiting for the data manifest")
    assert said[1].startswith("cannot check the dataprep Job waiter-dataprep (cannot reach the Kubernetes API at "
                              "http://127.0.0.1:9")
    assert said[1].endswith("; waiting on storage only")
    assert sum("cannot check" in line for line in said) == 1  # said once, not at every poll
    assert said[-1].startswith(f"data ready: {spec.layout.manifest}")


def test_the_launcher_waits_until_every_worker_accepts_ssh() -> None:
    """The v0.8.2 operator starts the launcher with the workers on resume: it must wait for them."""
    from pipelora.workflow.waitdata import WorkersTimeout, wait_for_workers

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    polls: list[float] = []

    def sleep(seconds: float) -> None:  # the worker's sshd comes up after the second poll
        polls.append(seconds)
        if len(polls) == 2:
            listener.listen()

    said: list[str] = []
    try:
        wait_for_workers(["127.0.0.1"], port=port, timeout_s=60, interval_s=0.01, echo=said.append, sleep=sleep)
    finally:
        listener.close()
    assert len(polls) == 2 and said[-1] == "workers ready: 127.0.0.1"
    with pytest.raises(WorkersTimeout, match=r"worker\(s\) 127.0.0.1 did not accept ssh on port"):
        wait_for_workers(["127.0.0.1"], port=port, timeout_s=0.05, interval_s=0.01, echo=said.append)


def test_the_cluster_launcher_command_waits_for_workers_and_the_local_one_does_not(tmp_path: Path) -> None:
    from pipelora.workflow.commands import job_commands

    _, spec = write_spec(tmp_path, "http://127.0.0.1:9", "bucket")
    assert job_commands(spec).wait_for_data[-1] == "--workers"
    assert "--workers" not in job_commands(spec, local=True).wait_for_data


def test_the_wait_for_workers_says_what_it_waits_on_each_time_an_address_changes() -> None:
    """A stuck launcher must say why in its log: a name without an address, or an address (perhaps a
    stale one, of a pod that was replaced) where nobody answers; said again only when it changes."""
    from pipelora.workflow.waitdata import WorkersTimeout, wait_for_workers, worker_state

    answers = iter([("w-1 (no address)", "does not resolve"), ("w-1 (10.0.0.9)", "port 2222: timed out"),
                    ("w-1 (10.0.0.9)", "port 2222: No route to host"), ("w-1 (10.0.0.11)", "port 2222: refused"),
                    None])
    said: list[str] = []
    wait_for_workers(["w-1"], port=2222, timeout_s=60, echo=said.append, sleep=lambda _: None,
                     probe=lambda host, port: next(answers))
    assert said == ["waiting for 1 worker(s) to accept ssh on port 2222",
                    "still waiting for w-1 (no address): does not resolve",
                    "still waiting for w-1 (10.0.0.9): port 2222: timed out",
                    "still waiting for w-1 (10.0.0.11): port 2222: refused",
                    "workers ready: w-1"]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # bound, not listening: refused
    port = listener.getsockname()[1]
    try:
        assert worker_state("127.0.0.1", port) == ("127.0.0.1 (127.0.0.1)", f"port {port}: Connection refused")
        with pytest.raises(WorkersTimeout, match=rf"127.0.0.1 \(127.0.0.1\): port {port}: Connection refused"):
            wait_for_workers(["127.0.0.1"], port=port, timeout_s=0.01, echo=said.append)
    finally:
        listener.close()
    unknown = worker_state("no-such-worker.invalid", port)
    assert unknown is not None and unknown[0] == "no-such-worker.invalid (no address)"
