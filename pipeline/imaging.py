"""DICOM pixel data to model-ready images.

Pure functions over pydicom datasets: no network, no files beyond what the caller hands in.
The steps follow the DICOM display pipeline (PS3.3 C.11 / C.7.6.3): Modality LUT (rescale
slope/intercept) → VOI LUT or window centre/width → presentation (MONOCHROME1 inverted so that
air is black, as radiologists read) → 8-bit → resize to the model's pixel budget. Colour data
ends as 8-bit RGB: YBR_* converted by pydicom's decoding, PALETTE COLOR (common in ultrasound)
looked up in its palette by pydicom's ``apply_color_lut`` (see ``palette_to_rgb``).

Unsupported or undecodable input raises ``ImagingError`` naming the study by a
non-identifying reference (see ``study_reference``), never by patient data.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from medvlm.errors import ImagingError


def study_reference(study_instance_uid: str) -> str:
    """A short non-identifying reference for logs and errors: a hash of the Study Instance UID.

    A UID is not a direct identifier, but it links to one in the PACS; a hash keeps log lines
    joinable with the ledger without spreading the UID.
    """
    return "study-" + hashlib.sha256(study_instance_uid.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PixelBudget:
    """How many pixels one image may cost the model (its processor resizes further)."""

    max_side: int = 1024

    def fit(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = self.max_side / max(width, height)
        if scale >= 1.0:
            return image
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # Bicubic with Pillow's antialiasing support (the filter Qwen2-VL's own processor
        # uses): about half the time of Lanczos on a 2k radiograph, for an input the
        # model's processor resamples again anyway.
        return image.resize(size, Image.Resampling.BICUBIC)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch ``values`` from their minimum to their maximum onto 0..255 (float32, in place
    on a copy: a 2k x 2k radiograph costs a few passes, not float64 temporaries)."""
    work = np.asarray(values).astype(np.float32)  # a copy, changed in place below
    return _stretch(work)


def _stretch(work: np.ndarray) -> np.ndarray:
    low, high = float(work.min()), float(work.max())
    if high <= low:
        return np.zeros(work.shape, dtype=np.uint8)
    work -= np.float32(low)
    work *= np.float32(255.0 / (high - low))
    work += np.float32(0.5)
    np.clip(work, 0, 255, out=work)
    return work.astype(np.uint8)


def _first(value: object) -> float:
    """The first of a possibly multi-valued DS (WindowCenter may list several windows)."""
    if isinstance(value, (MultiValue, list, tuple)):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def linear_window(ds: Dataset) -> tuple[float, float] | None:
    """``(scale, offset)`` taking stored values to 0..1 when the display pipeline is a
    rescale (slope/intercept) and a LINEAR window (PS3.3 C.11.2.1.2.1), the common case;
    None when a LUT sequence or another VOI function applies (pydicom then does it).

    LINEAR: x ≤ c - ½ - (w-1)/2 → 0, x > c - ½ + (w-1)/2 → 1, else (x - (c - ½))/(w-1) + ½,
    which is that affine map clipped to 0..1; the rescale folds into it.
    """
    if "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
        return None
    if str(ds.get("VOILUTFunction") or "LINEAR").upper() != "LINEAR":
        return None
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    try:
        c, w = _first(center), _first(width)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return None
    if w <= 1:
        return None
    return slope / (w - 1), (intercept - (c - 0.5)) / (w - 1) + 0.5


_RGB_ONCE_DECODED = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
"""Three-sample photometric interpretations that pydicom's ``pixel_array`` returns as RGB: with
its ``as_rgb`` default it converts YBR_FULL and YBR_FULL_422 (``convert_color_space``; native,
RLE, JPEG and JPEG-LS data alike), and the JPEG 2000 decoder inverts YBR_ICT / YBR_RCT itself.
YBR_PARTIAL_422 / YBR_PARTIAL_420 (retired, or MPEG only, which pydicom does not decode) are
converted by neither, nor by ``convert_color_space``: they are refused, not shown in wrong
colours."""

_PALETTE_CHANNELS = ("Red", "Green", "Blue")


