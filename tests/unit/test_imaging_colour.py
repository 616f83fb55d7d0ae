"""Colour images: PALETTE COLOR through its palette, YBR_* as RGB, multi-frame colour.

All on real sample files shipped with pydicom / pydicom-data; where a case has no sample file
(8-bit palette entries, segmented data built from a plain palette), it is built from real files
and says so. References are computed here from the files' bytes, independently of
``pipeline.imaging``.
"""

from __future__ import annotations

import struct

import numpy as np
import pydicom
import pytest
from pydicom.data import get_palette_files, get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space
from pydicom.pixels import pixel_array as decode
from pydicom.uid import ImplicitVRLittleEndian

from medvlm.errors import ImagingError
from pipeline.imaging import evenly_spaced, instance_to_images, study_images

pytestmark = pytest.mark.unit

CHANNELS = ("Red", "Green", "Blue")


def _read(name: str) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file(name), force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # OT-PAL-8-face.dcm: no file meta, implicit LE
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def _rendered(ds: Dataset, frames: int = 1) -> list[np.ndarray]:
    images = instance_to_images(ds, reference="s", max_frames=frames)
    assert all(image.mode == "RGB" for image in images)
    return [np.asarray(image) for image in images]


def _lut_words(ds: Dataset, channel: str) -> np.ndarray:
    """A channel's non-segmented LUT Data as 16-bit words in the file's byte order."""
    order = "<" if ds.original_encoding[1] else ">"
    return np.frombuffer(ds[f"{channel}PaletteColorLookupTableData"].value, dtype=f"{order}u2")


def _looked_up(stored: np.ndarray, luts: list[np.ndarray], first: int = 0) -> np.ndarray:
    """RGB of each stored value: its entry in each channel's LUT (PS3.3 C.7.6.3.1.5)."""
    index = np.clip(stored.astype(np.int64) - first, 0, len(luts[0]) - 1)
    return np.stack([lut[index] for lut in luts], axis=-1)


# 16-bit palette entries: the only bits per entry among the real PALETTE COLOR sample files.
@pytest.mark.parametrize(
    "name",
    [
        "OBXXXX1A.dcm",  # US, 8-bit stored, 256 entries, explicit VR little endian
        "OBXXXX1A_rle.dcm",  # the same image RLE compressed
        "OBXXXX1A_expb.dcm",  # the same image explicit VR big endian (LUT words swapped)
        "OT-PAL-8-face.dcm",  # OT, 8-bit stored, 200 entries, implicit VR little endian
        "examples_palette.dcm",  # US, 8-bit stored, 256 entries
    ],
)
def test_palette_pixels_are_the_16bit_entries_of_their_stored_values_in_8_bits(name: str) -> None:
    ds = _read(name)
    entries, first, bits = ds.RedPaletteColorLookupTableDescriptor
    assert (ds.PhotometricInterpretation, bits) == ("PALETTE COLOR", 16)
    luts = [_lut_words(ds, channel)[: entries or 65536] for channel in CHANNELS]
    expected = _looked_up(ds.pixel_array, luts, first) >> 8  # 16-bit entry → its high byte
    (rendered,) = _rendered(ds)
    assert rendered.dtype == np.uint8
    assert np.array_equal(rendered, expected)
    assert (rendered[..., 0] != rendered[..., 2]).any()  # colour, not a grey rendering


def test_big_endian_and_rle_palette_images_render_like_the_little_endian_original() -> None:
    (original,) = _rendered(_read("OBXXXX1A.dcm"))
    assert np.array_equal(_rendered(_read("OBXXXX1A_expb.dcm"))[0], original)
    assert np.array_equal(_rendered(_read("OBXXXX1A_rle.dcm"))[0], original)


def _hot_iron() -> np.ndarray:
    """pydicom's real Hot Iron palette (PS3.6 B.1.1): 256 entries of 8 bits, one per byte."""
    palette = pydicom.dcmread(get_palette_files("hotiron.dcm")[0])
    assert list(palette.RedPaletteColorLookupTableDescriptor) == [256, 0, 8]
    return np.stack(
        [
            np.frombuffer(palette[f"{channel}PaletteColorLookupTableData"].value, np.uint8)
            for channel in CHANNELS
        ],
        axis=-1,
    )


