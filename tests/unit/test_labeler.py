"""The rule labeler on hand-written final-report text, and the ``ReportLabels`` contract."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from pipeline.labeler import Labeler, ReportLabels, RuleLabeler, combine
from pipeline.report import FindingName, Presence

pytestmark = pytest.mark.unit

F = FindingName
PRESENT, ABSENT, UNCERTAIN = Presence.PRESENT, Presence.ABSENT, Presence.UNCERTAIN
LABELER = RuleLabeler()

# (id, report text, expected labels: None = the finding must not be mentioned, no_finding)
CASES: list[tuple[str, str, dict[FindingName, Presence | None], bool]] = [
    # Plain positives.
    ("effusion", "Small left pleural effusion.", {F.PLEURAL_EFFUSION: PRESENT}, False),
    (
        "cardiomegaly-edema",
        "Moderate cardiomegaly with mild interstitial pulmonary edema.",
        {F.CARDIOMEGALY: PRESENT, F.EDEMA: PRESENT, F.PLEURAL_EFFUSION: None},
        False,
    ),
    (
        "heart-enlarged-phrase",
        "The heart is mildly enlarged. Heart size is larger than normal.",
        {F.CARDIOMEGALY: PRESENT},
        False,
    ),
    (
        "consolidation-pneumonia",
        "New right lower lobe consolidation consistent with pneumonia.",
        {F.CONSOLIDATION: PRESENT, F.PNEUMONIA: PRESENT},
        False,
    ),
    (
        "tension-pneumothorax",
        "Large right tension pneumothorax with leftward mediastinal shift.",
        {F.PNEUMOTHORAX: PRESENT, F.ENLARGED_CARDIOMEDIASTINUM: None},
        False,
    ),
    ("widened-mediastinum", "Widened mediastinum.", {F.ENLARGED_CARDIOMEDIASTINUM: PRESENT}, False),
    (
        "rib-fracture",
        "Acute displaced fracture of the left fifth rib.",
        {F.FRACTURE: PRESENT},
        False,
    ),
    (
        "pleural-plaques",
        "Calcified pleural plaques bilaterally, consistent with prior asbestos exposure.",
        {F.PLEURAL_OTHER: PRESENT, F.PLEURAL_EFFUSION: None},
        False,
    ),
    (
        "atelectasis-collapse",
        "Complete collapse of the left lower lobe.",
        {F.ATELECTASIS: PRESENT},
        False,
    ),
    # Negation before the mention, after it, and over lists.
    ("neg-pre", "No pneumothorax.", {F.PNEUMOTHORAX: ABSENT}, True),
    ("neg-post-not-seen", "Pneumothorax is not seen.", {F.PNEUMOTHORAX: ABSENT}, True),
    (
        "neg-post-resolved",
        "The previously seen right apical pneumothorax has resolved.",
        {F.PNEUMOTHORAX: ABSENT},
        True,
    ),
    (
        "neg-list-oxford",
        "There is no pleural effusion, pneumothorax, or focal consolidation.",
        {F.PLEURAL_EFFUSION: ABSENT, F.PNEUMOTHORAX: ABSENT, F.CONSOLIDATION: ABSENT},
        True,
    ),
    (
        "neg-list-short",
        "No effusion, pneumothorax or consolidation.",
        {F.PLEURAL_EFFUSION: ABSENT, F.PNEUMOTHORAX: ABSENT, F.CONSOLIDATION: ABSENT},
        True,
    ),
    (
        "neg-post-list",
        "Effusion or pneumothorax is not seen.",
        {F.PLEURAL_EFFUSION: ABSENT, F.PNEUMOTHORAX: ABSENT},
        True,
    ),
    (
        "neg-evidence-of",
        "Without evidence of pulmonary edema.",
        {F.EDEMA: ABSENT},
        True,
    ),
    # Scope ends at "but", "however", and at a verb between trigger and mention.
    (
        "scope-but",
        "No pneumothorax but a small left effusion.",
        {F.PNEUMOTHORAX: ABSENT, F.PLEURAL_EFFUSION: PRESENT},
        False,
    ),
    (
        "scope-however",
        "No pneumothorax on the right, however a small left apical pneumothorax is present.",
        {F.PNEUMOTHORAX: PRESENT},
        False,
    ),
    (
        "scope-verb",
        "No pneumothorax is seen and the effusion is small.",
        {F.PNEUMOTHORAX: ABSENT, F.PLEURAL_EFFUSION: PRESENT},
        False,
    ),
    (
        "scope-without-after-mention",
        "Stable small right effusion without pneumothorax.",
        {F.PLEURAL_EFFUSION: PRESENT, F.PNEUMOTHORAX: ABSENT},
        False,
    ),
    (
        "post-trigger-stops-at-comma",
        "Small right effusion and atelectasis, pneumothorax not seen.",
        {F.PLEURAL_EFFUSION: PRESENT, F.ATELECTASIS: PRESENT, F.PNEUMOTHORAX: ABSENT},
        False,
    ),
    # Uncertainty.
    (
        "unc-cannot-be-excluded",
        "Early pneumonia cannot be excluded.",
        {F.PNEUMONIA: UNCERTAIN},
        True,
    ),
    (
        "unc-cannot-exclude",
        "Cannot exclude a small left pleural effusion.",
        {F.PLEURAL_EFFUSION: UNCERTAIN},
        True,
    ),
    ("unc-possible", "Possible right lower lobe pneumonia.", {F.PNEUMONIA: UNCERTAIN}, True),
    (
        "unc-may-represent",
        "Right basilar opacity may represent atelectasis or pneumonia.",
        {F.LUNG_OPACITY: PRESENT, F.ATELECTASIS: UNCERTAIN, F.PNEUMONIA: UNCERTAIN},
        False,
    ),
    (
        "unc-likely",
        "Left basilar opacity, likely atelectasis.",
        {F.LUNG_OPACITY: PRESENT, F.ATELECTASIS: UNCERTAIN},
        False,
    ),
    (
        "unc-versus-abbreviation",
        "Atelectasis vs. pneumonia at the left base.",
        {F.ATELECTASIS: UNCERTAIN, F.PNEUMONIA: UNCERTAIN},
        True,
    ),
    (
        "unc-which-clause",
        "Patchy opacity in the right lower lobe which is suspicious for pneumonia.",
        {F.LUNG_OPACITY: PRESENT, F.PNEUMONIA: UNCERTAIN},
        False,
    ),
    ("unc-borderline", "Borderline cardiomegaly.", {F.CARDIOMEGALY: UNCERTAIN}, True),
    # Uncertainty over negation where both match.
    ("unc-not-excluded", "Pneumonia is not excluded.", {F.PNEUMONIA: UNCERTAIN}, True),
    (
        "unc-cannot-be-ruled-out",
        "A small apical pneumothorax cannot be ruled out.",
        {F.PNEUMOTHORAX: UNCERTAIN},
        True,
    ),
    (
        "unc-after-negated-clause",
        "No pneumothorax, although a tiny apical pneumothorax cannot be excluded.",
        {F.PNEUMOTHORAX: UNCERTAIN},
        True,
    ),
    (
        "neg-carries-through-to-suggest",
        "No focal consolidation to suggest pneumonia.",
        {F.CONSOLIDATION: ABSENT, F.PNEUMONIA: ABSENT},
        True,
    ),
    (
        "nearest-pre-trigger-wins",
        "Possible small left effusion, no pneumothorax.",
        {F.PLEURAL_EFFUSION: UNCERTAIN, F.PNEUMOTHORAX: ABSENT},
        True,
    ),
    # Normal phrasing.
    ("normal-heart", "Heart size is normal.", {F.CARDIOMEGALY: ABSENT}, True),
    (
        "normal-cardiomediastinal",
        "The cardiomediastinal silhouette is within normal limits.",
        {F.CARDIOMEGALY: ABSENT, F.ENLARGED_CARDIOMEDIASTINUM: ABSENT},
        True,
    ),
    (
        "normal-lungs",
        "The lungs are clear.",
        {F.LUNG_OPACITY: ABSENT, F.CONSOLIDATION: ABSENT, F.PLEURAL_EFFUSION: None},
        True,
    ),
    (
        "normal-lungs-except",
        "The lungs are clear except for mild left basilar atelectasis.",
        {F.LUNG_OPACITY: ABSENT, F.ATELECTASIS: PRESENT},
        False,
    ),
    (
        "no-acute-process",
        "No acute cardiopulmonary process.",
        {F.PNEUMOTHORAX: ABSENT, F.PLEURAL_EFFUSION: ABSENT, F.CARDIOMEGALY: None},
        True,
    ),
    (
        "no-acute-process-with-chronic-effusion",
        "Stable small left pleural effusion. Otherwise no acute cardiopulmonary process.",
        {F.PLEURAL_EFFUSION: PRESENT, F.PNEUMOTHORAX: ABSENT},
        False,
    ),
    ("no-acute-osseous", "No acute osseous abnormality.", {F.FRACTURE: ABSENT}, True),
    # Several sentences: a positive mention anywhere wins.
    (
        "later-positive-wins",
        "No pleural effusion on the left. Small right pleural effusion.",
        {F.PLEURAL_EFFUSION: PRESENT},
        False,
    ),
    (
        "earlier-positive-wins",
        "Small right apical pneumothorax. No pneumothorax on the left.",
        {F.PNEUMOTHORAX: PRESENT},
        False,
    ),
    # Support devices do not count as a finding.
    (
        "devices-only",
        "Endotracheal tube terminates 4 cm above the carina. Right internal jugular central "
        "venous catheter tip in the SVC. Nasogastric tube courses below the diaphragm. "
        "Lungs are clear.",
        {F.SUPPORT_DEVICES: PRESENT, F.LUNG_OPACITY: ABSENT},
        True,
    ),
    (
        "device-removed",
        "Interval removal of the endotracheal tube.",
        {F.SUPPORT_DEVICES: ABSENT},
        True,
    ),
    (
        "device-not-well-visualized",
        "The tip of the enteric tube is not well visualized.",
        {F.SUPPORT_DEVICES: PRESENT},
        True,
    ),
    ("trachea-midline-not-a-line", "The trachea is midline.", {F.SUPPORT_DEVICES: None}, True),
    # Sentence splitting and word boundaries.
    (
        "decimal-does-not-split",
        "Stable 1.5 cm nodule in the right upper lobe; no pneumothorax.",
        {F.LUNG_LESION: PRESENT, F.PNEUMOTHORAX: ABSENT},
        False,
    ),
    (
        "massive-is-not-a-mass",
        "Massive left pleural effusion with mediastinal shift.",
        {F.PLEURAL_EFFUSION: PRESENT, F.LUNG_LESION: None},
        False,
    ),
    ("pericardial-not-pleural", "Small pericardial effusion.", {F.PLEURAL_EFFUSION: None}, True),
    ("soft-tissue-edema", "Soft tissue edema of the left chest wall.", {F.EDEMA: None}, True),
    (
        "vertebral-collapse-not-atelectasis",
        "Compression deformity with collapse of the T12 vertebral body.",
        {F.ATELECTASIS: None},
        True,
    ),
    # Pseudo-negation: "no change" and "not resolved" describe a present finding.
    (
        "no-change-in",
        "No significant change in the small left pleural effusion.",
        {F.PLEURAL_EFFUSION: PRESENT},
        False,
    ),
    (
        "not-resolved",
        "The right pneumothorax has not resolved.",
        {F.PNEUMOTHORAX: PRESENT},
        False,
    ),
    (
        "upper-case",
        "NO PNEUMOTHORAX. SMALL LEFT PLEURAL EFFUSION.",
        {F.PNEUMOTHORAX: ABSENT, F.PLEURAL_EFFUSION: PRESENT},
        False,
    ),
    # A whole signed report: the indication is not a finding of this image.
    (
        "full-report",
        "EXAMINATION: Chest radiograph, PA and lateral.\n"
        "INDICATION: Fever and cough, r/o pneumonia.\n"
        "COMPARISON: CT chest showing a 6 mm nodule.\n"
        "FINDINGS: Heart size is normal. The lungs are clear. No pleural effusion or "
        "pneumothorax. Mild degenerative changes of the thoracic spine.\n"
        "IMPRESSION: No acute cardiopulmonary process.",
        {
            F.PNEUMONIA: ABSENT,
            F.LUNG_LESION: None,
            F.CARDIOMEGALY: ABSENT,
            F.PLEURAL_EFFUSION: ABSENT,
            F.PNEUMOTHORAX: ABSENT,
            F.LUNG_OPACITY: ABSENT,
        },
        True,
    ),
]


@pytest.mark.parametrize(
    ("text", "expected", "no_finding"),
    [pytest.param(text, expected, nf, id=case_id) for case_id, text, expected, nf in CASES],
)
def test_rule_labeler_on_report_text(
    text: str, expected: dict[FindingName, Presence | None], no_finding: bool
) -> None:
    labels = LABELER.label(text)
    got = {name: labels.presence(name) for name in expected}
    assert got == expected, labels.findings
    assert labels.no_finding is no_finding
    assert labels.has_finding is not no_finding


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 35
    assert len({case_id for case_id, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "text",
    ["Small right pleural effusion.", "Small left pleural effusion.", "Small bilateral effusions."],
)
def test_laterality_does_not_change_the_label(text: str) -> None:
    assert LABELER.label(text).findings == {F.PLEURAL_EFFUSION: PRESENT}


def test_unmentioned_findings_are_not_in_the_mapping() -> None:
    labels = LABELER.label("Small left pleural effusion.")
    assert set(labels.findings) == {F.PLEURAL_EFFUSION}
    assert labels.presence(F.CARDIOMEGALY) is None


def test_empty_text_has_no_labels_and_no_finding() -> None:
    labels = LABELER.label("")
    assert labels.findings == {}
    assert labels.no_finding


def test_decimal_stays_in_one_clause() -> None:
    clauses = LABELER.clauses("Stable 1.5 cm nodule. No effusion; no pneumothorax.")
    assert clauses == ["stable 1.5 cm nodule", "no effusion", "no pneumothorax"]


def test_scope_words_start_a_new_clause() -> None:
    assert LABELER.clauses("No pneumothorax but a small effusion") == [
        "no pneumothorax",
        "but a small effusion",
    ]


def test_ignored_sections_can_be_kept() -> None:
    text = "INDICATION: Evaluate for pneumonia.\nFINDINGS: No pleural effusion."
    assert LABELER.label(text).presence(F.PNEUMONIA) is None
    kept = RuleLabeler(ignored_sections=()).label(text)
    assert kept.presence(F.PNEUMONIA) is UNCERTAIN
    assert kept.presence(F.PLEURAL_EFFUSION) is ABSENT


def test_ignored_section_on_one_line_ends_at_the_next_header() -> None:
    text = "Indication: r/o pneumonia. Findings: Right lower lobe pneumonia."
    assert LABELER.label(text).presence(F.PNEUMONIA) is PRESENT
    assert LABELER.label("Indication: r/o pneumonia.").presence(F.PNEUMONIA) is None


def test_evidence_names_the_deciding_trigger() -> None:
    evidence = LABELER.evidence("Pneumonia cannot be excluded. No pneumothorax.")
    by_finding = {item.finding: item for item in evidence}
    assert by_finding[F.PNEUMONIA].presence is UNCERTAIN
    assert by_finding[F.PNEUMONIA].trigger == "cannot be excluded"
    assert by_finding[F.PNEUMOTHORAX].presence is ABSENT
    assert by_finding[F.PNEUMOTHORAX].trigger == "no"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Possible pneumonia. Right lower lobe pneumonia.", PRESENT),
        ("No pneumonia. Pneumonia cannot be excluded.", UNCERTAIN),
        ("No pneumonia. Pneumonia is not seen.", ABSENT),
    ],
)
def test_mentions_are_combined_present_over_uncertain_over_absent(
    text: str, expected: Presence
) -> None:
    assert LABELER.label(text).presence(F.PNEUMONIA) is expected


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (PRESENT, ABSENT, PRESENT),
        (PRESENT, UNCERTAIN, PRESENT),
        (UNCERTAIN, ABSENT, UNCERTAIN),
        (ABSENT, ABSENT, ABSENT),
    ],
)
def test_combine_is_ordered_and_commutative(
    first: Presence, second: Presence, expected: Presence
) -> None:
    assert combine(first, second) is expected
    assert combine(second, first) is expected


def test_rule_labeler_satisfies_the_protocol() -> None:
    labeler = RuleLabeler()
    assert isinstance(labeler, Labeler)
    assert labeler.name == "rules-v1"
    assert not isinstance(object(), Labeler)


def test_another_labeler_can_be_plugged_in() -> None:
    class Fixed:
        name = "fixed"

        def label(self, text: str) -> ReportLabels:
            return ReportLabels({F.EDEMA: PRESENT})

    def run(labeler: Labeler, text: str) -> ReportLabels:
        return labeler.label(text)

    assert isinstance(Fixed(), Labeler)
    assert run(Fixed(), "anything").presence(F.EDEMA) is PRESENT


@pytest.mark.parametrize(
    ("findings", "has_finding"),
    [
        ({F.SUPPORT_DEVICES: PRESENT}, False),
        ({F.OTHER: PRESENT, F.SUPPORT_DEVICES: PRESENT}, False),
        ({F.PNEUMONIA: UNCERTAIN, F.EDEMA: ABSENT}, False),
        ({F.SUPPORT_DEVICES: PRESENT, F.FRACTURE: PRESENT}, True),
        ({}, False),
    ],
)
def test_has_finding_ignores_devices_other_and_non_present(
    findings: dict[FindingName, Presence], has_finding: bool
) -> None:
    labels = ReportLabels(findings)
    assert labels.has_finding is has_finding
    assert labels.no_finding is not has_finding


def test_report_labels_are_read_only_and_converted() -> None:
    labels = ReportLabels({"edema": "present", F.CARDIOMEGALY: ABSENT})  # type: ignore[dict-item]
    assert labels.findings == {F.CARDIOMEGALY: ABSENT, F.EDEMA: PRESENT}
    assert list(labels.findings) == [F.CARDIOMEGALY, F.EDEMA]  # FindingName order
    assert all(isinstance(key, FindingName) for key in labels.findings)
    with pytest.raises(TypeError):
        labels.findings[F.EDEMA] = ABSENT  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        labels.findings = {}  # type: ignore[misc]
    with pytest.raises(ValueError):
        ReportLabels({"not_a_finding": "present"})  # type: ignore[dict-item]


def test_report_labels_are_hashable_equal_and_picklable() -> None:
    labels = LABELER.label("Small left pleural effusion. No pneumothorax.")
    same = ReportLabels({F.PNEUMOTHORAX: ABSENT, F.PLEURAL_EFFUSION: PRESENT})
    assert labels == same
    assert hash(labels) == hash(same)
    assert labels != ReportLabels({F.PLEURAL_EFFUSION: PRESENT})
    restored = pickle.loads(pickle.dumps(labels))
    assert restored == labels
    assert restored.presence(F.PLEURAL_EFFUSION) is PRESENT
