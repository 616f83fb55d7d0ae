"""A site (as tests/integration/folder_site.py builds, or loaded into a DICOMweb PACS and a FHIR
server) whose patients carry DISTINCTIVE identifiers, for tests that look for patient data where
it must not be.

Every name, MRN, accession number and birth date below is made up to occur nowhere by chance
(letters outside the hexadecimal and base32 alphabets, names that are no words), in the DICOM
headers (PatientName, PatientID, AccessionNumber, PatientBirthDate: Latin-1 or UTF-8, and one
birth date the ACR-NEMA way, ``1929.08.23``, not a valid DA) and in the EHR (Patient name,
identifier and birthDate; ServiceRequest identifier). In the folder PACS the files are named
after the patient (MRN folder, name and accession in the file name) beside a note that is not
DICOM. Five studies, one per path a study can take through ``medvlm run``:

- ``A`` drafted and written;
- ``B`` no order in the EHR: drafted with the Patient found by the images' PatientID (MRN),
  written and flagged ``no-order-in-ehr``;
- ``C`` its order is signed already (a final DiagnosticReport): skipped before drafting;
- ``D`` its images carry another patient's PatientID and name (A's): drafted, then skipped at
  the write (``patient-mismatch``);
- ``E`` its pixel data is an undecodable JPEG payload: fails at the fetch with a reason, and
  again on the next run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from connectors.dicomweb import DicomWebSource
from connectors.factory import build_ehr, build_image_source
from connectors.fhir import build_http_client
from connectors.ndjson import NdjsonEhr
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM, MRN_SYSTEM, ehr_bundle
from medvlm.dev.synthetic_dicom import make_study
from medvlm.settings import EhrSettings, PacsSettings
from pipeline.identity import patient_id_digest
from tests.integration.phi_scanner import Phi


@dataclass(frozen=True)
class Patient:
    key: str
    family: str
    given: str
    mrn: str
    birth_date: dt.date
    accession: str
    charset: str  # SpecificCharacterSet of the patient's images

    @property
    def dicom_name(self) -> str:
        return f"{self.family}^{self.given}"

    def phi(self) -> list[Phi]:
        """What must not leave the sources, each with the label a hit is reported as."""
        who = f"patient {self.key}"
        return [
            Phi(f"{who} family name", self.family, "name"),
            Phi(f"{who} given name", self.given, "name"),
            Phi(f"{who} MRN", self.mrn, "mrn"),
            Phi(f"{who} birth date", self.birth_date.isoformat(), "birth_date"),
            Phi(f"study {self.key} accession number", self.accession, "accession"),
            Phi(f"{who} MRN digest", patient_id_digest(self.mrn), "digest"),
        ]


def _patient(key: str, family: str, given: str, born: str, charset: str) -> Patient:
    tag = f"{key}{ord(key) - 64}"  # A1, B2, …
    return Patient(
        key,
        family,
        given,
        f"MRN-Q7Z9X4{tag}",
        dt.date.fromisoformat(born),
        f"ACC-Q7Z9W3{tag}",
        charset,
    )


# Names with letters in and beyond Latin-1 (ISO_IR 100 vs UTF-8 in DICOM), ß (upper-cased to
# SS), Þ (no ASCII decomposition). Accession numbers are DICOM SH (at most 16 characters).
PATIENTS = (
    _patient("A", "Zyxwövä", "Quenthar", "1937-04-12", "ISO_IR 100"),
    _patient("B", "Ñormqvíst", "Yleandra", "1929-08-23", "ISO_IR 192"),
    _patient("C", "Þrovaldúr", "Kexmira", "1941-11-07", "ISO_IR 100"),
    _patient("D", "Wępczyński", "Ozymandrel", "1933-02-19", "ISO_IR 192"),
    _patient("E", "Grüßelheim", "Vorlaqua", "1926-06-30", "ISO_IR 100"),
)
BY_KEY = {p.key: p for p in PATIENTS}


def all_phi() -> list[Phi]:
    return [phi for patient in PATIENTS for phi in patient.phi()]


def _dicom(study: str, day: dt.date, seed: int) -> Dataset:
    """Study ``study``'s one CR instance; D's images carry A's identity (a wrong-patient study)."""
    order = BY_KEY[study]
    shown = BY_KEY["A"] if study == "D" else order
    (ds,) = make_study(
        "CR", seed=seed, accession=order.accession, patient_id=shown.mrn, study_date=day
    )
    ds.SpecificCharacterSet = shown.charset
    ds.PatientName = shown.dicom_name
    # B's modality writes birth dates the ACR-NEMA way ("1929.08.23"), as old ones still do:
    # not a valid DA, which pydicom reports when it reads the value.
    birth = "%Y.%m.%d" if study == "B" else "%Y%m%d"
    ds["PatientBirthDate"] = DataElement(0x00100030, "DA", shown.birth_date.strftime(birth))
    ds.PatientSex = "F"
    ds.PatientIdentityRemoved = "NO"
    if study == "E":  # a JPEG Baseline payload that no decoder can read
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = "01"
    return ds


