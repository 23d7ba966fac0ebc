#!/usr/bin/env bash
# A local stand-in for the image's Debian base, for machines that cannot pull from a registry:
# `debootstrap --variant=minbase <suite>` (what the official slim image is made from), imported
# into podman under the official tag, so that `FROM debian:<suite>-slim` resolves to it.
# Nothing happens when podman already has an image of that name.
#
#   scripts/base_image.sh [debian:bookworm-slim]
#
# DEBIAN_MIRROR (and DEBIAN_SECURITY_MIRROR) override the Debian archives debootstrap and the
# image's apt use.
set -euo pipefail

tag="${1:-debian:bookworm-slim}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
case "$tag" in
  debian:*-slim) suite="${tag#debian:}"; suite="${suite%-slim}" ;;
  *) echo "base_image.sh: $tag is not a debian:<suite>-slim tag" >&2; exit 2 ;;
esac

if podman image exists "$tag"; then
  echo "$tag"
  exit 0
fi
for tool in debootstrap podman tar; do
  command -v "$tool" >/dev/null || { echo "base_image.sh: $tool is missing (make containers installs it)" >&2; exit 1; }
done

# debootstrap needs root; podman itself may run rootless.
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
root="$(mktemp -d "${TMPDIR:-/var/tmp}/debian-${suite}.XXXXXX")"
trap '$sudo rm -rf "$root"' EXIT
echo "debootstrap --variant=minbase $suite (from $mirror) ..." >&2
PATH="$PATH:/usr/sbin:/sbin" $sudo debootstrap --variant=minbase "$suite" "$root" "$mirror" >&2

# As the official image: the suite's updates and security archives, no package cache, no lists.
security="${DEBIAN_SECURITY_MIRROR:-${mirror%/debian}/debian-security}"
printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
  "$mirror" "$suite" "$mirror" "$suite" "$security" "$suite" | $sudo tee "$root/etc/apt/sources.list" >/dev/null
$sudo sh -c 'rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/var/log/*.log "$1"/var/log/apt/*' \
  sh "$root"

$sudo tar --numeric-owner -C "$root" -c . | podman import --change 'CMD ["bash"]' - "$tag" >&2
echo "$tag"
