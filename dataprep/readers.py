"""Dataset files → a stream of raw records, each with where it came from.

JSONL and Parquet are read record by record (a 50 GB JSONL never sits in memory); a JSON
array is one document and is parsed whole. Malformed lines and invalid UTF-8 become records
carrying an error, so the caller can skip and count them instead of dying on the first one.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelora.dataprep.errors import DataprepError
from pipelora.storage import Storage, StorageError, is_s3, local_path, sha256_file

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
PARQUET_BATCH = 4096


@dataclass(slots=True)
class RawRecord:
    """One record, or the reason it could not be read (`error` set, `value` None)."""

    source: str
    unit: str  # line | record | row
    index: int
    value: Any = None
    error: str | None = None

    @property
    def where(self) -> str:
        """Formatted only when a record is reported: most never are."""
        return f"{self.source} {self.unit} {self.index}"


@dataclass(frozen=True)
class DatasetFile:
    """A dataset as a local file, with the sha256 of its bytes (part of the fingerprint)."""

    uri: str
    path: Path
    kind: str
    sha256: str
    size: int


def file_kind(uri: str, path: Path) -> str:
    """json | jsonl | parquet from the name; a `.json` file holding one object per line is JSONL."""
    suffix = Path(uri.split("?", 1)[0]).suffix.lower()
    kind = SUFFIXES.get(suffix)
    if kind is None:
        raise DataprepError(
            f"dataset {uri} has an unknown file type '{suffix or '(none)'}'; use .json (array), .jsonl or .parquet"
        )
    if kind == "json":
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"{"):
            return "jsonl"
    return kind


def fetch_dataset(storage: Storage, uri: str, *, scratch: Path | None = None) -> DatasetFile:
    """The dataset as a local file (an s3:// object is downloaded once into `scratch`)."""
    if is_s3(uri):
        scratch = scratch or Path(tempfile.mkdtemp(prefix="pipelora-dataset-"))
        path = scratch / Path(uri).name
        try:
            storage.download_file(uri, path)
        except StorageError as exc:
            raise DataprepError(f"cannot read dataset.uri: {exc}") from None
    else:
        path = local_path(uri)
        if not path.is_file():
            raise DataprepError(f"dataset {uri} does not exist; set dataset.uri to a .json, .jsonl or .parquet file")
    kind = file_kind(uri, path)
    return DatasetFile(uri=uri, path=path, kind=kind, sha256=sha256_file(path), size=path.stat().st_size)


def count_records(dataset: DatasetFile) -> int | None:
    """The record count where it is cheap to know (Parquet metadata), for the progress bar."""
    if dataset.kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(dataset.path).metadata.num_rows
    return None


def read_records(dataset: DatasetFile) -> Iterator[RawRecord]:
    readers = {"json": _read_json_array, "jsonl": _read_jsonl, "parquet": _read_parquet}
    return readers[dataset.kind](dataset)


def _read_jsonl(dataset: DatasetFile) -> Iterator[RawRecord]:
    name = dataset.uri
    with open(dataset.path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                text = raw.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRecord(name, "line", lineno, error=f"invalid UTF-8 at byte {exc.start} of the line")
                continue
            try:
                yield RawRecord(name, "line", lineno, _loads(text))
            except json.JSONDecodeError as exc:
                yield RawRecord(name, "line", lineno, error=f"malformed JSON: {exc.msg} (column {exc.colno})")


_scan = json.JSONDecoder().scan_once


def _loads(text: str) -> Any:
    """`json.loads`, but a line that is exactly one JSON value skips its wrapper's whitespace checks
    (a third of the per-line cost); anything else takes `json.loads`, for its value or its error."""
    try:
        value, end = _scan(text, 0)
    except (StopIteration, json.JSONDecodeError):
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


def _read_json_array(dataset: DatasetFile) -> Iterator[RawRecord]:
    raw = dataset.path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    # Invalid bytes become lone surrogates, so one bad string costs one record, not the file.
    text = raw.decode("utf-8", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataprepError(
            f"dataset {dataset.uri} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    if not isinstance(data, list):
        raise DataprepError(
            f"dataset {dataset.uri} holds a JSON {type(data).__name__}, not an array of records; "
            "write [ {...}, {...} ] or one record per line (.jsonl)"
        )
    for index, value in enumerate(data):
        if _has_invalid_utf8(value):
            yield RawRecord(dataset.uri, "record", index, error="invalid UTF-8 in a string")
        else:
            yield RawRecord(dataset.uri, "record", index, value)


def _has_invalid_utf8(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_invalid_utf8(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_invalid_utf8(v) for v in value)
    return False


def _read_parquet(dataset: DatasetFile) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(dataset.path)
        row = 0
        for batch in source.iter_batches(batch_size=PARQUET_BATCH):
            for value in batch.to_pylist():
                yield RawRecord(dataset.uri, "row", row, value)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataprepError(f"cannot read Parquet dataset {dataset.uri}: {exc}") from None
