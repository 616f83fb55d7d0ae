#!/usr/bin/env bash
# Copy every image the chart renders (k8s/images.txt) into a site's registry with skopeo
# (Debian: apt-get install skopeo), keeping each image's repository path and tag:
#
#   bash scripts/mirror-images.sh registry.example.org/mirror              # k8s/images.txt
#   bash scripts/mirror-images.sh registry.example.org/mirror FILE         # another list
#   bash scripts/mirror-images.sh --dry-run registry.example.org/mirror    # print the copies
#
#   docker.io/library/postgres:17.6-alpine3.22 -> registry.example.org/mirror/library/postgres:17.6-alpine3.22
#   registry.hospital.internal/medvlm/flows:0.1.0 -> registry.example.org/mirror/medvlm/flows:0.1.0
#
# An image built here by scripts/build-images.sh (localhost/<path>, e.g. localhost/medvlm/flows:
# 0.1.0) is pushed from local storage; any other is copied from its registry, with all its
# platforms (--all), so a digest pinned in values stays valid. Credentials: `skopeo login` (or
# REGISTRY_AUTH_FILE); more skopeo copy options in SKOPEO_COPY_ARGS (e.g. --dest-tls-verify=false).
# Then point the chart at the mirror (prefectWorker.image.repository, ray.image.repository,
# database.internal.image.repository).
set -euo pipefail

dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
registry="${1%/}"
list="${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/k8s/images.txt}"
[ -r "$list" ] || { echo "mirror-images: cannot read $list" >&2; exit 2; }
read -r -a extra <<< "${SKOPEO_COPY_ARGS:-}"
if [ "$dry_run" = 0 ]; then
  command -v skopeo > /dev/null || { echo "mirror-images: skopeo is not installed" >&2; exit 2; }
fi

copied=0
while read -r image _; do
  case "$image" in ''|'#'*) continue ;; esac
  # The registry host is the first component when it has a dot or a port, or is localhost;
  # otherwise the image is Docker Hub's (library/ for official images).
  first="${image%%/*}"
  if [ "$first" != "$image" ] && { [[ "$first" == *.* ]] || [[ "$first" == *:* ]] || [ "$first" = localhost ]; }; then
    path="${image#*/}"
  elif [[ "$image" == */* ]]; then
    path="$image"
  else
    path="library/$image"
  fi
  name="${path%@*}"   # a digest is checked at the source; the copy is tagged
  if [[ "${name##*/}" != *:* ]]; then
    echo "mirror-images: $image has no tag (the mirror needs one)" >&2
    exit 1
  fi
  source="docker://$image"
  if [[ "$image" == *@* ]]; then   # skopeo takes a tag or a digest, not both: the digest
    tagged="${image%@*}"
    source="docker://${tagged%:*}@${image#*@}"
  fi
  if [ "$dry_run" = 0 ] && skopeo inspect --raw "containers-storage:localhost/$name" > /dev/null 2>&1; then
    source="containers-storage:localhost/$name"
  fi
  echo "== $source -> docker://$registry/$name"
  if [ "$dry_run" = 0 ]; then
    skopeo copy --all "${extra[@]}" "$source" "docker://$registry/$name"
  fi
  copied=$((copied + 1))
done < "$list"
echo "mirror-images: $copied image(s) $([ "$dry_run" = 1 ] && echo 'to copy' || echo copied) to $registry"
