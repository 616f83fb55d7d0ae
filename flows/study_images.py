"""The model's images of one study, fetching only what the model sees.

The slices and frames are chosen from headers (``ImageSource.instance_headers``, no pixel data;
``pipeline.imaging.choose_images``), then only the chosen instances are retrieved
(``ImageSource.retrieve_instances``) and decoded: a 1,000-slice CT never sits whole in memory,
only the few instances picked from it.

One broken instance (truncated, undecodable, refused by the PACS as malformed) does not fail
its study: it is left out and the choice is made again from the instances not yet found
broken, a bounded number of times. The study fails only when no chosen instance decodes; the
draft is flagged when some were left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from pydicom.dataset import Dataset

from connectors.pacs import ImageSource, sort_instances
from medvlm.errors import ImagingError, InvalidDicomError
from pipeline.imaging import EncodedPicks, Pick, choose_images, encode_study_pngs

#: Choices made for one study at most (the first, then one per round of broken instances).
MAX_CHOICES = 3


@dataclass(frozen=True)
class ModelImages:
    """PNG bytes of the images the model sees, and the instances left out as unusable
    (SOP Instance UID → reason)."""

    pngs: list[bytes]
    unusable: dict[str, str]


def _sop_uid(header: Dataset) -> str:
    return str(header.get("SOPInstanceUID", ""))


def _retrieve_usable(
    source: ImageSource, study_uid: str, picks: Sequence[Pick], unusable: dict[str, str]
) -> list[Dataset]:
    """The picked instances; when the PACS answers with a malformed one, they are asked for
    one at a time, and those that fail are added to ``unusable``."""
    try:
        return source.retrieve_instances(study_uid, [pick.header for pick in picks])
    except InvalidDicomError as exc:
        if len(picks) == 1:
            unusable[picks[0].sop_instance_uid] = str(exc)
            return []
    instances: list[Dataset] = []
    for pick in picks:
        try:
            instances += source.retrieve_instances(study_uid, [pick.header])
        except InvalidDicomError as exc:
            unusable[pick.sop_instance_uid] = str(exc)
    return instances


def load_model_images(
    source: ImageSource,
    study_uid: str,
    reportable_headers: Sequence[Dataset],
    *,
    reference: str,
    max_images: int,
    max_side: int,
    processes: Executor | None = None,
) -> ModelImages:
    """PNG bytes of at most ``max_images`` images of the study, each fitted to ``max_side``.

    ``reportable_headers`` are the headers of the instances the model may see
    (``pipeline.reportable.select_reportable`` over ``source.instance_headers(study_uid)``).
    Raises ``ImagingError`` when no chosen instance decodes, ``PacsError`` when the retrieval
    fails. ``processes``: a process pool to decode and encode in (CPU-bound work, off the GIL).
    """
    unusable: dict[str, str] = {}
    encoded = EncodedPicks([], {})
    for _ in range(MAX_CHOICES):
        by_series: dict[str, list[Dataset]] = {}
        for header in reportable_headers:
            if _sop_uid(header) not in unusable:
                by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(header)
        if not by_series:
            break
        picks = choose_images(
            {uid: sort_instances(headers) for uid, headers in by_series.items()},
            reference=reference,
            max_images=max_images,
        )
        broken_before = len(unusable)
        instances = _retrieve_usable(source, study_uid, picks, unusable)
        if instances:
            args = (instances, picks, reference, max_side)
            encoded = (
                encode_study_pngs(*args)
                if processes is None
                else processes.submit(encode_study_pngs, *args).result()
            )
            for uid, why in encoded.failed.items():  # a retrieval's reason stands
                unusable.setdefault(uid, why)
        if len(unusable) == broken_before:
            break  # every pick decoded: this choice stands
    if not encoded.pngs:
        first = next(iter(unusable.values()), f"{reference}: no usable image in the study")
        more = len(unusable) - 1
        raise ImagingError(f"{first} (and {more} more unusable instance(s))" if more > 0 else first)
    return ModelImages(encoded.pngs, unusable)