def _little_endian(ds: Dataset) -> bool:
    """Byte order of the dataset's OW values: that of the file or stream they were read from,
    else that of its transfer syntax (a dataset built in memory), else little endian."""
    little = ds.original_encoding[1]
    if little is not None:
        return bool(little)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        return syntax is None or bool(UID(syntax).is_little_endian)
    except ValueError:  # not a transfer syntax UID
        return True


def _palette_module(ds: Dataset, entries: int) -> Dataset:
    """The Palette Color LUT module of ``ds`` in the form pydicom 3.0's ``apply_color_lut``
    reads right, values unchanged.

    That function reads non-segmented LUT Data in the machine's byte order (wrong colours from a
    big endian file) and indexes with the entries' own integer type (8-bit entries: stored
    values above 255 wrap round). So those data go to it as native 16-bit words: big endian
    words swapped (PS3.5 7.3; 8-bit entries are packed two to a word, the first in the low
    byte), 8-bit entries widened. Segmented data (PS3.3 C.7.9.2), which it expands itself, go
    with a transfer syntax of the byte order they are in.
    """
    little = _little_endian(ds)
    module = Dataset()
    for channel in _PALETTE_CHANNELS:
        descriptor = f"{channel}PaletteColorLookupTableDescriptor"
        values = [int(v) for v in ds[descriptor].value]
        first_vr = "SS" if values[1] < 0 else "US"  # negative only for signed stored values
        data = ds.get(f"{channel}PaletteColorLookupTableData")
        if data is None:  # segmented: apply_color_lut expands it
            module[descriptor] = DataElement(descriptor, first_vr, values)
            segmented = f"Segmented{channel}PaletteColorLookupTableData"
            module[segmented] = DataElement(segmented, "OW", ds[segmented].value)
            continue
        raw = bytes(data)
        if not little and len(raw) % 2 == 0:
            raw = np.frombuffer(raw, dtype=">u2").astype("<u2").tobytes()
        if len(raw) >= 2 * entries:
            words = np.frombuffer(raw[: 2 * entries], dtype="<u2").astype(np.uint16)
        else:  # 8-bit entries, one a byte
            words = np.frombuffer(raw[:entries], dtype=np.uint8).astype(np.uint16)
        # 16 in the descriptor as the data are 16-bit words now (pydicom knows no other word
        # sizes); ``palette_to_rgb`` scales by the entries' bits in the original descriptor.
        module[descriptor] = DataElement(descriptor, first_vr, [values[0], values[1], 16])
        name = f"{channel}PaletteColorLookupTableData"
        module[name] = DataElement(name, "OW", words.tobytes())  # native, as pydicom reads it
    module.file_meta = FileMetaDataset()
    module.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    return module


