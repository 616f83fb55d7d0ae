from __future__ import annotations

import hashlib
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B.patient import Patient
from pydicom.dataset import Dataset

from medvlm.dev.sample_data import sample_file
from pipeline.identity import (
    DicomPatient,
    IdentityCheck,
    check_patient_identity,
    patient_id_digest,
    pseudonym_key_id,
)

pytestmark = pytest.mark.unit

MRN = "MRN-0042"
MRN_SYSTEM = "urn:oid:1.2.3.4.5.1"
OTHER_SYSTEM = "urn:oid:1.2.3.4.5.2"


def _patient(*identifiers: dict[str, Any]) -> Patient:
    return Patient.model_validate(
        {
            "resourceType": "Patient",
            "id": "syn-1",
            "identifier": list(identifiers),
            "name": [{"family": "Synthetic", "given": ["Jane"]}],
            "birthDate": "1970-01-01",
        }
    )


def _dicom(patient_id: str | None = MRN, issuer: str | None = None) -> DicomPatient:
    ds = Dataset()
    if patient_id is not None:
        ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    ds.PatientName = "Synthetic^Jane"
    return DicomPatient.from_dataset(ds)


def _check(
    dicom: DicomPatient,
    patient: Patient,
    *,
    system: str | None = MRN_SYSTEM,
    issuer_systems: dict[str, str] | None = None,
    key: bytes | None = None,
) -> IdentityCheck:
    result = check_patient_identity(
        dicom, patient, system=system, issuer_systems=issuer_systems or {}, key=key
    )
    # Whatever the outcome, the detail never carries the MRN, its digest, or the name.
    for secret in (MRN, "0042", str(dicom.digest), "Synthetic", "Jane", "1970"):
        assert secret not in result.detail
    return result


def test_digest_is_sha256_of_the_value_without_padding() -> None:
    expected = hashlib.sha256(MRN.encode()).hexdigest()
    assert patient_id_digest(MRN) == expected
    assert patient_id_digest(f" {MRN}  ") == expected
    assert _dicom(MRN + " ").digest == expected


def test_keyed_digest_is_an_hmac_that_differs_from_the_plain_one() -> None:
    keyed = patient_id_digest(MRN, key=b"site-secret")
    assert keyed != patient_id_digest(MRN)
    assert keyed == patient_id_digest(MRN, key=b"site-secret")
    assert keyed != patient_id_digest(MRN, key=b"other-secret")


def test_real_header_gives_a_digest_and_never_keeps_the_patient_id() -> None:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
    dicom = DicomPatient.from_dataset(ds)
    assert dicom.digest == hashlib.sha256(str(ds.PatientID).encode()).hexdigest()
    assert dicom.issuer is None
    assert str(ds.PatientID) not in repr(dicom)


def test_matching_mrn_in_the_configured_system_matches() -> None:
    result = _check(_dicom(), _patient({"system": MRN_SYSTEM, "value": MRN}))
    assert result.matches is True
    assert MRN_SYSTEM in result.detail


def test_same_value_in_another_system_is_a_mismatch_when_a_system_is_configured() -> None:
    result = _check(_dicom(), _patient({"system": OTHER_SYSTEM, "value": MRN}))
    assert result.matches is False
    assert "outside the expected system" in result.detail


def test_without_a_configured_system_a_value_in_any_system_matches() -> None:
    result = _check(_dicom(), _patient({"system": OTHER_SYSTEM, "value": MRN}), system=None)
    assert result.matches is True
    assert "any system" in result.detail


def test_identifier_without_system_does_not_satisfy_a_configured_system() -> None:
    result = _check(_dicom(), _patient({"value": MRN}))
    assert result.matches is False


def test_different_mrn_is_a_mismatch() -> None:
    result = _check(_dicom(), _patient({"system": MRN_SYSTEM, "value": "MRN-0043"}))
    assert result.matches is False
    assert result.detail == "PatientID matches no Patient.identifier"


def test_mrn_must_match_exactly_not_by_prefix_or_case() -> None:
    for value in ("MRN-00421", "mrn-0042", "MRN-004"):
        result = _check(_dicom(), _patient({"system": MRN_SYSTEM, "value": value}))
        assert result.matches is False, value


def test_issuer_mapped_to_a_system_requires_that_system() -> None:
    issuers = {"HOSP_B": OTHER_SYSTEM}
    in_mapped = _patient({"system": OTHER_SYSTEM, "value": MRN})
    in_configured = _patient({"system": MRN_SYSTEM, "value": MRN})
    matched = _check(_dicom(issuer="HOSP_B"), in_mapped, issuer_systems=issuers)
    assert matched.matches is True
    assert "mapped from IssuerOfPatientID" in matched.detail
    # The mapped system wins over the configured one: HOSP_B's MRN 0042 is not ours.
    assert _check(_dicom(issuer="HOSP_B"), in_configured, issuer_systems=issuers).matches is False


