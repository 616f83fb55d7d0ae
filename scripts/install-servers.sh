#!/usr/bin/env bash
# Install the local development servers of medvlm-pipeline (idempotent: installs only what is missing).
#
#   1. Orthanc (PACS) from Debian with its DICOMweb and GDCM plugins, WITHOUT starting the system
#      service (a temporary /usr/sbin/policy-rc.d answers 101 during the install).
#   2. The FHIR R4 server sekmet-fhir==0.1.1 in its own venv, its dependencies pinned by
#      requirements/fhir-server.txt (they differ from the project's).
#   3. The LD_PRELOAD shim scripts/bind_loopback.c, compiled to MEDVLM_HOME/lib/bind_loopback.so,
#      which keeps Orthanc (no bind-address option in 1.10) on loopback.
#   4. PostgreSQL 15 from Debian (postgresql-15), WITHOUT starting its service: the tests of
#      several workers on one ledger start a throwaway cluster of their own (initdb, pg_ctl).
#   5. buildah and debootstrap (Debian; no service), with which scripts/build-images.sh builds
#      the container images (tests/integration/test_images.py builds and checks the flows image).
#   6. Headless Chromium (Debian's chromium; no service), with which
#      tests/integration/test_fairness_browser.py renders and prints the fairness report.
#   7. The Triton Inference Server of the Triton backend's tests (nvidia-pytriton's tritonserver) in
#      a venv of its own on Debian's Python 3.11: scripts/install-triton.sh.
#
# The servers themselves are started and stopped by `medvlm dev up|down` (medvlm/dev/servers.py).
#
# Environment:
#   MEDVLM_HOME               project home (default: $HOME/.cache/medvlm)
#   MEDVLM_DEV__FHIR_VENV     venv of the FHIR server (default: $MEDVLM_HOME/fhir-venv)
#   MEDVLM_FHIR_PYTHON        interpreter for that venv (default: first python3.11+ on PATH)
# Options:
#   --shim-only               only build the bind shim (scripts/install.sh uses it for local Ray)
#   --refreeze                resolve sekmet-fhir's dependencies afresh (no constraints) and rewrite
#                             requirements/fhir-server.txt from what resolved
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MEDVLM_HOME="${MEDVLM_HOME:-$HOME/.cache/medvlm}"
FHIR_VENV="${MEDVLM_DEV__FHIR_VENV:-$MEDVLM_HOME/fhir-venv}"
CONSTRAINTS="$REPO_ROOT/requirements/fhir-server.txt"
SEKMET_PIN="sekmet-fhir==0.1.1"
SHIM_SRC="$REPO_ROOT/scripts/bind_loopback.c"
SHIM_SO="$MEDVLM_HOME/lib/bind_loopback.so"
ORTHANC_PKGS=(orthanc orthanc-dicomweb orthanc-gdcm)
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_BACKUP=""
APT_UPDATED=0

REFREEZE=0
SHIM_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --refreeze) REFREEZE=1 ;;
        --shim-only) SHIM_ONLY=1 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "install-servers: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

# shellcheck source=lib/pinned-venv.sh
. "$REPO_ROOT/scripts/lib/pinned-venv.sh"
step() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'install-servers: ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "root (or sudo) is needed for: $*"
    fi
}

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

missing_packages() {  # the named Debian packages that are not installed, one a line
    local pkg
    for pkg in "$@"; do
        pkg_installed "$pkg" || echo "$pkg"
    done
}

apt_update_if_needed() {
    # Update the package lists only when one of the wanted packages has no install candidate.
    local pkg
    [ "$APT_UPDATED" -eq 1 ] && return 0
    for pkg in "$@"; do
        if ! apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            step "apt-get update (no candidate for $pkg in the package lists)"
            as_root apt-get update -q
            APT_UPDATED=1
            return 0
        fi
    done
}

