"""Figures of the reliability scenarios (faults, load, PHI scan), for the README's table.

A scenario test calls ``record(...)`` once with what it injected and what it counted; when
``MEDVLM_RELIABILITY_OUT`` names a file (``scripts/reliability.sh`` sets it), one JSON line is
appended to it, and ``bench/reliability_table.py`` prints the table from those lines. Without the
variable nothing is written: the test's own assertions are what CI checks.

Counts are taken from the real servers a test used (drafts per accession on the FHIR server,
ledger states), never from the flow's own tally.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Figures", "record"]

ENV = "MEDVLM_RELIABILITY_OUT"


@dataclass(frozen=True)
class Figures:
    """One scenario's outcome. ``lost`` = studies neither drafted once nor recorded with a
    reason in the ledger; ``duplicated`` = studies with more than one draft on the EHR. None:
    not measured by that scenario (shown as a dash)."""

    scenario: str
    faults: str
    studies: int
    drafted_once: int
    recorded_with_reason: int = 0
    lost: int | None = 0
    duplicated: int | None = 0
    phi_hits: int | None = None
    peak_rss_mib: float | None = None
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def record(figures: Figures) -> None:
    """Append ``figures`` as one JSON line to ``$MEDVLM_RELIABILITY_OUT`` (when set)."""
    out = os.environ.get(ENV)
    if not out:
        return
    line = {
        **asdict(figures),
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
