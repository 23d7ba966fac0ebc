"""The hf:// inputs of dataprep: a dataset streamed from the Hub, and the model mirrored into storage.

The dataset is read through `datasets` in streaming mode, so it never has to fit on the pod's
disk: records arrive as they are read, pinned to the commit the revision named when dataprep
started. The model is mirrored once into the storage root (`pipelora.hub`); dataprep reads its
tokenizer from that mirror, as every rank later reads the weights from it.

`datasets` reads `HF_ENDPOINT` once, when it is imported; the dataprep process has it in its
environment from the start, as the chart and the local runner set it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelora import hub
from pipelora.config import JobSpec
from pipelora.dataprep.errors import DataprepError
from pipelora.dataprep.readers import RawRecord
from pipelora.storage import storage_for

FIELD = "dataset.uri"


@dataclass(frozen=True)
class HubDataset:
    """A dataset split on the Hub at one commit: what the fingerprint and the manifest name."""

    uri: str
    ref: hub.HubRef
    sha: str
    size: int  # bytes of the repository's files at that commit (sizes the tokenizer workers)
    cache: Path  # where `datasets` may keep its small metadata files

    kind = "hub"

    @property
    def identity(self) -> str:
        """What the shards depend on: the repository, the commit and the split (not the branch name)."""
        return f"hf://datasets/{self.ref.repo_id}@{self.sha}#{self.ref.split}"

    def as_manifest(self, fmt: str) -> dict[str, Any]:
        return {"uri": self.uri, "repo": self.ref.repo_id, "revision": self.ref.revision, "sha": self.sha,
                "split": self.ref.split, "bytes": self.size, "format": fmt}


@dataclass(frozen=True)
class ModelSource:
    """Where dataprep reads the model's tokenizer (storage) and what the manifest says of the model."""

    uri: str  # storage URI of the model folder: model.uri, or the committed mirror of an hf:// model
    record: dict[str, Any]
    sha: str | None  # the commit of an hf:// model (part of the fingerprint)
    mirror: hub.ModelMirror | None = None


def open_hub_dataset(uri: str, *, scratch: Path) -> HubDataset:
    """Resolve the dataset's revision to a commit and check its files can be read (two small Hub calls:
    a gated dataset's description is public, its files are not); nothing is downloaded yet."""
    from huggingface_hub import hf_hub_url

    ref = hub.dataset_ref(uri)
    client = hub.api()
    info = hub.hub_call(ref, FIELD, client.dataset_info, ref.repo_id, revision=ref.revision, files_metadata=True)
    siblings = info.siblings or []
    sha = str(info.sha)
    if siblings:
        url = hf_hub_url(ref.repo_id, siblings[0].rfilename, repo_type="dataset", revision=sha,
                         endpoint=hub.endpoint())
        hub.hub_call(ref, FIELD, client.get_hf_file_metadata, url=url)
    size = sum(int(s.size or 0) for s in siblings)
    return HubDataset(uri=uri, ref=ref, sha=sha, size=size, cache=scratch / "datasets-cache")


def read_hub_records(dataset: HubDataset) -> Iterator[RawRecord]:
    """The split's records in order, streamed; a Hub or network failure becomes its one sentence."""
    import datasets

    try:
        stream = datasets.load_dataset(dataset.ref.repo_id, revision=dataset.sha, split=dataset.ref.split,
                                       streaming=True, cache_dir=str(dataset.cache), token=hub.token())
        records = iter(stream)
    except Exception as exc:
        raise _read_error(exc, dataset) from None
    index = 0
    while True:
        try:
            value = next(records)
        except StopIteration:
            return
        except Exception as exc:
            raise _read_error(exc, dataset) from None
        yield RawRecord(dataset.uri, "row", index, value)
        index += 1


def _read_error(exc: Exception, dataset: HubDataset) -> DataprepError | hub.HubError:
    explained = hub.explain(exc, dataset.ref, field=FIELD)
    if explained is not None:
        return explained
    text = " ".join(str(exc).split())
    if "split" in text.lower() and dataset.ref.split and dataset.ref.split in text:
        return DataprepError(
            f"{FIELD} {dataset.uri}: the dataset has no split '{dataset.ref.split}' at commit {dataset.sha[:12]} "
            f"({text[:200]}); name one of its splits after '#' (the default is #{hub.DEFAULT_SPLIT})"
        )
    return DataprepError(
        f"cannot read {FIELD} {dataset.uri} (commit {dataset.sha[:12]}) with the datasets library: "
        f"{type(exc).__name__}: {text[:300]}; check that the repository holds json, jsonl or parquet data files"
    )


def model_source(spec: JobSpec, *, scratch: Path) -> ModelSource:
    """The model as dataprep reads it: a storage folder as given, or an hf:// model mirrored into the
    storage root's `_hub` folder first (once: a committed mirror is reused, never downloaded again)."""
    uri = spec.model.uri
    if not hub.is_hub_uri(uri):
        return ModelSource(uri=uri, record={"uri": uri}, sha=None)
    mirror = hub.mirror_model(hub.model_ref(uri), storage=storage_for(spec, spec.storage.uri),
                              storage_uri=spec.storage.uri, scratch=scratch / "hub-download")
    if not mirror.downloaded:
        print(f"dataprep: model.uri {uri} is commit {mirror.sha[:12]}, already mirrored at {mirror.uri}",
              file=sys.stderr, flush=True)
    return ModelSource(uri=mirror.uri, record=mirror.as_manifest(uri), sha=mirror.sha, mirror=mirror)