restore_policy_rc() {
    if [ -n "$POLICY_RC_BACKUP" ] && [ -e "$POLICY_RC_BACKUP" ]; then
        as_root mv -f "$POLICY_RC_BACKUP" "$POLICY_RC"
        info "restored the previous $POLICY_RC"
    elif [ -e "$POLICY_RC" ] && grep -q 'medvlm install-servers' "$POLICY_RC" 2>/dev/null; then
        as_root rm -f "$POLICY_RC"
        info "removed the temporary $POLICY_RC"
    fi
    POLICY_RC_BACKUP=""
}
trap restore_policy_rc EXIT

# PIDs of Orthanc processes running the system configuration (/etc/orthanc), i.e. the service.
system_orthanc_pids() {
    local d pid exe
    for d in /proc/[0-9]*; do
        pid="${d#/proc/}"
        exe="$(readlink "$d/exe" 2>/dev/null || true)"
        [ "$exe" = "/usr/sbin/Orthanc" ] || continue
        if tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -q '/etc/orthanc'; then echo "$pid"; fi
    done
}

stop_system_orthanc() {
    local pids pid i
    pids="$(system_orthanc_pids)"
    [ -z "$pids" ] && return 0
    for pid in $pids; do
        info "stopping a system Orthanc (pid $pid) that listens on all interfaces"
        as_root kill -TERM "$pid" 2>/dev/null || true
    done
    for i in $(seq 1 50); do
        pids="$(system_orthanc_pids)"
        [ -z "$pids" ] && return 0
        sleep 0.1
    done
    for pid in $pids; do as_root kill -KILL "$pid" 2>/dev/null || true; done
}

# --------------------------------------------------------------------------------------------
# Install Debian packages without letting their post-install start a system service (which would
# listen on all interfaces): policy-rc.d says no for the duration, then the old one is restored.
apt_install_no_services() {
    if [ -e "$POLICY_RC" ]; then
        POLICY_RC_BACKUP="$(mktemp /usr/sbin/policy-rc.d.medvlm-backup.XXXXXX)"
        as_root cp -p "$POLICY_RC" "$POLICY_RC_BACKUP"
    fi
    printf '#!/bin/sh\n# medvlm install-servers: no service starts during package installs\nexit 101\n' \
        | as_root tee "$POLICY_RC" >/dev/null
    as_root chmod 0755 "$POLICY_RC"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
    restore_policy_rc
}

# --------------------------------------------------------------------------------------------
install_orthanc() {
    local missing
    mapfile -t missing < <(missing_packages "${ORTHANC_PKGS[@]}")
    if [ "${#missing[@]}" -eq 0 ]; then
        step "Orthanc: already installed ($(dpkg-query -W -f='${Version}' orthanc))"
    else
        step "Orthanc: installing ${missing[*]}"
        command -v apt-get >/dev/null 2>&1 || die "apt-get not found: Orthanc comes from Debian packages"
        apt_update_if_needed "${missing[@]}"
        apt_install_no_services "${missing[@]}"
        # The service stays off at boot too: dev servers run as the user's own processes.
        if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
            as_root systemctl disable --now orthanc >/dev/null 2>&1 || true
        elif command -v update-rc.d >/dev/null 2>&1 && [ -e /etc/init.d/orthanc ]; then
            as_root update-rc.d orthanc disable >/dev/null 2>&1 || true
        fi
        info "installed Orthanc $(dpkg-query -W -f='${Version}' orthanc); system service not started"
    fi
    stop_system_orthanc
    [ -x /usr/sbin/Orthanc ] || die "/usr/sbin/Orthanc missing after install"
    info "plugins: $(ls /usr/share/orthanc/plugins/ 2>/dev/null | tr '\n' ' ')"
}

# --------------------------------------------------------------------------------------------
install_postgresql() {
    if pkg_installed postgresql-15; then
        step "PostgreSQL: already installed ($(dpkg-query -W -f='${Version}' postgresql-15))"
        return 0
    fi
    step "PostgreSQL: installing postgresql-15"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: PostgreSQL comes from Debian packages"
    apt_update_if_needed postgresql-15
    apt_install_no_services postgresql-15
    [ -x /usr/lib/postgresql/15/bin/initdb ] || die "/usr/lib/postgresql/15/bin/initdb missing after install"
    info "installed PostgreSQL $(dpkg-query -W -f='${Version}' postgresql-15); system service not started"
}

