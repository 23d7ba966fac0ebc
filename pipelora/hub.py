"""Models and datasets named on the Hugging Face Hub (`hf://`), pinned to a commit and mirrored once.

Grammar (what `model.uri` and `dataset.uri` accept besides storage URIs):

    model.uri:    hf://<org>/<name>[@<revision>]
    dataset.uri:  hf://datasets/<org>/<name>[@<revision>][#<split>]

`<revision>` is a branch, a tag or a commit sha (default `main`; a branch may contain `/`, as in
`refs/pr/12`); `<split>` defaults to `train`. The revision is resolved to its commit sha when
dataprep runs, and that sha is what the run uses from then on: a branch that moves later does not
change a prepared run.

Only the dataprep step talks to the Hub. It mirrors the model (config.json, the safetensors
weights and their index, the tokenizer files; never other weight formats) into
`<storage.uri>/_hub/models/<org>/<name>/<sha>/`, file by file (one file on local disk at a time),
and commits the folder with a marker naming each file's size and sha256. A committed mirror is
never downloaded again, by any run sharing the storage root. The data manifest records the sha, so
every rank finds the mirror in storage and reads it with ranged reads like any model folder; the
trainer never contacts the Hub. The dataset is read with `datasets` in streaming mode.

The token comes from `HF_TOKEN` (the chart fills it from `cluster.hf_token_secret`), the endpoint
from `HF_ENDPOINT` (default https://huggingface.co); both are read when a call is made.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelora.errors import PipeloraError
from pipelora.layout import hub_model_marker, hub_model_uri
from pipelora.storage import ObjectInfo, Storage, StorageError, join_uri

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from pipelora.config import JobSpec

SCHEME = "hf://"
DATASETS_PREFIX = "datasets/"
DEFAULT_REVISION = "main"
DEFAULT_SPLIT = "train"
DEFAULT_ENDPOINT = "https://huggingface.co"

# The files of a model repository the trainer and dataprep read (the Hugging Face layout).
CONFIG_FILE = "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

# Hub repository names: letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 characters.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REVISION = r"[^\s@#]+"
_SPLIT = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_MODEL = re.compile(rf"^hf://(?P<org>{_PART})/(?P<name>{_PART})(?:@(?P<revision>{_REVISION}))?$")
_DATASET = re.compile(
    rf"^hf://datasets/(?P<org>{_PART})/(?P<name>{_PART})(?:@(?P<revision>{_REVISION}))?(?:#(?P<split>{_SPLIT}))?$"
)
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
MODEL_GRAMMAR = "hf://<org>/<name>[@<revision>]"
DATASET_GRAMMAR = "hf://datasets/<org>/<name>[@<revision>][#<split>]"

# Names an exception's type (or a base) has when it is the network, not the Hub, that failed.
_NETWORK_ERRORS = frozenset({"TransportError", "NetworkError", "ConnectError", "TimeoutException",
                             "ConnectionError", "TimeoutError", "ProxyError", "gaierror"})


class HubError(PipeloraError):
    """A Hub repository that cannot be read as asked: one sentence with which repo and the fix."""


@dataclass(frozen=True)
class HubRef:
    """A parsed `hf://` URI: which repository, at which revision (and for a dataset, which split)."""

    kind: str  # model | dataset
    org: str
    name: str
    revision: str = DEFAULT_REVISION
    split: str | None = None

    @property
    def repo_id(self) -> str:
        return f"{self.org}/{self.name}"

    @property
    def repo_type(self) -> str:
        return self.kind

    @property
    def is_commit(self) -> bool:
        """The revision is already a full commit sha (nothing to resolve)."""
        return bool(_COMMIT_SHA.match(self.revision))

    @property
    def page(self) -> str:
        """The repository's page on the Hub (where gated terms are accepted)."""
        prefix = DATASETS_PREFIX if self.kind == "dataset" else ""
        return f"{endpoint()}/{prefix}{self.repo_id}"

    def __str__(self) -> str:
        prefix = DATASETS_PREFIX if self.kind == "dataset" else ""
        at = "" if self.revision == DEFAULT_REVISION else f"@{self.revision}"
        split = f"#{self.split}" if self.kind == "dataset" and self.split != DEFAULT_SPLIT else ""
        return f"{SCHEME}{prefix}{self.repo_id}{at}{split}"


