#!/usr/bin/env bash
# Build the container images of medvlm-pipeline with buildah, on a Debian bookworm base made by
# debootstrap (no registry is needed for the base; pip still needs PyPI or a mirror). As root;
# Debian: apt-get install buildah debootstrap (scripts/install-servers.sh).
#
#   bash scripts/build-images.sh                            # the flows image
#   bash scripts/build-images.sh --serving-cpu              # and the CPU serving image (~7 GB)
#   bash scripts/build-images.sh --no-flows --serving-cpu   # only the CPU serving image
#
# Images, named as the chart's defaults expect (prefix localhost/medvlm):
#   <prefix>/flows:<project version>                              images/flows/Containerfile
#   <prefix>/serving:<ray version>-py311-cpu-medvlm<version>      images/serving-cpu/Containerfile
# The GPU serving image (images/serving-gpu/Containerfile) starts from a Ray release image and is
# built where that can be pulled (images/README.md).
#
# The base (<prefix>/base:bookworm) is imported from a rootfs tarball cached in
# $MEDVLM_IMAGE_CACHE; debootstrap runs only when the tarball is missing (or --rebuild-base).
# The build context is a clean copy of the project's files (git's tracked and untracked,
# not ignored), so a working tree's changes are built and caches (.venv, __pycache__) are not.
#
# Options:
#   --flows-tag TAG, --serving-tag TAG   other tags
#   --base-tarball FILE                  put this rootfs tarball in the cache instead of debootstrap
#   --rebuild-base                       debootstrap the base again
# Environment:
#   MEDVLM_IMAGE_CACHE    base tarball, .deb cache and build logs (default $HOME/.cache/medvlm/images)
#   MEDVLM_IMAGE_PREFIX   image name prefix (default localhost/medvlm)
#   MEDVLM_BUILD_CA       CA bundle given to pip as a build secret, for an intercepting proxy
#                         (default: $PIP_CERT, else /etc/ssl/certs/ca-certificates.crt if present;
#                         "none": no secret). It is not stored in the images.
#   MEDVLM_PIP_INDEX_URL  package index or mirror for the builds (default: PyPI)
#   DEBIAN_MIRROR         for debootstrap (default http://deb.debian.org/debian)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${MEDVLM_IMAGE_CACHE:-$HOME/.cache/medvlm/images}"
prefix="${MEDVLM_IMAGE_PREFIX:-localhost/medvlm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# What the base holds (Debian's python3.11; debootstrap does not resolve the virtual package
# python3.11-distutils that python3.11-venv depends on, so python3-distutils is named).
base_packages="python3.11,python3.11-venv,python3-distutils,python3-lib2to3,bash,wget,ca-certificates"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -n 1)
ray_version=$(grep -o 'ray\[serve\]==[0-9][0-9.]*' "$repo/pyproject.toml" | head -n 1 | cut -d= -f3)
flows=1 serving_cpu=0 rebuild_base=0 seed_tarball=""
flows_tag="$version"
serving_tag="${ray_version}-py311-cpu-medvlm${version}"
while [ $# -gt 0 ]; do
  case "$1" in
    --serving-cpu) serving_cpu=1; shift ;;
    --no-flows) flows=0; shift ;;
    --flows-tag) flows_tag="$2"; shift 2 ;;
    --serving-tag) serving_tag="$2"; shift 2 ;;
    --base-tarball) seed_tarball="$2"; shift 2 ;;
    --rebuild-base) rebuild_base=1; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "build-images: unknown argument: $1" >&2; exit 2 ;;
  esac
done

step() { printf '\n== %s\n' "$*"; }
die() { printf 'build-images: %s\n' "$*" >&2; exit "${2:-1}"; }
command -v buildah >/dev/null 2>&1 \
  || die "buildah is not installed (Debian: apt-get install buildah debootstrap)" 2
[ "$(id -u)" = 0 ] || die "run as root (debootstrap and buildah's storage here need it)" 2
[ -n "$version" ] && [ -n "$ray_version" ] \
  || die "could not read the project and Ray versions from pyproject.toml"

ca="${MEDVLM_BUILD_CA:-${PIP_CERT:-}}"
if [ -z "$ca" ] && [ -s /etc/ssl/certs/ca-certificates.crt ]; then ca=/etc/ssl/certs/ca-certificates.crt; fi
[ "$ca" = none ] && ca=""
[ -z "$ca" ] || [ -s "$ca" ] || die "CA bundle $ca not found (MEDVLM_BUILD_CA=none for no secret)"

