"""The model's images of one study, fetching only what the model sees.

The slices and frames are chosen from headers (``ImageSource.instance_headers``, no pixel data;
``pipeline.imaging.choose_images``), then only the chosen instances are retrieved
(``ImageSource.retrieve_instances``) and decoded: a 1,000-slice CT never sits whole in memory,
only the few instances picked from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

from pydicom.dataset import Dataset

from connectors.pacs import ImageSource, sort_instances
from pipeline.imaging import choose_images, encode_study_pngs


def load_model_images(
    source: ImageSource,
    study_uid: str,
    reportable_headers: Sequence[Dataset],
    *,
    reference: str,
    max_images: int,
    max_side: int,
    processes: Executor | None = None,
) -> list[bytes]:
    """PNG bytes of at most ``max_images`` images of the study, each fitted to ``max_side``.

    ``reportable_headers`` are the headers of the instances the model may see
    (``pipeline.reportable.select_reportable`` over ``source.instance_headers(study_uid)``).
    Raises ``ImagingError`` when nothing decodes, ``PacsError`` when the retrieval fails.
    ``processes``: a process pool to decode and encode in (CPU-bound work, off the GIL).
    """
    by_series: dict[str, list[Dataset]] = {}
    for header in reportable_headers:
        by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(header)
    picks = choose_images(
        {uid: sort_instances(headers) for uid, headers in by_series.items()},
        reference=reference,
        max_images=max_images,
    )
    instances = source.retrieve_instances(study_uid, [pick.header for pick in picks])
    if processes is None:
        return encode_study_pngs(instances, picks, reference, max_side)
    return processes.submit(encode_study_pngs, instances, picks, reference, max_side).result()
