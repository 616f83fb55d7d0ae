#!/usr/bin/env bash
# Install a pinned checkov (IaC scanner) into a venv of its own, for offline scans of k8s/ and
# images/ (tests/unit/test_k8s_scan.py).
#
#   bash scripts/install-checkov.sh            # into ${MEDVLM_HOME:-$HOME/.cache/medvlm}/checkov-venv
#   CHECKOV_VENV=/opt/checkov bash scripts/install-checkov.sh
#
# checkov's dependency tree conflicts with the project's, so it never goes into .venv. The venv
# gets checkov==CHECKOV_VERSION with every package constrained to requirements/checkov-lock.txt
# (the resolved set, pip freeze), from the machine's pip configuration (index or mirror); about
# 300 MB. Nothing else touches the network, and checkov itself is run offline by the tests
# (--skip-download, CKV_SKIP_PACKAGE_UPDATE_CHECK). Idempotent: a second run with the pinned
# version and an unchanged lock file does nothing.
set -euo pipefail

CHECKOV_VERSION="3.3.30"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$root/requirements/checkov-lock.txt"
venv="${CHECKOV_VENV:-${MEDVLM_HOME:-$HOME/.cache/medvlm}/checkov-venv}"
python="${PYTHON:-python3}"
stamp="$venv/.medvlm-checkov-lock.sha256"

grep -qx "checkov==${CHECKOV_VERSION}" "$lock" || {
  echo "$lock does not pin checkov==${CHECKOV_VERSION}: regenerate it (see its header)" >&2
  exit 1
}
lock_sha="$(sha256sum "$lock" | cut -d' ' -f1)"

installed_ok() {
  [ -x "$venv/bin/checkov" ] && [ -f "$stamp" ] || return 1
  [ "$(cat "$stamp")" = "$lock_sha" ] || return 1
  local version
  version="$(CKV_SKIP_PACKAGE_UPDATE_CHECK=true "$venv/bin/checkov" --version 2>/dev/null)" || return 1
  [ "$version" = "$CHECKOV_VERSION" ]
}

if installed_ok; then
  echo "checkov ${CHECKOV_VERSION} already in $venv"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "== creating the venv $venv ($("$python" --version))"
  "$python" -m venv "$venv"
fi

echo "== installing checkov==${CHECKOV_VERSION} (constraints: requirements/checkov-lock.txt)"
rm -f "$stamp"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  --constraint "$lock" "checkov==${CHECKOV_VERSION}"
echo "$lock_sha" > "$stamp"

if ! installed_ok; then
  echo "the venv's checkov is not ${CHECKOV_VERSION}" >&2
  exit 1
fi
echo "checkov ${CHECKOV_VERSION} in $venv ($(du -sh "$venv" | cut -f1))"