def is_hub_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


def _bad_part(value: str) -> bool:
    return "--" in value or ".." in value


def parse_hub_uri(uri: str, *, field: str, kind: str) -> HubRef:
    """Parse `uri` as the `kind` (model | dataset) a spec field names; ValueError is one sentence."""
    rest = uri[len(SCHEME):]
    if kind == "model":
        if rest.startswith(DATASETS_PREFIX):
            raise ValueError(f"{field} '{uri}' names a dataset repository; a model is written {MODEL_GRAMMAR}")
        if rest.startswith("spaces/"):
            raise ValueError(f"{field} '{uri}' names a Space; a model is written {MODEL_GRAMMAR}")
        match = _MODEL.match(uri)
        grammar = MODEL_GRAMMAR
    else:
        if not rest.startswith(DATASETS_PREFIX):
            raise ValueError(
                f"{field} '{uri}' names a model repository; a dataset is written {DATASET_GRAMMAR} "
                f"(e.g. hf://datasets/{rest.split('@')[0].split('#')[0] or 'tatsu-lab/alpaca'})"
            )
        match = _DATASET.match(uri)
        grammar = DATASET_GRAMMAR
    if match is None or _bad_part(match["org"]) or _bad_part(match["name"]):
        example = "hf://mistralai/Mistral-7B-v0.1" if kind == "model" else "hf://datasets/tatsu-lab/alpaca#train"
        raise ValueError(
            f"{field} '{uri}' is not a Hugging Face Hub {kind} URI; write {grammar} (e.g. {example}): names use "
            "letters, digits, '-', '_' and '.', a revision is a branch, tag or commit sha"
        )
    split = (match.groupdict().get("split") or DEFAULT_SPLIT) if kind == "dataset" else None
    return HubRef(kind, match["org"], match["name"], match["revision"] or DEFAULT_REVISION, split)


def model_ref(uri: str) -> HubRef:
    return parse_hub_uri(uri, field="model.uri", kind="model")


def dataset_ref(uri: str) -> HubRef:
    return parse_hub_uri(uri, field="dataset.uri", kind="dataset")


def base_model_name(uri: str) -> str:
    """What PEFT's `base_model_name_or_path` should say: `<org>/<name>` for an hf:// model, else the URI."""
    return model_ref(uri).repo_id if is_hub_uri(uri) else uri


# -- talking to the Hub --------------------------------------------------------------------------


def endpoint() -> str:
    """The Hub's address now (`HF_ENDPOINT`), not when huggingface_hub was first imported."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    """`HF_TOKEN` when set; else None, and huggingface_hub falls back to a saved login."""
    return os.environ.get("HF_TOKEN") or None


def api() -> HfApi:
    from huggingface_hub import HfApi

    from pipelora import __version__

    return HfApi(endpoint=endpoint(), token=token(), library_name="pipelora-k8s", library_version=__version__)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_network(exc: BaseException) -> bool:
    return any(cls.__name__ in _NETWORK_ERRORS for cls in type(exc).__mro__)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def explain(exc: BaseException, ref: HubRef, *, field: str) -> HubError | None:
    """The one sentence for a failure to read `ref` from the Hub, or None when it is not a Hub failure.

    Walks the exception's causes: `datasets` wraps the Hub's errors in its own.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{field} {ref}"
    for error in _chain(exc):
        if isinstance(error, GatedRepoError):
            if token() is None:
                return HubError(
                    f"{where}: {ref.repo_id} is gated on the Hugging Face Hub and no token is set; accept its terms "
                    f"at {ref.page} and put that account's token in HF_TOKEN (on a cluster: cluster.hf_token_secret)"
                )
            return HubError(
                f"{where}: {ref.repo_id} is gated on the Hugging Face Hub and the account of the token in HF_TOKEN "
                f"has not been granted access; accept its terms at {ref.page} with that account (or use the token "
                "of one that has), then run again"
            )
        if isinstance(error, RevisionNotFoundError):
            return HubError(
                f"{where}: {ref.repo_id} has no branch, tag or commit '{ref.revision}' on the Hugging Face Hub; "
                f"use one that exists (see {ref.page}/tree/main) or leave out @<revision> for main"
            )
        if isinstance(error, RepositoryNotFoundError):
            hint = ("set HF_TOKEN (on a cluster: cluster.hf_token_secret) to a token that can read it" if token() is None
                    else "check that the token in HF_TOKEN can read it")
            return HubError(
                f"{where}: the Hugging Face Hub at {endpoint()} has no {ref.kind} repository {ref.repo_id} that "
                f"can be read; check the name ({MODEL_GRAMMAR if ref.kind == 'model' else DATASET_GRAMMAR}), "
                f"or if it is private, {hint}"
            )
        if isinstance(error, RemoteEntryNotFoundError):
            return HubError(
                f"{where}: a file the repository lists is missing on the Hub ({_one_line(error)}); "
                "pin another revision with @<revision>"
            )
        if isinstance(error, HfHubHTTPError) and error.response is not None and error.response.status_code == 401:
            return HubError(
                f"{where}: the Hugging Face Hub refused the token in HF_TOKEN (401: invalid credentials); replace "
                "it with a valid token (on a cluster: the Secret named by cluster.hf_token_secret), or unset it "
                "for public repositories"
            )
        if isinstance(error, OfflineModeIsEnabled):
            return HubError(
                f"{where}: HF_HUB_OFFLINE is set, so the Hugging Face Hub cannot be read; unset it for the "
                "dataprep step (the other steps read storage only)"
            )
        if isinstance(error, HfHubHTTPError):
            status = error.response.status_code if error.response is not None else "an error"
            return HubError(
                f"{where}: the Hugging Face Hub at {endpoint()} answered {status} "
                f"({_one_line(error)}); run again later, or check the Hub's status page"
            )
        if _is_network(error):
            return HubError(
                f"{where}: cannot reach the Hugging Face Hub at {endpoint()} ({type(error).__name__}: "
                f"{_one_line(error)}); check the network of the dataprep pod (egress, proxy variables), or set "
                "HF_ENDPOINT to a reachable Hub mirror"
            )
    return None


