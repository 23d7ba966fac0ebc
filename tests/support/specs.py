"""Job specs the tests write: a base dict with dotted overrides, as `--set` takes them."""

from __future__ import annotations

from typing import Any


def with_overrides(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`spec` with each `"section.key": value` of `overrides` set in place (returned for chaining)."""
    for dotted, value in overrides.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return spec
