"""Synthetic cohorts for the fairness monitor's tests, with or without a planted disparity.

Each case is a drafted study: its subgroups, the draft the "model" made, and the text of the
radiologist's signed report. The planted disparity is the reference failure (CheXclusion):
in one group the draft says "no finding" far more often when the signed report has one.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from pipeline.report import (
    DraftReport,
    Finding,
    FindingName,
    Laterality,
    Presence,
    Severity,
)

POSITIVE_TEXT = "Moderate cardiomegaly. Small left pleural effusion."
NEGATIVE_TEXT = "Heart size is normal. Lungs are clear. No pleural effusion or pneumothorax."


def draft_report(present: bool, *, critical: bool = False) -> DraftReport:
    """A draft marking cardiomegaly and effusion present, or marking no finding present."""
    presence = Presence.PRESENT if present else Presence.ABSENT
    findings = [
        Finding(
            name=name,
            presence=presence,
            laterality=Laterality.NOT_APPLICABLE,
            location="chest",
            severity=Severity.NOT_APPLICABLE,
            detail="synthetic",
        )
        for name in (FindingName.CARDIOMEGALY, FindingName.PLEURAL_EFFUSION)
    ]
    return DraftReport(
        rationale="synthetic",
        findings=findings,
        impression="synthetic",
        critical=critical,
        recommendation="none",
    )


@dataclass(frozen=True)
class Case:
    index: int
    subgroups: dict[str, str]
    draft: DraftReport
    signed_text: str
    signed_positive: bool


def cohort(
    *,
    per_group: int = 200,
    planted: bool,
    seed: int = 7,
    small_group: int = 12,
) -> list[Case]:
    """Cases in sexes female/male plus a few of unknown sex, races A/B plus a small group.

    Half the signed reports have findings. The draft misses a present finding with
    probability 0.10 in every group, except, when ``planted``, 0.45 for ``sex=female``.
    ``small_group`` cases have race "Native Hawaiian or Other Pacific Islander".
    """
    rng = random.Random(seed)
    cases: list[Case] = []
    layout = [("female", per_group), ("male", per_group), ("unknown", per_group // 4)]
    for sex, count in layout:
        for _ in range(count):
            cases.append(_case(len(cases), sex, rng.choice(["White", "Black"]), planted, rng))
    for _ in range(small_group):
        race = "Native Hawaiian or Other Pacific Islander"
        cases.append(_case(len(cases), rng.choice(["female", "male"]), race, planted, rng))
    return cases


def _case(index: int, sex: str, race: str, planted: bool, rng: random.Random) -> Case:
    positive = rng.random() < 0.5
    miss = 0.45 if planted and sex == "female" else 0.10
    draft_positive = positive and rng.random() >= miss
    subgroups = {
        "sex": sex,
        "age_band": rng.choice(["18-39", "40-59", "60-79"]),
        "race": race,
        "ethnicity": "unknown",
        "site": "SYNTHETIC HOSPITAL",
        "manufacturer": rng.choice(["ACME", "Globex"]),
        "scanner_model": "unknown",
        "modality": "CR",
    }
    return Case(
        index=index,
        subgroups=subgroups,
        draft=draft_report(draft_positive, critical=draft_positive and rng.random() < 0.1),
        signed_text=POSITIVE_TEXT if positive else NEGATIVE_TEXT,
        signed_positive=positive,
    )


WINDOW_START = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
WINDOW_END = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def created_at(case: Case) -> dt.datetime:
    """Spread the cases evenly over the window (deterministically: golden-ratio steps)."""
    span = (WINDOW_END - WINDOW_START).total_seconds()
    return WINDOW_START + dt.timedelta(seconds=int((case.index * 0.6180339887) % 1.0 * span))
