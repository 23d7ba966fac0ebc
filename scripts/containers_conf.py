#!/usr/bin/env python3
"""Make podman work on machines whose kernel refuses what its defaults ask for.

Two settings in /etc/containers/containers.conf: `[containers] default_ulimits = []` (podman's
default ulimits make the OCI runtime call setrlimit, which fails on such machines) and
`[engine] runtime = "runc"` (crun fails there on setrlimit and on hybrid cgroups). The file is
edited in place, keeping whatever else it holds; nothing is written when both are already set.

    python3 scripts/containers_conf.py [--check] [--path FILE]

`--check` only reports: exit status 0 when the file already holds both settings, 1 otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

SETTINGS = {("containers", "default_ulimits"): "[]", ("engine", "runtime"): '"runc"'}
SECTION = re.compile(r"^\s*\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$")


def _key_pattern(key: str) -> re.Pattern[str]:
    return re.compile(rf"^\s*{re.escape(key)}\s*=\s*(.*?)\s*(#.*)?$")


def _sections(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Section name → (index of its header line, index one past its last line)."""
    headers = [(n, m.group(1)) for n, line in enumerate(lines) if (m := SECTION.match(line))]
    spans = {}
    for i, (n, name) in enumerate(headers):
        end = headers[i + 1][0] if i + 1 < len(headers) else len(lines)
        spans.setdefault(name, (n, end))
    return spans


def apply(text: str) -> str:
    """`text` with both settings present (replacing other values of the same keys)."""
    lines = text.splitlines()
    for (section, key), value in SETTINGS.items():
        spans = _sections(lines)
        wanted = f"{key} = {value}"
        if section not in spans:
            if lines and lines[-1].strip():
                lines.append("")
            lines += [f"[{section}]", wanted]
            continue
        start, end = spans[section]
        pattern = _key_pattern(key)
        found = [n for n in range(start + 1, end) if pattern.match(lines[n])]
        if found:
            n = found[0]
            # A multi-line array: drop its continuation lines up to the closing bracket.
            if pattern.match(lines[n]).group(1).startswith("[") and "]" not in lines[n]:
                while n + 1 < len(lines) and "]" not in lines[n + 1]:
                    del lines[n + 1]
                if n + 1 < len(lines):
                    del lines[n + 1]
            lines[n] = wanted
        else:
            lines.insert(start + 1, wanted)
    return "\n".join(lines) + "\n"


def satisfied(text: str) -> bool:
    lines = text.splitlines()
    spans = _sections(lines)
    for (section, key), value in SETTINGS.items():
        if section not in spans:
            return False
        start, end = spans[section]
        values = [m.group(1) for n in range(start + 1, end) if (m := _key_pattern(key).match(lines[n]))]
        if not values or values[0].replace(" ", "") != value:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=Path("/etc/containers/containers.conf"))
    parser.add_argument("--check", action="store_true", help="only report whether both settings are there")
    args = parser.parse_args(argv)
    text = args.path.read_text() if args.path.exists() else ""
    if satisfied(text):
        return 0
    if args.check:
        print(f"{args.path} lacks the podman settings this project needs", file=sys.stderr)
        return 1
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(apply(text))
    print(f"{args.path}: default_ulimits = [] and runtime = \"runc\" set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
