"""submit / render / delete / list from the command line, without a cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from pipelora.workflow import helm
from pipelora.workflow.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "mistral-7b-alpaca.yaml"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_submit_dry_run_prints_validated_manifests(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["submit", "--config", str(EXAMPLE), "--stages", "4", "--nodes", "4",
                              "--gpus-per-node", "2", "--dry-run", "-n", "ml"], capsys)
    assert code == 0, err
    docs = [d for d in yaml.safe_load_all(out) if d]
    mpijob = next(d for d in docs if d["kind"] == "MPIJob")
    assert mpijob["metadata"]["name"] == "alpaca-mistral"
    assert mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 4
    assert mpijob["spec"]["slotsPerWorker"] == 2
    assert "-np" in (cmd := mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0][
        "command"]) and cmd[cmd.index("-np") + 1] == "8"


def test_submit_rejects_a_bad_spec_before_touching_a_cluster(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    code, out, err = run_cli(["submit", "--config", str(EXAMPLE), "--stages", "3"], capsys)
    assert code == 2
    assert "cannot be split into 3 stages" in err
    code, out, err = run_cli(["submit", "--config", str(EXAMPLE), "--set", "cluster.values.worker.restartPolicy=Always"],
                             capsys)
    assert code != 0 and "'/worker/restartPolicy': value must be one of 'Never', 'OnFailure'" in err


def test_render_to_a_folder_writes_one_file_per_object(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["render", "--config", str(EXAMPLE), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert {"configmap-alpaca-mistral-spec.yaml", "job-alpaca-mistral-dataprep.yaml",
            "mpijob-alpaca-mistral.yaml"} <= set(written)
    assert sorted(out.split()) == sorted(str(tmp_path / "m" / name) for name in written)
    job = yaml.safe_load((tmp_path / "m" / "job-alpaca-mistral-dataprep.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    # dataprep first; the MPIJob is resumed only after it succeeded (a failed init container stops the pod).
    dataprep = next(c for c in pod["initContainers"] if c["name"] == "dataprep")
    assert dataprep["command"] == ["pipelora-k8s", "dataprep", "--config", "/etc/pipelora/job.yaml"]
    release = next(c for c in pod["containers"] if c["name"] == "release")
    assert release["command"] == ["pipelora-k8s", "release-training", "--config", "/etc/pipelora/job.yaml"]


def test_unreachable_cluster_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "dead",
                  "clusters": [{"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}}],
                  "users": [{"name": "u", "user": {"token": "t"}}],
                  "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    for argv in (["submit", "--config", str(EXAMPLE)], ["delete", "alpaca-mistral"], ["list"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 1
        assert err.startswith("error: cannot reach the Kubernetes cluster to "), err
        assert len(err.strip().splitlines()) == 1


def test_missing_helm_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("PIPELORA_HELM", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    code, out, err = run_cli(["render", "--config", str(EXAMPLE)], capsys)
    assert code == 1
    assert err.strip() == ("error: helm was not found; install helm v3 or v4 (https://helm.sh/docs/intro/install/) "
                           "or point PIPELORA_HELM at the binary")


def test_list_shows_only_pipelora_releases(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in helm (a script answering `helm list -o json`) checks parsing and the arguments passed."""
    fake = tmp_path / "helm"
    fake.write_text(
        "#!/bin/sh\necho \"$@\" > " + str(tmp_path / "args") + "\n"
        "echo '[{\"name\":\"alpaca\",\"namespace\":\"ml\",\"revision\":\"2\",\"status\":\"deployed\","
        "\"chart\":\"pipelora-0.1.0\",\"updated\":\"2026-01-01\"},"
        "{\"name\":\"nginx\",\"namespace\":\"web\",\"revision\":\"1\",\"status\":\"deployed\",\"chart\":\"nginx-1.0\"}]'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PIPELORA_HELM", str(fake))
    code, out, err = run_cli(["list", "--context", "prod", "-n", "ml"], capsys)
    assert code == 0, err
    rows = out.splitlines()
    assert len(rows) == 2 and rows[1].split()[:4] == ["alpaca", "ml", "deployed", "2"]
    assert (tmp_path / "args").read_text().split() == ["list", "--output", "json", "--kube-context", "prod",
                                                       "--namespace", "ml"]
    assert helm.find_helm() == str(fake)
    assert os.access(fake, os.X_OK)


@pytest.mark.parametrize(("stderr", "expected"), [
    ("Error: UPGRADE FAILED: cannot patch \"x-dataprep\" with kind Job: Job.batch \"x-dataprep\" is invalid: "
     "spec.template: Invalid value: core.PodTemplateSpec{}: field is immutable",
     "cannot install release x: its dataprep Job or MPIJob already exists"),
    ("Error: unable to build kubernetes objects from release manifest: resource mapping not found for name: "
     "\"x\" namespace: \"\" from \"\": no matches for kind \"MPIJob\" in version \"kubeflow.org/v2beta1\"",
     "the cluster has no MPIJob kind; install the Kubeflow MPI Operator v2"),
    ("Error: Kubernetes cluster unreachable: Get \"https://10.0.0.1/version\": dial tcp: i/o timeout",
     "cannot reach the Kubernetes cluster to install release x"),
])
def test_helm_failures_become_one_actionable_sentence(stderr: str, expected: str) -> None:
    message = helm._explain(stderr, "install release x")
    assert message.startswith(expected)
    assert "\n" not in message
