"""Finding labels from free-text radiology reports: the ``Labeler`` interface and a rule labeler.

The fairness monitor scores a model's draft against the radiologist's FINAL signed report, which
is free text. A ``Labeler`` turns that text into ``ReportLabels``: for each ``FindingName`` the
report mentions, whether it is present, absent or uncertain. ``RuleLabeler`` is the default; a
model-based labeler (CheXbert and the like) can replace it by satisfying the same protocol.

How ``RuleLabeler`` works (in the spirit of the NIH / CheXpert labeler and NegBio, but with
regular expressions instead of a dependency parse, and nothing outside the standard library):

1. Normalise: lower case; drop the sections that do not describe this image (indication,
   history, comparison, technique: ``IGNORED_SECTIONS``), each up to the next known header or
   the end of its line; expand shorthand (``r/o``, ``w/o``, ``s/p``, ``vs.``); hyphens between
   letters become spaces (``ground-glass`` -> ``ground glass``).
2. Split into sentences at ``.`` (not inside a decimal such as ``1.5 cm``), ``;``, ``?``,
   ``!`` and line breaks; split each sentence into clauses at ``:`` and before the words of
   ``SCOPE_BOUNDARIES`` (``but``, ``however``, ``although``, ``which``, ``except``, ``there
   is`` ...). A trigger never reaches across a clause boundary.
3. Phrase rules (``PHRASE_RULES``) label fixed normal phrasings directly: "heart size is
   normal" -> cardiomegaly absent, "the lungs are clear" -> lung opacity and consolidation
   absent, "no acute cardiopulmonary process" -> the common acute findings absent.
4. Mentions: each finding has a list of synonyms (``FINDING_PATTERNS``) matched on word
   boundaries (``mass`` does not match ``massive``), minus exclusions (``FINDING_EXCLUSIONS``:
   a pericardial effusion is not a pleural effusion, soft-tissue edema is not pulmonary edema).
5. Triggers: negation and uncertainty phrases that act on mentions after them (``PRE_*``) or
   before them (``POST_*``), and pseudo-triggers (``PSEUDO_TRIGGERS``: "no change in") that
   look like negation but are not. Overlapping matches are resolved pseudo first, then
   uncertainty, then negation, longest first: so "cannot be excluded" is uncertain and never
   read as the negation "excluded".
6. Each mention takes the nearest pre-trigger before it in its clause (a negation carries over
   a list: "no effusion, pneumothorax or consolidation"), unless a verb (``BLOCKING_WORDS``)
   stands between them ("no pneumothorax is seen and the effusion is small"); and the nearest
   post-trigger after it, with neither a comma nor such a verb between ("effusion or
   pneumothorax is not seen"). Uncertain if either is an uncertainty trigger, else absent if
   either is a negation, else present. "No opacity to suggest pneumonia": phrases of
   ``NEGATION_CARRYING_UNCERTAINTY`` take on a negation earlier in their clause.
7. Mentions of one finding are combined over the report: present beats uncertain beats absent,
   as in CheXpert's aggregation (a positive mention anywhere wins).

Known limits (rules, not a parser):

* A negation runs to the end of its clause across commas: "No pneumothorax, small effusion"
  negates the effusion too (write "No pneumothorax. Small effusion." or use "but").
* A pre-trigger applies to every later mention in its clause without a verb between, so
  "Possible small effusion and atelectasis" makes both uncertain.
* Temporal language is not modelled: "resolving pneumonia", "decreased effusion" and "old rib
  fractures" are present; "interval removal of", "resolved" and "no longer seen" are absent.
* The nearest pre-trigger wins: "Possible effusion, no pneumothorax" gives an uncertain
  effusion and an absent pneumothorax (a blanket "uncertainty beats negation" would make the
  pneumothorax uncertain). Where the two triggers overlap in the text, uncertainty wins.
* Vocabulary is deliberately narrow: "vascular congestion" and "CHF" are not edema, "volume
  loss" is not atelectasis, "blunting of the costophrenic angle" is not an effusion, sternotomy
  wires are not support devices, and ``OTHER`` is never labeled. A word such as "may" in a
  date ("compared with May 3") is still read as uncertainty.
* An ignored section ends at the next known header or at the end of its line, so an indication
  run into the findings on one line without a header hides them.
* English only; no spelling correction; abbreviations beyond those in ``_SHORTHAND`` are not
  expanded.

The module does no I/O and does not log: report text may identify a patient.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

from pipeline.report import FindingName, Presence

__all__ = [
    "BLOCKING_WORDS",
    "FINDING_EXCLUSIONS",
    "FINDING_PATTERNS",
    "IGNORED_SECTIONS",
    "KNOWN_SECTIONS",
    "NEGATION_CARRYING_UNCERTAINTY",
    "PHRASE_RULES",
    "POST_NEGATION",
    "POST_UNCERTAINTY",
    "PRE_NEGATION",
    "PRE_UNCERTAINTY",
    "PSEUDO_TRIGGERS",
    "SCOPE_BOUNDARIES",
    "Evidence",
    "Labeler",
    "PhraseRule",
    "ReportLabels",
    "RuleLabeler",
    "combine",
]

#: CheXpert's "No Finding" ignores these: a report with only devices has no finding.
_NOT_FINDINGS = frozenset({FindingName.SUPPORT_DEVICES, FindingName.OTHER})
_RANK = {Presence.ABSENT: 0, Presence.UNCERTAIN: 1, Presence.PRESENT: 2}
_ORDER = {name: index for index, name in enumerate(FindingName)}


def combine(first: Presence, second: Presence) -> Presence:
    """Two mentions of one finding as one label: present beats uncertain beats absent."""
    return first if _RANK[first] >= _RANK[second] else second


@dataclass(frozen=True)
class ReportLabels:
    """The findings one report mentions. A finding it does not mention is not a key.

    ``findings`` is read-only (a ``MappingProxyType`` in ``FindingName`` order); keys and values
    given as plain strings are converted, and unknown ones raise ``ValueError``.
    """

    findings: Mapping[FindingName, Presence]

    def __post_init__(self) -> None:
        converted = {FindingName(k): Presence(v) for k, v in self.findings.items()}
        ordered = dict(sorted(converted.items(), key=lambda item: _ORDER[item[0]]))
        object.__setattr__(self, "findings", MappingProxyType(ordered))

    def presence(self, name: FindingName) -> Presence | None:
        """The label of ``name``, or ``None`` if the report does not mention it."""
        return self.findings.get(name)

    @property
    def has_finding(self) -> bool:
        """A finding other than support devices and ``other`` is present."""
        return any(
            presence is Presence.PRESENT and name not in _NOT_FINDINGS
            for name, presence in self.findings.items()
        )

    @property
    def no_finding(self) -> bool:
        """CheXpert's "No Finding": nothing but support devices or ``other`` is present.

        Uncertain findings do not count here (CheXpert's own "No Finding" also excludes
        uncertain ones; check ``findings`` for that stricter reading).
        """
        return not self.has_finding

    def __hash__(self) -> int:
        return hash(frozenset(self.findings.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        # A mappingproxy cannot be pickled; labels cross process (Ray) boundaries.
        return (ReportLabels, (dict(self.findings),))


@runtime_checkable
class Labeler(Protocol):
    """Extracts ``ReportLabels`` from report text. ``name`` identifies it and its version."""

    @property
    def name(self) -> str: ...

    def label(self, text: str) -> ReportLabels: ...


# --------------------------------------------------------------------------------------------
# Rule tables. Each entry is a regular expression fragment, matched case-insensitively (the
# text is lower-cased) on word boundaries against normalised text: single spaces, hyphens
# between letters replaced by spaces.
# --------------------------------------------------------------------------------------------

_ADV = (
    r"(?:(?:mildly|moderately|markedly|severely|slightly|minimally|massively|again|still"
    r"|stably|significantly|substantially) ){0,2}"
)
#: An optional auxiliary in front of a post-trigger: "(has been) removed", "(is) not seen".
_AUX = r"(?:(?:is|are|was|were|has|have|had) (?:been )?)?"
_COPULA = r"(?:is|are|remains?|appears?|was|were)"
_NOT_NOT = r"(?:(?!not\b)\w+ )"  # a filler word that is not "not"

FINDING_PATTERNS: Mapping[FindingName, tuple[str, ...]] = MappingProxyType(
    {
        FindingName.ENLARGED_CARDIOMEDIASTINUM: (
            r"widened (?:superior )?mediastin(?:um|al silhouette|al contours?)",
            r"widening of the (?:superior )?mediastinum",
            r"mediastinal widening",
            rf"mediastinum {_COPULA} {_ADV}widened",
            r"enlarged cardio ?mediastinal (?:silhouette|contours?)",
            rf"cardio ?mediastinal (?:silhouette|contours?) {_COPULA} {_ADV}(?:enlarged|widened)",
            r"enlargement of the cardio ?mediastinal (?:silhouette|contours?)",
        ),
        FindingName.CARDIOMEGALY: (
            r"cardiomegaly",
            r"(?:enlarged|large) (?:heart|cardiac silhouette|cardiac contour)(?: size)?",
            rf"(?:heart|cardiac silhouette|cardiac contour)(?: size)? {_COPULA} {_ADV}"
            r"(?:enlarged|large|increased|larger than normal)",
            r"(?:cardiac|heart) enlargement",
            r"enlargement of the (?:heart|cardiac silhouette)",
            r"increased (?:heart|cardiac) size",
        ),
        FindingName.LUNG_OPACITY: (
            r"opacit(?:y|ies)",
            r"opacification",
            r"opacified",
            r"infiltrates?",
            r"infiltration",
            r"air ?space (?:disease|process)",
            r"ground glass",
        ),
        FindingName.LUNG_LESION: (
            r"nodules?",
            r"nodular (?:opacit(?:y|ies)|densit(?:y|ies))",
            r"mass(?:es)?",
            r"lesions?",
            r"tumou?rs?",
            r"neoplasms?",
        ),
        FindingName.EDEMA: (r"edema",),
        FindingName.CONSOLIDATION: (r"consolidat(?:ion|ions|ive|ed)",),
        FindingName.PNEUMONIA: (
            r"pneumonias?",
            r"bronchopneumonia",
            r"infectious (?:process|etiology)",
            r"infections?",
        ),
        FindingName.ATELECTASIS: (
            r"atelectas[ie]s",
            r"atelectatic",
            r"collapsed?",
        ),
        FindingName.PNEUMOTHORAX: (
            r"pneumothorax",
            r"pneumothoraces",
            r"hydropneumothorax",
            r"ptx",
        ),
        FindingName.PLEURAL_EFFUSION: (
            r"pleural effusions?",
            r"effusions?",
            r"pleural fluid",
            r"hydrothorax",
            r"hydropneumothorax",
        ),
        FindingName.PLEURAL_OTHER: (
            r"pleural (?:thickening|plaques?|calcifications?|scarring|fibrosis)",
            r"fibrothorax",
        ),
        FindingName.FRACTURE: (r"fractures?", r"fractured", r"fx"),
        FindingName.SUPPORT_DEVICES: (
            r"endotracheal tubes?",
            r"et tubes?",
            r"ett",
            r"tracheostomy(?: tubes?)?",
            r"(?:nasogastric|orogastric|feeding|enteric|gastric|ng|og) tubes?",
            r"ngt",
            r"ogt",
            r"dobhoff",
            r"chest tubes?",
            r"pleural (?:catheters?|drains?)",
            r"pigtail(?: catheters?)?",
            r"(?:central|central venous|picc|midline|arterial|dialysis|hemodialysis|ij"
            r"|internal jugular|subclavian|femoral|swan ganz|pulmonary artery) "
            r"(?:lines?|catheters?)",
            r"picc",
            r"swan ganz",
            r"cvc",
            r"lines and tubes",
            r"tubes and lines",
            r"catheters?",
            r"tubes?",
            r"drains?",
            r"cannulas?",
            r"(?:pacemaker|pacer|icd|aicd|defibrillator)(?: (?:leads?|wires?|generator|device))?",
            r"(?:pacing|transvenous) (?:leads?|wires?)",
            r"loop recorder",
            r"mediport",
            r"port a cath",
            r"portacath",
            r"(?:chest|chest wall|infusion|power) port",
            r"intra aortic balloon pump",
            r"iabp",
            r"impella",
            r"lvad",
            r"ventricular assist device",
            r"(?:prosthetic|mechanical|bioprosthetic) (?:aortic |mitral |tricuspid )?valves?",
            r"valve (?:replacement|prosthesis)",
            r"support devices?",
        ),
        FindingName.OTHER: (),
    }
)

#: Text that contains a synonym but is not that finding; a mention inside one is ignored.
FINDING_EXCLUSIONS: Mapping[FindingName, tuple[str, ...]] = MappingProxyType(
    {
        FindingName.LUNG_LESION: (
            r"mass effect",
            r"(?:osseous|bony|bone|lytic|sclerotic|blastic|skin|cutaneous|breast|soft tissue"
            r"|chest wall|liver|hepatic|renal|adrenal|thyroid|mediastinal) "
            r"(?:lesions?|mass(?:es)?|nodules?)",
        ),
        FindingName.EDEMA: (
            r"(?:soft tissue|subcutaneous|chest wall|peripheral|extremity|scalp|facial|airway"
            r"|laryngeal) edema",
        ),
        FindingName.PNEUMONIA: (
            r"(?:urinary tract|urinary|skin|wound|soft tissue|line|catheter|bloodstream) "
            r"infections?",
        ),
        FindingName.ATELECTASIS: (
            r"(?:vertebral|vertebra|vertebral body|compression) collapsed?",
            r"collapse of (?:the )?(?:\w+ )?(?:vertebral|vertebra|vertebral body|[tl]\d{1,2})",
        ),
        FindingName.PLEURAL_EFFUSION: (r"(?:pericardial|joint) effusions?",),
        FindingName.FRACTURE: (
            r"fractured (?:\w+ )?wires?",
            r"wire fractures?",
            r"fracture of (?:the |a |one |several )?(?:\w+ )?wires?",
        ),
    }
)


@dataclass(frozen=True)
class PhraseRule:
    """A fixed phrasing that labels findings directly, whatever the triggers say."""

    pattern: str
    labels: tuple[tuple[FindingName, Presence], ...]


def _normal(subject: str) -> str:
    """The phrasings "SUBJECT (is) (grossly) normal" and "normal SUBJECT".

    Only a few filler words may stand between subject and "normal", so that "heart size is
    larger than normal" is not read as a normal heart size.
    """
    normal = (
        r"(?:normal|within normal limits|unremarkable|not enlarged|not widened|top normal"
        r"|upper normal|(?:at )?(?:the )?upper limits? of normal)"
    )
    filler = (
        r"(?:(?:grossly|overall|essentially|otherwise|again|still|stable|stably|unchanged|and) )"
    )
    return (
        rf"(?:{subject}) (?:{_COPULA} )?{filler}{{0,3}}{normal}"
        rf"|(?:normal|unremarkable) (?:{subject})"
    )


_ABSENT = Presence.ABSENT
_HEART = r"heart size|heart|cardiac size|cardiac silhouette|cardiac contours?|size of the heart"
_CARDIOMEDIASTINAL = (
    r"cardio ?mediastinal (?:silhouettes?|contours?|structures?)(?: and hil(?:a|ar contours))?"
    r"|cardiac and mediastinal (?:silhouettes?|contours?)"
    r"|mediastinal and cardiac (?:silhouettes?|contours?)"
    r"|heart and mediastinum"
)
_MEDIASTINUM = (
    r"mediastinum|mediastinal (?:silhouette|contours?|width)(?: and hil(?:a|ar contours))?"
)
#: Acute findings set absent by a report-level "no acute cardiopulmonary process".
_ACUTE = (
    FindingName.PNEUMOTHORAX,
    FindingName.PLEURAL_EFFUSION,
    FindingName.CONSOLIDATION,
    FindingName.PNEUMONIA,
    FindingName.EDEMA,
)

PHRASE_RULES: tuple[PhraseRule, ...] = (
    PhraseRule(_normal(_HEART), ((FindingName.CARDIOMEGALY, _ABSENT),)),
    PhraseRule(
        r"heart size (?:is )?borderline|borderline (?:heart|cardiac) size",
        ((FindingName.CARDIOMEGALY, Presence.UNCERTAIN),),
    ),
    PhraseRule(
        _normal(_CARDIOMEDIASTINAL),
        ((FindingName.CARDIOMEGALY, _ABSENT), (FindingName.ENLARGED_CARDIOMEDIASTINUM, _ABSENT)),
    ),
    PhraseRule(_normal(_MEDIASTINUM), ((FindingName.ENLARGED_CARDIOMEDIASTINUM, _ABSENT),)),
    PhraseRule(
        rf"(?:lungs|lung fields|lung) (?:{_COPULA} )?{_NOT_NOT}{{0,3}}?clear|clear lungs",
        ((FindingName.LUNG_OPACITY, _ABSENT), (FindingName.CONSOLIDATION, _ABSENT)),
    ),
    PhraseRule(
        r"no (?:(?:evidence|signs?) of )?(?:(?:acute|active|significant) )*"
        r"(?:cardiopulmonary|intrathoracic|cardiothoracic|thoracic|chest) "
        r"(?:process(?:es)?|abnormalit(?:y|ies)|disease|findings?|pathology)"
        r"|no (?:(?:evidence|signs?) of )?(?:acute|active) "
        r"(?:process(?:es)?|abnormalit(?:y|ies)|findings?|disease)"
        r"|normal (?:chest )?(?:radiographs?|x rays?|study|exam(?:ination)?)",
        tuple((name, _ABSENT) for name in _ACUTE),
    ),
    PhraseRule(
        r"no (?:(?:evidence|signs?) of )?(?:acute )?(?:osseous|bony|skeletal) "
        r"(?:abnormalit(?:y|ies)|injury|findings?|process)"
        rf"|(?:osseous|bony|skeletal) structures {_COPULA} {_NOT_NOT}{{0,2}}?"
        r"(?:intact|unremarkable|normal)",
        ((FindingName.FRACTURE, _ABSENT),),
    ),
    PhraseRule(
        rf"costophrenic (?:angles?|sulci|sulcus) {_COPULA} {_NOT_NOT}{{0,2}}?"
        r"(?:sharp|clear|normal)",
        ((FindingName.PLEURAL_EFFUSION, _ABSENT),),
    ),
)

#: Negation acting on mentions after it in its clause.
PRE_NEGATION: tuple[str, ...] = (
    r"no",
    r"not",
    r"without",
    r"negative for",
    r"free of",
    r"clear of",
    r"no evidence (?:of|for)",
    r"no signs? of",
    r"absence of",
    r"absent",
    r"resolution of",
    r"resolved",
    r"removal of",
    r"rules out",
    r"ruled out",
    r"no longer",
    r"neither",
    r"nor",
)
#: Negation acting on mentions before it: "pneumothorax is not seen", "... has resolved".
POST_NEGATION: tuple[str, ...] = (
    rf"{_AUX}(?:not|no longer) (?:(?:definitely|clearly|convincingly|again|currently"
    r"|radiographically) )?(?:seen|identified|visualized|appreciated|present|demonstrated"
    r"|evident|detected|noted|visible|apparent)",
    rf"{_AUX}(?:resolved|removed|cleared|withdrawn|excluded|ruled out|absent)",
    r"removal",
)
#: Uncertainty acting on mentions after it in its clause.
PRE_UNCERTAINTY: tuple[str, ...] = (
    r"may",
    r"might",
    r"could",
    r"possible",
    r"possibly",
    r"probable",
    r"probably",
    r"likely",
    r"unlikely",
    r"presumed",
    r"presumably",
    r"suspected",
    r"suspect",
    r"question of",
    r"questionable",
    r"equivocal",
    r"borderline",
    r"indeterminate",
    r"uncertain",
    r"unclear",
    r"not clear",
    r"versus",
    r"vs",
    r"suggest",
    r"suggests",
    r"suggesting",
    r"suggestion of",
    r"(?:cannot|can not|could not) (?:exclude|rule out)",
    r"difficult to exclude",
    r"rule out",
    r"to exclude",
    r"(?:evaluate|assess) for",
    r"differential (?:diagnosis )?(?:includes?|of)",
    r"maybe",
    r"perhaps",
    r"favou?r(?:s|ed)?",
    r"consider",
)
#: Uncertainty acting on mentions before it: "pneumonia cannot be excluded".
POST_UNCERTAINTY: tuple[str, ...] = (
    r"(?:cannot|can not|could not|may not) be (?:entirely |completely |definitely )?"
    r"(?:excluded|ruled out)",
    rf"{_AUX}not (?:entirely |completely |definitely )?(?:excluded|ruled out)",
    rf"{_AUX}(?:possible|suspected|questioned|questionable|equivocal|favou?red|considered"
    r"|uncertain|indeterminate|unlikely)",
    rf"{_AUX}(?:most |more |also )?(?:likely|probable)(?=\s*(?:,|$))",
    r"(?:likely|possibly|probably) (?:present|seen|noted)",
    r"(?:may|could|might) be present",
    r"versus",
    r"vs",
    r"difficult to exclude",
)
#: Uncertainty phrases that, after a negation in the same clause, continue it instead:
#: "no consolidation to suggest pneumonia" is a negative pneumonia.
NEGATION_CARRYING_UNCERTAINTY: tuple[str, ...] = (
    r"to suggest",
    r"to indicate",
    r"suggestive of",
    r"suspicious (?:for|of)",
    r"concerning for",
    r"concern for",
    r"worrisome for",
)
#: Look like a trigger, are not one: they shield mentions from triggers beyond them.
PSEUDO_TRIGGERS: tuple[str, ...] = (
    r"(?:no|without) (?:(?:significant|appreciable|substantial|interval|definite|major|gross"
    r"|further) )*(?:change|changes|increase|decrease|progression|worsening|improvement)",
    r"not (?:(?:significantly|substantially|appreciably|markedly) )?"
    r"(?:changed|increased|decreased|improved)",
    rf"{_AUX}not (?:yet )?(?:been )?(?:resolved|removed|cleared)",
    r"not (?:well|entirely|completely|fully) (?:seen|visualized|evaluated|assessed|included)",
    r"not only",
    r"gram negative",
)
#: A new clause starts before these words (and at ":"). "No pneumothorax but a small effusion".
SCOPE_BOUNDARIES: tuple[str, ...] = (
    r"but",
    r"however",
    r"although",
    r"though",
    r"whereas",
    r"while",
    r"which",
    r"except",
    r"exception of",
    r"apart from",
    r"aside from",
    r"other than",
    r"otherwise",
    r"nevertheless",
    r"nonetheless",
    r"there (?:is|are|was|were|has been|have been)",
)
#: Verbs that end a trigger's reach within a clause (see step 6 of the module docstring).
BLOCKING_WORDS: tuple[str, ...] = (
    r"is",
    r"are",
    r"was",
    r"were",
    r"has",
    r"have",
    r"had",
    r"remains?",
    r"appears?",
    r"persists?",
    r"shows?",
    r"demonstrates?",
    r"measures?",
    r"seen",
    r"noted",
    r"identified",
    r"present",
    r"visualized",
)
#: Sections about the request or earlier studies, not this image: "evaluate for pneumonia".
IGNORED_SECTIONS: tuple[str, ...] = (
    "indication",
    "indications",
    "clinical indication",
    "clinical history",
    "clinical information",
    "history",
    "reason for exam",
    "reason for examination",
    "reason for study",
    "comparison",
    "comparisons",
    "technique",
)
#: Section headers the labeler recognises (a header is a name and a colon at a line start or
#: after a sentence end). Those in ``IGNORED_SECTIONS`` are dropped before labeling.
KNOWN_SECTIONS: tuple[str, ...] = (
    *IGNORED_SECTIONS,
    "examination",
    "exam",
    "procedure",
    "findings",
    "impression",
    "conclusion",
    "conclusions",
    "recommendation",
    "recommendations",
    "addendum",
    "summary",
    "opinion",
)

# --------------------------------------------------------------------------------------------
# Compiled forms.
# --------------------------------------------------------------------------------------------

_Kind = Literal["pseudo", "uncertainty", "negation"]
_Role = Literal["pre", "post"]
_PRIORITY: dict[_Kind, int] = {"pseudo": 0, "uncertainty": 1, "negation": 2}

_SHORTHAND: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\bw/o\b", "without"),
        (r"\br/o\b", "rule out"),
        (r"\bs/p\b", "status post"),
        (r"\bc/w\b", "consistent with"),
        (r"\bh/o\b", "history of"),
        (r"\bw/", "with "),
        (r"\be\.g\.", "eg"),
        (r"\bi\.e\.", "ie"),
        (r"\b(vs|approx|cf|dr)\.", r"\1"),
        (r"(?<=[a-z])-(?=[a-z])", " "),
    )
)
_SENTENCE_END = re.compile(r"[;\n!?]|(?<!\d)\.|\.(?!\d)")
_SPACE = re.compile(r"\s+")


def _words(fragments: Iterable[str]) -> str:
    """One alternation of ``fragments``, longest first, anchored on word boundaries."""
    ordered = sorted(fragments, key=len, reverse=True)
    return r"(?<!\w)(?:" + "|".join(ordered) + r")(?!\w)"


def _compile(fragments: Iterable[str]) -> re.Pattern[str] | None:
    listed = tuple(fragments)
    return re.compile(_words(listed)) if listed else None


_CLAUSE_SPLIT = re.compile(r":|(?=" + _words(SCOPE_BOUNDARIES) + ")")
_BLOCKING = re.compile(_words(BLOCKING_WORDS))
_MENTIONS: tuple[tuple[FindingName, re.Pattern[str], re.Pattern[str] | None], ...] = tuple(
    (name, compiled, _compile(FINDING_EXCLUSIONS.get(name, ())))
    for name, fragments in FINDING_PATTERNS.items()
    if (compiled := _compile(fragments)) is not None
)
_PHRASES: tuple[tuple[re.Pattern[str], PhraseRule], ...] = tuple(
    (re.compile(_words((rule.pattern,))), rule) for rule in PHRASE_RULES
)


@dataclass(frozen=True)
class _TriggerTable:
    kind: _Kind
    roles: frozenset[_Role]
    pattern: re.Pattern[str]
    carries_negation: bool = False


def _table(
    kind: _Kind, roles: Iterable[_Role], fragments: Iterable[str], *, carries: bool = False
) -> _TriggerTable:
    return _TriggerTable(kind, frozenset(roles), re.compile(_words(fragments)), carries)


_TRIGGERS: tuple[_TriggerTable, ...] = (
    _table("pseudo", ("pre", "post"), PSEUDO_TRIGGERS),
    _table("uncertainty", ("pre",), PRE_UNCERTAINTY),
    _table("uncertainty", ("post",), POST_UNCERTAINTY),
    _table("uncertainty", ("pre",), NEGATION_CARRYING_UNCERTAINTY, carries=True),
    _table("negation", ("pre",), PRE_NEGATION),
    _table("negation", ("post",), POST_NEGATION),
)


@dataclass(frozen=True)
class _Trigger:
    kind: _Kind
    roles: frozenset[_Role]
    start: int
    end: int
    text: str
    carries_negation: bool


@dataclass(frozen=True)
class Evidence:
    """Why a label was given: one mention or phrase in one clause (normalised text)."""

    finding: FindingName
    presence: Presence
    phrase: str
    clause: str
    trigger: str | None


def _triggers(clause: str) -> list[_Trigger]:
    """Non-overlapping triggers of ``clause``: pseudo, then uncertainty, then negation wins."""
    merged: dict[tuple[_Kind, int, int], _Trigger] = {}
    for table in _TRIGGERS:
        for match in table.pattern.finditer(clause):
            key = (table.kind, match.start(), match.end())
            found = merged.get(key)
            merged[key] = _Trigger(
                table.kind,
                table.roles | (found.roles if found else frozenset()),
                match.start(),
                match.end(),
                match.group(),
                table.carries_negation or (found.carries_negation if found else False),
            )
    accepted: list[_Trigger] = []
    for trigger in sorted(
        merged.values(), key=lambda t: (_PRIORITY[t.kind], t.start - t.end, t.start)
    ):
        if all(trigger.end <= other.start or trigger.start >= other.end for other in accepted):
            accepted.append(trigger)
    return sorted(accepted, key=lambda t: t.start)


def _resolve(clause: str, start: int, end: int, triggers: list[_Trigger]) -> _Trigger | None:
    """The trigger deciding the mention at ``clause[start:end]``, or ``None`` (present)."""
    before = [
        t
        for t in triggers
        if "pre" in t.roles and t.end <= start and not _BLOCKING.search(clause[t.end : start])
    ]
    after = [
        t
        for t in triggers
        if "post" in t.roles
        and t.start >= end
        and "," not in clause[end : t.start]
        and not _BLOCKING.search(clause[end : t.start])
    ]
    pre = before[-1] if before else None
    if pre is not None and pre.carries_negation:
        negations = [
            t for t in triggers if t.kind == "negation" and "pre" in t.roles and t.end <= pre.start
        ]
        if negations:
            pre = negations[-1]
    post = after[0] if after else None
    deciding = [t for t in (pre, post) if t is not None and t.kind != "pseudo"]
    deciding.sort(key=lambda t: _PRIORITY[t.kind])
    return deciding[0] if deciding else None


def _clause_evidence(clause: str) -> Iterator[Evidence]:
    for pattern, rule in _PHRASES:
        for match in pattern.finditer(clause):
            for name, presence in rule.labels:
                yield Evidence(name, presence, match.group(), clause, None)
    triggers = _triggers(clause)
    for name, pattern, exclusion in _MENTIONS:
        excluded = [m.span() for m in exclusion.finditer(clause)] if exclusion else []
        for match in pattern.finditer(clause):
            start, end = match.span()
            if any(s <= start and end <= e for s, e in excluded):
                continue
            trigger = _resolve(clause, start, end, triggers)
            presence = (
                Presence.PRESENT
                if trigger is None
                else Presence.UNCERTAIN
                if trigger.kind == "uncertainty"
                else Presence.ABSENT
            )
            yield Evidence(name, presence, match.group(), clause, trigger.text if trigger else None)


class RuleLabeler:
    """The default labeler: negation- and uncertainty-aware rules (see the module docstring).

    ``ignored_sections`` names the report sections dropped before labeling (lower case, any of
    ``KNOWN_SECTIONS`` or others); pass ``()`` to label the whole text.
    """

    name: str = "rules-v1"

    def __init__(self, *, ignored_sections: Iterable[str] = IGNORED_SECTIONS) -> None:
        self._ignored = frozenset(_SPACE.sub(" ", s.strip().lower()) for s in ignored_sections)
        headers = sorted(set(KNOWN_SECTIONS) | self._ignored, key=len, reverse=True)
        self._header = re.compile(
            r"(?:^|(?<=[.;]))[ \t]*(?P<name>"
            + "|".join(re.escape(h).replace(r"\ ", r"\s+") for h in headers)
            + r")[ \t]*:",
            re.MULTILINE,
        )

    def label(self, text: str) -> ReportLabels:
        findings: dict[FindingName, Presence] = {}
        for item in self.evidence(text):
            known = findings.get(item.finding)
            findings[item.finding] = (
                item.presence if known is None else combine(known, item.presence)
            )
        return ReportLabels(findings)

    def evidence(self, text: str) -> tuple[Evidence, ...]:
        """Every labeled mention and phrase, in text order within each clause: for audit."""
        return tuple(item for clause in self.clauses(text) for item in _clause_evidence(clause))

    def clauses(self, text: str) -> list[str]:
        """The normalised clauses the rules run on (ignored sections dropped)."""
        text = self._drop_sections(text.lower())
        for pattern, replacement in _SHORTHAND:
            text = pattern.sub(replacement, text)
        clauses: list[str] = []
        for sentence in _SENTENCE_END.split(text):
            for clause in _CLAUSE_SPLIT.split(_SPACE.sub(" ", sentence)):
                stripped = clause.strip(" ,")
                if stripped:
                    clauses.append(stripped)
        return clauses

    def _drop_sections(self, text: str) -> str:
        if not self._ignored:
            return text
        headers = list(self._header.finditer(text))
        kept: list[str] = []
        position = 0
        for index, header in enumerate(headers):
            name = _SPACE.sub(" ", header.group("name"))
            if header.start() < position or name not in self._ignored:
                continue
            following = headers[index + 1].start() if index + 1 < len(headers) else len(text)
            newline = text.find("\n", header.end())
            end = min(following, newline if newline != -1 else len(text))
            kept.extend((text[position : header.start()], "\n"))
            position = end
        kept.append(text[position:])
        return "".join(kept)
