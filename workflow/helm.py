"""The helm binary, driven with the chart shipped inside the package.

Helm does the templating and the release bookkeeping (upgrade, uninstall, list); this module
only finds the binary and the chart and turns helm's failures into one sentence a user can act on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipelora.errors import PipeloraError


class HelmError(PipeloraError):
    """helm is missing, the cluster is unreachable, or helm refused the release."""


@dataclass(frozen=True)
class KubeTarget:
    """kubectl's --context / --namespace, passed on to helm and the Kubernetes client."""

    context: str | None = None
    namespace: str | None = None

    def helm_args(self) -> list[str]:
        args: list[str] = []
        if self.context:
            args += ["--kube-context", self.context]
        if self.namespace:
            args += ["--namespace", self.namespace]
        return args


def chart_path() -> Path:
    """The chart folder inside the installed package (a plain folder for wheels and editable installs)."""
    path = Path(str(resources.files("pipelora.chart") / "pipelora"))
    if not (path / "Chart.yaml").is_file():
        raise HelmError(f"the pipelora chart is missing from the installation ({path}); reinstall pipelora-k8s")
    return path


def find_helm() -> str:
    """$PIPELORA_HELM, then helm on PATH, then the one next to this Python (the virtualenv's bin/)."""
    candidates = [os.environ.get("PIPELORA_HELM"), shutil.which("helm"), str(Path(sys.executable).parent / "helm")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise HelmError(
        "helm was not found; install helm v3 or v4 (https://helm.sh/docs/intro/install/) "
        "or point PIPELORA_HELM at the binary"
    )


def _explain(stderr: str, action: str) -> str:
    text = stderr.strip().removeprefix("Error: ").strip()
    lowered = text.lower()
    if "kubernetes cluster unreachable" in lowered or "connection refused" in lowered or "no such host" in lowered:
        return (f"cannot reach the Kubernetes cluster to {action}; check `kubectl cluster-info` "
                f"(and --context/--namespace): {text.splitlines()[0] if text else 'no detail'}")
    if "no matches for kind" in lowered and "mpijob" in lowered:
        return ("the cluster has no MPIJob kind; install the Kubeflow MPI Operator v2 "
                "(kubectl apply --server-side -f https://raw.githubusercontent.com/kubeflow/mpi-operator/"
                "v0.6.0/deploy/v2beta1/mpi-operator.yaml)")
    if "field is immutable" in lowered:
        return (f"cannot {action}: its dataprep Job or MPIJob already exists and Kubernetes does not allow "
                "changing them; delete the release first (`pipelora-k8s delete NAME`; the run folder stays)")
    return f"helm failed to {action}: {' '.join(text.split())}"


def run_helm(args: list[str], *, action: str, capture: bool = True) -> str:
    """Run helm; any failure becomes a HelmError naming what was being done."""
    argv = [find_helm(), *args]
    proc = subprocess.run(argv, capture_output=capture, text=True, check=False)
    if proc.returncode != 0:
        raise HelmError(_explain(proc.stderr or "", action))
    return proc.stdout or ""


def _values_file(values: dict[str, Any], folder: str) -> str:
    path = Path(folder) / "values.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return str(path)


def template(name: str, values: dict[str, Any], *, namespace: str | None = None) -> str:
    """`helm template`: the manifests, rendered offline (no cluster needed)."""
    with tempfile.TemporaryDirectory(prefix="pipelora-values-") as folder:
        args = ["template", name, str(chart_path()), "-f", _values_file(values, folder)]
        if namespace:
            args += ["--namespace", namespace]
        return run_helm(args, action=f"render release {name}")


def upgrade_install(
    name: str, values: dict[str, Any], *, target: KubeTarget, wait: bool = False, timeout: str = "10m"
) -> str:
    """`helm upgrade --install`; returns helm's output (the chart's NOTES)."""
    with tempfile.TemporaryDirectory(prefix="pipelora-values-") as folder:
        args = ["upgrade", "--install", name, str(chart_path()), "-f", _values_file(values, folder),
                *target.helm_args()]
        if wait:
            args += ["--wait", "--timeout", timeout]
        return run_helm(args, action=f"install release {name}")


def uninstall(name: str, *, target: KubeTarget) -> str:
    return run_helm(["uninstall", name, *target.helm_args()], action=f"delete release {name}")


def list_releases(*, target: KubeTarget, all_namespaces: bool = False) -> list[dict[str, Any]]:
    """Releases of this chart (other charts' releases are left out)."""
    args = ["list", "--output", "json", *target.helm_args()]
    if all_namespaces:
        args.append("--all-namespaces")
    out = run_helm(args, action="list releases")
    releases = json.loads(out or "[]")
    return [r for r in releases if str(r.get("chart", "")).startswith("pipelora-")]
