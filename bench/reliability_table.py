"""The README's reliability table, from the JSON lines the reliability scenarios wrote.

Each line is one scenario's ``tests.reliability_figures.Figures`` (written when
``MEDVLM_RELIABILITY_OUT`` is set; ``scripts/reliability.sh`` sets it and calls this). Prints a
markdown table, one row per line in file order, then the machine the figures come from:

    .venv/bin/python bench/reliability_table.py bench/results/reliability-2026-12-01.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# (key in a line, column heading)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("scenario", "scenario"),
    ("faults", "faults injected"),
    ("studies", "studies"),
    ("drafted_once", "drafted once"),
    ("recorded_with_reason", "recorded with reason"),
    ("lost", "lost"),
    ("duplicated", "duplicated"),
    ("phi_hits", "PHI hits"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("seconds", "seconds"),
)
NOT_MEASURED = "–"


def load(path: Path) -> list[dict[str, Any]]:
    """The lines of ``path`` as dicts (blank lines skipped); a bad line names its number."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        rows.append(row)
    return rows


def cell(value: Any) -> str:
    """One table cell: a missing figure as a dash, floats rounded (RSS, seconds: whole units
    from 100 up, one decimal below), text with the characters markdown would misread escaped."""
    if value is None:
        return NOT_MEASURED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return " ".join(str(value).split()).replace("|", "\\|")


def table(rows: Iterable[dict[str, Any]]) -> str:
    """The markdown table of ``rows`` (every column of ``COLUMNS``; absent keys are dashes)."""
    lines = [
        "| " + " | ".join(heading for _, heading in COLUMNS) + " |",
        "|"
        + "|".join("---" if key in ("scenario", "faults") else "---:" for key, _ in COLUMNS)
        + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def machine(rows: Sequence[dict[str, Any]]) -> str:
    """Which machine the figures come from: the CPU counts the lines recorded (this machine's
    when none did)."""
    cpus = sorted({row["host_cpus"] for row in rows if row.get("host_cpus") is not None})
    if not cpus:
        cpus = [os.cpu_count() or 0]
    return f"CPUs: {', '.join(str(n) for n in cpus)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="JSON lines from the reliability scenarios")
    args = parser.parse_args(argv)
    try:
        rows = load(args.results)
    except (OSError, ValueError) as exc:
        print(f"reliability_table: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(
            f"reliability_table: {args.results}: no figures (did any scenario run?)",
            file=sys.stderr,
        )
        return 1
    print(table(rows))
    print()
    print(machine(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
