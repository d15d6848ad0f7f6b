"""The deterministic part of Med-UniC image preprocessing, and its disk cache.

Every Flower message starts a fresh ClientApp process, so decoding a DICOM, cropping the
foreground and resizing to 256 must happen once per image, not once per round. The result
is a small uint8 ``.npy`` keyed by the source file and the preprocessing settings; the
random views (``transforms.py``) run on it every epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from medunic_core.data import readers
from medunic_core.errors import SiteDataError

# Bump when the output of preprocess_image changes, so existing caches are not reused.
PREPROCESS_VERSION = 1
# Fraction of the intensity range a pixel must exceed to count as foreground: low enough to
# keep dim soft tissue, high enough that sensor noise or JPEG ringing in a black border
# does not stretch the bounding box to the whole image.
CROP_THRESHOLD = 0.05


def foreground_box(img: np.ndarray, threshold: float = CROP_THRESHOLD) -> tuple[int, int, int, int]:
    """Return ``(top, bottom, left, right)`` (exclusive ends) of the pixels above ``threshold``.

    The threshold is relative to the image's own min..max, so it works for raw 16-bit,
    Hounsfield-like and 8-bit inputs alike; a flat image keeps its full extent.
    """
    lo, hi = float(img.min()), float(img.max())
    mask = img > lo + threshold * (hi - lo)
    if hi <= lo or not mask.any():
        return 0, img.shape[0], 0, img.shape[1]
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def preprocess_image(img: np.ndarray, cache_size: int, threshold: float = CROP_THRESHOLD) -> np.ndarray:
    """Crop to the foreground, resize to ``cache_size`` x ``cache_size``, min-max to uint8.

    Input: a 2-D array of display values (bright = dense), any dtype. Output: uint8
    ``(cache_size, cache_size)`` spanning 0..255 (all zeros for a flat image). Resizing
    happens in float before quantising, so the bilinear filter (antialiased by Pillow when
    shrinking) cannot round away the extremes and the output keeps the full range.
    """
    if img.ndim != 2:
        raise ValueError(f"preprocess_image needs a 2-D image, got shape {img.shape}")
    top, bottom, left, right = foreground_box(img, threshold)
    crop = np.ascontiguousarray(img[top:bottom, left:right], dtype=np.float32)
    resized = np.asarray(
        Image.fromarray(crop).resize((cache_size, cache_size), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    lo, hi = float(resized.min()), float(resized.max())
    if hi <= lo:
        return np.zeros((cache_size, cache_size), dtype=np.uint8)
    return np.rint((resized - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def settings_hash(cache_size: int) -> str:
    """Hash of everything that changes the cached bytes; it names the cache sub-folder."""
    settings = {"cache_size": cache_size, "version": PREPROCESS_VERSION, "crop_threshold": CROP_THRESHOLD}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class ImageCache:
    """Preprocessed images on disk as ``.npy`` (no pickles), safe to share between processes.

    An entry is keyed by the absolute source path, its size and mtime_ns (so an edited
    file is re-read) under a folder named by :func:`settings_hash` (so a new
    ``cache_size`` or preprocessing version never reuses stale files). ``hits`` and
    ``misses`` count lookups in this process.
    """

    def __init__(self, cache_dir: str | Path, cache_size: int) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be positive, got {cache_size}")
        self.cache_size = cache_size
        self.root = Path(cache_dir) / settings_hash(cache_size)
        self.hits = 0
        self.misses = 0

    def entry_path(self, path: str | Path) -> Path:
        """Where the preprocessed version of ``path`` is (or will be) stored."""
        src = readers.require_file(path).resolve()
        st = src.stat()
        key = hashlib.sha256(json.dumps([str(src), st.st_size, st.st_mtime_ns]).encode()).hexdigest()
        return self.root / key[:2] / f"{key}.npy"

    def get(self, path: str | Path) -> np.ndarray:
        """Return the uint8 ``(cache_size, cache_size)`` image for ``path``, decoding only on a miss.

        Decoding problems raise :class:`SiteDataError` naming the source file.
        """
        entry = self.entry_path(path)
        cached = self._load(entry)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        pixels, _ = readers.read_image(path)
        out = preprocess_image(pixels, self.cache_size)
        self._store(entry, out)
        return out

    def _load(self, entry: Path) -> np.ndarray | None:
        try:
            arr = np.load(entry, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            entry.unlink(missing_ok=True)  # truncated or garbage: recompute it
            return None
        if arr.dtype != np.uint8 or arr.shape != (self.cache_size, self.cache_size):
            entry.unlink(missing_ok=True)
            return None
        return arr

    def _store(self, entry: Path, arr: np.ndarray) -> None:
        # A temp file in the same folder plus os.replace: readers in other processes see
        # either no entry or a complete one, never a half-written file.
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=entry.stem[:8], suffix=".tmp")
        except OSError as exc:
            raise SiteDataError(
                f"{entry.parent}: image cache folder is not writable ({exc}); "
                "fix its permissions or set data.cache_dir to a writable folder"
            ) from exc
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, arr, allow_pickle=False)
            os.replace(tmp, entry)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise SiteDataError(
                f"{entry}: cannot write the image cache entry ({exc}); free disk space or "
                "set data.cache_dir to another folder"
            ) from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
