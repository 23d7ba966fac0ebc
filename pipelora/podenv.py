"""The pod's environment, handed to ranks that sshd starts without it.

Open MPI starts the ranks of a worker pod through ssh, and an ssh session does not inherit the
container's environment: IRSA and EKS Pod Identity (`AWS_ROLE_ARN`, `AWS_WEB_IDENTITY_TOKEN_FILE`,
`AWS_CONTAINER_CREDENTIALS_FULL_URI`...), webhook-injected `NCCL_*` and `HF_*` would all be lost,
and on a cluster that grants S3 through IRSA every rank would fail. The worker entrypoint records
them in a file only the pod's user can read; a rank applies the file at start, never overriding
what mpirun passed explicitly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

RECORDED_PREFIXES = ("AWS_", "HF_", "NCCL_", "HUGGING_FACE_", "TRANSFORMERS_", "PIPELORA_")
# Names the chart adds on top (its `env` list and `podEnv.names`), comma-separated.
EXTRA_NAMES_ENV = "PIPELORA_POD_ENV_NAMES"
# Never recorded: they describe the entrypoint's own process, not the pod.
NEVER_RECORDED = frozenset({"PIPELORA_POD_ENV_NAMES", "PWD", "SHLVL", "_"})
# What this process took from the file (the CLI applies it once at start), for `pod-env` to show.
applied_names: set[str] = set()


def recorded_names(environ: Mapping[str, str], extra: Iterable[str] = ()) -> list[str]:
    """Which of `environ`'s variables a rank should get: the prefixes above and the extra names."""
    wanted = {n.strip() for n in extra if n.strip()}
    wanted |= {n.strip() for n in environ.get(EXTRA_NAMES_ENV, "").split(",") if n.strip()}
    names = [n for n in environ if n.startswith(RECORDED_PREFIXES) or n in wanted]
    return sorted(n for n in names if n not in NEVER_RECORDED)


def record_pod_env(path: str | Path, environ: Mapping[str, str], extra: Iterable[str] = ()) -> list[str]:
    """Write the variables a rank should get to `path` (mode 0600, atomically); returns their names."""
    names = recorded_names(environ, extra)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({n: environ[n] for n in names}, fh)
    os.replace(tmp, target)
    return names


def apply_pod_env(path: str | Path, environ: MutableMapping[str, str]) -> list[str]:
    """Set each recorded variable that `environ` lacks; returns the names set. No file: nothing."""
    try:
        recorded = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    applied = []
    for name, value in recorded.items():
        if name not in environ:
            environ[name] = value
            applied.append(name)
    applied_names.update(applied)
    return applied
