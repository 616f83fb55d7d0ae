"""Choosing the model's images from headers, then decoding only what was chosen.

``choose_images`` must pick exactly what ``study_images`` used to decode (the behaviour before the
split is kept here as ``_legacy_study_images``), from headers without pixel data.
"""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from connectors.pacs import HEADER_KEYWORDS
from medvlm.dev.sample_data import CHEST_RADIOGRAPH, sample_file
from medvlm.dev.synthetic_dicom import make_study
from medvlm.errors import ImagingError
from pipeline.imaging import (
    Pick,
    PixelBudget,
    choose_images,
    encode_study_pngs,
    image_to_png,
    instance_to_images,
    representative_slices,
    study_images,
)
from pipeline.subgroups import SUBGROUP_HEADER_KEYWORDS

pytestmark = pytest.mark.unit


def _legacy_study_images(
    series_instances: dict[str, list[Dataset]],
    *,
    reference: str,
    max_images: int,
    budget: PixelBudget | None = None,
) -> list[Image.Image]:
    """``study_images`` as it was before choosing and decoding were split (the reference)."""

    def available(instances: list[Dataset]) -> int:
        if len(instances) == 1:
            return int(instances[0].get("NumberOfFrames", 1) or 1)
        return len(instances)

    ordered = sorted((s for s in series_instances.values() if s), key=available, reverse=True)
    shares = [0] * len(ordered)
    remaining = max_images
    while remaining > 0 and any(shares[i] < available(s) for i, s in enumerate(ordered)):
        for i, instances in enumerate(ordered):
            if remaining > 0 and shares[i] < available(instances):
                shares[i] += 1
                remaining -= 1
    images: list[Image.Image] = []
    for instances, share in zip(ordered, shares, strict=True):
        if share == 0:
            continue
        if len(instances) == 1:
            images += instance_to_images(
                instances[0], reference=reference, budget=budget, max_frames=share
            )
        else:
            for ds in representative_slices(instances, share):
                images += instance_to_images(ds, reference=reference, budget=budget)
    return images[:max_images]


def _header(series_uid: str, z: float, number: int, frames: int | None = None) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds


def _z(pick: Pick) -> float:
    return float(pick.header.ImagePositionPatient[2])


def test_a_300_slice_ct_gives_only_max_images_picks_evenly_spaced_by_position() -> None:
    ct = [_header("ct", z=-1.25 * i, number=i + 1) for i in range(300)]
    shuffled = random.Random(7).sample(ct, len(ct))  # file order is not slice order
    picks = choose_images({"ct": shuffled}, reference="s", max_images=4)
    assert len(picks) == 4
    assert all(p.frames == (0,) for p in picks)
    # evenly_spaced(300, 4) over the slices sorted along the normal: 0, 100, 199, 299
    positions = sorted(-1.25 * i for i in range(300))
    assert [_z(p) for p in picks] == [positions[i] for i in (0, 100, 199, 299)]


def test_a_multiframe_instance_gives_evenly_spaced_frame_picks() -> None:
    cine = _header("us", 0.0, 1, frames=120)
    [pick] = choose_images({"us": [cine]}, reference="s", max_images=5)
    assert pick.header is cine
    assert pick.frames == (0, 30, 60, 89, 119)


def test_a_mixed_study_shares_the_budget_round_robin_largest_series_first() -> None:
    ct = [_header("ct", float(i), i + 1) for i in range(50)]
    us = [_header("us", 0.0, 1, frames=8)]
    cr = [_header("cr", 0.0, 1)]
    picks = choose_images({"cr": cr, "us": us, "ct": ct}, reference="s", max_images=7)
    assert sum(len(p.frames) for p in picks) == 7
    by_series: dict[str, int] = {}
    for p in picks:
        series = str(p.header.SeriesInstanceUID)
        by_series[series] = by_series.get(series, 0) + len(p.frames)
    # largest first (CT 50, US 8 frames, CR 1): 3, 3, 1 after round-robin
    assert by_series == {"ct": 3, "us": 3, "cr": 1}
    assert [str(p.header.SeriesInstanceUID) for p in picks] == ["ct", "ct", "ct", "us", "cr"]


def test_a_slice_of_a_multiframe_series_shows_its_middle_frame() -> None:
    series = [_header("mr", float(i), i + 1, frames=9) for i in range(3)]
    picks = choose_images({"mr": series}, reference="s", max_images=2)
    assert [p.frames for p in picks] == [(4,), (4,)]


def test_an_empty_study_is_a_clear_error() -> None:
    with pytest.raises(ImagingError, match="study-e: study has no instances"):
        choose_images({}, reference="study-e", max_images=2)


