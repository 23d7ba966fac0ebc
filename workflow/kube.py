"""The Kubernetes API, reached the way kubectl reaches it (kubeconfig, --context, --namespace),
or from inside a pod through its service account.

Only the few calls `status`, `logs`, `wait-for-data` and `release-training` need. Every failure
(no kubeconfig, no cluster, no such object) becomes a KubeError with one sentence; a missing
object is `None` where absence is normal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelora.errors import PipeloraError
from pipelora.workflow.helm import KubeTarget

MPIJOB_GROUP, MPIJOB_VERSION, MPIJOB_PLURAL = "kubeflow.org", "v2beta1", "mpijobs"
# Where Kubernetes mounts a pod's service account: token, CA bundle and the pod's namespace.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# (connect, read) seconds for single requests; log streams are not bounded.
REQUEST_TIMEOUT = (10, 60)
MERGE_PATCH = "application/merge-patch+json"


class KubeError(PipeloraError):
    """The cluster cannot be reached or refused a request."""


class KubeNotFound(KubeError):
    """The object (or pod) asked for does not exist."""


class KubeUnreachable(KubeError):
    """No answer from the API server."""


def _in_cluster(configuration: Any) -> str | None:
    """Load the pod's service-account credentials into `configuration`; the pod's namespace."""
    from kubernetes.config.incluster_config import InClusterConfigLoader

    InClusterConfigLoader(token_filename=str(SERVICE_ACCOUNT_DIR / "token"),
                          cert_filename=str(SERVICE_ACCOUNT_DIR / "ca.crt")).load_and_set(configuration)
    try:
        return (SERVICE_ACCOUNT_DIR / "namespace").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


@dataclass
class Kube:
    """A connected API client and the namespace every call uses."""

    api: Any
    namespace: str

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def connect(cls, target: KubeTarget) -> Kube:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        configuration = client.Configuration()
        namespace = target.namespace
        # Read KUBECONFIG now: the client library captures it once, at import.
        config_file = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        try:
            config.load_kube_config(config_file=config_file, context=target.context,
                                    client_configuration=configuration)
            if namespace is None:
                contexts, active = config.list_kube_config_contexts(config_file=config_file)
                chosen = next((c for c in contexts if c["name"] == target.context), active) if target.context else active
                namespace = (chosen or {}).get("context", {}).get("namespace")
        except (ConfigException, FileNotFoundError) as exc:
            if target.context:
                raise KubeError(f"kubeconfig has no usable context '{target.context}': {exc}") from None
            try:
                pod_namespace = _in_cluster(configuration)
            except ConfigException:
                raise KubeError(
                    "no Kubernetes configuration found; set KUBECONFIG or create ~/.kube/config "
                    "(e.g. `kind export kubeconfig`), or pass --context"
                ) from None
            namespace = namespace or pod_namespace
        configuration.retries = 1
        return cls(api=client.ApiClient(configuration), namespace=namespace or "default")

    @classmethod
    def in_cluster(cls, namespace: str | None = None) -> Kube:
        """The API as the pod's service account sees it (never a kubeconfig); KubeError outside a pod."""
        from kubernetes import client
        from kubernetes.config.config_exception import ConfigException

        configuration = client.Configuration()
        try:
            pod_namespace = _in_cluster(configuration)
        except ConfigException as exc:
            raise KubeError(f"not running in a Kubernetes pod with a service account ({exc})") from None
        configuration.retries = 1
        return cls(api=client.ApiClient(configuration), namespace=namespace or pod_namespace or "default")

    # -- calls ----------------------------------------------------------------------------------
    def _raw(self, what: str, fn, *args: Any, missing_ok: bool = False, verb: str = "read",
             stream: bool = False, **kwargs: Any) -> Any:
        """Call a typed API method without its model classes: the raw urllib3 response (or None)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        if not stream:
            kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            return fn(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            if exc.status == 404:
                raise KubeNotFound(f"{what} was not found in namespace {self.namespace}") from None
            if exc.status in (401, 403):
                raise KubeError(f"the cluster refused to let you {verb} {what} ({exc.status} {exc.reason}); "
                                "check your credentials and RBAC") from None
            gerund = {"read": "reading", "patch": "patching"}.get(verb, verb)
            raise KubeError(f"{gerund} {what} failed: {exc.status} {exc.reason}") from None
        except HTTPError as exc:
            host = getattr(self.api.configuration, "host", "?")
            raise KubeUnreachable(f"cannot reach the Kubernetes API at {host} to {verb} {what}; check "
                                  f"`kubectl cluster-info` and --context ({type(exc).__name__})") from None

    def _json(self, what: str, fn, *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        resp = self._raw(what, fn, *args, missing_ok=missing_ok, **kwargs)
        return None if resp is None else json.loads(resp.data or b"null")

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    def config_map(self, name: str) -> dict | None:
        return self._json(f"ConfigMap {name}", self._core().read_namespaced_config_map, name, self.namespace,
                          missing_ok=True)

    def job(self, name: str) -> dict | None:
        from kubernetes import client

        return self._json(f"Job {name}", client.BatchV1Api(self.api).read_namespaced_job, name, self.namespace,
                          missing_ok=True)

    def mpijob(self, name: str) -> dict | None:
        from kubernetes import client

        return self._json(f"MPIJob {name}", client.CustomObjectsApi(self.api).get_namespaced_custom_object,
                          MPIJOB_GROUP, MPIJOB_VERSION, self.namespace, MPIJOB_PLURAL, name, missing_ok=True)

    def resume_mpijob(self, name: str) -> dict:
        """Clear `spec.runPolicy.suspend` with a JSON merge patch (the only change made to the MPIJob)."""
        from kubernetes import client

        return self._json(f"MPIJob {name}", client.CustomObjectsApi(self.api).patch_namespaced_custom_object,
                          MPIJOB_GROUP, MPIJOB_VERSION, self.namespace, MPIJOB_PLURAL, name,
                          {"spec": {"runPolicy": {"suspend": False}}}, verb="patch",
                          field_manager="pipelora-k8s", _content_type=MERGE_PATCH)

    def pods(self, selector: str) -> list[dict]:
        out = self._json(f"pods ({selector})", self._core().list_namespaced_pod, self.namespace,
                         label_selector=selector)
        return list((out or {}).get("items", []) or [])

    def pod_log(self, pod: str, *, container: str | None = None, follow: bool = False,
                tail_lines: int | None = None) -> PodLog:
        """The pod's log, line by line; with `follow`, until the container exits.

        The request is made here, so a pod that is gone raises KubeNotFound before any line.
        """
        resp = self._raw(f"the log of pod {pod}", self._core().read_namespaced_pod_log, pod, self.namespace,
                         container=container, follow=follow, tail_lines=tail_lines, stream=True)
        return PodLog(resp)


class PodLog(Iterable[str]):
    """An open log response, iterated as lines; `close` releases it when it is not read to the end."""

    def __init__(self, resp: Any) -> None:
        self._resp = resp

    def __iter__(self) -> Iterator[str]:
        buffer = b""
        try:
            for chunk in self._resp.stream(4096, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if buffer:
                yield buffer.decode("utf-8", "replace")
        finally:
            self.close()

    def close(self) -> None:
        self._resp.release_conn()