def palette_to_rgb(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    """PALETTE COLOR stored values to 8-bit RGB through the image's own palette (PS3.3
    C.7.6.3.1.5-6, segmented C.7.9.2), looked up by pydicom's ``apply_color_lut``.

    Values below the first mapped value take the first entry, values above the last the last.
    Each entry keeps its 8 most significant bits as the LUT descriptor counts its bits: the high
    byte of 16-bit entries (exact for both ways 8-bit colours are written in 16 bits, k·256 and
    k·257), 8-bit entries as they are, also when kept in 16-bit words (PS3.3 C.7.6.3.1.5);
    entries above what the descriptor allows are taken as 16-bit.
    """
    try:
        entries, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImagingError("palette colour image without a usable palette descriptor") from exc
    entries = entries or 2**16
    segmented = "RedPaletteColorLookupTableData" not in ds
    if segmented and "SegmentedRedPaletteColorLookupTableData" not in ds:
        raise ImagingError("palette colour image without palette data")
    if segmented and bits == 8 and entries > 256:
        # pydicom would index them with 8-bit integers (see ``_palette_module``).
        raise ImagingError("8-bit segmented palettes of more than 256 entries are not supported")
    # Clipped here, so that pydicom's index arithmetic stays within the LUT for any entry type.
    indices = np.clip(frame, first, first + entries - 1)
    try:
        rgb = apply_color_lut(indices, _palette_module(ds, entries))[..., :3]
    except (IndexError, KeyError, TypeError, ValueError, struct.error) as exc:
        raise ImagingError(f"palette colour lookup table cannot be applied: {exc}") from exc
    bits = bits if 8 <= bits <= 16 else 16
    if int(rgb.max(initial=0)) >= 2**bits:
        bits = 16
    return (rgb >> (bits - 8)).astype(np.uint8)


def frame_to_image(
    ds: Dataset, frame: np.ndarray, budget: PixelBudget | None = None
) -> Image.Image:
    """One decoded frame to a display-ready 8-bit PIL image (``L`` or ``RGB``), fitted to
    ``budget`` when one is given. ``frame`` is as pydicom's ``pixel_array`` returns it (YBR_*
    already RGB, see ``_RGB_ONCE_DECODED``; PALETTE COLOR stored values).

    The common grayscale case, a rescale and a LINEAR window (``linear_window``), is computed
    here in float32 in place (a 2k radiograph: ~13 ms against ~100 ms through pydicom's
    float64 path, same pixels); LUT sequences and other VOI functions go through pydicom.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples == 3 and photometric in _RGB_ONCE_DECODED:
        image = Image.fromarray(frame if frame.dtype == np.uint8 else _to_uint8(frame), "RGB")
        return budget.fit(image) if budget is not None else image
    if samples == 1 and photometric == "PALETTE COLOR":
        image = Image.fromarray(palette_to_rgb(ds, frame), "RGB")
        return budget.fit(image) if budget is not None else image
    if samples != 1 or photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        raise ImagingError(f"unsupported photometric interpretation {photometric!r}")
    window = linear_window(ds)
    if window is not None:
        work = frame.astype(np.float32)
        work *= np.float32(window[0])
        work += np.float32(window[1])
        np.clip(work, 0.0, 1.0, out=work)
        pixels = _stretch(work)
    else:
        values = apply_modality_lut(frame, ds)
        values = apply_voi_lut(values, ds, index=0)
        pixels = _to_uint8(np.asarray(values))
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    image = Image.fromarray(pixels, "L")
    return budget.fit(image) if budget is not None else image


MAX_FRAME_PIXELS = 64_000_000
"""Largest frame decoded (Rows x Columns): 8,000 x 8,000, above any radiograph or mammogram
(~24 MP). A frame's working copy is float32, so one costs at most ~256 MB per sample; a larger
one (a mis-sent whole-slide image, a corrupt header) is refused before decoding."""


def _check_frame_size(ds: Dataset, reference: str) -> None:
    try:
        pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        raise ImagingError(f"{reference}: Rows/Columns are not numbers") from None
    if pixels > MAX_FRAME_PIXELS:
        raise ImagingError(
            f"{reference}: frame of {pixels / 1e6:.0f} megapixels is over the "
            f"{MAX_FRAME_PIXELS / 1e6:.0f} MP limit; not decoded"
        )


def _undecodable(ds: Dataset, reference: str, exc: Exception) -> ImagingError:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
    return ImagingError(
        f"{reference}: pixel data cannot be decoded (transfer syntax {syntax}): {exc}"
    )


def dataset_frames(ds: Dataset, *, reference: str) -> np.ndarray:
    """All frames of an instance as an array with a leading frame axis."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ImagingError(f"{reference}: instance has no pixel data")
    _check_frame_size(ds, reference)
    try:
        array = ds.pixel_array
    except Exception as exc:  # pydicom/pylibjpeg raise many types for undecodable data
        raise _undecodable(ds, reference, exc) from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    if frames == 1:
        return array[np.newaxis, ...]
    if (samples == 1 and array.ndim != 3) or (samples == 3 and array.ndim != 4):
        raise ImagingError(f"{reference}: unexpected pixel array shape {array.shape}")
    return array


def instance_to_images(
    ds: Dataset, *, reference: str, budget: PixelBudget | None = None, max_frames: int = 1
) -> list[Image.Image]:
    """Images for one instance: up to ``max_frames`` frames sampled evenly across the instance."""
    budget = budget or PixelBudget()
    frames = dataset_frames(ds, reference=reference)
    try:
        return [
            frame_to_image(ds, frames[i], budget) for i in evenly_spaced(len(frames), max_frames)
        ]
    except ImagingError as exc:
        raise ImagingError(f"{reference}: {exc}") from exc


PNG_COMPRESS_LEVEL = 1
"""zlib level of the model's PNGs (lossless at any level)."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {"L": 0, "RGB": 2}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
    )


def image_to_png(image: Image.Image, *, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Lossless PNG bytes of an 8-bit ``L`` or ``RGB`` image (PNG 1.2 / ISO 15948).

    Every row with the "Up" filter (the byte above subtracted, one numpy pass) and zlib at a
    fast level, because Pillow's encoder tries every filter on every row: measured on the
    sample chest radiograph fitted to 1024 px, ~28 ms to 432 KiB here against ~50-75 ms to
    431 KiB through Pillow at the same zlib level (and ~260 ms at Pillow's default level 6),
    per image of every study. Other modes go through Pillow.
    """
    color_type = _PNG_COLOR_TYPES.get(image.mode)
    if color_type is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False, compress_level=compress_level)
        return buffer.getvalue()
    pixels = np.asarray(image, dtype=np.uint8)
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type Up (PNG 1.2 §6.3): Raw(x) - Prior(x), modulo 256
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), compress_level)),
            _png_chunk(b"IEND", b""),
        )
    )


