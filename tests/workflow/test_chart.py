"""The chart: lint, render over several value sets, validate every object, and check the contracts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipelora.config import spec_from_dict
from pipelora.launch import CLUSTER_HOSTFILE, POD_RUNTIME_DIR
from pipelora.workflow import helm
from pipelora.workflow.commands import CLUSTER_CONFIG_PATH, job_commands
from pipelora.workflow.names import ReleaseNames
from pipelora.workflow.rules import ManifestError, check_release, controller_problems, parse_manifests
from pipelora.workflow.runner import local_commands
from pipelora.workflow.values import chart_values, split_image

REPO = Path(__file__).resolve().parents[2]
CRD = REPO.parent / "shared" / "k8s" / "kubeflow.org_mpijobs.yaml"
K8S_VERSION = "1.30.0"

# Recognisable values that must never appear in rendered output (they live only in Secrets).
SECRET_VALUES = ("AKIA-NEVER-RENDERED", "s3cr3t-never-rendered", "hf_never_rendered")


def base_spec(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "alpaca-mistral",
        "storage": {"uri": "s3://bucket/pipelora", "endpoint_url": "http://minio.minio:9000"},
        "model": {"uri": "s3://bucket/models/mistral-7b"},
        "dataset": {"uri": "s3://bucket/data/alpaca.json", "seq_len": 2048},
        "parallel": {"stages": 1, "nodes": 1, "gpus_per_node": 1, "micro_batches": 8},
        "training": {"max_steps": 100},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


VALUE_SETS: dict[str, dict[str, Any]] = {
    "one-node": base_spec(),
    "two-nodes-8-stages-secrets": base_spec(
        parallel={"stages": 8, "nodes": 2, "gpus_per_node": 4, "micro_batches": 16},
        cluster={"s3_secret": "pipelora-s3", "hf_token_secret": "hf-token"},
    ),
    "two-nodes-no-secrets": base_spec(parallel={"stages": 2, "nodes": 2, "gpus_per_node": 1, "micro_batches": 4}),
    "custom-scheduler-cpu": base_spec(
        parallel={"stages": 2, "nodes": 2, "gpus_per_node": 2, "micro_batches": 8},
        cluster={
            "image": "registry.local:5000/pipelora-k8s:0.1.0-cpu",
            "s3_secret": "minio-creds",
            "values": {
                "schedulerName": "volcano",
                "priorityClassName": "high-priority",
                "nodeSelector": {"pool": "training"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                       "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "alpaca-mistral"}}}}]}},
                "imagePullSecrets": ["regcred"],
                "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "DS_ACCELERATOR", "value": "cpu"}],
                "gpu": {"enabled": False},
                "mpiJob": {"runPolicy": {"activeDeadlineSeconds": 7200, "suspend": True}},
                "worker": {"shmSize": "2Gi", "resources": {"requests": {"cpu": "1", "memory": "2Gi"}}},
            },
        },
    ),
}


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    if not CRD.exists():
        pytest.skip(f"MPIJob CRD not found at {CRD} (it sits beside the checkout in the project workspace)")
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v2beta1")
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Each value set rendered once through helm (module-scoped: helm is a subprocess)."""
    out = {}
    for key, data in VALUE_SETS.items():
        spec = spec_from_dict(data)
        out[key] = parse_manifests(helm.template(spec.name, chart_values(spec), namespace="ml"))
    return out


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys the schema does not declare (the API server would prune them silently)."""
    if isinstance(obj, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        bad: list[str] = []
        for key, value in obj.items():
            if props is not None and key in props:
                bad += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                bad += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and extra is not True:
                bad.append(f"{path}.{key}")
        return bad
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [b for i, item in enumerate(obj) for b in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def test_helm_lint_passes(tmp_path: Path) -> None:
    spec = spec_from_dict(VALUE_SETS["two-nodes-8-stages-secrets"])
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(spec)))
    proc = subprocess.run(
        [helm.find_helm(), "lint", "--strict", str(helm.chart_path()), "-f", str(values)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_core_objects_pass_kubernetes_schemas(rendered: dict, key: str) -> None:
    objects = rendered[key]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Job", "MPIJob", "Role", "RoleBinding", "ServiceAccount"]
    for obj in objects:
        if obj["kind"] == "MPIJob":
            for role, rs in obj["spec"]["mpiReplicaSpecs"].items():
                template = {"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": f"{obj['metadata']['name']}-{role.lower()}"},
                            "template": rs["template"]}
                kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_mpijob_matches_crd_and_controller_rules(rendered: dict, crd_schema: dict, key: str) -> None:
    mpijob = by_kind(rendered[key], "MPIJob")
    jsonschema.Draft4Validator(crd_schema).validate(mpijob)
    assert unknown_fields(mpijob, crd_schema) == []
    assert controller_problems(mpijob) == []
    spec = spec_from_dict(VALUE_SETS[key])
    assert mpijob["spec"]["slotsPerWorker"] == spec.parallel.gpus_per_node
    assert mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == spec.parallel.nodes
    assert mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["replicas"] == 1
    assert mpijob["spec"]["sshAuthMountPath"] == "/home/mpiuser/.ssh"
    assert mpijob["spec"]["launcherCreationPolicy"] == "WaitForWorkersReady"
    assert mpijob["spec"]["runPolicy"]["cleanPodPolicy"] in ("Running", "None")


def test_unknown_field_check_catches_a_typo(crd_schema: dict, rendered: dict) -> None:
    mpijob = json.loads(json.dumps(by_kind(rendered["one-node"], "MPIJob")))
    mpijob["spec"]["slotPerWorker"] = 4
    mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert sorted(unknown_fields(mpijob, crd_schema)) == [
        ".spec.mpiReplicaSpecs.Worker.template.spec.containers[0].resource", ".spec.slotPerWorker"]


def test_worker_pods_run_sshd_non_root_with_shm_and_gpus(rendered: dict) -> None:
    mpijob = by_kind(rendered["two-nodes-8-stages-secrets"], "MPIJob")
    pod = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]
    container = pod["spec"]["containers"][0]
    commands = job_commands(spec_from_dict(VALUE_SETS["two-nodes-8-stages-secrets"]))
    # PID 1 is the worker entrypoint (sshd is its child), given the grace period less a margin
    assert container["command"] == [*commands.worker, "--grace-seconds", "290"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 300
    # readiness tests the entrypoint's file: no TCP connection, so nothing in sshd's log
    assert container["readinessProbe"]["exec"]["command"] == commands.worker_ready
    assert "tcpSocket" not in container["readinessProbe"]
    runtime = next(v for v in pod["spec"]["volumes"] if v["name"] == "pod-runtime")
    assert runtime["emptyDir"]["medium"] == "Memory"
    assert {"name": "pod-runtime", "mountPath": POD_RUNTIME_DIR} in container["volumeMounts"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 1000
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    launcher = mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(launcher["containers"][0]["resources"])


def test_every_pod_carries_standard_labels(rendered: dict) -> None:
    objects = rendered["one-node"]
    pods = [by_kind(objects, "Job")["spec"]["template"]]
    pods += [rs["template"] for rs in by_kind(objects, "MPIJob")["spec"]["mpiReplicaSpecs"].values()]
    components = set()
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "alpaca-mistral"
        assert labels["app.kubernetes.io/name"] == "pipelora"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        components.add(labels["app.kubernetes.io/component"])
    assert components == {"dataprep", "launcher", "worker"}


def test_secrets_only_by_reference(rendered: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in zip(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"), SECRET_VALUES, strict=True):
        monkeypatch.setenv(name, value)
    spec = spec_from_dict(VALUE_SETS["two-nodes-8-stages-secrets"])
    values = chart_values(spec)  # built while the credentials sit in this process's environment
    text = helm.template(spec.name, values, namespace="ml")
    for value in SECRET_VALUES:
        assert value not in text
        assert value not in json.dumps(values)
    objects = parse_manifests(text)
    containers = [c for rs in by_kind(objects, "MPIJob")["spec"]["mpiReplicaSpecs"].values()
                  for c in rs["template"]["spec"]["containers"] + rs["template"]["spec"].get("initContainers", [])]
    job_pod = by_kind(objects, "Job")["spec"]["template"]["spec"]
    containers += job_pod["containers"] + job_pod.get("initContainers", [])
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "pipelora-s3", "key": "AWS_ACCESS_KEY_ID"}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "pipelora-s3"
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
        assert all("value" not in env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"))
    # and without Secrets configured, no credential variables at all
    plain = json.dumps(rendered["two-nodes-no-secrets"])
    assert "AWS_SECRET_ACCESS_KEY" not in plain and "HF_TOKEN" not in plain


def test_configmap_holds_the_resolved_spec(rendered: dict) -> None:
    cm = by_kind(rendered["two-nodes-8-stages-secrets"], "ConfigMap")
    spec = spec_from_dict(yaml.safe_load(cm["data"]["job.yaml"]))
    assert spec == spec_from_dict(VALUE_SETS["two-nodes-8-stages-secrets"])
    assert spec.parallel.world_size == 8


def test_rendered_commands_equal_the_local_runners(rendered: dict, tmp_path: Path) -> None:
    spec = spec_from_dict(VALUE_SETS["two-nodes-8-stages-secrets"])
    objects = rendered["two-nodes-8-stages-secrets"]
    job = by_kind(objects, "Job")["spec"]["template"]["spec"]
    launcher = by_kind(objects, "MPIJob")["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    cluster = job_commands(spec)
    assert job["initContainers"][0]["command"] == cluster.dataprep
    assert job["containers"][0]["command"] == cluster.release_training
    assert launcher["initContainers"][0]["command"] == cluster.wait_for_data
    assert launcher["containers"][0]["command"] == cluster.launcher
    argv = cluster.launcher
    assert argv[:5] == ["mpirun", "--hostfile", CLUSTER_HOSTFILE, "-np", "8"]
    assert argv[-4:] == ["pipelora-k8s", "train", "--config", CLUSTER_CONFIG_PATH]
    assert f"PIPELORA_RANK_RELAY_DIR={POD_RUNTIME_DIR}/ranks" in argv and "--tag-output" in argv
    assert not any("/proc/1/fd" in a for a in argv)
    assert "MASTER_ADDR=alpaca-mistral-worker-0.alpaca-mistral" in argv
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "PATH"} <= set(argv)

    config, hostfile = tmp_path / "job.yaml", tmp_path / "hostfile"
    local = local_commands(spec, config=config, hostfile=hostfile)

    def normalise(cmd: list[str], *, cfg: str, hosts: str) -> list[str]:
        """Drop what only one side has (local-only flags, -x pairs), then map the paths."""
        out, skip = [], False
        for arg in cmd:
            if skip:
                skip = False
                continue
            if arg == "-x":
                skip = True
                continue
            if arg in ("--allow-run-as-root", "--oversubscribe"):
                continue
            out.append({cfg: "CONFIG", hosts: "HOSTFILE"}.get(arg, arg))
        return out

    assert local.dataprep == [a.replace(CLUSTER_CONFIG_PATH, str(config)) for a in cluster.dataprep]
    assert normalise(local.launcher, cfg=str(config), hosts=str(hostfile)) == normalise(
        cluster.launcher, cfg=CLUSTER_CONFIG_PATH, hosts=CLUSTER_HOSTFILE)
    assert "--oversubscribe" in local.launcher


def test_values_schema_rejects_unknown_keys() -> None:
    data = base_spec(cluster={"values": {"worker": {"shmSise": "1Gi"}}})
    spec = spec_from_dict(data)
    with pytest.raises(helm.HelmError, match="shmSise"):
        helm.template(spec.name, chart_values(spec))


def test_controller_rules_are_checked_before_submitting(rendered: dict) -> None:
    mpijob = json.loads(json.dumps(by_kind(rendered["one-node"], "MPIJob")))
    mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["replicas"] = 2
    mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] = 0
    mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["restartPolicy"] = "Always"
    mpijob["spec"]["runPolicy"]["cleanPodPolicy"] = "Sometimes"
    mpijob["metadata"]["name"] = "x" * 60
    problems = controller_problems(mpijob)
    assert len(problems) == 5, problems
    with pytest.raises(ManifestError, match="Launcher replicas is 2"):
        check_release(yaml.safe_dump(mpijob))


def test_image_reference_split() -> None:
    assert split_image("ghcr.io/pipelora/pipelora-k8s:0.1.0") == ("ghcr.io/pipelora/pipelora-k8s", "0.1.0")
    assert split_image("registry.local:5000/pipelora-k8s") == ("registry.local:5000/pipelora-k8s", "")
    assert split_image("registry.local:5000/pipelora-k8s:sha-abc1234") == ("registry.local:5000/pipelora-k8s", "sha-abc1234")


def test_custom_scheduling_values_reach_every_pod(rendered: dict) -> None:
    objects = rendered["custom-scheduler-cpu"]
    pods = [by_kind(objects, "Job")["spec"]["template"]["spec"]]
    pods += [rs["template"]["spec"] for rs in by_kind(objects, "MPIJob")["spec"]["mpiReplicaSpecs"].values()]
    for pod in pods:
        assert pod["schedulerName"] == "volcano"
        assert pod["priorityClassName"] == "high-priority"
        assert pod["nodeSelector"] == {"pool": "training"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["containers"][0]["image"] == "registry.local:5000/pipelora-k8s:0.1.0-cpu"
        assert {"name": "NCCL_DEBUG", "value": "INFO"} in pod["containers"][0]["env"]
    mpijob = by_kind(objects, "MPIJob")
    worker = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(worker["resources"])
    assert mpijob["spec"]["runPolicy"]["suspend"] is True
    assert mpijob["spec"]["runPolicy"]["activeDeadlineSeconds"] == 7200
    launcher = mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"]
    # extra env names are forwarded to the ranks by name
    assert "NCCL_DEBUG" in launcher and "DS_ACCELERATOR" in launcher


def test_mpijob_is_suspended_until_dataprep_releases_it(rendered: dict) -> None:
    objects = rendered["two-nodes-no-secrets"]
    assert by_kind(objects, "MPIJob")["spec"]["runPolicy"]["suspend"] is True
    job = by_kind(objects, "Job")["spec"]["template"]["spec"]
    # dataprep is an init container: a failed dataprep never reaches the release container
    assert [c["name"] for c in job["initContainers"]] == ["dataprep"]
    assert [c["name"] for c in job["containers"]] == ["release"]
    assert job["restartPolicy"] == "Never"


def test_gating_off_leaves_suspend_to_a_queue() -> None:
    spec = spec_from_dict(base_spec(cluster={"values": {"gating": {"enabled": False}}}))
    objects = parse_manifests(helm.template(spec.name, chart_values(spec), namespace="ml"))
    assert by_kind(objects, "MPIJob")["spec"]["runPolicy"]["suspend"] is False
    job = by_kind(objects, "Job")["spec"]["template"]["spec"]
    assert "initContainers" not in job and [c["name"] for c in job["containers"]] == ["dataprep"]
    launcher = by_kind(objects, "MPIJob")["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    assert launcher["initContainers"][0]["command"] == job_commands(spec).wait_for_data


def test_rbac_reaches_only_the_releases_own_objects(rendered: dict) -> None:
    objects = rendered["two-nodes-no-secrets"]
    names = ReleaseNames("alpaca-mistral")
    role = by_kind(objects, "Role")
    assert role["metadata"]["name"] == names.gate_role
    rules = {(r["apiGroups"][0], r["resources"][0]): r for r in role["rules"]}
    assert set(rules) == {("kubeflow.org", "mpijobs"), ("batch", "jobs")}
    assert rules["kubeflow.org", "mpijobs"]["resourceNames"] == [names.mpijob]
    assert sorted(rules["kubeflow.org", "mpijobs"]["verbs"]) == ["get", "patch"]
    assert rules["batch", "jobs"]["resourceNames"] == [names.dataprep_job]
    assert rules["batch", "jobs"]["verbs"] == ["get"]
    assert all("*" not in json.dumps(r) for r in role["rules"])
    binding = by_kind(objects, "RoleBinding")
    assert binding["roleRef"]["name"] == names.gate_role
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": names.service_account, "namespace": "ml"}]
    assert by_kind(objects, "ServiceAccount")["metadata"]["name"] == names.service_account
    pods = [by_kind(objects, "Job")["spec"]["template"]["spec"]]
    pods += [rs["template"]["spec"] for rs in by_kind(objects, "MPIJob")["spec"]["mpiReplicaSpecs"].values()]
    assert {p["serviceAccountName"] for p in pods} == {names.service_account}


def test_existing_service_account_gets_the_role_and_no_new_one() -> None:
    spec = spec_from_dict(base_spec(cluster={"values": {"serviceAccountName": "irsa-trainer"}}))
    objects = parse_manifests(helm.template(spec.name, chart_values(spec), namespace="ml"))
    assert not [o for o in objects if o["kind"] == "ServiceAccount"]
    assert by_kind(objects, "RoleBinding")["subjects"][0]["name"] == "irsa-trainer"


def test_launcher_never_restarts_in_place(rendered: dict) -> None:
    mpijob = by_kind(rendered["one-node"], "MPIJob")
    assert mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["restartPolicy"] == "Never"
    spec = spec_from_dict(base_spec(cluster={"values": {"launcher": {"restartPolicy": "OnFailure"}}}))
    with pytest.raises(helm.HelmError, match="restartPolicy"):
        helm.template(spec.name, chart_values(spec))


def test_object_names_agree_with_release_names(rendered: dict) -> None:
    names = ReleaseNames("alpaca-mistral")
    objects = rendered["two-nodes-no-secrets"]
    assert by_kind(objects, "MPIJob")["metadata"]["name"] == names.mpijob
    assert by_kind(objects, "Job")["metadata"]["name"] == names.dataprep_job
    assert by_kind(objects, "ConfigMap")["metadata"]["name"] == names.config_map
    launcher = by_kind(objects, "MPIJob")["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    assert f"MASTER_ADDR={names.worker_host(0)}" in launcher["containers"][0]["command"]
    labels = by_kind(objects, "MPIJob")["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
    selector = dict(kv.split("=") for kv in names.selector("worker").split(","))
    assert selector.items() <= labels.items()


def test_name_overrides_are_refused() -> None:
    spec = spec_from_dict(base_spec())
    for key in ("fullnameOverride", "nameOverride"):
        with pytest.raises(helm.HelmError, match=key):
            helm.template(spec.name, {**chart_values(spec), key: "other"})
    # a release installed under another name than the spec's would break status, logs and MASTER_ADDR
    with pytest.raises(helm.HelmError, match="job spec's name"):
        helm.template("other-name", chart_values(spec))


def test_chart_has_no_second_copy_of_the_commands() -> None:
    defaults = yaml.safe_load((REPO / "helm" / "pipelora" / "values.yaml").read_text())
    assert defaults["commands"] == {}
    assert CLUSTER_HOSTFILE not in (REPO / "helm" / "pipelora" / "values.yaml").read_text()
