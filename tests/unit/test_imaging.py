from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medvlm.dev.sample_data import CHEST_RADIOGRAPH, sample_file
from medvlm.errors import ImagingError
from pipeline.imaging import (
    PixelBudget,
    evenly_spaced,
    instance_to_images,
    representative_slices,
    study_images,
    study_reference,
)

pytestmark = pytest.mark.unit


def _mono(photometric: str, pixels: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def test_real_chest_radiograph_becomes_an_8bit_image_within_budget() -> None:
    ds = pydicom.dcmread(sample_file(CHEST_RADIOGRAPH))
    (image,) = instance_to_images(ds, reference="study-x", budget=PixelBudget(max_side=512))
    assert image.mode == "L"
    assert max(image.size) == 512
    pixels = np.asarray(image)
    assert pixels.min() < 30 and pixels.max() > 225  # full display range used


def test_monochrome1_is_inverted_so_that_low_values_display_white() -> None:
    ramp = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))
    mono2 = np.asarray(instance_to_images(_mono("MONOCHROME2", ramp), reference="s")[0])
    mono1 = np.asarray(instance_to_images(_mono("MONOCHROME1", ramp), reference="s")[0])
    assert mono2[0, 0] == 0 and mono2[0, -1] == 255
    assert mono1[0, 0] == 255 and mono1[0, -1] == 0


def test_missing_pixel_data_is_a_clear_error_naming_the_study() -> None:
    ds = _mono("MONOCHROME2", np.zeros((4, 4)))
    del ds.PixelData
    with pytest.raises(ImagingError, match="study-ref-1: instance has no pixel data"):
        instance_to_images(ds, reference="study-ref-1")


def test_truncated_pixel_data_is_an_imaging_error_not_a_crash() -> None:
    ds = _mono("MONOCHROME2", np.zeros((64, 64)))
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(ImagingError, match="study-ref-2"):
        instance_to_images(ds, reference="study-ref-2")


def test_study_reference_is_stable_and_does_not_contain_the_uid() -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert study_reference(uid) == study_reference(uid)
    assert uid not in study_reference(uid)
    assert study_reference(uid) != study_reference(uid + "0")


def _sample(name: str) -> Dataset:
    return pydicom.dcmread(sample_file(name))


def test_evenly_spaced_keeps_the_ends_and_never_repeats() -> None:
    assert evenly_spaced(100, 5) == [0, 25, 50, 74, 99]
    assert evenly_spaced(3, 8) == [0, 1, 2]
    assert evenly_spaced(9, 1) == [4]


def test_ct_slices_are_ordered_by_patient_position_not_file_order() -> None:
    slices = []
    for z in (30.0, -10.0, 10.0, 0.0, 20.0):
        ds = _mono("MONOCHROME2", np.full((8, 8), int(z) + 100))
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, z]
        slices.append(ds)
    picked = representative_slices(slices, 3)
    assert [float(ds.ImagePositionPatient[2]) for ds in picked] == [-10.0, 10.0, 30.0]


def test_mr_multiframe_gives_evenly_spaced_frames_within_the_image_budget() -> None:
    images = study_images({"s1": [_sample("emri_small.dcm")]}, reference="s", max_images=4)
    assert len(images) == 4
    assert len({image.tobytes() for image in images}) == 4  # different frames


def test_budget_is_shared_across_series_of_a_study() -> None:
    study = {
        "ct": [_sample("CT_small.dcm")],
        "mr": [_sample("emri_small.dcm")],
    }
    images = study_images(study, reference="s", max_images=3)
    assert len(images) == 3


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "US1_J2KR.dcm", "SC_rgb_rle.dcm"])
def test_colour_images_in_any_syntax_become_rgb(name: str) -> None:
    (image,) = instance_to_images(_sample(name), reference="s")
    assert image.mode == "RGB"
    assert np.asarray(image).std() > 5  # real content, not a blank frame


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "JPEG2000.dcm", "RG1_J2KR.dcm"])
def test_compressed_greyscale_decodes(name: str) -> None:
    (image,) = instance_to_images(_sample(name), reference="s")
    assert image.mode == "L" and np.asarray(image).std() > 5


def test_empty_study_is_a_clear_error() -> None:
    with pytest.raises(ImagingError, match="study-e: study has no instances"):
        study_images({}, reference="study-e", max_images=2)