def _slice_position(ds: Dataset) -> float:
    """Position along the slice normal (PS3.3 C.7.6.2), else SliceLocation, else InstanceNumber."""
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    if position is not None and orientation is not None and len(orientation) == 6:
        row = np.asarray(orientation[:3], dtype=float)
        column = np.asarray(orientation[3:], dtype=float)
        return float(np.dot(np.cross(row, column), np.asarray(position, dtype=float)))
    if "SliceLocation" in ds:
        return float(ds.SliceLocation)
    return float(ds.get("InstanceNumber", 0) or 0)


def evenly_spaced(count: int, picks: int) -> list[int]:
    """``picks`` indices spread evenly over ``range(count)``, ends included, no repeats."""
    if count <= picks:
        return list(range(count))
    if picks == 1:
        return [count // 2]
    return sorted({round(i * (count - 1) / (picks - 1)) for i in range(picks)})


def representative_slices(series: Sequence[Dataset], picks: int) -> list[Dataset]:
    """``picks`` slices of a cross-sectional series, evenly spaced in patient space order."""
    ordered = sorted(series, key=_slice_position)
    return [ordered[i] for i in evenly_spaced(len(ordered), picks)]


@dataclass(frozen=True)
class Pick:
    """One instance chosen for the model and which of its frames (0-based) to show.

    ``header`` may be a header without pixel data (``ImageSource.instance_headers``) or the full
    instance; ``frames`` are indices into the instance's frames, as its NumberOfFrames announces.
    """

    header: Dataset
    frames: tuple[int, ...]

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.get("SOPInstanceUID", ""))


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def choose_images(
    series_headers: Mapping[str, Sequence[Dataset]], *, reference: str, max_images: int
) -> list[Pick]:
    """Which instances and frames the model sees, from headers alone (no pixel data read).

    Single images (CR, DX) are taken as they are; a cross-sectional series (CT, MR) gives
    evenly spaced slices by patient position; a multi-frame instance (US cine, XA) gives evenly
    spaced frames. The image budget is shared across series round-robin, largest series first,
    so at most ``max_images`` frames are picked in all.
    """
    if not series_headers:
        raise ImagingError(f"{reference}: study has no instances")

    def available(headers: Sequence[Dataset]) -> int:
        return _frame_count(headers[0]) if len(headers) == 1 else len(headers)

    ordered = sorted((list(s) for s in series_headers.values() if s), key=available, reverse=True)
    # Round-robin over series so that a single-image series does not waste its share.
    shares = [0] * len(ordered)
    remaining = max_images
    while remaining > 0 and any(shares[i] < available(s) for i, s in enumerate(ordered)):
        for i, headers in enumerate(ordered):
            if remaining > 0 and shares[i] < available(headers):
                shares[i] += 1
                remaining -= 1
    picks: list[Pick] = []
    for headers, share in zip(ordered, shares, strict=True):
        if share == 0:
            continue
        if len(headers) == 1:
            frames = evenly_spaced(_frame_count(headers[0]), share)
            picks.append(Pick(headers[0], tuple(frames)))
        else:
            for ds in representative_slices(headers, share):
                picks.append(Pick(ds, tuple(evenly_spaced(_frame_count(ds), 1))))
    return picks


