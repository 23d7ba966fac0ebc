"""The pod runner's translation of rendered objects, without a container engine: what the MPI
Operator v0.8.2 adds to the MPIJob's pods, how a pod's containers become `podman create` argv,
the API server's RBAC, and the DNS records of ready pods."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from podrun import Podman, cannot_run_containers, operator
from podrun.apiserver import merge_patch, parse_path, rbac_allows, selector_matches
from podrun.engine import DnsRecords
from podrun.kubelet import (
    Mount,
    PodConfigError,
    container_argv,
    dns_args,
    expand_refs,
    parse_quantity,
    pod_dns_name,
    resolve_env,
    tmpfs_options,
    volume_files,
    write_files,
)

from pipelora.config import spec_from_dict
from pipelora.workflow import helm
from pipelora.workflow.rules import parse_manifests
from pipelora.workflow.values import chart_values

NAME = "pods-unit"
IMAGE = "localhost/pipelora-k8s:dev-cpu"


@pytest.fixture(scope="module")
def release() -> dict[str, dict[str, Any]]:
    """The chart rendered for 2 stages on 2 one-rank nodes, objects by kind (the one of each)."""
    spec = spec_from_dict({
        "name": NAME,
        "storage": {"uri": "s3://bucket/runs", "endpoint_url": "http://10.89.0.1:9000"},
        "model": {"uri": "s3://bucket/models/tiny-mistral"},
        "dataset": {"uri": "s3://bucket/datasets/learnable.jsonl", "seq_len": 64},
        "parallel": {"stages": 2, "nodes": 2, "gpus_per_node": 1, "micro_batch_size": 2, "micro_batches": 4},
        "cluster": {"image": IMAGE, "image_pull_policy": "Never", "s3_secret": "pipelora-s3", "values": {
            "gpu": {"enabled": False},
            "env": [{"name": "DS_ACCELERATOR", "value": "cpu"}],
            "worker": {"shmSize": "1Gi", "terminationGracePeriodSeconds": 30,
                       "resources": {"limits": {"memory": "4Gi"}}},
        }},
    })
    objects = parse_manifests(helm.template(spec.name, chart_values(spec)))
    return {o["kind"]: o for o in objects}


class Objects:
    """An ObjectSource with the test's Secret and the release's ConfigMap."""

    def __init__(self, config_maps: dict[str, dict[str, str]], secrets: dict[str, dict[str, str]]) -> None:
        self.config_maps = config_maps
        self.secrets = secrets

    def secret_data(self, name: str) -> dict[str, bytes] | None:
        found = self.secrets.get(name)
        return None if found is None else {k: v.encode() for k, v in found.items()}

    def config_map_data(self, name: str) -> dict[str, bytes] | None:
        found = self.config_maps.get(name)
        return None if found is None else {k: v.encode() for k, v in found.items()}

    def service_account_token(self, service_account: str, audience: str | None) -> str:
        return f"token-of-{service_account}"


S3 = {"pipelora-s3": {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret"}}


def test_hostfile_is_the_operators(release: dict[str, dict[str, Any]]) -> None:
    mpijob = release["MPIJob"]
    assert operator.hostfile(mpijob, "team") == (
        f"{NAME}-worker-0.{NAME}.team.svc slots=1\n{NAME}-worker-1.{NAME}.team.svc slots=1\n")
    assert operator.discover_hosts(mpijob, "team", [1]) == f"#!/bin/sh\necho {NAME}-worker-1.{NAME}.team.svc\n"


def test_worker_pod_is_the_template_with_the_operators_additions(release: dict[str, dict[str, Any]]) -> None:
    mpijob = release["MPIJob"]
    template = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]
    pod = operator.worker_pod(mpijob, 1, "default")
    spec = pod["spec"]
    assert pod["metadata"]["name"] == f"{NAME}-worker-1"
    assert (spec["hostname"], spec["subdomain"]) == (f"{NAME}-worker-1", NAME)
    assert spec["dnsConfig"]["searches"] == [f"{NAME}.default.svc.cluster.local"]
    assert spec["restartPolicy"] == "OnFailure"
    container = spec["containers"][0]
    rendered = template["spec"]["containers"][0]
    assert container["command"] == rendered["command"]  # the chart's entrypoint, untouched
    assert container["env"] == [*rendered["env"], {"name": "K_MPI_JOB_ROLE", "value": "worker"}]
    assert {"name": "ssh-auth", "mountPath": "/home/mpiuser/.ssh"} in container["volumeMounts"]
    ssh = next(v for v in spec["volumes"] if v["name"] == "ssh-auth")["secret"]
    assert ssh["secretName"] == f"{NAME}-ssh" and "defaultMode" not in ssh  # 0644, root-owned
    assert [i["path"] for i in ssh["items"]] == ["id_rsa", "id_rsa.pub", "authorized_keys"]
    assert pod["metadata"]["labels"][operator.REPLICA_INDEX_LABEL] == "1"


def test_launcher_gets_the_openmpi_environment_hostfile_and_retries(release: dict[str, dict[str, Any]]) -> None:
    mpijob = release["MPIJob"]
    job = operator.launcher_job(mpijob, "default")
    assert job["spec"]["backoffLimit"] == mpijob["spec"]["runPolicy"]["backoffLimit"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never" and spec["hostname"] == f"{NAME}-launcher"
    env = {e["name"]: e["value"] for e in spec["containers"][0]["env"] if "value" in e}
    assert env["K_MPI_JOB_ROLE"] == "launcher"
    assert env["OMPI_MCA_orte_keep_fqdn_hostnames"] == "true"
    assert env["OMPI_MCA_orte_default_hostfile"] == "/etc/mpi/hostfile"
    assert env["OMPI_MCA_plm_rsh_args"] == "-o ConnectionAttempts=10"
    assert env["OMPI_MCA_orte_set_default_slots"] == "1"
    assert env["NVIDIA_VISIBLE_DEVICES"] == ""
    config = next(v for v in spec["volumes"] if v["name"] == "mpi-job-config")["configMap"]
    assert {i["path"]: i["mode"] for i in config["items"]} == {"hostfile": 0o444, "discover_hosts.sh": 0o555}
    assert {"name": "mpi-job-config", "mountPath": "/etc/mpi"} in spec["containers"][0]["volumeMounts"]
    assert not any(m["name"] == "mpi-job-config" for c in spec["initContainers"] for m in c.get("volumeMounts", []))


def test_ssh_secret_is_an_ecdsa_p521_pair_as_the_operator_makes_it(tmp_path: Path) -> None:
    private, public = operator.ssh_key_pair()
    assert private.startswith("-----BEGIN EC PRIVATE KEY-----\n")
    assert public.startswith("ecdsa-sha2-nistp521 ") and public.endswith("\n") and len(public.split()) == 2
    key = tmp_path / "id_rsa"
    key.write_text(private)
    key.chmod(0o600)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True)
    assert derived.stdout.split()[:2] == public.split()


def worker_argv(release: dict[str, dict[str, Any]], secrets: dict[str, dict[str, str]]) -> list[str]:
    pod = operator.worker_pod(release["MPIJob"], 0, "default")
    container = pod["spec"]["containers"][0]
    objects = Objects({}, secrets)
    env = resolve_env(container, pod, namespace="default", objects=objects, service_env={"KUBERNETES_SERVICE_HOST": "h"})
    mounts = {"job-spec": Mount("bind", "/v/job-spec", read_only=True), "dshm": Mount("volume", "v-dshm"),
              "pod-runtime": Mount("volume", "v-rt"), "ssh-auth": Mount("bind", "/v/ssh", read_only=True)}
    return container_argv(name="c", podman_pod="p", labels={"l": "1"}, container=container, pod=pod, env=env,
                          mounts=mounts, image_user="1000:1000", termination_log="/v/term")


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_worker_container_becomes_podman_argv_exactly_as_rendered(release: dict[str, dict[str, Any]]) -> None:
    argv = worker_argv(release, S3)
    rendered = release["MPIJob"]["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert argv[:2] == ["create", "--name"]
    assert json.loads(flag_values(argv, "--entrypoint")[0]) == rendered["command"]
    assert argv[-1] == IMAGE  # no args: the image's CMD is dropped, as `command` does in Kubernetes
    assert flag_values(argv, "--user") == ["1000:1000"] and flag_values(argv, "--group-add") == ["1000"]
    assert flag_values(argv, "--cap-drop") == ["ALL"]
    assert flag_values(argv, "--security-opt") == ["no-new-privileges"]
    assert flag_values(argv, "--memory") == [str(4 << 30)]
    assert flag_values(argv, "--stop-timeout") == ["30"]
    env = dict(e.split("=", 1) for e in flag_values(argv, "--env"))
    assert env["AWS_ACCESS_KEY_ID"] == "AKIDEXAMPLE" and env["K_MPI_JOB_ROLE"] == "worker"
    assert env["KUBERNETES_SERVICE_HOST"] == "h"
    assert env["PIPELORA_POD_ENV_NAMES"] == "DS_ACCELERATOR"
    mounts = flag_values(argv, "--mount")
    assert "type=bind,source=/v/job-spec,destination=/etc/pipelora,ro=true" in mounts
    assert "type=volume,source=v-dshm,destination=/dev/shm" in mounts
    assert "type=volume,source=v-rt,destination=/run/pipelora" in mounts
    assert "type=bind,source=/v/ssh,destination=/home/mpiuser/.ssh,ro=true" in mounts
    assert "type=bind,source=/v/term,destination=/dev/termination-log" in mounts


def test_a_missing_secret_stops_the_container_as_the_kubelet_does(release: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(PodConfigError) as err:
        worker_argv(release, {})
    assert err.value.reason == "CreateContainerConfigError" and '"pipelora-s3" not found' in err.value.message
    with pytest.raises(PodConfigError, match="couldn't find key AWS_SECRET_ACCESS_KEY"):
        worker_argv(release, {"pipelora-s3": {"AWS_ACCESS_KEY_ID": "x"}})


def test_env_order_expansion_and_env_from() -> None:
    container = {
        "name": "c", "image": "i",
        "envFrom": [{"secretRef": {"name": "s"}, "prefix": "S_"}, {"configMapRef": {"name": "absent", "optional": True}}],
        "env": [{"name": "A", "value": "a"}, {"name": "B", "value": "$(A)-$(S_K)-$(NOPE)-$$(A)"},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "S_K", "value": "override"}],
        "command": ["echo", "$(B)"],
    }
    pod = {"metadata": {"name": "p1"}, "spec": {"containers": [container]}}
    env = resolve_env(container, pod, namespace="ns", objects=Objects({}, {"s": {"K": "k"}}))
    assert env == {"S_K": "override", "A": "a", "B": "a-k-$(NOPE)-$(A)", "POD": "p1"}
    assert expand_refs("$(B)", env) == "a-k-$(NOPE)-$(A)"
    argv = container_argv(name="n", podman_pod="p", labels={}, container=container, pod=pod, env=env, mounts={})
    assert json.loads(flag_values(argv, "--entrypoint")[0]) == ["echo", "a-k-$(NOPE)-$(A)"]


def test_run_as_non_root_is_enforced() -> None:
    pod = {"metadata": {"name": "p"}, "spec": {"securityContext": {"runAsNonRoot": True}, "containers": []}}
    container = {"name": "c", "image": "i"}
    with pytest.raises(PodConfigError, match="runAsNonRoot"):
        container_argv(name="n", podman_pod="p", labels={}, container=container, pod=pod, env={}, mounts={},
                       image_user="root")
    argv = container_argv(name="n", podman_pod="p", labels={}, container=container, pod=pod, env={}, mounts={},
                          image_user="1000:1000")
    assert "--user" not in argv  # the image's own user, which is not root


def test_memory_empty_dir_is_a_tmpfs_of_its_size_limit() -> None:
    assert tmpfs_options({"medium": "Memory", "sizeLimit": "64Mi"}) == [
        "--opt", "type=tmpfs", "--opt", "device=tmpfs", "--opt", "o=nr_blocks=16384,mode=0777"]
    assert parse_quantity("1Gi") == 1 << 30 and parse_quantity("500m") == 0.5 and parse_quantity("2G") == 2e9


def test_volume_files_are_root_owned_with_the_mode_and_fs_group(release: dict[str, dict[str, Any]],
                                                                 tmp_path: Path) -> None:
    pod = operator.worker_pod(release["MPIJob"], 0, "default")
    ssh = next(v for v in pod["spec"]["volumes"] if v["name"] == "ssh-auth")
    objects = Objects({}, {f"{NAME}-ssh": {"ssh-privatekey": "PRIVATE", "ssh-publickey": "PUBLIC"}})
    files = volume_files(ssh, pod, namespace="default", objects=objects)
    assert files is not None
    write_files(tmp_path / "ssh", files[0], default_mode=files[1], fs_group=1000)
    for name, content in (("id_rsa", "PRIVATE"), ("id_rsa.pub", "PUBLIC"), ("authorized_keys", "PUBLIC")):
        info = (tmp_path / "ssh" / name).stat()
        assert (tmp_path / "ssh" / name).read_text() == content
        assert stat.S_IMODE(info.st_mode) == 0o644
        if os.geteuid() == 0:
            assert (info.st_uid, info.st_gid) == (0, 1000)
    hostfile = {"name": "cfg", "configMap": {"name": "cm", "items": [{"key": "hostfile", "path": "hostfile",
                                                                      "mode": 0o444}]}}
    files = volume_files(hostfile, pod, namespace="default", objects=Objects({"cm": {"hostfile": "h"}}, {}))
    assert files == ([("hostfile", b"h", 0o444)], 0o644)


def test_pod_dns_follows_kubernetes(release: dict[str, dict[str, Any]]) -> None:
    pod = operator.worker_pod(release["MPIJob"], 0, "team")
    assert pod_dns_name(pod, "team") == f"{NAME}-worker-0.{NAME}.team.svc.cluster.local"
    args = dns_args(pod, "team")
    assert flag_values(args, "--dns-search") == ["team.svc.cluster.local", "svc.cluster.local", "cluster.local",
                                                 f"{NAME}.team.svc.cluster.local"]
    assert flag_values(args, "--dns-option") == ["ndots:5"]


def test_rbac_grants_exactly_the_rendered_role(release: dict[str, dict[str, Any]]) -> None:
    objects = [release["Role"], release["RoleBinding"]]
    sa = release["ServiceAccount"]["metadata"]["name"]
    mpijob = f"/apis/kubeflow.org/v2beta1/namespaces/default/mpijobs/{NAME}"
    job = f"/apis/batch/v1/namespaces/default/jobs/{NAME}-dataprep"

    def allowed(method: str, path: str, who: str = sa) -> bool:
        req = parse_path(method, path)
        assert req is not None
        return rbac_allows(objects, "default", who, req)

    assert allowed("GET", mpijob) and allowed("PATCH", mpijob) and allowed("GET", job)
    assert not allowed("PATCH", mpijob.replace(NAME, "another"))
    assert not allowed("GET", "/api/v1/namespaces/default/pods?labelSelector=a%3Db")
    assert not allowed("GET", "/api/v1/namespaces/default/secrets/pipelora-s3")
    assert not allowed("GET", mpijob, who="default")


def test_merge_patch_and_selectors() -> None:
    assert merge_patch({"spec": {"runPolicy": {"suspend": True, "backoffLimit": 3}}},
                       {"spec": {"runPolicy": {"suspend": False}}}) == {
        "spec": {"runPolicy": {"suspend": False, "backoffLimit": 3}}}
    assert merge_patch({"a": 1, "b": 2}, {"b": None}) == {"a": 1}
    assert selector_matches("a=1,b!=2", {"a": "1", "b": "3"}) and not selector_matches("a=1", {"a": "2"})


def test_dns_records_come_and_go_without_touching_other_lines(tmp_path: Path) -> None:
    network = tmp_path / "net"
    network.write_text("10.89.0.1\nabc 10.89.0.2  other,names\n")
    server = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "aardvark.pid").write_text(str(server.pid))
        records = DnsRecords("net", folder=tmp_path)
        records.set({"a": ("10.89.0.7", "w-0.svc.ns.svc.cluster.local")})
        lines = network.read_text().splitlines()
        assert lines[:2] == ["10.89.0.1", "abc 10.89.0.2  other,names"]
        assert lines[2].endswith(" 10.89.0.7  w-0.svc.ns.svc.cluster.local")
        assert server.wait(timeout=10) == -signal.SIGHUP  # the DNS server was told to reload
        (tmp_path / "aardvark.pid").write_text(str(os.getpid() + 10_000_000))
        with pytest.raises(Exception, match="cannot signal aardvark-dns"):
            records.set({})
        assert network.read_text().splitlines() == ["10.89.0.1", "abc 10.89.0.2  other,names"]
    finally:
        server.kill()


def test_no_engine_is_a_reason_not_a_skip() -> None:
    why = cannot_run_containers(Podman("podman-that-is-not-installed"))
    assert why is not None and "not installed" in why
