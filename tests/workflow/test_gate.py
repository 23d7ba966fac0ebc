"""The steps that run in the release's own pods, in-cluster: a local HTTPS server stands in for the
API server, reached through a service-account folder (token, CA, namespace) as a pod reaches it."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from pipelora.config import JobSpec, spec_from_dict
from pipelora.storage import storage_for
from pipelora.workflow import kube as kube_module
from pipelora.workflow.cli import main
from pipelora.workflow.kube import Kube, KubeError

NS = "team-ml"  # only the service account's namespace file says this
NAME = "gated"
TOKEN = "service-account-token"
MPIJOB_PATH = f"/apis/kubeflow.org/v2beta1/namespaces/{NS}/mpijobs/{NAME}"
JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs/{NAME}-dataprep"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA (the pod's ca.crt), and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class InClusterApi(BaseHTTPRequestHandler):
    """GET and PATCH of the MPIJob and the dataprep Job; every request recorded with its headers and body."""

    objects: dict[str, Any] = {}
    requests: list[dict[str, Any]] = []
    patch_status = 200

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self, body: bytes | None = None) -> tuple[str, dict[str, list[str]]]:
        url = urlparse(self.path)
        self.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                              "content_type": self.headers.get("Content-Type"),
                              "authorization": self.headers.get("Authorization"),
                              "body": json.loads(body) if body else None})
        return url.path, parse_qs(url.query)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path, query = self._record()
        if path == f"/api/v1/namespaces/{NS}/pods":
            return self._send(200, {"kind": "PodList", "items": self.objects.get("pods", [])})
        if path in self.objects:
            return self._send(200, self.objects[path])
        return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

    def do_PATCH(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        path, _ = self._record(body)
        if self.patch_status != 200:
            return self._send(self.patch_status, {"kind": "Status", "code": self.patch_status, "reason": "Forbidden"})
        if path not in self.objects:
            return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
        merge(self.objects[path], json.loads(body))
        return self._send(200, self.objects[path])


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 JSON merge patch, as the API server applies `application/merge-patch+json`."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = value


@dataclass
class Cluster:
    spec: JobSpec
    config: Path

    def commit_manifest(self) -> None:
        storage = storage_for(self.spec, self.spec.run_uri)
        shard = storage.write_bytes(self.spec.layout.shard("train", 0), b"rows")
        storage.commit(self.spec.layout.manifest, [shard], extra={"splits": {"train": {"rows": 12}}})

    @staticmethod
    def patches() -> list[dict[str, Any]]:
        return [r for r in InClusterApi.requests if r["method"] == "PATCH"]


@pytest.fixture
def cluster(tmp_path: Path, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """This process as a pod of the release: service account folder, KUBERNETES_SERVICE_*, no kubeconfig."""
    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), InClusterApi)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN)
    (account / "ca.crt").write_bytes(cert.read_bytes())
    (account / "namespace").write_text(NS)
    monkeypatch.setattr(kube_module, "SERVICE_ACCOUNT_DIR", account)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_port))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    data = {"name": NAME, "storage": {"uri": f"s3://{s3_bucket}/runs", "endpoint_url": s3_endpoint},
            "model": {"uri": f"s3://{s3_bucket}/models/m"}, "dataset": {"uri": f"s3://{s3_bucket}/data/a.jsonl"}}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    InClusterApi.requests = []
    InClusterApi.patch_status = 200
    InClusterApi.objects = {
        MPIJOB_PATH: {"kind": "MPIJob", "metadata": {"name": NAME},
                      "spec": {"runPolicy": {"cleanPodPolicy": "Running", "suspend": True}}},
        JOB_PATH: {"kind": "Job", "status": {"active": 1}},
    }
    yield Cluster(spec_from_dict(data), config)
    server.shutdown()
    server.server_close()


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_release_training_resumes_the_mpijob_with_a_merge_patch(cluster: Cluster,
                                                                capsys: pytest.CaptureFixture) -> None:
    cluster.commit_manifest()
    code, out, err = cli(["release-training", "--config", str(cluster.config)], capsys)
    assert code == 0, err
    assert out.splitlines() == [f"data committed at {cluster.spec.layout.manifest} (train 12 rows); "
                                f"resumed MPIJob {NAME} in namespace {NS}: training starts"]
    [patch] = cluster.patches()
    assert patch["path"] == MPIJOB_PATH  # the namespace came from the service account folder
    assert patch["content_type"] == "application/merge-patch+json"
    assert patch["body"] == {"spec": {"runPolicy": {"suspend": False}}}
    assert patch["authorization"].lower() == f"bearer {TOKEN}"  # the scheme is case-insensitive
    assert InClusterApi.objects[MPIJOB_PATH]["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "suspend": False}
    # a retried pod finds it running and changes nothing
    code, out, err = cli(["release-training", "--config", str(cluster.config)], capsys)
    assert code == 0, err
    assert out.strip().endswith(f"MPIJob {NAME} is already running") and len(cluster.patches()) == 1


def test_release_training_without_committed_data_leaves_the_mpijob_suspended(cluster: Cluster,
                                                                             capsys: pytest.CaptureFixture) -> None:
    storage_for(cluster.spec, cluster.spec.run_uri).write_bytes(cluster.spec.layout.shard("train", 0), b"partial")
    code, out, err = cli(["release-training", "--config", str(cluster.config)], capsys)
    assert code == 1
    assert err.strip() == (f"error: the data manifest {cluster.spec.layout.manifest} is not committed, so MPIJob "
                           f"{NAME} stays suspended; run dataprep to completion first (it writes the manifest last)")
    assert cluster.patches() == []
    assert InClusterApi.objects[MPIJOB_PATH]["spec"]["runPolicy"]["suspend"] is True


def test_release_training_refused_by_rbac_is_one_sentence(cluster: Cluster, capsys: pytest.CaptureFixture) -> None:
    cluster.commit_manifest()
    InClusterApi.patch_status = 403
    code, out, err = cli(["release-training", "--config", str(cluster.config)], capsys)
    assert code == 1
    assert err.strip() == (f"error: the cluster refused to let you patch MPIJob {NAME} (403 Forbidden); "
                           "check your credentials and RBAC")
    del InClusterApi.objects[MPIJOB_PATH]
    InClusterApi.patch_status = 200
    code, out, err = cli(["release-training", "--config", str(cluster.config)], capsys)
    assert code == 1 and err.startswith(f"error: MPIJob {NAME} was not found in namespace {NS}")


def test_in_cluster_client_takes_the_pods_namespace(cluster: Cluster, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    kube = Kube.in_cluster()
    assert kube.namespace == NS and kube.mpijob(NAME) is not None
    assert Kube.in_cluster(namespace="other").namespace == "other"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(KubeError, match="not running in a Kubernetes pod with a service account"):
        Kube.in_cluster()


def test_wait_for_data_in_a_pod_ends_at_once_when_dataprep_failed(cluster: Cluster,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """The launcher's guard when gating is off: no 24 h of polling after a failed dataprep."""
    InClusterApi.objects[JOB_PATH] = {"kind": "Job", "status": {"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]}}
    started = time.monotonic()
    code, out, err = cli(["wait-for-data", "--config", str(cluster.config), "--interval", "0.2"], capsys)
    assert code == 4 and time.monotonic() - started < 30
    assert err.strip() == (
        f"error: dataprep failed: BackoffLimitExceeded: Job has reached the specified backoff limit; the data "
        f"manifest {cluster.spec.layout.manifest} will not appear (`pipelora-k8s logs {NAME} --component dataprep` "
        "shows why)")
    assert any(r["method"] == "GET" and r["path"] == JOB_PATH for r in InClusterApi.requests)