# --------------------------------------------------------------------------------------------
IMAGE_TOOL_PKGS=(buildah debootstrap)
install_image_tools() {
    local missing
    mapfile -t missing < <(missing_packages "${IMAGE_TOOL_PKGS[@]}")
    if [ "${#missing[@]}" -eq 0 ]; then
        step "image tools: already installed (buildah $(dpkg-query -W -f='${Version}' buildah))"
        return 0
    fi
    step "image tools: installing ${missing[*]}"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: buildah comes from Debian packages"
    apt_update_if_needed "${missing[@]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    info "installed buildah $(dpkg-query -W -f='${Version}' buildah)"
}

# --------------------------------------------------------------------------------------------
# Headless Chromium: renders and prints the fairness report in tests/integration/
# test_fairness_browser.py. A desktop package but it starts no service.
install_chromium() {
    if [ -z "$(missing_packages chromium)" ]; then
        step "Chromium: already installed ($(dpkg-query -W -f='${Version}' chromium))"
        return 0
    fi
    step "Chromium: installing chromium"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: chromium comes from Debian packages"
    apt_update_if_needed chromium
    apt_install_no_services chromium
    info "installed chromium $(dpkg-query -W -f='${Version}' chromium)"
}

# --------------------------------------------------------------------------------------------
find_python() {
    local cand
    if [ -n "${MEDVLM_FHIR_PYTHON:-}" ]; then echo "$MEDVLM_FHIR_PYTHON"; return 0; fi
    for cand in python3.11 python3.12 python3.13 python3; do
        if command -v "$cand" >/dev/null 2>&1 &&
            "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$cand"; return 0
        fi
    done
    return 1
}

install_fhir_server() {
    local py
    pinned_venv_current "FHIR server" "$FHIR_VENV" "$SEKMET_PIN" "$CONSTRAINTS" "$REFREEZE" && return 0
    step "FHIR server: installing $SEKMET_PIN into $FHIR_VENV"
    py="$(find_python)" || die "no Python >= 3.11 found (set MEDVLM_FHIR_PYTHON)"
    if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        case "$py" in
            /usr/bin/*)
                apt_update_if_needed python3-venv
                as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv ;;
            *) die "$py cannot create virtualenvs (no ensurepip)" ;;
        esac
    fi
    pinned_venv_fill "$FHIR_VENV" "$py" "$SEKMET_PIN" "$CONSTRAINTS" "$REFREEZE" \
        "the FHIR dev server's own venv (sekmet-fhir and what it resolved to)" \
        "bash scripts/install-servers.sh --refreeze"
    info "installed: $("$FHIR_VENV/bin/sekmet" --version)"
}

# --------------------------------------------------------------------------------------------
build_shim() {
    if ! command -v gcc >/dev/null 2>&1; then
        step "bind shim: gcc not found, skipped (Orthanc will bind 0.0.0.0 unless run in 'unshare -n')"
        return 0
    fi
    if [ -f "$SHIM_SO" ] && [ "$SHIM_SO" -nt "$SHIM_SRC" ]; then
        step "bind shim: up to date ($SHIM_SO)"
        return 0
    fi
    step "bind shim: compiling $SHIM_SO"
    mkdir -p "$(dirname "$SHIM_SO")"
    gcc -shared -fPIC -O2 -Wall -Wextra -o "$SHIM_SO.tmp" "$SHIM_SRC" -ldl
    mv -f "$SHIM_SO.tmp" "$SHIM_SO"
}

if [ "$SHIM_ONLY" = 1 ]; then
    build_shim
    exit 0
fi
install_orthanc
install_fhir_server
install_postgresql
install_image_tools
install_chromium
bash "$REPO_ROOT/scripts/install-triton.sh"
build_shim
step "done: start the servers with 'medvlm dev up'"
