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
    count = len(frames)
    picks = sorted({round(i * (count - 1) / max(1, max_frames - 1)) for i in range(max_frames)})
    picks = [p for p in picks if p < count][:max_frames] if count > 1 else [0]
    try:
        return [budget.fit(frame_to_image(ds, frames[i])) for i in picks]
    except ImagingError as exc:
        raise ImagingError(f"{reference}: {exc}") from exc


def image_to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