def _with_palette(ds: Dataset, descriptor: list[int], luts: list[bytes]) -> Dataset:
    for channel, data in zip(CHANNELS, luts, strict=True):
        setattr(ds, f"{channel}PaletteColorLookupTableDescriptor", descriptor)
        setattr(ds, f"{channel}PaletteColorLookupTableData", data)
    return ds


@pytest.mark.parametrize("words", [False, True], ids=["one-a-byte", "in-16-bit-words"])
def test_8bit_palette_entries_are_used_as_they_are(words: bool) -> None:
    # No sample image has 8-bit entries: a real image's stored values looked up in the real
    # Hot Iron palette (8-bit entries one a byte, as PS3.3 C.7.6.3.1.6 stores them, or kept in
    # 16-bit words as some writers do, PS3.3 C.7.6.3.1.5); a shift by 8 would make it black.
    hot_iron = _hot_iron()
    dtype = np.dtype("<u2") if words else np.dtype(np.uint8)
    ds = _with_palette(
        _read("OBXXXX1A.dcm"),
        [256, 0, 8],
        [hot_iron[:, i].astype(dtype).tobytes() for i in range(3)],
    )
    (rendered,) = _rendered(ds)
    assert np.array_equal(rendered, hot_iron[ds.pixel_array])
    assert rendered.max() == 255


def test_8bit_palette_of_65536_entries_maps_16bit_stored_values() -> None:
    # 8-bit entries with more than 256 of them (pydicom 3.0.2's apply_color_lut alone indexes
    # those with 8-bit integers, wrapping round): the real 16-bit stored values of an Aloka
    # ultrasound image and Hot Iron spread over 65536 entries, one a byte.
    ds = _read("gdcm-US-ALOKA-16.dcm")
    stored = ds.pixel_array
    assert stored.dtype == np.uint16 and stored.max() > 255
    hot_iron = _hot_iron()
    spread = hot_iron[np.arange(65536) >> 8]
    del ds.SegmentedRedPaletteColorLookupTableData
    del ds.SegmentedGreenPaletteColorLookupTableData
    del ds.SegmentedBluePaletteColorLookupTableData
    _with_palette(ds, [0, 0, 8], [spread[:, i].tobytes() for i in range(3)])
    (rendered,) = _rendered(ds)
    assert np.array_equal(rendered, hot_iron[stored >> 8])


def test_stored_values_outside_the_palette_take_its_first_and_last_entries() -> None:
    hot_iron = _hot_iron()
    ds = _read("OBXXXX1A.dcm")
    first, count = 100, 50  # a palette for stored values 100..149 only
    _with_palette(ds, [count, first, 8], [hot_iron[:count, i].tobytes() for i in range(3)])
    stored = ds.pixel_array
    assert stored.min() < first and stored.max() >= first + count
    (rendered,) = _rendered(ds)
    assert np.array_equal(
        rendered, _looked_up(stored, [hot_iron[:count, i] for i in range(3)], 100)
    )


def _expand_segments(words: tuple[int, ...], used: set[int] | None = None) -> list[int]:
    """Reference expansion of Segmented Palette Color LUT Data (PS3.3 C.7.9.2): discrete
    segments (opcode 0) and linear ones (opcode 1, from the previous entry to y1); the Aloka
    file uses no indirect ones (opcode 2). The segment types met are added to ``used``."""
    lut: list[int] = []
    at = 0
    while at + 1 < len(words):
        opcode, length = words[at], words[at + 1]
        if used is not None:
            used.add(opcode)
        if opcode == 0:
            lut += words[at + 2 : at + 2 + length]
            at += 2 + length
        elif opcode == 1:
            y0, y1 = lut[-1], words[at + 2]
            lut += [round(y0 + (y1 - y0) * (i + 1) / length) for i in range(length)]
            at += 3
        else:
            raise AssertionError(f"segment type {opcode} not expected in the sample")
    return lut


