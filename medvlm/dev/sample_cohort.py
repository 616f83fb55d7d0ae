"""A small synthetic cohort for the demo and the tests: studies with matching EHR records.

Each case is a study (DICOM datasets) plus a FHIR transaction Bundle with the patient, the
order (ServiceRequest with the study's accession number), an active Condition, a prior final
report and the ImagingStudy. All patient data is synthetic ("SYNTHETIC^…", "SYN-…"); the one
real image is the de-identified chest radiograph from ``pydicom-data``. No I/O here: callers
store the datasets and post the bundles through connectors.
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from medvlm.dev.synthetic_dicom import make_study

MRN_SYSTEM = "urn:medvlm-pipeline:synthetic-mrn"
ACCESSION_SYSTEM = "urn:medvlm-pipeline:synthetic-accession"
DEMO_STUDY_DATE = dt.date(2026, 11, 2)
SEX_BY_CASE = ("female", "male", "female", "male", "unknown")


@dataclass(frozen=True)
class SampleCase:
    """One study and its EHR record."""

    name: str
    datasets: list[Dataset]
    bundle: dict[str, Any] | None
    accession: str
    mrn: str

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)


def ehr_bundle(
    *,
    mrn: str,
    accession: str,
    study_uid: str,
    modality: str,
    reason: str,
    condition: str,
    prior_impression: str,
    sex: str,
    birth_date: str,
    with_order: bool = True,
) -> dict[str, Any]:
    """A transaction Bundle of conditional creates for one synthetic patient and order."""
    patient_url = "urn:uuid:" + _uuid(mrn, "patient")

    def entry(resource: dict[str, Any], key: str, if_none_exist: str) -> dict[str, Any]:
        return {
            "fullUrl": "urn:uuid:" + _uuid(mrn, key),
            "resource": resource,
            "request": {
                "method": "POST",
                "url": resource["resourceType"],
                "ifNoneExist": if_none_exist,
            },
        }

    subject = {"reference": patient_url}
    entries = [
        {
            "fullUrl": patient_url,
            "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
                "name": [{"family": "SYNTHETIC", "given": [mrn]}],
                "gender": sex,
                "birthDate": birth_date,
            },
            "request": {
                "method": "POST",
                "url": "Patient",
                "ifNoneExist": f"identifier={MRN_SYSTEM}|{mrn}",
            },
        },
        entry(
            {
                "resourceType": "Condition",
                "identifier": [{"system": MRN_SYSTEM, "value": f"{mrn}-cond"}],
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "active",
                        }
                    ]
                },
                "code": {"text": condition},
                "subject": subject,
            },
            "condition",
            f"identifier={MRN_SYSTEM}|{mrn}-cond",
        ),
        entry(
            {
                "resourceType": "DiagnosticReport",
                "identifier": [{"system": MRN_SYSTEM, "value": f"{mrn}-prior"}],
                "status": "final",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://loinc.org",
                                "code": "LP29684-5",
                                "display": "Radiology",
                            }
                        ]
                    }
                ],
                "code": {"text": f"{modality} prior study"},
                "subject": subject,
                "effectiveDateTime": "2023-06-01T09:00:00Z",
                "conclusion": prior_impression,
            },
            "prior",
            f"identifier={MRN_SYSTEM}|{mrn}-prior",
        ),
        entry(
            {
                "resourceType": "ImagingStudy",
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
                "status": "available",
                "subject": subject,
                "modality": [
                    {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": modality}
                ],
            },
            "imagingstudy",
            f"identifier=urn:dicom:uid|urn:oid:{study_uid}",
        ),
    ]
    if with_order:
        entries.append(
            entry(
                {
                    "resourceType": "ServiceRequest",
                    "identifier": [{"system": ACCESSION_SYSTEM, "value": accession}],
                    "status": "active",
                    "intent": "order",
                    "code": {"text": f"{modality} imaging"},
                    "subject": subject,
                    "reasonCode": [{"text": reason}],
                },
                "order",
                f"identifier={ACCESSION_SYSTEM}|{accession}",
            )
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "medvlm-sample/" + "/".join(parts)))


def _relabel(datasets: list[Dataset], *, accession: str, mrn: str, date: str) -> list[Dataset]:
    """Copies with this case's accession, patient id and new UIDs derived from them.

    Derived, not random: loading the same cohort twice gives the same studies, so a re-run of
    the demo finds them already drafted.
    """

    def uid(*parts: str) -> str:
        return str(generate_uid(entropy_srcs=[accession, mrn, date, *parts]))

    study_uid = uid("study")
    out = []
    for ds in datasets:
        copy_ds = copy.deepcopy(ds)
        copy_ds.StudyInstanceUID = study_uid
        copy_ds.SeriesInstanceUID = uid("series", str(ds.SeriesInstanceUID))
        copy_ds.SOPInstanceUID = uid("instance", str(ds.SOPInstanceUID))
        copy_ds.file_meta.MediaStorageSOPInstanceUID = copy_ds.SOPInstanceUID
        copy_ds.AccessionNumber = accession
        copy_ds.PatientID = mrn
        copy_ds.PatientName = f"SYNTHETIC^{mrn}"
        copy_ds.StudyDate = date
        copy_ds.preamble = b"\0" * 128
        out.append(copy_ds)
    return out


def sample_cohort(
    chest_radiograph: Dataset | None = None,
    *,
    prefix: str = "DEMO",  # up to 8 characters: the accession number is a DICOM SH (16)
    study_date: dt.date = DEMO_STUDY_DATE,
) -> list[SampleCase]:
    """The demo cohort: the real chest radiograph (if given) and generated CR, CT and US.

    The last generated case has no order in the EHR (only the Patient), to show a draft made
    with what exists and flagged.
    """
    if not 1 <= len(prefix) <= 8:
        raise ValueError("prefix must have 1 to 8 characters (accession numbers are DICOM SH)")
    date = study_date.strftime("%Y%m%d")
    plans: list[tuple[str, str, list[Dataset], str, str, str]] = []
    if chest_radiograph is not None:
        plans.append(
            (
                "real chest radiograph",
                "CR",
                [chest_radiograph],
                "Cough and fever for one week",
                "Asthma",
                "No acute cardiopulmonary abnormality.",
            )
        )
    plans += [
        (
            "synthetic chest CR",
            "CR",
            make_study("CR", seed=11),
            "Shortness of breath",
            "Heart failure",
            "Mild cardiomegaly.",
        ),
        (
            "synthetic chest CT, two series",
            "CT",
            make_study("CT", series=2, instances_per_series=6, seed=12),
            "Pulmonary nodule follow-up",
            "Former smoker",
            "6 mm nodule right upper lobe.",
        ),
        (
            "synthetic abdominal US cine, no order in the EHR",
            "US",
            make_study("US", seed=13),
            "Right upper quadrant pain",
            "Gallstones",
            "Cholelithiasis without cholecystitis.",
        ),
    ]
    cases = []
    for i, (name, modality, datasets, reason, condition, prior) in enumerate(plans):
        mrn = f"SYN-{prefix}-{i:04d}"
        accession = f"ACC-{prefix}-{i:03d}"
        relabelled = _relabel(datasets, accession=accession, mrn=mrn, date=date)
        bundle = ehr_bundle(
            mrn=mrn,
            accession=accession,
            study_uid=str(relabelled[0].StudyInstanceUID),
            modality=modality,
            reason=reason,
            condition=condition,
            prior_impression=prior,
            sex=SEX_BY_CASE[i % len(SEX_BY_CASE)],
            birth_date=f"{1950 + 7 * i}-01-01",
            with_order=i != len(plans) - 1,
        )
        cases.append(SampleCase(name, relabelled, bundle, accession, mrn))
    return cases


def chest_cohort(
    chest_radiograph: Dataset,
    count: int,
    *,
    prefix: str = "BENCH",
    study_date: dt.date = DEMO_STUDY_DATE,
) -> list[SampleCase]:
    """``count`` chest CR studies made of the one real radiograph, each with its own patient,
    order, condition and prior (for benchmarks: identical images, distinct studies)."""
    if not 1 <= len(prefix) <= 6:
        raise ValueError("prefix must have 1 to 6 characters (accession numbers are DICOM SH)")
    date = study_date.strftime("%Y%m%d")
    cases = []
    for i in range(count):
        mrn, accession = f"SYN-{prefix}-{i:06d}", f"{prefix}{i:06d}"
        relabelled = _relabel([chest_radiograph], accession=accession, mrn=mrn, date=date)
        bundle = ehr_bundle(
            mrn=mrn,
            accession=accession,
            study_uid=str(relabelled[0].StudyInstanceUID),
            modality="CR",
            reason="Cough and fever for one week",
            condition="Asthma",
            prior_impression="No acute cardiopulmonary abnormality.",
            sex=SEX_BY_CASE[i % len(SEX_BY_CASE)],
            birth_date=f"{1940 + i % 60}-01-01",
        )
        cases.append(SampleCase(f"chest CR {i}", relabelled, bundle, accession, mrn))
    return cases
