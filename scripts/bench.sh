#!/usr/bin/env bash
# Run a benchmark from bench/ in a loopback-only network namespace, as the tests run.
#
#   bash scripts/bench.sh                                  # bench/bench_pipeline.py, full size
#   bash scripts/bench.sh bench/bench_pipeline.py --studies 8 --repeats 1   # smoke size
#
# Ray Serve replicas open ports on all interfaces: the private namespace keeps them unreachable.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$here/.venv}"
cd "$here"
if [ "$#" -eq 0 ]; then set -- bench/bench_pipeline.py; fi
cmd=("$venv/bin/python" "$@")
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' "${cmd[@]}"
fi
echo "warning: no private network namespace (needs root and unshare); running on the host network" >&2
exec "${cmd[@]}"
