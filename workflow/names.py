"""The names of a release's Kubernetes objects: the one source `status`, `logs`, MASTER_ADDR and
the chart agree on (the chart refuses a release whose name differs from the spec's, and a test
renders it and compares every object's name with these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReleaseNames:
    """Objects of the release of job `name` (the Helm release, the MPIJob and the run folder)."""

    name: str

    @property
    def mpijob(self) -> str:
        return self.name

    @property
    def service(self) -> str:
        """The MPI Operator's headless Service: worker pods resolve as <pod>.<service>."""
        return self.name

    @property
    def config_map(self) -> str:
        return f"{self.name}-spec"

    @property
    def dataprep_job(self) -> str:
        return f"{self.name}-dataprep"

    @property
    def service_account(self) -> str:
        return self.name

    @property
    def gate_role(self) -> str:
        return f"{self.name}-gate"

    def worker_pod(self, index: int) -> str:
        return f"{self.name}-worker-{index}"

    def worker_host(self, index: int) -> str:
        return f"{self.worker_pod(index)}.{self.service}"

    def selector(self, component: str) -> str:
        """Label selector of the pods of one component (dataprep, launcher or worker)."""
        return f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component={component}"
