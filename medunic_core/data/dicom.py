"""Grayscale radiograph DICOM I/O through pydicom.

Reading turns any site's DICOM into one convention (display values, bright = dense), so
that preprocessing and the cache never have to know about slopes, windows or MONOCHROME1.
Writing exists for the synthetic generator and the tests: it makes small, valid,
reproducible files that exercise exactly those conversions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from medunic_core.data.limits import check_pixel_count
from medunic_core.errors import SiteDataError

SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
GRAYSCALE_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def write_dicom(
    pixels: np.ndarray,
    path: str | Path,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    patient_id: str = "",
    study_id: str = "",
) -> Path:
    """Write a 2-D grayscale array as an uncompressed Secondary Capture DICOM.

    Pixels are stored as given (they must be integers that fit ``bits_stored``; negative
    values make the pixel representation signed); the slope, intercept and window
    ``(center, width)`` are written as tags, so a reader has to apply them. UIDs are
    derived from the ids, the file name and the pixel content, so the same call writes
    the same bytes: synthetic datasets stay reproducible.
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"write_dicom needs a 2-D grayscale array, got shape {arr.shape}")
    if photometric not in GRAYSCALE_PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {GRAYSCALE_PHOTOMETRICS}, not {photometric!r}")
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be in 1..16, got {bits_stored}")
    if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError("write_dicom stores integer pixels; round or scale the array first")
    signed = bool(arr.size and arr.min() < 0)
    if signed:
        lo, hi = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    else:
        lo, hi = 0, 2**bits_stored - 1
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ValueError(
            f"pixel values {arr.min()}..{arr.max()} do not fit bits_stored={bits_stored} "
            f"({'signed' if signed else 'unsigned'} range {lo}..{hi}); raise bits_stored or rescale"
        )
    bits_allocated = 8 if bits_stored <= 8 else 16
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}").newbyteorder("<")
    stored = np.ascontiguousarray(arr.astype(dtype))

    path = Path(path)
    content = hashlib.sha256(stored.tobytes()).hexdigest()
    # Without ids every file is its own study; with them, files of one study share its UID.
    study_key = [patient_id, study_id] if patient_id or study_id else [path.name]
    study_uid = generate_uid(entropy_srcs=["study", *study_key])
    series_uid = generate_uid(entropy_srcs=["series", study_uid])
    sop_uid = generate_uid(entropy_srcs=["sop", study_uid, path.name, content, photometric])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = ""
    ds.StudyID = study_id
    ds.Modality = "DX"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope = _ds_value(rescale_slope)
    ds.RescaleIntercept = _ds_value(rescale_intercept)
    ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter = _ds_value(window[0])
        ds.WindowWidth = _ds_value(window[1])
    ds.PixelData = stored.tobytes()

    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def read_dicom(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a grayscale DICOM to display values as a float32 2-D array, bright = dense.

    Applies the modality LUT (slope/intercept), then the VOI LUT or window, then inverts
    MONOCHROME1; multi-frame files give their first frame. Anything that is not a
    grayscale image raises :class:`SiteDataError` naming the file and what to do.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise SiteDataError(
            f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc}); "
            "re-export or re-download it, or drop it from the manifest"
        ) from exc

    if len(ds) == 0:
        raise SiteDataError(
            f"{path}: DICOM header but no data elements (truncated file?); "
            "re-export or re-download it, or drop it from the manifest"
        )
    file_meta = getattr(ds, "file_meta", None)
    sop_uid = str(ds.get("SOPClassUID", "") or getattr(file_meta, "MediaStorageSOPClassUID", ""))
    sop_name = pydicom.uid.UID(sop_uid).name if sop_uid else "unknown"
    if not any(k in ds for k in PIXEL_DATA_KEYWORDS):
        raise SiteDataError(
            f"{path}: has no pixel data (SOP class {sop_name}); not an image, drop it from the manifest"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric not in GRAYSCALE_PHOTOMETRICS or samples != 1:
        raise SiteDataError(
            f"{path}: is not a grayscale DICOM (PhotometricInterpretation={photometric or 'missing'}, "
            f"SamplesPerPixel={samples}); medunic trains on grayscale radiographs: "
            "convert it to MONOCHROME2 or drop it from the manifest"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    check_pixel_count(path, int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0))
    _hoist_frame_functional_groups(ds, index=0)
    try:
        if frames > 1:  # decode only the first frame of a multi-frame file
            ds.pixel_array_options(index=0)
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing decoders or bad data
        syntax = getattr(file_meta, "TransferSyntaxUID", None)
        todo = (
            "decompress it (e.g. to Explicit VR Little Endian) or install a pydicom decoder for it"
            if syntax is not None and syntax.is_compressed
            else "the file looks truncated or corrupted: re-export it"
        )
        raise SiteDataError(
            f"{path}: pixel data cannot be decoded (transfer syntax "
            f"{syntax.name if syntax is not None else 'unknown'}: {exc}); {todo}, or drop it from the manifest"
        ) from exc

    if arr.ndim != 2:
        raise SiteDataError(
            f"{path}: pixel array has shape {arr.shape}, expected a 2-D grayscale frame; "
            "drop it from the manifest"
        )

    voi_lut = bool(ds.get("VOILUTSequence"))
    windowed = "WindowCenter" in ds and "WindowWidth" in ds
    try:
        out = apply_modality_lut(arr, ds)
        if voi_lut or windowed:
            out = apply_voi_lut(out, ds, index=0, prefer_lut=True)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise SiteDataError(
            f"{path}: invalid rescale, VOI LUT or window tags ({type(exc).__name__}: {exc}); "
            "fix the tags in the export or drop it from the manifest"
        ) from exc
    out = np.asarray(out, dtype=np.float32)
    if photometric == "MONOCHROME1":
        out = np.float32(out.max() + out.min()) - out

    meta: dict[str, Any] = {
        "format": "dicom",
        "path": str(path),
        "sop_class_uid": sop_uid,
        "sop_class": sop_name,
        "modality": str(ds.get("Modality", "")),
        "photometric": photometric,
        "frames": frames,
        "shape": tuple(int(s) for s in out.shape),
        "rescale": (float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)),
        "voi": "lut" if voi_lut else ("window" if windowed else None),
        "patient_id": str(ds.get("PatientID", "")),
        "study_id": str(ds.get("StudyID", "")),
    }
    return np.ascontiguousarray(out), meta


def _hoist_frame_functional_groups(ds: Dataset, index: int) -> None:
    """Enhanced (multi-frame) DICOM keeps rescale and window in functional groups, not at the
    top level where pydicom's LUT functions look: copy the shared values, then the frame's
    own (Pixel Value Transformation and Frame VOI LUT macros), to the top level."""
    macros = (("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
              ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")))
    for groups_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(groups_name) or []
        position = 0 if groups_name.startswith("Shared") else index
        if len(groups) <= position:
            continue
        for macro, keywords in macros:
            items = groups[position].get(macro) or []
            for keyword in keywords:
                if items and keyword in items[0]:
                    setattr(ds, keyword, items[0][keyword].value)


def _ds_value(value: float) -> str:
    """Format a float for a DS tag (16 characters at most) without rounding surprises."""
    text = f"{float(value):.10g}"
    if len(text) > 16:
        text = f"{float(value):.8g}"
    return text