def _sample(name: str, *, header: bool = False) -> Dataset:
    return pydicom.dcmread(sample_file(name), stop_before_pixels=header)


FIXTURES = {
    "cr": {"cr": [CHEST_RADIOGRAPH]},
    "mr-multiframe": {"mr": ["emri_small.dcm"]},
    "ct+mr": {"ct": ["CT_small.dcm"], "mr": ["emri_small.dcm"]},
    "us+mr+rle": {"us": ["US1_UNCR.dcm"], "mr": ["emri_small.dcm"], "rle": ["MR_small_RLE.dcm"]},
}


@pytest.mark.parametrize("max_images", [1, 3, 6])
@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_study_images_is_unchanged_and_choosing_from_headers_decodes_the_same(
    fixture: str, max_images: int
) -> None:
    names = FIXTURES[fixture]
    full = {uid: [_sample(n) for n in files] for uid, files in names.items()}
    budget = PixelBudget(max_side=256)
    legacy = _legacy_study_images(full, reference="s", max_images=max_images, budget=budget)
    now = study_images(full, reference="s", max_images=max_images, budget=budget)
    assert [image.tobytes() for image in now] == [image.tobytes() for image in legacy]

    headers = {uid: [_sample(n, header=True) for n in files] for uid, files in names.items()}
    assert not any("PixelData" in h for hs in headers.values() for h in hs)
    picks = choose_images(headers, reference="s", max_images=max_images)
    instances = [ds for instances in full.values() for ds in instances]
    encoded = encode_study_pngs(instances, picks, "s", budget.max_side)
    assert encoded.failed == {}
    assert encoded.pngs == [image_to_png(image) for image in legacy]


def test_a_synthetic_ct_study_picks_from_headers_as_from_full_instances() -> None:
    study = make_study("CT", series=2, instances_per_series=20, seed=3)
    by_series: dict[str, list[Dataset]] = {}
    for ds in study:
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    legacy = _legacy_study_images(by_series, reference="s", max_images=5)
    picks = choose_images(by_series, reference="s", max_images=5)
    encoded = encode_study_pngs(study, picks, "s", 1024)
    assert encoded.pngs == [image_to_png(image) for image in legacy]


def test_a_pick_that_was_not_retrieved_is_left_out_with_a_reason_naming_the_study() -> None:
    [pick] = choose_images(
        {"cr": [_sample(CHEST_RADIOGRAPH, header=True)]}, reference="s", max_images=1
    )
    encoded = encode_study_pngs([], [pick], "study-r", 256)
    assert encoded.pngs == []
    assert encoded.failed == {pick.sop_instance_uid: "study-r: a chosen instance was not retrieved"}


def test_a_header_without_number_of_frames_still_shows_frames_of_the_real_instance() -> None:
    header = _sample("emri_small.dcm", header=True)
    del header.NumberOfFrames  # as a PACS that does not return it at IMAGE level
    [pick] = choose_images({"mr": [header]}, reference="s", max_images=4)
    assert pick.frames == (0,)
    full = _sample("emri_small.dcm")
    [png] = encode_study_pngs([full], [pick], "s", 1024).pngs
    # like study_images always did: as many frames as chosen, spread over the real ones (middle)
    [expected] = instance_to_images(full, reference="s", max_frames=1)
    assert png == image_to_png(expected)


def test_encode_study_pngs_and_its_arguments_pickle_for_a_process_pool() -> None:
    full = _sample(CHEST_RADIOGRAPH)
    picks = choose_images(
        {"cr": [_sample(CHEST_RADIOGRAPH, header=True)]}, reference="s", max_images=2
    )
    args = pickle.loads(pickle.dumps(([full], picks, "s", 512)))
    assert pickle.loads(pickle.dumps(encode_study_pngs)) is encode_study_pngs
    [png] = encode_study_pngs(*args).pngs
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and max(image.size) == 512
        # lossless: the PNG holds exactly the decoded, fitted image
        [expected] = instance_to_images(full, reference="s", budget=PixelBudget(512))
        assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_header_keywords_cover_what_the_flow_reads_from_the_first_header() -> None:
    read_by_the_flow = {
        "PatientID",
        "IssuerOfPatientID",
        "StudyDate",
        "StudyTime",
        "TimezoneOffsetFromUTC",
        "Modality",
        "BodyPartExamined",
        "StudyDescription",
        "SOPClassUID",
        "BurnedInAnnotation",
    }
    assert read_by_the_flow | set(SUBGROUP_HEADER_KEYWORDS) <= set(HEADER_KEYWORDS)
