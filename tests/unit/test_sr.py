"""The draft as a DICOM SR (pipeline.sr): parses back with highdicom, says what the draft says,
is marked as an unverified AI draft, and lands in the source study with a stable UID."""

from __future__ import annotations

import io

import highdicom as hd
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipeline.fhir_resources import ModelIdentity, draft_id
from pipeline.report import DraftReport
from pipeline.sr import AI_NOTICE, build_sr, is_sr, sr_uids

pytestmark = pytest.mark.unit

REPORT = DraftReport.model_validate(
    {
        "rationale": "Left base blunting.",
        "findings": [
            {
                "name": "pleural_effusion",
                "presence": "present",
                "laterality": "left",
                "location": "costophrenic angle",
                "severity": "mild",
                "detail": "Blunting of the left costophrenic angle.",
            },
            {
                "name": "cardiomegaly",
                "presence": "absent",
                "laterality": "not_applicable",
                "location": "heart",
                "severity": "not_applicable",
                "detail": "Normal heart size.",
            },
        ],
        "impression": "Small left pleural effusion.",
        "critical": False,
        "recommendation": "none",
    }
)
MODEL = ModelIdentity(name="medgemma-4b-it", version="rev-1", manufacturer="Acme AI")


def _image(study: str, series: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.Modality = "DX"
    ds.PatientID = "MRN-1"
    ds.PatientName = "Müller^Jürgen"
    ds.PatientBirthDate = "19600102"
    ds.PatientSex = "M"
    ds.AccessionNumber = "ACC-1"
    ds.StudyDate = "20261201"
    ds.StudyTime = "101500"
    return ds


def _roundtrip(sr: Dataset) -> hd.sr.ComprehensiveSR:
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    back = hd.sr.srread(buf)
    assert isinstance(back, hd.sr.ComprehensiveSR)
    return back


def _items(ds: Dataset) -> list[Dataset]:
    """Every content item of the tree, depth first."""
    out: list[Dataset] = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def _named(ds: Dataset, meaning: str) -> list[Dataset]:
    return [i for i in _items(ds) if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def test_sr_parses_back_marked_as_unverified_ai_draft() -> None:
    study, series = generate_uid(), generate_uid()
    images = [_image(study, series), _image(study, series)]
    tag = draft_id("ACC-1", MODEL.version)
    back = _roundtrip(build_sr(REPORT, MODEL, draft_id=tag, evidence=images))

    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert back.VerificationFlag == "UNVERIFIED"
    assert back.CompletionFlag == "PARTIAL"
    assert back.PreliminaryFlag == "PRELIMINARY"
    assert back.Manufacturer == "Acme AI"
    assert back.ManufacturerModelName == "medgemma-4b-it"
    assert back.SoftwareVersions == "rev-1"
    assert "AI" in back.SeriesDescription
    comments = [i.TextValue for i in _named(back, "Comment")]
    assert AI_NOTICE in comments
    # The model is the device observer of the content.
    assert _named(back, "Observer Type")[0].ConceptCodeSequence[0].CodeValue == "121007"
    assert _named(back, "Device Observer Manufacturer")[0].TextValue == "Acme AI"
    assert "rev-1" in _named(back, "Device Observer Model Name")[0].TextValue


def test_sr_is_in_the_source_study_with_the_patient_of_the_images() -> None:
    study, series = generate_uid(), generate_uid()
    images = [_image(study, series), _image(study, series)]
    back = _roundtrip(build_sr(REPORT, MODEL, draft_id="draft-x", evidence=images))

    assert back.StudyInstanceUID == study
    assert back.SeriesInstanceUID != series
    assert str(back.PatientName) == "Müller^Jürgen"
    assert back.PatientID == "MRN-1"
    assert back.AccessionNumber == "ACC-1"
    (evidence,) = back.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == study
    (ref_series,) = evidence.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == series
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedSOPSequence} == {
        i.SOPInstanceUID for i in images
    }


def test_sr_carries_every_finding_with_presence_laterality_and_site() -> None:
    study, series = generate_uid(), generate_uid()
    back = _roundtrip(build_sr(REPORT, MODEL, draft_id="draft-x", evidence=[_image(study, series)]))
    (effusion,) = _named(back, "Pleural effusion")
    assert effusion.ValueType == "CODE"
    assert effusion.ConceptNameCodeSequence[0].CodeValue == "60046008"
    assert effusion.ConceptCodeSequence[0].CodeMeaning == "Present"
    assert _named(effusion, "Laterality")[0].ConceptCodeSequence[0].CodeValue == "7771000"
    assert _named(effusion, "Finding Site")[0].TextValue == "costophrenic angle"
    assert _named(effusion, "Severity (attribute)")[0].ConceptCodeSequence[0].CodeMeaning == "Mild"
    # No published code confirmed for cardiomegaly: the local scheme, no laterality.
    (heart,) = _named(back, "cardiomegaly")
    assert heart.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99MEDVLM"
    assert heart.ConceptCodeSequence[0].CodeMeaning == "Absent"
    assert _named(heart, "Laterality") == []
    assert _named(back, "Impression")[0].TextValue == "Small left pleural effusion."
    assert _named(back, "Recommendation")[0].TextValue == "none"


def test_sr_uids_are_stable_per_draft() -> None:
    study, series = generate_uid(), generate_uid()
    a = build_sr(REPORT, MODEL, draft_id="draft-1", evidence=[_image(study, series)])
    b = build_sr(REPORT, MODEL, draft_id="draft-1", evidence=[_image(study, series)])
    c = build_sr(REPORT, MODEL, draft_id="draft-2", evidence=[_image(study, series)])
    assert a.SOPInstanceUID == b.SOPInstanceUID == sr_uids("draft-1").instance
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert c.SOPInstanceUID != a.SOPInstanceUID
    assert len(a.SOPInstanceUID) <= 64


def test_sr_leaves_other_srs_out_of_the_evidence_and_needs_an_image() -> None:
    study, series = generate_uid(), generate_uid()
    image = _image(study, series)
    earlier = build_sr(REPORT, MODEL, draft_id="draft-1", evidence=[image])
    assert is_sr(earlier) and not is_sr(image)
    again = build_sr(REPORT, MODEL, draft_id="draft-1", evidence=[earlier, image])
    refs = again.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in refs] == [series]
    with pytest.raises(ValueError, match="source image"):
        build_sr(REPORT, MODEL, draft_id="draft-1", evidence=[earlier])


def test_random_weight_model_and_critical_flag_are_said_in_the_sr() -> None:
    study, series = generate_uid(), generate_uid()
    report = REPORT.model_copy(update={"critical": True})
    model = ModelIdentity(name="tiny", version="0", random_weights=True)
    back = _roundtrip(build_sr(report, model, draft_id="d", evidence=[_image(study, series)]))
    comments = " ".join(i.TextValue for i in _named(back, "Comment"))
    assert "RANDOM WEIGHTS" in comments
    assert "Critical result" in comments
