"""How the tests start real mpirun on this machine (several ranks on 2 cores, as root in CI)."""

from __future__ import annotations

import os
import shutil

import pytest


def mpirun_prefix(np_: int) -> list[str]:
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun (Open MPI) is not installed; `make setup` installs openmpi-bin")
    cmd = ["mpirun", "--oversubscribe", "-np", str(np_)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd
