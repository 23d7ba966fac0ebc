#!/usr/bin/env bash
# Build the trainer image from the Dockerfile with podman, on a machine that cannot pull images:
# the Debian base is made locally when podman lacks it (scripts/base_image.sh), and pip inside the
# build gets this machine's pip settings (`pip config list`): its CA bundle and its local wheel
# folders are mounted read-only into the build and passed as PIP_CERT and PIP_FIND_LINKS.
# Prints the tag it built on stdout (everything else goes to stderr).
#
#   scripts/build_image.sh [TAG]        # default localhost/pipelora-k8s:dev-<variant>
#
# VARIANT=cpu (default) or cuda; PIP picks the pip whose settings are read (default: the project's
# virtualenv, else python3 -m pip). Extra arguments for podman build go in PODMAN_BUILD_ARGS.
set -euo pipefail

cd "$(dirname "$0")/.."
variant="${VARIANT:-cpu}"
tag="${1:-localhost/pipelora-k8s:dev-${variant}}"
case "$variant" in
  cpu | cuda) ;;
  *) echo "build_image.sh: VARIANT must be cpu or cuda, not ${variant}" >&2; exit 2 ;;
esac
command -v podman >/dev/null || { echo "build_image.sh: podman is missing (make containers installs it)" >&2; exit 1; }

# Every variant builds the project's wheel on the Debian base.
debian_base="$(sed -n 's/^ARG DEBIAN_BASE=//p' Dockerfile)"
scripts/base_image.sh "$debian_base" >/dev/null

if [ -n "${PIP:-}" ]; then
  read -r -a pip <<<"$PIP"
elif [ -x .venv/bin/pip ]; then
  pip=(.venv/bin/pip)
else
  pip=(python3 -m pip)
fi
settings="$("${pip[@]}" config list 2>/dev/null || true)"

# One pip setting as `pip config list` shows it; the environment's value wins, as it does for pip.
pip_setting() {
  local key="$1" scope line
  for scope in ":env:" "install" "global"; do
    line="$(grep -m1 -F "${scope}.${key}=" <<<"$settings" || true)"
    if [ -n "$line" ]; then
      line="${line#*=}"
      line="${line#\'}"
      echo "${line%\'}"
      return
    fi
  done
}

build=(--format docker --pull=never --layers --build-arg "VARIANT=${variant}")
cert="$(pip_setting cert)"
if [ -n "$cert" ] && [ -f "$cert" ]; then
  build+=(-v "${cert}:/etc/ssl/host-ca.crt:ro" --build-arg PIP_CERT=/etc/ssl/host-ca.crt)
fi
links=()
for folder in $(pip_setting find-links); do
  folder="${folder#file://}"
  if [ -d "$folder" ]; then
    build+=(-v "${folder}:${folder}:ro")
    links+=("$folder")
  fi
done
if [ "${#links[@]}" -gt 0 ]; then
  build+=(--build-arg "PIP_FIND_LINKS=${links[*]}")
fi

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
build+=(--build-arg "VERSION=${version}" --build-arg "REVISION=${revision}")

read -r -a extra <<<"${PODMAN_BUILD_ARGS:-}"
podman build "${build[@]}" "${extra[@]}" -t "$tag" -f Dockerfile . >&2
echo "$tag"
