"""Reader choice and PNG/JPG decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medunic_core.data.dicom import write_dicom
from medunic_core.data.readers import READERS, DicomReader, PilReader, read_image
from medunic_core.errors import SiteDataError


def _gradient(high: int, dtype: type) -> np.ndarray:
    return np.linspace(0, high, 40 * 50).reshape(40, 50).astype(dtype)


def test_read_image_png_8bit(tmp_path: Path) -> None:
    arr = _gradient(255, np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out, meta = read_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and meta["format"] == "png" and meta["mode"] == "L"
    np.testing.assert_array_equal(out, arr.astype(np.float32))


def test_read_image_png_16bit_keeps_full_range(tmp_path: Path) -> None:
    arr = _gradient(60000, np.uint16)
    Image.fromarray(arr).save(tmp_path / "a16.png")
    out, meta = read_image(tmp_path / "a16.png")
    assert meta["mode"].startswith("I")
    np.testing.assert_array_equal(out, arr.astype(np.float32))


def test_read_image_rgb_jpg_is_converted_to_grey(tmp_path: Path) -> None:
    grey = _gradient(255, np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "c.jpg", quality=95)
    out, meta = read_image(tmp_path / "c.jpg")
    assert out.shape == (40, 50) and meta["format"] == "jpeg"
    assert np.abs(out - grey).max() < 8  # JPEG is lossy


def test_read_image_extensionless_dicom_by_preamble(tmp_path: Path) -> None:
    arr = np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 10
    path = write_dicom(arr, tmp_path / "IM0001")
    assert path.suffix == ""
    out, meta = read_image(path)
    assert meta["format"] == "dicom"
    np.testing.assert_array_equal(out, arr.astype(np.float32))


def test_read_image_png_without_suffix_by_signature(tmp_path: Path) -> None:
    Image.fromarray(_gradient(255, np.uint8)).save(tmp_path / "noext", format="PNG")
    _, meta = read_image(tmp_path / "noext")
    assert meta["format"] == "png"


def test_read_image_unknown_file_lists_each_reader_reason(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(SiteDataError) as exc:
        read_image(path)
    msg = str(exc.value)
    assert "notes.txt" in msg
    for reader in READERS:
        assert f"{reader.name}:" in msg
    assert "DICM" in msg and ".png" in msg


def test_read_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match=r"gone\.png.*does not exist"):
        read_image(tmp_path / "gone.png")


def test_read_image_corrupt_png_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(SiteDataError, match=r"bad\.png.*cannot be decoded"):
        read_image(path)


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.name)
def test_reader_refuses_a_text_file_with_a_reason(reader: DicomReader | PilReader, tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("x")
    reason = reader.verify(path)
    assert isinstance(reason, str) and reason
