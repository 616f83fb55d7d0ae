#!/usr/bin/env bash
# Install the Triton dev server of medvlm-pipeline (idempotent: installs only what is missing).
#
# A real Triton Inference Server (2.51, Python backend) comes with PyPI's nvidia-pytriton, pinned
# by requirements/triton-server.txt with what it resolved to; only its tritonserver binary, the
# Python backend and the backend's stub are used (not PyTriton's Python API). It lives in a venv
# of its own built on Debian's own Python 3.11 (/usr/bin/python3.11, package python3.11 +
# python3.11-venv): the wheel's 3.11 stub links Debian's libpython3.11, and under another build
# of 3.11 (pyenv's) the stub's Python fails ("'_thread.RLock' object has no attribute
# '_recursion_count'"). medvlm/dev/triton.py starts and stops the server by PID on loopback; its
# model (medvlm/dev/triton_model.py) forwards to the Serve app with the standard library and
# the venv's numpy.
#
# Environment:
#   MEDVLM_HOME                 project home (default: $HOME/.cache/medvlm)
#   MEDVLM_DEV__TRITON_VENV     venv of the Triton server (default: $MEDVLM_HOME/triton-venv)
#   MEDVLM_TRITON_PYTHON        interpreter for that venv (default: /usr/bin/python3.11)
# Options:
#   --refreeze                  resolve nvidia-pytriton's dependencies afresh and rewrite
#                               requirements/triton-server.txt from what resolved
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MEDVLM_HOME="${MEDVLM_HOME:-$HOME/.cache/medvlm}"
TRITON_VENV="${MEDVLM_DEV__TRITON_VENV:-$MEDVLM_HOME/triton-venv}"
TRITON_PYTHON="${MEDVLM_TRITON_PYTHON:-/usr/bin/python3.11}"
CONSTRAINTS="$REPO_ROOT/requirements/triton-server.txt"
PYTRITON_PIN="nvidia-pytriton==0.7.0"

REFREEZE=0
for arg in "$@"; do
    case "$arg" in
        --refreeze) REFREEZE=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "install-triton: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

# shellcheck source=lib/pinned-venv.sh
. "$REPO_ROOT/scripts/lib/pinned-venv.sh"
step() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'install-triton: ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "root (or sudo) is needed for: $*"
    fi
}


ensure_python() {
    if [ -x "$TRITON_PYTHON" ] && "$TRITON_PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        return 0
    fi
    case "$TRITON_PYTHON" in
        /usr/bin/python3.11)
            command -v apt-get >/dev/null 2>&1 || die "apt-get not found: Debian's python3.11 is needed"
            step "Debian's Python 3.11: installing python3.11 python3.11-venv"
            as_root apt-get update -q
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                python3.11 python3.11-venv ;;
        *) die "$TRITON_PYTHON cannot create virtualenvs (no ensurepip)" ;;
    esac
}

install_triton() {
    pinned_venv_current "Triton" "$TRITON_VENV" "$PYTRITON_PIN" "$CONSTRAINTS" "$REFREEZE" && return 0
    step "Triton: installing $PYTRITON_PIN into $TRITON_VENV"
    ensure_python
    pinned_venv_fill "$TRITON_VENV" "$TRITON_PYTHON" "$PYTRITON_PIN" "$CONSTRAINTS" "$REFREEZE" \
        "the Triton dev server's own venv (nvidia-pytriton and what it resolved to)" \
        "bash scripts/install-triton.sh --refreeze"
    "$TRITON_VENV/bin/python" -c 'import numpy, pytriton' || die "pytriton does not import"
    info "installed: nvidia-pytriton $("$TRITON_VENV/bin/python" -c \
        'import importlib.metadata as m; print(m.version("nvidia-pytriton"))')"
}

install_triton
