"""Side-by-side cost of the fairness computation: this project's vectorised path vs fairlearn.

One synthetic cohort (``tests/fairness_data.py``, planted disparity), every metric of
``pipeline.fairness`` over every attribute. Timed in one run:

- ``numpy point``: the group point estimates as ``compute_report`` takes them (masked sums);
- ``fairlearn point``: the same estimates from one fairlearn ``MetricFrame`` per attribute
  (checked equal to the numpy ones);
- ``compute_report``: the whole report, with ``--boot`` bootstrap resamples for every group's
  value, ratio and difference to the overall.

    .venv/bin/python bench/bench_fairness.py [--per-group 2000] [--boot 500]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairlearn.metrics import MetricFrame

from medvlm.settings import FairnessSettings
from pipeline.fairness import (
    FairnessRecord,
    _groups,
    _Table,
    compute_report,
    metric_definitions,
)
from pipeline.fairness_types import ATTRIBUTES
from pipeline.labeler import RuleLabeler
from tests.fairness_data import WINDOW_END, WINDOW_START, cohort, created_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-group", type=int, default=2000)
    parser.add_argument("--boot", type=int, default=500)
    args = parser.parse_args()

    labeler = RuleLabeler()
    cases = cohort(planted=True, per_group=args.per_group)
    records = [
        FairnessRecord(
            created_at=created_at(c),
            model_version="bench",
            subgroups=c.subgroups,
            outcome="drafted",
            draft=c.draft,
            output_chars=400,
            latency_s=1.0,
            final=labeler.label(c.signed_text),
        )
        for c in cases
    ]
    defs = metric_definitions()
    table = _Table.of(records, defs)
    print(f"{len(records)} studies, {len(defs)} metrics, {len(ATTRIBUTES)} attributes")

    started = time.perf_counter()
    ours: dict[tuple[str, str, str], float] = {}
    for attribute in ATTRIBUTES:
        for group, mask in _groups(records, attribute):  # as compute_report groups them
            num, den = table.num[:, mask].sum(axis=1), table.den[:, mask].sum(axis=1)
            for i, d in enumerate(defs):
                ours[(attribute, group, d.name)] = num[i] / den[i] if den[i] else math.nan
    numpy_s = time.perf_counter() - started

    started = time.perf_counter()
    index = np.arange(len(records))

    def estimator(i: int) -> Any:
        def metric(y_true: Any, _y_pred: Any) -> float:
            rows = np.asarray(y_true, dtype=int)
            den = table.den[i, rows].sum()
            return float(table.num[i, rows].sum() / den) if den else math.nan

        return metric

    theirs: dict[tuple[str, str, str], float] = {}
    for attribute in ATTRIBUTES:
        frame = MetricFrame(
            metrics={d.name: estimator(i) for i, d in enumerate(defs)},
            y_true=index,
            y_pred=index,
            sensitive_features=np.asarray([r.group(attribute) for r in records], dtype=object),
        )
        for group, row in frame.by_group.iterrows():
            for d in defs:
                theirs[(attribute, str(group), d.name)] = float(row[d.name])
    fairlearn_s = time.perf_counter() - started
    same = all(
        (math.isnan(v) and math.isnan(theirs[k])) or math.isclose(v, theirs[k])
        for k, v in ours.items()
    )

    settings = FairnessSettings(n_boot=args.boot)
    started = time.perf_counter()
    report = compute_report(
        records,
        since=WINDOW_START,
        until=WINDOW_END,
        attributes=ATTRIBUTES,
        min_group_size=settings.min_group_size,
        n_boot=args.boot,
        confidence=settings.confidence,
        rules=settings.rules,
    )
    report_s = time.perf_counter() - started

    print(f"{'path':<34}{'seconds':>10}{'vs numpy':>10}")
    print(f"{'numpy point estimates':<34}{numpy_s:>10.3f}{1.0:>10.1f}")
    print(f"{'fairlearn MetricFrame point':<34}{fairlearn_s:>10.3f}{fairlearn_s / numpy_s:>10.1f}")
    label = f"compute_report ({args.boot} resamples)"
    print(f"{label:<34}{report_s:>10.3f}{report_s / numpy_s:>10.1f}")
    print(f"estimates identical: {same}; alerts: {len(report.alerts)}")


if __name__ == "__main__":
    main()