def _bundle(study: str, study_uid: str) -> dict[str, Any]:
    patient = BY_KEY[study]
    bundle = ehr_bundle(
        mrn=patient.mrn,
        accession=patient.accession,
        study_uid=study_uid,
        modality="CR",
        reason="Cough",
        condition="Asthma",
        prior_impression="No acute abnormality.",
        sex="female",
        birth_date=patient.birth_date.isoformat(),
        with_order=study != "B",
    )
    entries: list[dict[str, Any]] = bundle["entry"]
    resource = entries[0]["resource"]
    assert resource["resourceType"] == "Patient"
    resource["name"] = [
        {
            "family": patient.family,
            "given": [patient.given],
            "text": f"{patient.given} {patient.family}",
        }
    ]
    if study == "C":  # a radiologist signed the order already
        (order,) = [e for e in entries if e["resource"]["resourceType"] == "ServiceRequest"]
        entries.append(
            {
                "fullUrl": "urn:uuid:6b0f5c0e-6a43-4d38-9d1e-5f3a0c4b9c11",
                "resource": {
                    "resourceType": "DiagnosticReport",
                    "identifier": [{"system": ACCESSION_SYSTEM, "value": patient.accession}],
                    "status": "final",
                    "category": [{"coding": [{"system": "http://loinc.org", "code": "LP29684-5"}]}],
                    "code": {"text": "CR chest"},
                    "subject": {"reference": entries[0]["fullUrl"]},
                    "basedOn": [{"reference": order["fullUrl"]}],
                    "issued": "2026-11-04T12:00:00Z",
                    "conclusion": "No acute abnormality.",
                },
                "request": {
                    "method": "POST",
                    "url": "DiagnosticReport",
                    "ifNoneExist": f"identifier={ACCESSION_SYSTEM}|{patient.accession}",
                },
            }
        )
    return bundle


def phi_studies(day: dt.date) -> list[tuple[str, Dataset, dict[str, Any]]]:
    """(key, the study's one instance, its EHR transaction Bundle) of the five studies."""
    out = []
    for seed, patient in enumerate(PATIENTS, start=700):
        ds = _dicom(patient.key, day, seed)
        out.append((patient.key, ds, _bundle(patient.key, str(ds.StudyInstanceUID))))
    return out


def dicom_path(root: Path, key: str) -> Path:
    """Where study ``key``'s file is in the folder PACS: named after the patient and the order,
    as exports often are (the folder source must not log file names)."""
    shown = BY_KEY["A"] if key == "D" else BY_KEY[key]
    name = f"{shown.family}^{shown.given}_{BY_KEY[key].accession}.dcm"
    return root / "dicom" / shown.mrn / name


def build_phi_site(root: Path, day: dt.date) -> dict[str, str]:
    """The five studies (dated ``day``) in ``root/dicom`` (``dicom_path``) beside a file that is
    not DICOM, and their EHR records in ``root/ehr``; returns the Study Instance UID of each
    study by key."""
    ehr = NdjsonEhr(root / "ehr", accession_system=ACCESSION_SYSTEM)
    uids = {}
    for key, ds, bundle in phi_studies(day):
        path = dicom_path(root, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        uids[key] = str(ds.StudyInstanceUID)
        ehr.transaction(Bundle.model_validate(bundle))
    a = BY_KEY["A"]
    note = root / "dicom" / a.mrn / f"{a.given} {a.family} {a.birth_date:%Y%m%d}.txt"
    note.write_text(f"{a.dicom_name} {a.mrn} {a.accession}: not an image\n", encoding="utf-8")
    return uids


def load_phi_servers(pacs: PacsSettings, ehr: EhrSettings, day: dt.date) -> dict[str, str]:
    """The five studies stored in a DICOMweb PACS (STOW-RS) and their records in a FHIR
    server; returns the Study Instance UID of each study by key."""
    source = build_image_source(pacs)
    client = build_http_client(ehr)
    try:
        assert isinstance(source, DicomWebSource)
        fhir = build_ehr(ehr, client)
        uids = {}
        for key, ds, bundle in phi_studies(day):
            stored = source.store([ds])
            assert not stored.failed, f"study {key}: STOW-RS refused it"
            uids[key] = str(ds.StudyInstanceUID)
            fhir.transaction(Bundle.model_validate(bundle))
        return uids
    finally:
        client.close()
        source.close()


__all__ = [
    "BY_KEY",
    "MRN_SYSTEM",
    "PATIENTS",
    "Patient",
    "all_phi",
    "build_phi_site",
    "dicom_path",
    "load_phi_servers",
]
