"""A local HTTP server standing in for the Hugging Face Hub, for the paths `huggingface_hub` and
`datasets` request when they read a model or dataset repository.

Point a client at it with `HF_ENDPOINT=<hub.url>`. Implemented (models under `/api/models/...`
and `/<repo>/...`, datasets under `/api/datasets/...` and `/datasets/<repo>/...`):

- `GET  /api/{models,datasets}/<repo>[/revision/<rev>]`     repository info: commit sha, siblings
  (sizes, git blob ids and LFS sha256 with `?blobs=true`), gated flag
- `HEAD|GET /[datasets/]<repo>/resolve/<rev>/<path>`         a file, with `X-Repo-Commit`, `ETag`,
  `Content-Length`, and `Range` requests answered 206
- `GET  /api/{models,datasets}/<repo>/tree/<rev>[/<path>]`   a folder listing (`?recursive=true`)
- `POST /api/{models,datasets}/<repo>/paths-info/<rev>`      entries of the named paths
- `GET  /api/agent-harnesses`                                 the registry huggingface_hub's user-agent
  detection fetches (answered empty)

Errors carry the Hub's `X-Error-Code` / `X-Error-Message` headers, which is what the clients
turn into their exception classes: `RepoNotFound` (404, or 401 without a token),
`RevisionNotFound`, `EntryNotFound`, `GatedRepo` (401 without a token, 403 with one that has no
access; info stays readable, files do not, as on the Hub), and 401 "Invalid credentials in
Authorization header" for a token the server does not know.

Every request but the registry's is recorded in `requests` (method, path without the query),
which is what tests count. Anything else is
answered 404 *and* recorded in `unknown`, and printed to stderr, so a test fails clearly (assert
`hub.unknown == []`) when a library version starts asking for something new.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".parquet", ".bin", ".model", ".arrow", ".pt")
LFS_MIN_SIZE = 64 * 1024
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
AGENT_REGISTRY = "/api/agent-harnesses"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(name: str, data: bytes) -> bool:
    return name.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE


@dataclass
class FakeRepo:
    """One repository: its commits (sha → files), branches and tags, and who may read its files."""

    repo_type: str  # model | dataset
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag → commit sha
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # tokens that accepted a gated repo's terms
    withheld: set[str] = field(default_factory=set)  # listed, but `resolve` answers 404 (a broken upload)

    def commit(self, files: dict[str, bytes], *, branch: str = "main") -> str:
        digest = hashlib.sha1(f"{self.repo_type}/{self.repo_id}/{len(self.commits)}".encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """The server and its repositories. `tokens`: the tokens it accepts (any other is refused)."""

    def __init__(self, *, tokens: Iterable[str] = ()) -> None:
        self.tokens = set(tokens)
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[str] = []
        self.telemetry = 0  # fetches of the agent registry: not part of reading a repository
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- repositories ------------------------------------------------------------------------
    def add_repo(self, repo_type: str, repo_id: str, files: dict[str, bytes], *, gated: bool = False,
                 granted: Iterable[str] = ()) -> FakeRepo:
        repo = FakeRepo(repo_type, repo_id, gated=gated, granted=set(granted))
        repo.commit(files)
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def repo(self, repo_type: str, repo_id: str) -> FakeRepo:
        return self.repos[(repo_type, repo_id)]

    # -- what was asked ----------------------------------------------------------------------
    def count(self, method: str | None = None, contains: str = "") -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if (method is None or m == method) and contains in p)

    def file_downloads(self, repo_id: str) -> list[str]:
        """Paths of the files of `repo_id` whose bytes were sent (GETs of `resolve`)."""
        marker = f"/{repo_id}/resolve/"
        with self._lock:
            return [p.split(marker, 1)[1].split("/", 1)[1] for m, p in self.requests if m == "GET" and marker in p]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- server ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Refusal(Exception):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(/.*)?)?$")
_RESOLVE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    # -- dispatch ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = parse_qs(split.query)
        body = b""
        if method == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.hub._lock:
            if path == AGENT_REGISTRY:
                self.hub.telemetry += 1
            else:
                self.hub.requests.append((method, path))
        try:
            self._check_token()
            api = _API.match(split.path)
            resolve = _RESOLVE.match(split.path)
            if api and method == "GET" and api.group(3) in (None, "revision") and not api.group(5):
                self._info(api.group(1)[:-1], unquote(api.group(2)), unquote(api.group(4) or "main"), query)
            elif api and method == "GET" and api.group(3) == "tree":
                self._tree(api.group(1)[:-1], unquote(api.group(2)), unquote(api.group(4)),
                           unquote(api.group(5) or "").strip("/"), query)
            elif api and method == "POST" and api.group(3) == "paths-info" and not api.group(5):
                self._paths_info(api.group(1)[:-1], unquote(api.group(2)), unquote(api.group(4)), body)
            elif path == AGENT_REGISTRY and method == "GET":
                # huggingface_hub's user-agent detection fetches this registry once a day: an empty one
                self._send(200, b'{"standardEnvVars": [], "harnesses": {}}', {"Content-Type": "application/json"})
            elif resolve and method in ("GET", "HEAD"):
                kind = "dataset" if resolve.group(1) else "model"
                self._resolve(kind, unquote(resolve.group(2)), unquote(resolve.group(3)),
                              unquote(resolve.group(4)), head=method == "HEAD")
            else:
                line = f"{method} {self.path}"
                with self.hub._lock:
                    self.hub.unknown.append(line)
                print(f"fake hub: UNHANDLED REQUEST {line}", file=sys.stderr, flush=True)
                self._send(404, b'{"error": "the fake hub does not implement this path"}')
        except _Refusal as refusal:
            headers = {"X-Error-Message": refusal.message}
            if refusal.code:
                headers["X-Error-Code"] = refusal.code
            self._send(refusal.status, json.dumps({"error": refusal.message}).encode(), headers,
                       head=method == "HEAD")

    # -- auth and lookup ---------------------------------------------------------------------
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _check_token(self) -> None:
        token = self._token()
        if token is not None and token not in self.hub.tokens:
            raise _Refusal(401, None, INVALID_CREDENTIALS)

    def _repo(self, kind: str, repo_id: str) -> FakeRepo:
        repo = self.hub.repos.get((kind, repo_id))
        if repo is None:
            raise _Refusal(401 if self._token() is None else 404, "RepoNotFound", "Repository not found")
        return repo

    def _files(self, repo: FakeRepo, revision: str) -> tuple[str, dict[str, bytes]]:
        sha = repo.resolve(revision)
        if sha is None:
            raise _Refusal(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, repo.commits[sha]

    def _check_gate(self, repo: FakeRepo) -> None:
        if not repo.gated:
            return
        token = self._token()
        if token is None:
            raise _Refusal(401, "GatedRepo", f"Access to {repo.repo_type} {repo.repo_id} is restricted. "
                                             "You must have access to it and be authenticated to access it.")
        if token not in repo.granted:
            raise _Refusal(403, "GatedRepo", f"Access to {repo.repo_type} {repo.repo_id} is restricted and you "
                                             "are not in the authorized list.")

    # -- endpoints ---------------------------------------------------------------------------
    def _info(self, kind: str, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(kind, repo_id)
        sha, files = self._files(repo, revision)
        blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
        siblings = []
        for name in sorted(files):
            sibling: dict[str, object] = {"rfilename": name}
            if blobs:
                data = files[name]
                sibling.update(size=len(data), blobId=git_blob_id(data))
                if is_lfs(name, data):
                    sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
        }
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _entries(self, files: dict[str, bytes], names: Iterable[str]) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for name in names:
            if name in files:
                data = files[name]
                entry: dict[str, object] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": name}
                if is_lfs(name, data):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                out.append(entry)
            elif any(f.startswith(name + "/") for f in files):
                out.append({"type": "directory", "oid": hashlib.sha1(name.encode()).hexdigest(), "size": 0,
                            "path": name})
        return out

    def _tree(self, kind: str, repo_id: str, revision: str, folder: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(kind, repo_id)
        _, files = self._files(repo, revision)
        recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
        prefix = folder + "/" if folder else ""
        inside = [f for f in files if f.startswith(prefix)]
        if folder and not inside:
            raise _Refusal(404, "EntryNotFound", f"{folder} does not exist on {revision}")
        names: set[str] = set()
        for f in inside:
            rest = f[len(prefix):].split("/")
            if recursive:
                names.update(prefix + "/".join(rest[: i + 1]) for i in range(len(rest)))
            else:
                names.add(prefix + rest[0])
        self._send(200, json.dumps(self._entries(files, sorted(names))).encode(), {"Content-Type": "application/json"})

    def _paths_info(self, kind: str, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(kind, repo_id)
        _, files = self._files(repo, revision)
        form = parse_qs(body.decode())
        paths = [p.strip("/") for p in form.get("paths", [])]
        self._send(200, json.dumps(self._entries(files, paths)).encode(), {"Content-Type": "application/json"})

    def _resolve(self, kind: str, repo_id: str, revision: str, name: str, *, head: bool) -> None:
        repo = self._repo(kind, repo_id)
        sha, files = self._files(repo, revision)
        self._check_gate(repo)
        if name not in files or name in repo.withheld:
            raise _Refusal(404, "EntryNotFound", f"{name} does not exist on {revision}")
        data = files[name]
        etag = hashlib.sha256(data).hexdigest() if is_lfs(name, data) else git_blob_id(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        status, part = 200, data
        ranged = re.match(r"^bytes=(\d*)-(\d*)$", self.headers.get("Range") or "")
        if ranged and data:
            first_s, last_s = ranged.groups()
            if first_s:
                first, last = int(first_s), int(last_s) if last_s else len(data) - 1
            else:
                first, last = max(len(data) - int(last_s), 0), len(data) - 1
            last = min(last, len(data) - 1)
            if first >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
                return
            status, part = 206, data[first:last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        self._send(status, part, headers, head=head)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, *, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
