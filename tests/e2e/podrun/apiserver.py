"""The few REST paths of the Kubernetes API the release's own pods call, over HTTPS, with RBAC.

The dataprep Job's `release` container resumes the suspended MPIJob through the API with its
service account, and the launcher's `wait-for-data` asks it whether dataprep failed. This server
answers those calls from the cluster's object store, the way kube-apiserver would: TLS with a CA
the pods find in their service-account volume, a bearer token per service account, and each
request authorized by the rendered Role and RoleBinding (403 otherwise). Served: get of any stored
object, list of pods by label selector, JSON merge patch of an MPIJob, and a pod's log.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

# (API group, plural) → kind, for the objects a path can name.
RESOURCES = {
    ("", "pods"): "Pod",
    ("", "configmaps"): "ConfigMap",
    ("", "secrets"): "Secret",
    ("", "services"): "Service",
    ("", "serviceaccounts"): "ServiceAccount",
    ("batch", "jobs"): "Job",
    ("kubeflow.org", "mpijobs"): "MPIJob",
}


@dataclass(frozen=True)
class Request:
    verb: str  # get, list, patch
    group: str
    resource: str
    namespace: str
    name: str | None
    subresource: str | None
    query: dict[str, list[str]]


def parse_path(method: str, url: str) -> Request | None:
    """`/api/v1/namespaces/ns/pods/x/log` and `/apis/g/v/namespaces/ns/r[/name]` → a Request."""
    parsed = urlparse(url)
    parts = [p for p in parsed.path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if len(rest) < 3 or rest[0] != "namespaces":
        return None
    namespace, resource = rest[1], rest[2]
    name = rest[3] if len(rest) > 3 else None
    sub = rest[4] if len(rest) > 4 else None
    verb = {"GET": "get" if name else "list", "PATCH": "patch"}.get(method, method.lower())
    return Request(verb, group, resource, namespace, name, sub, parse_qs(parsed.query))


def rule_allows(rule: dict[str, Any], req: Request) -> bool:
    def match(values: list[str] | None, value: str) -> bool:
        return bool(values) and ("*" in values or value in values)

    resource = req.resource + (f"/{req.subresource}" if req.subresource else "")
    if not match(rule.get("apiGroups"), req.group) or not match(rule.get("resources"), resource):
        return False
    if not match(rule.get("verbs"), req.verb):
        return False
    names = rule.get("resourceNames") or []
    return not names or (req.name is not None and req.name in names)


def rbac_allows(objects: list[dict[str, Any]], namespace: str, service_account: str, req: Request) -> bool:
    """Does a RoleBinding in `namespace` bind this service account to a Role allowing `req`?"""
    roles = {o["metadata"]["name"]: o for o in objects if o.get("kind") == "Role"}
    for binding in objects:
        if binding.get("kind") != "RoleBinding":
            continue
        subjects = binding.get("subjects") or []
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == service_account
                   and (s.get("namespace") or namespace) == namespace for s in subjects):
            continue
        ref = binding.get("roleRef") or {}
        role = roles.get(ref.get("name")) if ref.get("kind") == "Role" else None
        if role and any(rule_allows(rule, req) for rule in role.get("rules") or []):
            return True
    return False


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif labels.get(term) is None:
            return False
    return True


class Certificates:
    """A CA and a serving certificate for `host` (an IP) and the in-cluster names of the API."""

    def __init__(self, host: str, folder: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "podrun-ca")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False,
                                           encipher_only=False, decipher_only=False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(host))]
        names += [x509.DNSName(n) for n in ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                            "kubernetes.default.svc.cluster.local")]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        self.ca_pem = ca.public_bytes(pem)
        folder.mkdir(parents=True, exist_ok=True)
        self.cert_file = folder / "apiserver.crt"
        self.key_file = folder / "apiserver.key"
        self.cert_file.write_bytes(cert.public_bytes(pem) + self.ca_pem)
        self.key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
        self.key_file.chmod(0o600)


class ApiServer:
    """kube-apiserver for one namespace's objects, on `host:<free port>` over TLS."""

    def __init__(self, *, host: str, namespace: str, objects: Callable[[], list[dict[str, Any]]],
                 patch: Callable[[str, str, dict[str, Any]], dict[str, Any] | None],
                 pod_log: Callable[[str, str | None], str | None], workdir: Path | None = None) -> None:
        self.host = host
        self.namespace = namespace
        self.objects = objects
        self.patch = patch
        self.pod_log = pod_log
        self.tokens: dict[str, str] = {}  # token → service account ("" for the cluster admin)
        self.admin_token = secrets.token_urlsafe(24)
        self.tokens[self.admin_token] = ""
        self.audit: list[tuple[str, str, str, int]] = []  # (who, verb, path, status)
        self._lock = threading.Lock()
        folder = workdir or Path(tempfile.mkdtemp(prefix="podrun-api-"))
        self.certs = Certificates(host, folder)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.certs.cert_file), str(self.certs.key_file))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self, "GET")

            def do_PATCH(self) -> None:
                server._handle(self, "PATCH")

            def do_POST(self) -> None:
                server._handle(self, "POST")

            def do_PUT(self) -> None:
                server._handle(self, "PUT")

            def do_DELETE(self) -> None:
                server._handle(self, "DELETE")

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="podrun-apiserver", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def token_for(self, service_account: str) -> str:
        with self._lock:
            for token, who in self.tokens.items():
                if who == service_account:
                    return token
            token = secrets.token_urlsafe(24)
            self.tokens[token] = service_account
            return token

    def service_env(self) -> dict[str, str]:
        """The variables the kubelet gives every container for the `kubernetes` Service."""
        return {
            "KUBERNETES_SERVICE_HOST": self.host,
            "KUBERNETES_SERVICE_PORT": str(self.port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.port),
            "KUBERNETES_PORT": f"tcp://{self.host}:{self.port}",
            f"KUBERNETES_PORT_{self.port}_TCP": f"tcp://{self.host}:{self.port}",
            f"KUBERNETES_PORT_{self.port}_TCP_PROTO": "tcp",
            f"KUBERNETES_PORT_{self.port}_TCP_PORT": str(self.port),
            f"KUBERNETES_PORT_{self.port}_TCP_ADDR": self.host,
        }

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for the cluster admin (what `pipelora-k8s status/logs` on a laptop would use)."""
        ca = path.with_suffix(".ca.crt")
        ca.write_bytes(self.certs.ca_pem)
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "podrun",
            "clusters": [{"name": "podrun", "cluster": {"server": self.url, "certificate-authority": str(ca)}}],
            "users": [{"name": "admin", "user": {"token": self.admin_token}}],
            "contexts": [{"name": "podrun", "context": {"cluster": "podrun", "user": "admin",
                                                         "namespace": self.namespace}}],
        }
        path.write_text(json.dumps(config))
        return path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- requests ------------------------------------------------------------------------------
    def _reply(self, h: BaseHTTPRequestHandler, code: int, body: Any, *, who: str, verb: str,
               content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        with self._lock:
            self.audit.append((who, verb, h.path, code))

    def _status(self, code: int, reason: str, message: str) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                "reason": reason, "code": code}

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        auth = h.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        who = self.tokens.get(token)
        if who is None:
            self._reply(h, 401, self._status(401, "Unauthorized", "Unauthorized"), who="?", verb=method)
            return
        req = parse_path(method, h.path)
        user = "admin" if who == "" else f"system:serviceaccount:{self.namespace}:{who}"
        if req is None:
            self._reply(h, 404, self._status(404, "NotFound", f"the server could not find {h.path}"),
                        who=user, verb=method)
            return
        if who != "" and not rbac_allows(self.objects(), self.namespace, who, req):
            what = req.resource + (f"/{req.subresource}" if req.subresource else "")
            msg = (f'{what} "{req.name or ""}" is forbidden: User "{user}" cannot {req.verb} resource "{what}" '
                   f'in API group "{req.group}" in the namespace "{req.namespace}"')
            self._reply(h, 403, self._status(403, "Forbidden", msg), who=user, verb=req.verb)
            return
        kind = RESOURCES.get((req.group, req.resource))
        if kind is None or req.namespace != self.namespace:
            self._reply(h, 404, self._status(404, "NotFound", f"the server could not find {h.path}"),
                        who=user, verb=req.verb)
            return
        if req.verb == "list":
            selector = (req.query.get("labelSelector") or [""])[0]
            items = [o for o in self.objects() if o.get("kind") == kind
                     and selector_matches(selector, (o.get("metadata") or {}).get("labels") or {})]
            self._reply(h, 200, {"kind": f"{kind}List", "apiVersion": "v1", "items": items},
                        who=user, verb=req.verb)
            return
        found = next((o for o in self.objects() if o.get("kind") == kind and o["metadata"]["name"] == req.name), None)
        if found is None:
            self._reply(h, 404, self._status(404, "NotFound", f'{req.resource} "{req.name}" not found'),
                        who=user, verb=req.verb)
            return
        if req.verb == "get" and req.subresource == "log" and kind == "Pod":
            container = (req.query.get("container") or [None])[0]
            text = self.pod_log(str(req.name), container)
            self._reply(h, 200, (text or "").encode(), who=user, verb=req.verb, content_type="text/plain")
            return
        if req.verb == "get" and req.subresource is None:
            self._reply(h, 200, found, who=user, verb=req.verb)
            return
        if req.verb == "patch" and kind == "MPIJob" and req.subresource is None:
            ctype = h.headers.get("Content-Type", "")
            if "merge-patch" not in ctype:
                self._reply(h, 415, self._status(415, "UnsupportedMediaType", f"{ctype} is not served here"),
                            who=user, verb=req.verb)
                return
            updated = self.patch(kind, str(req.name), json.loads(body or b"{}"))
            self._reply(h, 200, updated, who=user, verb=req.verb)
            return
        self._reply(h, 405, self._status(405, "MethodNotAllowed", f"{req.verb} is not served here"),
                    who=user, verb=req.verb)