def hub_call(ref: HubRef, field: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, with any Hub or network failure turned into its one sentence."""
    try:
        return fn(*args, **kwargs)
    except PipeloraError:
        raise
    except Exception as exc:
        error = explain(exc, ref, field=field)
        if error is None:
            raise
        raise error from None


def resolve_revision(ref: HubRef, *, field: str) -> str:
    """The commit sha `ref`'s revision names now (one small Hub call)."""
    client = api()
    get = client.model_info if ref.kind == "model" else client.dataset_info
    info = hub_call(ref, field, get, ref.repo_id, revision=ref.revision)
    return str(info.sha)


# -- the model mirror ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMirror:
    """A model pinned to a commit and committed in storage: what the manifest records about it."""

    ref: HubRef
    sha: str
    uri: str  # the mirror folder in storage
    marker: str
    files: int
    bytes: int
    downloaded: int  # files fetched from the Hub this time: 0 when an existing mirror was reused

    def as_manifest(self, source_uri: str) -> dict[str, Any]:
        return {"uri": source_uri, "repo": self.ref.repo_id, "revision": self.ref.revision, "sha": self.sha,
                "mirror": self.uri}


def mirror_location(storage_uri: str, ref: HubRef, sha: str) -> tuple[str, str]:
    """(folder, marker) of `ref`'s mirror at commit `sha` in the storage root."""
    return (hub_model_uri(storage_uri, ref.org, ref.name, sha),
            hub_model_marker(storage_uri, ref.org, ref.name, sha))


def _intact(storage: Storage, folder: str, marker: dict[str, Any]) -> bool:
    """Every file the marker names is there with its size (cheap: no bytes are read)."""
    for name, meta in (marker.get("files") or {}).items():
        found = storage.stat(join_uri(folder, name))
        if found is None or found.size != int(meta.get("size", -1)):
            return False
    return bool(marker.get("files"))


def _committed_mirror(storage: Storage, storage_uri: str, ref: HubRef, sha: str) -> ModelMirror | None:
    folder, marker_uri = mirror_location(storage_uri, ref, sha)
    marker = storage.read_marker(marker_uri)
    if marker is None or not _intact(storage, folder, marker):
        return None
    files = marker.get("files") or {}
    return ModelMirror(ref, sha, folder, marker_uri, len(files), sum(int(m["size"]) for m in files.values()), 0)


def _wanted_files(ref: HubRef, sha: str, listed: dict[str, Any], index: dict[str, Any] | None) -> list[str]:
    """The repository's files the mirror holds: config, the safetensors weights the loader reads
    (the index's shards, or model.safetensors alone), generation config and tokenizer files."""
    where = f"model.uri {ref} (commit {sha[:12]})"
    if CONFIG_FILE not in listed:
        raise HubError(f"{where} has no {CONFIG_FILE}, so it is not a transformers model; point model.uri at one")
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HubError(f"{where}: {WEIGHTS_INDEX} has no weight_map; pin a revision whose index is whole")
        shards = sorted({str(v) for v in weight_map.values()})
        missing = [s for s in shards if s not in listed]
        if missing:
            raise HubError(f"{where}: {WEIGHTS_INDEX} names {', '.join(missing[:3])}, which the repository lacks; "
                           "pin a revision whose weights are complete")
        weights = [WEIGHTS_INDEX, *shards]
    elif SINGLE_WEIGHTS in listed:
        weights = [SINGLE_WEIGHTS]
    else:
        others = sorted(n for n in listed if n.endswith((".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")))
        found = f" (it has {', '.join(others[:3])})" if others else ""
        raise HubError(
            f"{where} has no safetensors weights ({SINGLE_WEIGHTS} or {WEIGHTS_INDEX}){found}; only safetensors "
            "are read: pin a revision that has them (conversions often sit on a refs/pr/<n> branch)"
        )
    extras = [n for n in (GENERATION_CONFIG, *TOKENIZER_FILES) if n in listed]
    return [CONFIG_FILE, *extras, *weights]


def mirror_model(
    ref: HubRef,
    *,
    storage: Storage,
    storage_uri: str,
    scratch: Path,
    log: Callable[[str], None] | None = None,
) -> ModelMirror:
    """The committed mirror of `ref` in `storage_uri`'s `_hub` folder, downloading it if it is not there.

    Files are fetched one at a time into `scratch`, uploaded, checked against the Hub's sha256
    (LFS files) and deleted, so local disk holds at most the largest file. A file already in the
    folder with the right size and sha256 (a mirror interrupted before its marker) is kept. The
    marker goes out last: a folder without it is never used.
    """
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    field = "model.uri"
    if ref.is_commit:  # a pinned commit whose mirror exists needs no Hub at all
        found = _committed_mirror(storage, storage_uri, ref, ref.revision)
        if found is not None:
            return found
    client = api()
    info = hub_call(ref, field, client.model_info, ref.repo_id, revision=ref.revision, files_metadata=True)
    sha = str(info.sha)
    found = _committed_mirror(storage, storage_uri, ref, sha)
    if found is not None:
        return found
    listed = {s.rfilename: s for s in (info.siblings or []) if "/" not in s.rfilename}
    folder, marker_uri = mirror_location(storage_uri, ref, sha)
    scratch.mkdir(parents=True, exist_ok=True)

    def fetch(name: str) -> Path:
        with _quiet_progress_bars():
            path = hub_call(ref, field, client.hf_hub_download, ref.repo_id, name, revision=sha,
                            local_dir=str(scratch))
        return Path(path)

    index: dict[str, Any] | None = None
    index_path: Path | None = None
    if WEIGHTS_INDEX in listed:
        index_path = fetch(WEIGHTS_INDEX)
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HubError(f"model.uri {ref}: {WEIGHTS_INDEX} at commit {sha[:12]} is not valid JSON ({exc}); "
                           "pin another revision") from None
    names = _wanted_files(ref, sha, listed, index)
    total = sum(int(listed[n].size or 0) for n in names)
    say(f"dataprep: mirroring {ref} (commit {sha[:12]}, {len(names)} files, {total / 2**20:.1f} MiB) into {folder}")
    objects: list[ObjectInfo] = []
    downloaded = 0
    for number, name in enumerate(names, 1):
        sibling = listed[name]
        expected_sha = sibling.lfs.sha256 if sibling.lfs is not None else None
        uri = join_uri(folder, name)
        kept = _reusable(storage, uri, size=sibling.size, sha256=expected_sha)
        if kept is not None:
            objects.append(kept)
            continue
        path = index_path if name == WEIGHTS_INDEX and index_path is not None else fetch(name)
        downloaded += 1
        try:
            obj = storage.upload_file(path, uri)
        finally:
            path.unlink(missing_ok=True)
        if expected_sha and obj.sha256 != expected_sha:
            raise HubError(f"model.uri {ref}: {name} arrived with a sha256 other than the Hub's (commit {sha[:12]}); "
                           "the download was corrupted: run dataprep again")
        objects.append(obj)
        say(f"dataprep: mirrored {name} ({number}/{len(names)}, {obj.size / 2**20:.1f} MiB)")
    extra = {"source": str(ref), "repo": ref.repo_id, "revision": ref.revision, "sha": sha}
    try:
        storage.commit(marker_uri, objects, extra)
    except StorageError as exc:
        raise HubError(f"model.uri {ref}: cannot commit the mirror at {folder}: {exc}") from None
    return ModelMirror(ref, sha, folder, marker_uri, len(objects), sum(o.size for o in objects), downloaded)


def _reusable(storage: Storage, uri: str, *, size: int | None, sha256: str | None) -> ObjectInfo | None:
    """An object left by an interrupted mirror that is already right (size, and sha256 where the Hub has it)."""
    if size is None or sha256 is None:
        return None
    found = storage.stat(uri)
    if found is None or found.size != size:
        return None
    checked = storage.checksum(uri)
    return checked if checked.sha256 == sha256 else None


def _quiet_progress_bars() -> contextlib.AbstractContextManager[Any]:
    """Outside a terminal (a pod's log) the Hub's progress bars are noise; the mirror logs one line per file."""
    if sys.stderr.isatty():
        return contextlib.nullcontext()
    from huggingface_hub.utils.tqdm import disable_progress_bars

    return disable_progress_bars()


# -- what the other steps read -----------------------------------------------------------------------


def model_storage_uri(spec: JobSpec) -> str:
    """Where the model's files are in storage: `model.uri` itself, or for an hf:// model the committed
    mirror that dataprep recorded in the run's data manifest (read from storage; never the Hub)."""
    uri = spec.model.uri
    if not is_hub_uri(uri):
        return uri
    from pipelora.storage import storage_for

    ref = model_ref(uri)
    layout = spec.layout
    storage = storage_for(spec, spec.storage.uri)
    manifest = storage.read_marker(layout.manifest)
    if manifest is None:
        raise HubError(
            f"model.uri is {uri}, which the dataprep step mirrors into storage, and there is no prepared data at "
            f"{layout.data} yet: run dataprep first (pipelora-k8s dataprep --config ...)"
        )
    found_record = manifest.get("model")
    record: dict[str, Any] = found_record if isinstance(found_record, dict) else {}
    sha = str(record.get("sha") or "")
    if record.get("uri") != uri or not _COMMIT_SHA.match(sha):
        prepared = record.get("uri") or "a model given by path"
        raise HubError(
            f"the data at {layout.data} was prepared for {prepared}, not model.uri {uri}; run dataprep again "
            "with --overwrite so the data and the model match"
        )
    found = _committed_mirror(storage, spec.storage.uri, ref, sha)
    if found is None:
        folder, _ = mirror_location(spec.storage.uri, ref, sha)
        raise HubError(
            f"the mirror of {uri} at commit {sha[:12]} ({folder}) is missing or incomplete; run dataprep again "
            "to mirror it (it downloads only what is missing)"
        )
    return found.uri


def read_model_config(spec: JobSpec) -> Any:
    """The hf:// model's config.json: from the committed mirror when this run has one, else from the Hub
    (for checks on a workstation before anything ran)."""
    from pipelora.storage import storage_for

    ref = model_ref(spec.model.uri)
    try:
        folder = model_storage_uri(spec)
    except HubError:
        folder = None
    if folder is not None:
        return storage_for(spec, folder).read_json(join_uri(folder, CONFIG_FILE))
    client = api()
    sha = resolve_revision(ref, field="model.uri")  # one quick call that fails fast (downloads retry offline)
    with tempfile.TemporaryDirectory(prefix="pipelora-hub-") as tmp, _quiet_progress_bars():
        path = hub_call(ref, "model.uri", client.hf_hub_download, ref.repo_id, CONFIG_FILE, revision=sha,
                        local_dir=tmp)
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HubError(f"model.uri {ref}: {CONFIG_FILE} is not valid JSON ({exc}); pin another revision") from None
