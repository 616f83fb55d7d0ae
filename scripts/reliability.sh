#!/usr/bin/env bash
# Run the reliability scenarios (faults, load, PHI scan: the tests marked `reliability`) against
# the real servers, then print the README's reliability table from the figures they recorded.
#
#   bash scripts/reliability.sh                     # figures to bench/results/reliability-<date>.jsonl
#   bash scripts/reliability.sh /tmp/figures.jsonl  # or to this file (replaced)
#   bash scripts/reliability.sh /tmp/f.jsonl --load-model tiny   # more pytest arguments follow
#
# Each scenario appends one JSON line (tests/reliability_figures.py) to $MEDVLM_RELIABILITY_OUT;
# bench/reliability_table.py prints them as a markdown table with the machine's CPU count.
# The tests run as scripts/test.sh runs them (loopback-only network namespace); their own
# assertions decide the exit code, and the table is printed whatever it is.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$here/.venv}"
cd "$here"

out="${1:-bench/results/reliability-$(date -u +%Y-%m-%d).jsonl}"
[ "$#" -eq 0 ] || shift
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
rm -f "$out"
export MEDVLM_RELIABILITY_OUT="$out"

started=$(date +%s)
status=0
bash "$here/scripts/test.sh" -m reliability "$@" || status=$?
echo "reliability: scenarios finished in $(( $(date +%s) - started ))s (pytest exit $status); figures in $out"
echo
if [ -s "$out" ]; then
  "$venv/bin/python" "$here/bench/reliability_table.py" "$out"
else
  echo "reliability: no scenario recorded figures" >&2
  [ "$status" -ne 0 ] || status=1
fi
exit "$status"
