"""Pure study preparation and the EHR selection rules both EHR connectors apply."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest

from medvlm.dev.synthetic_dicom import make_study
from pipeline.ehr_rules import EhrContext, created_ids, signed_report_of
from pipeline.fhir_resources import StudyLinks
from pipeline.identity import DicomPatient, patient_id_digest
from pipeline.study import FLAG_NO_STUDY_TIME, prepare_study

pytestmark = pytest.mark.unit

BERLIN = ZoneInfo("Europe/Berlin")


def _report(rid: str, status: str, issued: str, **extra: object) -> DiagnosticReport:
    return DiagnosticReport.model_validate(
        {
            "resourceType": "DiagnosticReport",
            "id": rid,
            "status": status,
            "code": {"text": "XR chest"},
            "issued": issued,
            **extra,
        }
    )


def test_the_signed_report_of_an_order_is_the_latest_signed_one_based_on_it() -> None:
    based = {"basedOn": [{"reference": "https://ehr.example/fhir/ServiceRequest/7/_history/2"}]}
    reports = [
        _report("old", "final", "2026-01-01T08:00:00Z", **based),
        _report("new", "amended", "2026-01-02T08:00:00+01:00", **based),
        _report("draft", "preliminary", "2026-01-03T08:00:00Z", **based),
        _report(
            "other", "final", "2026-01-04T08:00:00Z", basedOn=[{"reference": "ServiceRequest/8"}]
        ),
    ]
    found = signed_report_of(reports, order_id="7", accession_number=None, accession_system=None)
    assert found is not None and found.id == "new"


def test_without_a_report_on_the_order_the_accession_number_finds_it_in_its_system() -> None:
    carrying = _report(
        "acc", "final", "2026-01-01T08:00:00Z", identifier=[{"system": "urn:acc", "value": "A1"}]
    )
    assert (
        signed_report_of(
            [carrying], order_id="7", accession_number="A1", accession_system="urn:acc"
        )
        == carrying
    )
    assert (
        signed_report_of(
            [carrying], order_id="7", accession_number="A1", accession_system="urn:other"
        )
        is None
    )


def test_created_ids_read_relative_absolute_and_versioned_locations() -> None:
    assert created_ids(
        [
            "DiagnosticReport/12/_history/1",
            "https://ehr.example/fhir/Observation/5/_history/3",
            "Observation/6",
            None,
        ]
    ) == {"DiagnosticReport": ["12"], "Observation": ["5", "6"]}


def _context(study_uid: str) -> EhrContext:
    patient = Patient.model_validate({"resourceType": "Patient", "id": "p1"})
    order = ServiceRequest.model_validate(
        {
            "resourceType": "ServiceRequest",
            "id": "o1",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "reasonCode": [{"text": "Cough"}],
        }
    )
    imaging = ImagingStudy.model_validate(
        {
            "resourceType": "ImagingStudy",
            "id": "is1",
            "status": "available",
            "subject": {"reference": "Patient/p1"},
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        }
    )
    return EhrContext(patient, order, (), (), (imaging,))


def test_prepared_links_point_to_the_order_patient_imaging_study_and_time() -> None:
    (ds,) = make_study("CR", accession="ACC-1", patient_id="MRN-1", study_date="20261102")
    ds.TimezoneOffsetFromUTC = "+0100"
    uid = str(ds.StudyInstanceUID)
    prepared = prepare_study(
        ds,
        _context(uid),
        study_uid=uid,
        accession_number="ACC-1",
        accession_system=None,
        site_timezone=BERLIN,
    )
    assert prepared.links == StudyLinks(
        accession_number="ACC-1",
        patient="Patient/p1",
        service_request="ServiceRequest/o1",
        imaging_study="ImagingStudy/is1",
        study_uid=uid,
        study_started=dt.datetime(2026, 11, 2, 10, 15, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        dicom_patient=DicomPatient(patient_id_digest("MRN-1"), None),
    )
    assert prepared.prompt.context.indication == "Cough"
    assert prepared.prompt.sources == ("ServiceRequest/o1",)
    assert prepared.flags == ()


def test_links_survive_the_ledger_as_json_unchanged() -> None:
    links = StudyLinks(
        accession_number="A",
        patient="Patient/1",
        study_started=dt.date(2026, 11, 2),
        dicom_patient=DicomPatient("ab" * 32, "HOSP"),
    )
    assert StudyLinks.model_validate(links.model_dump(mode="json")) == links
    timed = links.model_copy(
        update={"study_started": dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.UTC)}
    )
    assert StudyLinks.model_validate(timed.model_dump(mode="json")) == timed


def test_a_study_without_a_date_has_no_time_and_is_flagged() -> None:
    (ds,) = make_study("CR")
    ds.StudyDate = ""
    prepared = prepare_study(
        ds,
        None,
        study_uid=str(ds.StudyInstanceUID),
        accession_number=None,
        accession_system=None,
        site_timezone=BERLIN,
    )
    assert prepared.links.study_started is None and prepared.links.patient is None
    assert prepared.flags == (FLAG_NO_STUDY_TIME,)
    assert prepared.links.accession_number == str(ds.StudyInstanceUID)
