"""Reading a safetensors header: 8 bytes of little-endian length, then a JSON map of tensors.

Both the shard reader (memory-maps local files) and the model-weight reader (ranged reads from
object storage) need only the header to locate a tensor's bytes; one parser serves both through
a `read(start, length)` callable.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pipelora.errors import PipeloraError

# safetensors dtype names -> numpy dtype strings (little-endian). BF16 has no numpy dtype: readers
# that need it (torch) map it themselves; the item size is what the layout needs.
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                "U8": "u1", "BOOL": "?"}


class SafetensorsHeaderError(PipeloraError):
    """The bytes are not a safetensors file (truncated, or a corrupt header)."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are, as absolute offsets in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(read: Callable[[int, int], bytes], where: str) -> dict[str, TensorEntry]:
    """Every tensor of the file `read` gives access to; `where` names it in errors."""
    head = read(0, 8)
    if len(head) < 8:
        raise SafetensorsHeaderError(f"{where} is truncated or not a safetensors file")
    (length,) = struct.unpack("<Q", head)
    raw = read(8, length)
    if len(raw) < length:
        raise SafetensorsHeaderError(f"{where} is truncated or not a safetensors file")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SafetensorsHeaderError(f"{where} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"{where} has a corrupt safetensors header (not a JSON object)")
    base = 8 + length
    entries: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            entries[name] = TensorEntry(name, str(meta["dtype"]), tuple(int(d) for d in meta["shape"]),
                                        base + int(begin), base + int(end))
        except (TypeError, KeyError, ValueError):
            raise SafetensorsHeaderError(f"{where} has a corrupt safetensors header (tensor {name!r})") from None
    return entries


def read_file_header(path: str) -> dict[str, TensorEntry]:
    """`read_header` for a local file."""
    with open(path, "rb") as fh:
        def read(start: int, length: int) -> bytes:
            fh.seek(start)
            return fh.read(length)

        return read_header(read, path)