mkdir -p "$cache/logs"
started=$SECONDS
logged() {  # logged NAME CMD...: output to $cache/logs/NAME.log, its tail on failure
  local log="$cache/logs/$1.log"; shift
  if ! "$@" > "$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "failed: $* (full log: $log)"
  fi
}

# 1. The base rootfs tarball (cached), then the base image (re-imported when the tarball changed).
base_tar="$cache/base-bookworm.tar.gz"
base_key="$cache/base-bookworm.packages"   # the package list the tarball was made with
base_image="$prefix/base:bookworm"
if [ -n "$seed_tarball" ]; then
  step "base: using $seed_tarball"
  cp "$seed_tarball" "$base_tar.tmp" && mv "$base_tar.tmp" "$base_tar"
  echo "$base_packages" > "$base_key"
fi
if [ "$rebuild_base" = 1 ] || [ ! -s "$base_tar" ] || [ "$(cat "$base_key" 2>/dev/null)" != "$base_packages" ]; then
  command -v debootstrap >/dev/null 2>&1 \
    || die "debootstrap is not installed (Debian: apt-get install debootstrap)" 2
  step "base: debootstrap bookworm ($base_packages)"
  t=$SECONDS
  rootfs="$cache/rootfs.tmp"
  rm -rf "$rootfs"
  mkdir -p "$cache/debcache"
  logged debootstrap debootstrap --variant=minbase --cache-dir="$cache/debcache" \
    --include="$base_packages" bookworm "$rootfs" "$mirror"
  # Trimmed: no .debs, package lists, manuals, locales, docs (copyright files stay).
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/debootstrap
  find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
  tar --numeric-owner -C "$rootfs" -czf "$base_tar.tmp" .
  mv "$base_tar.tmp" "$base_tar"
  echo "$base_packages" > "$base_key"
  rm -rf "$rootfs"
  echo "base tarball: $(du -h "$base_tar" | cut -f1) in $((SECONDS - t)) s"
fi
base_sum=$(sha256sum "$base_tar" | cut -d' ' -f1)
have_sum=$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "org.medvlm.base.sha256"}}' \
  "$base_image" 2>/dev/null || true)
if [ "$have_sum" != "$base_sum" ]; then
  step "base: importing $base_image"
  t=$SECONDS
  # buildah 1.28 has no `buildah import`: `buildah add` unpacks the tarball into an empty image.
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$base_tar" / > /dev/null
  buildah config --env LANG=C.UTF-8 \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --label "org.medvlm.base.sha256=$base_sum" --cmd /bin/bash "$ctr"
  buildah commit --rm -q "$ctr" "$base_image" > /dev/null
  echo "imported in $((SECONDS - t)) s"
fi

# 2. The build context: the project's files only.
ctx=$(mktemp -d "${TMPDIR:-/tmp}/medvlm-image-context.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
paths=(pyproject.toml README.md prefect.yaml requirements medvlm pipeline serving connectors flows)
if git -C "$repo" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard -- "${paths[@]}" \
    | tar --null --ignore-failed-read -T - -cf -) | tar -C "$ctx" -xf -
else
  tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
    -cf - "${paths[@]}" | tar -C "$ctx" -xf -
fi

bud=(buildah bud --isolation chroot --layers --build-arg "BASE=$base_image")
[ -z "$ca" ] || bud+=(--secret "id=pipca,src=$ca")
[ -z "${MEDVLM_PIP_INDEX_URL:-}" ] || bud+=(--build-arg "PIP_INDEX_URL=$MEDVLM_PIP_INDEX_URL")
built=()
build() {  # build NAME CONTAINERFILE IMAGE
  step "$1: buildah bud -> $3 (log: $cache/logs/$1.log)"
  local t=$SECONDS
  logged "$1" "${bud[@]}" -f "$2" -t "$3" "$ctx"
  echo "built in $((SECONDS - t)) s"
  built+=("$3")
}
if [ "$flows" = 1 ]; then
  build flows "$repo/images/flows/Containerfile" "$prefix/flows:$flows_tag"
fi
if [ "$serving_cpu" = 1 ]; then
  build serving-cpu "$repo/images/serving-cpu/Containerfile" "$prefix/serving:$serving_tag"
fi

step "images (total $((SECONDS - started)) s)"
for image in "$base_image" "${built[@]}"; do
  printf '%-60s %s\n' "$image" "$(buildah images --format '{{.Size}}' "$image" | head -n 1)"
done
