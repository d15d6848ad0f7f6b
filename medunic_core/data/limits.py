"""What an image may be: limits every reader applies before and after decoding."""

from __future__ import annotations

from pathlib import Path

from medunic_core.errors import SiteDataError

# A chest radiograph is at most about 4,300 x 4,300 pixels (43 cm at 0.1 mm). Larger claims
# are refused from the header, before any pixel is decoded (a decompression bomb fills RAM);
# smaller than 32 x 32 is no radiograph (a placeholder, a thumbnail, a broken export).
MAX_IMAGE_PIXELS = 10_000 * 10_000
MIN_IMAGE_SIDE = 32


def check_pixel_count(path: Path, width: int, height: int) -> None:
    """Refuse, from the header, an image (frame) whose decoded size would exceed MAX_IMAGE_PIXELS."""
    if width * height > MAX_IMAGE_PIXELS:
        raise SiteDataError(
            f"{path}: its header claims {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS:,} a radiograph "
            "can have (a decompression bomb?); not decoded, drop it from the manifest"
        )