@pytest.mark.parametrize(
    ("mode", "shape"),
    [("L", (1, 1)), ("L", (7, 5)), ("L", (300, 257)), ("RGB", (9, 4, 3)), ("RGB", (64, 33, 3))],
)
def test_png_encoder_round_trips_every_pixel(mode: str, shape: tuple[int, ...]) -> None:
    import io

    from PIL import Image

    from pipeline.imaging import image_to_png

    pixels = np.random.default_rng(len(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    pixels[0, 0] = 255  # wraparound of the Up filter: 0 - 255 (mod 256)
    data = image_to_png(Image.fromarray(pixels, mode))
    decoded = Image.open(io.BytesIO(data))
    decoded.load()  # checks every chunk CRC and the zlib stream
    assert decoded.format == "PNG" and decoded.mode == mode
    assert np.array_equal(np.asarray(decoded), pixels)


def test_png_encoder_hands_other_modes_to_pillow() -> None:
    import io

    from PIL import Image

    from pipeline.imaging import image_to_png

    image = Image.new("LA", (3, 2), (10, 200))
    decoded = Image.open(io.BytesIO(image_to_png(image)))
    assert decoded.mode == "LA" and decoded.getpixel((2, 1)) == (10, 200)


def _display_by_pydicom(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    """The reference: pydicom's modality and VOI LUTs in float64, stretched to 0..255."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_voi_lut(apply_modality_lut(frame, ds), ds, index=0), np.float64)
    low, high = values.min(), values.max()
    out = np.clip((values - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return 255 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out


def test_the_float32_linear_window_gives_pydicoms_pixels() -> None:
    from pipeline.imaging import frame_to_image, linear_window

    chest = pydicom.dcmread(sample_file(CHEST_RADIOGRAPH))  # MONOCHROME1, one window
    ct = _mono("MONOCHROME2", (np.arange(64 * 48, dtype=np.uint16) % 4096).reshape(64, 48))
    ct.RescaleSlope, ct.RescaleIntercept = 1, -1024
    ct.WindowCenter, ct.WindowWidth = [40, -600], [400, 1500]  # soft tissue first, lung second
    for ds in (chest, ct):
        assert linear_window(ds) is not None
        frame = ds.pixel_array
        assert np.array_equal(np.asarray(frame_to_image(ds, frame)), _display_by_pydicom(ds, frame))
    sigmoid = _mono("MONOCHROME2", np.arange(256, dtype=np.uint16).reshape(16, 16))
    sigmoid.WindowCenter, sigmoid.WindowWidth, sigmoid.VOILUTFunction = 128, 64, "SIGMOID"
    assert linear_window(sigmoid) is None  # pydicom computes the other functions


def _multi_frame_corpus() -> list[str]:
    import warnings

    from pydicom.data import get_testdata_files

    names = []
    with warnings.catch_warnings():
        # Files pydicom would download (not here: offline), and the corpus' invalid values.
        warnings.simplefilter("ignore")
        for path in sorted(get_testdata_files("*.dcm")):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
                if int(header.get("NumberOfFrames", 1) or 1) > 2:
                    names.append(path)
            except Exception:
                continue
    return names


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_only_the_picked_frames_are_decoded_and_they_are_those_of_the_whole_array() -> None:
    """Every multi-frame file of pydicom's corpus (native, RLE, JPEG, JPEG-LS, JPEG 2000;
    grey, RGB, YBR, palette): frames decoded one by one equal the same frames of the whole
    pixel array (same colour conversion)."""
    from pipeline.imaging import picked_frames

    compared = []
    for path in _multi_frame_corpus():
        ds = pydicom.dcmread(path)
        try:
            whole = ds.pixel_array
        except Exception:
            continue  # pydicom cannot decode it here (no plugin): nothing to compare with
        count = int(ds.NumberOfFrames)
        indices = [0, count // 2, count - 1]
        for index, frame in zip(indices, picked_frames(ds, indices, "study-x"), strict=True):
            assert np.array_equal(frame, whole[index]), (Path(path).name, index)
        compared.append(Path(path).name)
    assert len(compared) >= 10, compared


def test_picked_frames_of_multi_frame_float_pixel_data_are_those_of_the_whole_array() -> None:
    """Float Pixel Data (parametric maps) has no per-frame decoder: decoded whole instead."""
    from pydicom.uid import ExplicitVRLittleEndian

    from pipeline.imaging import picked_frames

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 4, 5, 3, 1
    ds.PhotometricInterpretation, ds.BitsAllocated = "MONOCHROME2", 32
    frames = np.arange(60, dtype="<f4").reshape(3, 4, 5) / 7
    ds.FloatPixelData = frames.tobytes()
    (frame,) = picked_frames(ds, [1], "study-x")
    assert np.array_equal(frame, frames[1])


def test_a_frame_over_the_size_limit_is_refused_before_anything_is_decoded() -> None:
    from pipeline.imaging import MAX_FRAME_PIXELS, picked_frames

    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    ds.Rows, ds.Columns = 20_000, 20_000  # a header that promises 400 MP a frame
    assert MAX_FRAME_PIXELS < 400_000_000
    with pytest.raises(ImagingError, match=r"^study-x: frame of 400 megapixels is over the"):
        picked_frames(ds, [0, 5], "study-x")


def test_a_long_cine_is_not_decoded_whole_for_the_frames_the_model_sees() -> None:
    import tracemalloc

    from pipeline.imaging import picked_frames

    frames, rows, cols = 120, 256, 256
    cine = np.random.default_rng(3).integers(0, 255, (frames, rows, cols, 3), dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(cine, "RGB", 8)
    tracemalloc.start()
    try:
        picked = picked_frames(ds, [0, 40, 80, 119], "study-x")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(np.array_equal(p, cine[i]) for p, i in zip(picked, [0, 40, 80, 119], strict=True))
    whole = cine.nbytes  # 23.6 MB
    assert peak < whole // 5, (peak, whole)