def _pick_images(
    pick: Pick, ds: Dataset, *, reference: str, budget: PixelBudget
) -> list[Image.Image]:
    """The picked frames of ``ds`` (the full instance of ``pick.header``) as images.

    When the decoded instance has another frame count than its header announced (a header
    without NumberOfFrames, say), as many frames are spread evenly over the real ones.
    """
    count = _frame_count(ds)
    indices = list(pick.frames)
    if _frame_count(pick.header) != count or any(i >= count for i in indices):
        indices = evenly_spaced(count, max(1, len(indices)))
    frames = picked_frames(ds, indices, reference)
    try:
        return [frame_to_image(ds, frame, budget) for frame in frames]
    except ImagingError as exc:
        raise ImagingError(f"{reference}: {exc}") from exc


def picked_frames(ds: Dataset, indices: Sequence[int], reference: str) -> list[np.ndarray]:
    """Frames ``indices`` of ``ds``, decoding only those (a 500-frame cine of which the model
    sees 4 never sits decoded whole in memory), as ``pixel_array`` would give them."""
    count = _frame_count(ds)
    # Float pixel data (parametric maps) is never compressed: decoded whole, as pixel_array does.
    if count == 1 or len(set(indices)) >= count or "PixelData" not in ds:
        frames = dataset_frames(ds, reference=reference)
        return [frames[i] for i in indices]
    _check_frame_size(ds, reference)
    try:
        return [pixel_array(ds, index=i) for i in indices]
    except Exception as exc:  # pydicom/pylibjpeg raise many types for undecodable data
        raise _undecodable(ds, reference, exc) from exc


@dataclass(frozen=True)
class EncodedPicks:
    """PNGs of the picks that decoded (in pick order, one per frame shown) and why the others
    did not: SOP Instance UID → reason (naming the study, never patient data)."""

    pngs: list[bytes]
    failed: dict[str, str]


def encode_study_pngs(
    instances: Sequence[Dataset], picks: Sequence[Pick], reference: str, max_side: int
) -> EncodedPicks:
    """PNG bytes of the picked frames: decode, fit to ``max_side``, encode. An instance that
    does not decode (or was not retrieved) is left out with its reason, so that the caller can
    choose another one in its place.

    Top-level and over picklable arguments, so that a caller may run it in a process pool.
    """
    by_uid = {str(ds.get("SOPInstanceUID", "")): ds for ds in instances}
    budget = PixelBudget(max_side)
    pngs: list[bytes] = []
    failed: dict[str, str] = {}
    for pick in picks:
        ds = by_uid.get(pick.sop_instance_uid)
        if ds is None:
            failed[pick.sop_instance_uid] = f"{reference}: a chosen instance was not retrieved"
            continue
        try:
            images = _pick_images(pick, ds, reference=reference, budget=budget)
        except ImagingError as exc:
            failed[pick.sop_instance_uid] = str(exc)
            continue
        pngs += [image_to_png(image) for image in images]
    return EncodedPicks(pngs, failed)


def study_images(
    series_instances: dict[str, list[Dataset]],
    *,
    reference: str,
    max_images: int,
    budget: PixelBudget | None = None,
) -> list[Image.Image]:
    """Model images for a whole study of full instances, at most ``max_images``.

    ``choose_images`` then the decoding of what it picked (see both).
    """
    budget = budget or PixelBudget()
    images: list[Image.Image] = []
    for pick in choose_images(series_instances, reference=reference, max_images=max_images):
        images += _pick_images(pick, pick.header, reference=reference, budget=budget)
    if not images:
        raise ImagingError(f"{reference}: no usable image in the study")
    return images[:max_images]
