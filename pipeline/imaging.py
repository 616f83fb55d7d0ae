"""DICOM pixel data to model-ready images.

Pure functions over pydicom datasets: no network, no files beyond what the caller hands in.
The steps follow the DICOM display pipeline (PS3.3 C.11 / C.7.6.3): Modality LUT (rescale
slope/intercept) → VOI LUT or window centre/width → presentation (MONOCHROME1 inverted so that
air is black, as radiologists read) → 8-bit → resize to the model's pixel budget. Colour data
(RGB, YBR_*) is converted to RGB by pydicom.

Unsupported or undecodable input raises ``ImagingError`` naming the study by a
non-identifying reference (see ``study_reference``), never by patient data.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

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
        return image.resize(size, Image.Resampling.LANCZOS)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64, copy=False)
    low, high = float(np.min(values)), float(np.max(values))
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip((values - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def frame_to_image(ds: Dataset, frame: np.ndarray) -> Image.Image:
    """One decoded frame to a display-ready 8-bit PIL image (``L`` or ``RGB``)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples == 3:
        # pydicom's pixel_array already converts YBR_* to RGB (its ``as_rgb`` default).
        return Image.fromarray(frame if frame.dtype == np.uint8 else _to_uint8(frame), "RGB")
    if samples != 1 or photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        raise ImagingError(f"unsupported photometric interpretation {photometric!r}")
    values = apply_modality_lut(frame, ds)
    values = apply_voi_lut(values, ds, index=0)
    pixels = _to_uint8(np.asarray(values))
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    return Image.fromarray(pixels, "L")


def dataset_frames(ds: Dataset, *, reference: str) -> np.ndarray:
    """All frames of an instance as an array with a leading frame axis."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ImagingError(f"{reference}: instance has no pixel data")
    try:
        array = ds.pixel_array
    except Exception as exc:  # pydicom/pylibjpeg raise many types for undecodable data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ImagingError(
            f"{reference}: pixel data cannot be decoded (transfer syntax {syntax}): {exc}"
        ) from exc
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
            budget.fit(frame_to_image(ds, frames[i]))
            for i in evenly_spaced(len(frames), max_frames)
        ]
    except ImagingError as exc:
        raise ImagingError(f"{reference}: {exc}") from exc


def image_to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


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


def representative_slices(series: list[Dataset], picks: int) -> list[Dataset]:
    """``picks`` slices of a cross-sectional series, evenly spaced in patient space order."""
    ordered = sorted(series, key=_slice_position)
    return [ordered[i] for i in evenly_spaced(len(ordered), picks)]


def study_images(
    series_instances: dict[str, list[Dataset]],
    *,
    reference: str,
    max_images: int,
    budget: PixelBudget | None = None,
) -> list[Image.Image]:
    """Model images for a whole study, at most ``max_images``.

    Single images (CR, DX) are taken as they are; a cross-sectional series (CT, MR) gives
    evenly spaced slices; a multi-frame instance (US cine, XA) gives evenly spaced frames. The
    image budget is shared across series, largest series first.
    """
    if not series_instances:
        raise ImagingError(f"{reference}: study has no instances")

    def available(instances: list[Dataset]) -> int:
        if len(instances) == 1:
            return int(instances[0].get("NumberOfFrames", 1) or 1)
        return len(instances)

    ordered = sorted((s for s in series_instances.values() if s), key=available, reverse=True)
    # Round-robin over series so that a single-image series does not waste its share.
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
    if not images:
        raise ImagingError(f"{reference}: no usable image in the study")
    return images[:max_images]
