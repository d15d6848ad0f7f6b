"""Image readers: each says whether it can read a file, and if not, why.

Sites export radiographs as DICOM (often without an extension) or as PNG/JPG. A reader is
picked by suffix and by the DICOM preamble rather than by trial decoding, so an unreadable
file gets one error naming every reader's reason instead of the last decoder's traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medunic_core.data.dicom import read_dicom
from medunic_core.data.limits import MIN_IMAGE_SIDE, check_pixel_count
from medunic_core.errors import SiteDataError

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


class ImageReader(Protocol):
    """A decoder for one family of formats; ``verify`` is cheap, ``read`` decodes."""

    name: str

    def verify(self, path: Path) -> str | None:
        """Return None when this reader accepts ``path``, otherwise the reason it does not."""
        ...

    def read(self, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode ``path`` to a float32 2-D array (bright = dense) and a metadata dict."""
        ...


def has_dicom_preamble(path: Path) -> bool:
    """True when the file carries "DICM" at byte 128, whatever its name."""
    try:
        with path.open("rb") as f:
            f.seek(DICOM_MAGIC_OFFSET)
            return f.read(len(DICOM_MAGIC)) == DICOM_MAGIC
    except OSError:
        return False


def _starts_with(path: Path, *magics: bytes) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(max(len(m) for m in magics))
    except OSError:
        return False
    return any(head.startswith(m) for m in magics)


class DicomReader:
    """Grayscale DICOM through :func:`medunic_core.data.dicom.read_dicom`."""

    name = "dicom"

    def verify(self, path: Path) -> str | None:
        """Accept a DICOM suffix or the "DICM" preamble (extension-less exports)."""
        if path.suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(path):
            return None
        return (
            f"suffix {path.suffix or '(none)'!r} is not one of {DICOM_SUFFIXES} "
            "and there is no 'DICM' preamble at byte 128"
        )

    def read(self, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode with rescale, VOI LUT/window and MONOCHROME1 inversion applied."""
        return read_dicom(path)


class PilReader:
    """PNG and JPG through Pillow: 8-bit, 16-bit ('I;16') and colour converted to grey."""

    name = "pil"

    def verify(self, path: Path) -> str | None:
        """Accept a PNG/JPG suffix or PNG/JPEG magic bytes."""
        if path.suffix.lower() in PIL_SUFFIXES or _starts_with(path, PNG_MAGIC, JPEG_MAGIC):
            return None
        return (
            f"suffix {path.suffix or '(none)'!r} is not one of {PIL_SUFFIXES} "
            "and the file has no PNG/JPEG signature"
        )

    def read(self, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode to float32 grey, keeping the full 16-bit range when the file has one."""
        try:
            with Image.open(path) as img:
                check_pixel_count(path, *img.size)
                img.load()
                fmt = (img.format or "").lower()
                mode = img.mode
                # Phone or scanner JPEGs may be stored rotated with an EXIF flag.
                img = ImageOps.exif_transpose(img)
                if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F", "L"):
                    arr = np.asarray(img)
                else:
                    arr = np.asarray(img.convert("L"))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise SiteDataError(
                f"{path}: cannot be decoded as PNG/JPG ({type(exc).__name__}: {exc}); "
                "re-export the image or drop it from the manifest"
            ) from exc
        if arr.ndim != 2:
            raise SiteDataError(
                f"{path}: decoded to shape {arr.shape}, expected a 2-D image; re-export it as grayscale"
            )
        out = arr.astype(np.float32)
        meta = {"format": fmt, "path": str(path), "mode": mode, "shape": tuple(int(s) for s in out.shape)}
        return np.ascontiguousarray(out), meta


READERS: tuple[ImageReader, ...] = (DicomReader(), PilReader())


def require_file(path: str | Path) -> Path:
    """Return ``path`` as a Path, or raise SiteDataError when it is not an existing file."""
    path = Path(path)
    if not path.exists():
        raise SiteDataError(
            f"{path}: image file does not exist; check image_path in the manifest or the data root"
        )
    if not path.is_file():
        raise SiteDataError(f"{path}: is not a regular file; image_path must point at one image")
    return path


def read_image(
    path: str | Path, readers: Sequence[ImageReader] = READERS
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode any supported radiograph to a float32 2-D array (bright = dense) plus metadata.

    The first reader whose ``verify`` accepts the file decodes it; DICOM goes first so a
    DICOM named ``.png`` is still read as DICOM. An image smaller than MIN_IMAGE_SIDE on a
    side, or claiming more than MAX_IMAGE_PIXELS, is refused naming the file.
    """
    path = require_file(path)
    reasons = []
    for reader in readers:
        reason = reader.verify(path)
        if reason is None:
            pixels, meta = reader.read(path)
            if min(pixels.shape) < MIN_IMAGE_SIDE:
                raise SiteDataError(
                    f"{path}: the image is {pixels.shape[1]} x {pixels.shape[0]} pixels, smaller than "
                    f"{MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE}: not a usable radiograph; re-export it or drop it"
                )
            return pixels, meta
        reasons.append(f"{reader.name}: {reason}")
    raise SiteDataError(
        f"{path}: no image reader accepts this file ({'; '.join(reasons)}); "
        "convert it to DICOM or PNG, or drop it from the manifest"
    )
