"""Do a study's images belong to the order's patient? Pure logic, no I/O.

Before a draft is filed on a Patient, the DICOM Patient ID (0010,0020) and Issuer of Patient ID
(0010,0021) of the images (PS3.3 C.7.1.1, Patient Module) are compared with the Patient's
identifiers (FHIR ``Patient.identifier``). A mismatch means the study was sent under one
patient and ordered for another (a merge, a mis-registration, a wrong worklist pick), and the
draft must not be written.

The MRN itself never leaves this module: ``DicomPatient`` keeps a SHA-256 digest of it (so the
ledger can store and compare it), and ``IdentityCheck.detail`` names systems and outcomes only.
A plain digest of a short MRN can be reversed by trying all MRNs; pass ``key`` (a site secret)
to use HMAC-SHA-256 instead wherever the digest is kept beyond the check.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.patient import Patient
from pydicom.dataset import Dataset

__all__ = [
    "DicomPatient",
    "IdentityCheck",
    "check_patient_identity",
    "patient_id_digest",
    "pseudonym_key_id",
]


def patient_id_digest(value: str, *, key: bytes | None = None) -> str:
    """Hex SHA-256 of a patient identifier value (HMAC-SHA-256 with ``key`` when given).

    Leading and trailing spaces are not significant in LO values (PS3.5 6.2, Table 6.2-1), so
    they are stripped first; DICOM PatientID and FHIR ``Patient.identifier.value`` of the same
    MRN therefore give the same digest.
    """
    data = value.strip().encode("utf-8")
    if key is not None:
        return hmac.new(key, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def pseudonym_key_id(key: bytes | None) -> str | None:
    """A short name of ``key`` that reveals nothing of it (None: no key, plain SHA-256), kept
    beside a digest so that one taken under another key is told apart from a mismatch."""
    if key is None:
        return None
    return hmac.new(key, b"medvlm pseudonym key id", hashlib.sha256).hexdigest()[:12]


def _lo(value: object) -> str | None:
    """An LO header value stripped of padding, or None when absent or empty."""
    text = str(value).strip(" \x00") if value is not None else ""
    return text or None


@dataclass(frozen=True)
class DicomPatient:
    """Who the images say they belong to, without the MRN itself.

    ``digest``: ``patient_id_digest`` of Patient ID (0010,0020), None when the images carry
    none. ``issuer``: Issuer of Patient ID (0010,0021), the assigning authority's name (PS3.3
    C.7.1.1), None when absent. ``key_id``: ``pseudonym_key_id`` of the key the digest was
    taken with (None: unkeyed).
    """

    digest: str | None
    issuer: str | None
    key_id: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset, *, key: bytes | None = None) -> DicomPatient:
        """From one instance's Patient Module (PS3.3 C.7.1.1): PatientID and IssuerOfPatientID."""
        patient_id = _lo(ds.get("PatientID"))
        return cls(
            digest=patient_id_digest(patient_id, key=key) if patient_id else None,
            issuer=_lo(ds.get("IssuerOfPatientID")),
            key_id=pseudonym_key_id(key),
        )


@dataclass(frozen=True)
class IdentityCheck:
    """Whether the images match the Patient, and why, in words free of identifiers."""

    matches: bool
    detail: str


def _assigner_names(identifier: Identifier) -> set[str]:
    """``Patient.identifier.assigner.display`` and ``.assigner.identifier.value``, casefolded."""
    assigner = identifier.assigner
    if assigner is None:
        return set()
    names = {assigner.display, assigner.identifier.value if assigner.identifier else None}
    return {str(name).strip().casefold() for name in names if name and str(name).strip()}


def check_patient_identity(
    dicom: DicomPatient,
    patient: Patient,
    *,
    system: str | None,
    issuer_systems: Mapping[str, str],
    key: bytes | None = None,
) -> IdentityCheck:
    """Whether the images' Patient ID (0010,0020) is one of the Patient's identifiers.

    PS3.3 C.7.1.1 (Patient Module: PatientID, IssuerOfPatientID) against FHIR
    ``Patient.identifier`` (``system``, ``value``, ``assigner``). The expected identifier
    system is ``issuer_systems[dicom.issuer]`` when the images name an issuer the site has
    mapped, else ``system`` when given, else any system. It matches when an identifier has
    that system and a value whose digest (``patient_id_digest`` with ``key``, as used for
    ``dicom``) equals ``dicom.digest``, and, when the images name an issuer and that
    identifier has an ``assigner`` (``display`` or ``identifier.value``), the two agree
    (case-insensitively). Images without a PatientID never match, nor do images whose digest
    was taken under another key (the site's pseudonym key changed since they were read).
    """
    if dicom.digest is None:
        return IdentityCheck(False, "the images carry no PatientID (0010,0020)")
    if dicom.key_id != pseudonym_key_id(key):
        return IdentityCheck(
            False,
            "the images' PatientID digest was taken under another pseudonym key "
            "(job.pseudonym_key changed since the study was read); requeue the study",
        )
    issuer_system = issuer_systems.get(dicom.issuer) if dicom.issuer is not None else None
    expected = issuer_system or system
    where = f"system {expected}" if expected else "any system"
    if issuer_system:
        where += " (mapped from IssuerOfPatientID)"
    same_value = [
        identifier
        for identifier in patient.identifier or []
        if identifier.value
        and hmac.compare_digest(patient_id_digest(str(identifier.value), key=key), dicom.digest)
    ]
    if not same_value:
        return IdentityCheck(False, "PatientID matches no Patient.identifier")
    in_system = [
        identifier
        for identifier in same_value
        if expected is None
        or (identifier.system is not None and str(identifier.system) == expected)
    ]
    if not in_system:
        return IdentityCheck(
            False, f"PatientID matches a Patient.identifier only outside the expected {where}"
        )
    issuer = dicom.issuer.strip().casefold() if dicom.issuer else None
    for identifier in in_system:
        assigners = _assigner_names(identifier)
        if issuer is None or not assigners or issuer in assigners:
            agreed = (
                " and its assigner agrees with IssuerOfPatientID" if assigners and issuer else ""
            )
            return IdentityCheck(True, f"PatientID matches Patient.identifier in {where}{agreed}")
    return IdentityCheck(
        False,
        f"PatientID matches Patient.identifier in {where}, "
        "but its assigner disagrees with IssuerOfPatientID",
    )