@pytest.mark.parametrize("name", ["gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm"])
def test_real_segmented_16bit_palette_is_expanded_and_applied(name: str) -> None:
    # US, 16-bit stored, segmented 16-bit palette of 65536 entries; little and big endian.
    ds = _read(name)
    assert list(ds.RedPaletteColorLookupTableDescriptor) == [0, 0, 16]
    order = "<" if ds.original_encoding[1] else ">"
    luts = []
    for channel in CHANNELS:
        data = ds[f"Segmented{channel}PaletteColorLookupTableData"].value
        luts.append(np.asarray(_expand_segments(struct.unpack(f"{order}{len(data) // 2}H", data))))
    assert all(len(lut) == 65536 for lut in luts)
    (rendered,) = _rendered(ds)
    assert np.array_equal(rendered, _looked_up(ds.pixel_array, luts) >> 8)
    assert (rendered[..., 0] != rendered[..., 1]).any()  # the colour-flow part is coloured


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "gdcm-US-ALOKA-16.dcm"])
def test_real_segmented_8bit_palette_maps_8_and_16bit_stored_values(name: str) -> None:
    # pydicom's real SUMMER palette (PS3.6 B.1.6): 256 8-bit entries as segmented data, one
    # unit a byte, with linear segments; on real 8-bit and 16-bit stored values (those above
    # 255 take the last entry; pydicom 3.0.2's apply_color_lut alone wraps them round).
    palette = pydicom.dcmread(get_palette_files("summer.dcm")[0])
    ds = _read(name)
    for element in ("", "Segmented"):
        for channel in CHANNELS:
            if f"{element}{channel}PaletteColorLookupTableData" in ds:
                delattr(ds, f"{element}{channel}PaletteColorLookupTableData")
    luts = []
    for channel in CHANNELS:
        setattr(ds, f"{channel}PaletteColorLookupTableDescriptor", [256, 0, 8])
        data = palette[f"Segmented{channel}PaletteColorLookupTableData"].value
        setattr(ds, f"Segmented{channel}PaletteColorLookupTableData", data)
        used: set[int] = set()
        luts.append(np.asarray(_expand_segments(tuple(data), used)))
        assert len(luts[-1]) == 256 and 1 in used
    (rendered,) = _rendered(ds)
    assert np.array_equal(rendered, _looked_up(ds.pixel_array, luts))


def test_8bit_segmented_palette_of_more_than_256_entries_is_refused_not_wrapped() -> None:
    # No such file is known; pydicom 3.0.2 would index its 8-bit entries with 8-bit integers.
    ds = _read("gdcm-US-ALOKA-16.dcm")
    ramp = bytes([0, 1, 0, 1, 255, 255, 1, 255, 0, 1, 1, 255])  # 512 entries: up, down, up
    for channel in CHANNELS:
        setattr(ds, f"{channel}PaletteColorLookupTableDescriptor", [512, 0, 8])
        setattr(ds, f"Segmented{channel}PaletteColorLookupTableData", ramp)
    with pytest.raises(ImagingError, match="study-z: 8-bit segmented palettes of more than 256"):
        instance_to_images(ds, reference="study-z")


def _segmented(lut: np.ndarray) -> bytes:
    """Segmented LUT Data (PS3.3 C.7.9.2) for ``lut``: runs of one value as linear segments
    (opcode 1, length, y1), everything else in discrete segments (opcode 0, length, values)."""
    words: list[int] = []
    discrete: list[int] = []
    i = 0
    while i < len(lut):
        run = 1
        while i + run < len(lut) and lut[i + run] == lut[i]:
            run += 1
        if run >= 4 and (words or discrete):  # a linear segment continues the previous entry
            discrete.append(int(lut[i]))
            words += [0, len(discrete), *discrete]
            words += [1, run - 1, int(lut[i])]
            discrete = []
        else:
            discrete += [int(v) for v in lut[i : i + run]]
        i += run
    if discrete:
        words += [0, len(discrete), *discrete]
    return struct.pack(f"<{len(words)}H", *words)


def test_segmented_palette_built_from_a_real_palette_renders_like_the_original() -> None:
    # The only real segmented sample has 16-bit stored values; this one is OBXXXX1A's own
    # 16-bit palette rewritten as segmented data by the encoder above (PS3.3 C.7.9.2).
    original = _read("OBXXXX1A.dcm")
    ds = _read("OBXXXX1A.dcm")
    for channel in CHANNELS:
        data = _segmented(_lut_words(ds, channel))
        used: set[int] = set()
        expanded = _expand_segments(struct.unpack(f"<{len(data) // 2}H", data), used)
        assert expanded == list(_lut_words(ds, channel)) and used == {0, 1}
        delattr(ds, f"{channel}PaletteColorLookupTableData")
        setattr(ds, f"Segmented{channel}PaletteColorLookupTableData", data)
    assert "RedPaletteColorLookupTableData" not in ds
    assert np.array_equal(_rendered(ds)[0], _rendered(original)[0])