def test_unmapped_issuer_falls_back_to_the_configured_system() -> None:
    patient = _patient({"system": MRN_SYSTEM, "value": MRN})
    result = _check(_dicom(issuer="HOSP_C"), patient, issuer_systems={"HOSP_B": OTHER_SYSTEM})
    assert result.matches is True
    assert "mapped" not in result.detail


def test_assigner_that_disagrees_with_the_issuer_is_a_mismatch() -> None:
    patient = _patient(
        {"system": MRN_SYSTEM, "value": MRN, "assigner": {"display": "Other Hospital"}}
    )
    result = _check(_dicom(issuer="HOSP_A"), patient)
    assert result.matches is False
    assert "assigner disagrees" in result.detail


def test_assigner_agreeing_by_display_or_identifier_matches_ignoring_case() -> None:
    by_display = _patient({"system": MRN_SYSTEM, "value": MRN, "assigner": {"display": "hosp_a"}})
    by_identifier = _patient(
        {
            "system": MRN_SYSTEM,
            "value": MRN,
            "assigner": {"identifier": {"value": "HOSP_A"}, "display": "Hospital A"},
        }
    )
    for patient in (by_display, by_identifier):
        result = _check(_dicom(issuer="HOSP_A"), patient)
        assert result.matches is True
        assert "assigner agrees" in result.detail


def test_assigner_is_not_checked_when_the_images_name_no_issuer() -> None:
    patient = _patient(
        {"system": MRN_SYSTEM, "value": MRN, "assigner": {"display": "Other Hospital"}}
    )
    assert _check(_dicom(issuer=None), patient).matches is True


def test_one_agreeing_identifier_is_enough_when_another_disagrees() -> None:
    patient = _patient(
        {"system": MRN_SYSTEM, "value": MRN, "assigner": {"display": "Other Hospital"}},
        {"system": MRN_SYSTEM, "value": MRN, "assigner": {"display": "HOSP_A"}},
    )
    assert _check(_dicom(issuer="HOSP_A"), patient).matches is True


@pytest.mark.parametrize("patient_id", [None, "", "   "])
def test_images_without_patient_id_never_match(patient_id: str | None) -> None:
    dicom = _dicom(patient_id)
    assert dicom.digest is None
    result = _check(dicom, _patient({"system": MRN_SYSTEM, "value": MRN}), system=None)
    assert result == IdentityCheck(False, "the images carry no PatientID (0010,0020)")


def test_patient_without_identifiers_does_not_match() -> None:
    result = _check(_dicom(), _patient())
    assert result.matches is False


def test_digests_made_with_a_key_match_only_with_the_same_key() -> None:
    ds = Dataset()
    ds.PatientID = MRN
    dicom = DicomPatient.from_dataset(ds, key=b"site-secret")
    patient = _patient({"system": MRN_SYSTEM, "value": MRN})
    same = check_patient_identity(
        dicom, patient, system=MRN_SYSTEM, issuer_systems={}, key=b"site-secret"
    )
    unkeyed = check_patient_identity(dicom, patient, system=MRN_SYSTEM, issuer_systems={})
    assert same.matches is True
    assert unkeyed.matches is False
    assert "another pseudonym key" in unkeyed.detail


def test_a_digest_taken_under_another_key_is_told_apart_from_another_patient() -> None:
    """The site rotated job.pseudonym_key between reading the images and writing: the same
    patient, a different digest. The gate refuses (safe) and says why, never 'no match'."""
    ds = Dataset()
    ds.PatientID = MRN
    patient = _patient({"system": MRN_SYSTEM, "value": MRN})
    old = DicomPatient.from_dataset(ds, key=b"old-site-secret-0123")
    rotated = check_patient_identity(
        old, patient, system=MRN_SYSTEM, issuer_systems={}, key=b"new-site-secret-4567"
    )
    assert rotated.matches is False
    assert "requeue" in rotated.detail
    assert MRN not in rotated.detail
    # A row from before keys existed (no key_id) checked under a key: the same refusal.
    legacy = DicomPatient(patient_id_digest(MRN), None)
    assert "another pseudonym key" in _check(legacy, patient, key=b"new-site-secret-4567").detail
    other = _patient({"system": MRN_SYSTEM, "value": "OTHER-9"})
    assert (
        check_patient_identity(
            DicomPatient.from_dataset(ds, key=b"new-site-secret-4567"),
            other,
            system=MRN_SYSTEM,
            issuer_systems={},
            key=b"new-site-secret-4567",
        ).detail
        == "PatientID matches no Patient.identifier"
    )


def test_the_key_id_reveals_nothing_of_the_key_and_tells_keys_apart() -> None:
    a, b = pseudonym_key_id(b"site-secret-aaaaaaaa"), pseudonym_key_id(b"site-secret-bbbbbbbb")
    assert pseudonym_key_id(None) is None
    assert a is not None and b is not None and a != b and len(a) == 12
    assert "site-secret" not in a
