"""One study made ready for the model and the EHR: its prompt context and its typed links. No I/O.

``prepare_study`` takes the header of the study's first reportable instance and what the EHR
returned for its order (``EhrContext``, or None when the EHR has nothing), and decides everything
that needs no further I/O: when the study started (DICOM StudyDate/StudyTime in the right zone),
which ImagingStudy, order and Patient the draft will point to, whose identity the images claim,
which priors and conditions the prompt shows and the references of what it used. The flow does
the I/O around it (images, EHR reads, writes).

``StudyLinks`` (pipeline.fhir_resources) is what the ledger keeps between drafting and writing
(``DraftJob.links``, its JSON form), so that a draft resumed days later is written exactly where
it was meant to go.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from pipeline.context import PromptContext, build_prompt_context, eligible_priors
from pipeline.dicom_time import study_instant
from pipeline.ehr_rules import EhrContext, local_id
from pipeline.fhir_resources import StudyLinks
from pipeline.identity import DicomPatient
from pipeline.prompts import StudyContext

FLAG_NO_STUDY_TIME = "no-study-time"


@dataclass(frozen=True)
class PreparedStudy:
    """The prompt's context (with the references it used), the draft's links and the flags."""

    prompt: PromptContext
    links: StudyLinks
    flags: tuple[str, ...]


def header_value(ds: Dataset, keyword: str) -> str | None:
    """A header attribute as text, None when absent or empty."""
    value = ds.get(keyword)
    return str(value) if value not in (None, "") else None


def _imaging_study(context: EhrContext, study_uid: str) -> str | None:
    """The ImagingStudy whose identifier is the Study Instance UID (``urn:oid:`` or bare)."""
    for study in context.imaging_studies:
        if any(
            (i.value or "").removeprefix("urn:oid:") == study_uid for i in study.identifier or []
        ):
            return f"ImagingStudy/{study.id}"
    return None


def prepare_study(
    header: Dataset,
    context: EhrContext | None,
    *,
    study_uid: str,
    accession_number: str | None,
    accession_system: str | None,
    site_timezone: dt.tzinfo,
    pseudonym_key: bytes | None = None,
) -> PreparedStudy:
    """Decide the prompt context and the links of one study from its header and EHR context.

    ``header`` is the first reportable instance (Modality, BodyPartExamined, StudyDescription,
    StudyDate/StudyTime/TimezoneOffsetFromUTC, PatientID/IssuerOfPatientID: PS3.3 C.7.1.1,
    C.7.2.1, C.7.3.1, C.12.1). The prompt shows only priors signed before the study started
    (``eligible_priors``), never this order's own report.
    """
    started = study_instant(
        header.get("StudyDate"),
        header.get("StudyTime"),
        header.get("TimezoneOffsetFromUTC"),
        site_timezone,
    )
    modality = header_value(header, "Modality") or "OT"
    body_part = header_value(header, "BodyPartExamined")
    description = header_value(header, "StudyDescription")
    links: dict[str, Any] = {
        "accession_number": accession_number or study_uid,
        "study_uid": study_uid,
        "study_started": started,
        "dicom_patient": DicomPatient.from_dataset(header, key=pseudonym_key),
    }
    if context is None:
        prompt = PromptContext(
            StudyContext(modality=modality, body_part=body_part, study_description=description),
            (),
        )
    else:
        order = context.service_request
        prompt = build_prompt_context(
            modality=modality,
            body_part=body_part,
            study_description=description,
            service_request=order,
            conditions=context.conditions,
            prior_reports=eligible_priors(
                context.prior_reports,
                before=started,
                order_id=order.id if order is not None else None,
                accession_number=accession_number,
                accession_system=accession_system,
            ),
        )
        links["patient"] = f"Patient/{context.patient.id}"
        links["service_request"] = f"ServiceRequest/{order.id}" if order is not None else None
        encounter = (
            local_id(order.encounter.reference, "Encounter") if order and order.encounter else None
        )
        links["encounter"] = f"Encounter/{encounter}" if encounter else None
        links["imaging_study"] = _imaging_study(context, study_uid)
    flags = () if started is not None else (FLAG_NO_STUDY_TIME,)
    return PreparedStudy(prompt, StudyLinks(**links), flags)