def test_multiframe_palette_renders_each_chosen_frame_through_the_palette() -> None:
    ds = _read("OBXXXX1A_2frame.dcm")
    luts = [_lut_words(ds, channel) for channel in CHANNELS]
    rendered = _rendered(ds, frames=2)
    assert len(rendered) == 2
    for frame, image in zip(ds.pixel_array, rendered, strict=True):
        assert np.array_equal(image, _looked_up(frame, luts) >> 8)
    assert not np.array_equal(rendered[0], rendered[1])


def test_palette_image_without_palette_data_is_a_clear_error_without_patient_data() -> None:
    ds = _read("OBXXXX1A.dcm")
    for channel in CHANNELS:
        delattr(ds, f"{channel}PaletteColorLookupTableData")
    with pytest.raises(ImagingError, match="study-p: palette colour image without") as caught:
        instance_to_images(ds, reference="study-p")
    assert str(ds.PatientID) not in str(caught.value)


# YBR: pydicom's RGB conversion of the same file, from its undecoded colour space.
@pytest.mark.parametrize(
    "name",
    [
        "SC_ybr_full_uncompressed.dcm",  # YBR_FULL, native
        "SC_ybr_full_422_uncompressed.dcm",  # YBR_FULL_422, native (subsampled)
        "SC_rgb_jpeg_dcmtk.dcm",  # YBR_FULL, JPEG baseline
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # YBR_FULL_422, JPEG baseline
        "US1_J2KI.dcm",  # YBR_ICT, JPEG 2000 (irreversible)
        "US1_J2KR.dcm",  # YBR_RCT, JPEG 2000 lossless
    ],
)
def test_ybr_images_end_as_pydicoms_rgb_conversion(name: str) -> None:
    ds = _read(name)
    photometric = ds.PhotometricInterpretation
    as_stored = decode(get_testdata_file(name), as_rgb=False)  # the decoder's own colour space
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        expected = convert_color_space(as_stored, photometric, "RGB")
        assert np.abs(expected.astype(int) - as_stored).max() > 50  # conversion matters here
    else:  # the JPEG 2000 decoder inverts the ICT / RCT itself
        expected = as_stored
    (rendered,) = _rendered(ds)
    assert np.array_equal(rendered, expected)


@pytest.mark.parametrize(
    ("rgb", "ybr", "max_error", "mean_error"),
    [
        ("SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", 8, 1.0),
        ("SC_rgb.dcm", "SC_ybr_full_422_uncompressed.dcm", 8, 1.0),
        ("SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", 8, 1.0),
        ("SC_rgb.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm", 8, 1.0),
        ("US1_UNCR.dcm", "US1_J2KR.dcm", 0, 0.0),  # lossless
        ("US1_UNCR.dcm", "US1_J2KI.dcm", 255, 2.5),  # lossy: a few edge pixels differ more
    ],
)
def test_ybr_and_rgb_files_of_the_same_content_render_alike(
    rgb: str, ybr: str, max_error: int, mean_error: float
) -> None:
    (from_rgb,) = _rendered(_read(rgb))
    (from_ybr,) = _rendered(_read(ybr))
    error = np.abs(from_rgb.astype(int) - from_ybr)
    assert error.max() <= max_error and error.mean() <= mean_error
    assert from_rgb.std() > 5


def test_multiframe_ybr_cine_gives_pydicoms_rgb_of_the_chosen_frames() -> None:
    name = "examples_ybr_color.dcm"  # 30 frames, YBR_FULL_422, JPEG baseline
    ds = _read(name)
    images = study_images({"us": [ds]}, reference="s", max_images=3)
    as_stored = decode(get_testdata_file(name), as_rgb=False)
    assert len(images) == 3
    for index, image in zip(evenly_spaced(30, 3), images, strict=True):
        assert image.mode == "RGB"
        expected = convert_color_space(as_stored[index], "YBR_FULL_422", "RGB")
        assert np.array_equal(np.asarray(image), expected)
    assert len({image.tobytes() for image in images}) == 3


def test_ybr_partial_is_refused_rather_than_shown_in_wrong_colours() -> None:
    # pydicom converts neither YBR_PARTIAL_* (a native file relabelled, since pydicom decodes
    # no MPEG); shown as RGB it would be in the wrong colours.
    ds = _read("SC_ybr_full_uncompressed.dcm")
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    with pytest.raises(ImagingError, match=r"study-y: unsupported photometric .*'YBR_PARTIAL_420'"):
        instance_to_images(ds, reference="study-y")
