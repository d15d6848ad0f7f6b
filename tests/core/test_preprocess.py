"""Deterministic preprocessing and the on-disk image cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medunic_core.data import preprocess
from medunic_core.data.dicom import write_dicom
from medunic_core.data.preprocess import ImageCache, foreground_box, preprocess_image
from medunic_core.errors import SiteDataError


def _bordered(noise: bool = True) -> np.ndarray:
    """A 100x120 image: black border with faint noise around a 60x80 textured body."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 40, size=(100, 120)).astype(np.float32) if noise else np.zeros((100, 120), np.float32)
    img[20:80, 25:105] = 1000 + np.linspace(0, 3000, 80, dtype=np.float32)[None, :]
    return img


def test_foreground_box_ignores_noisy_black_border() -> None:
    assert foreground_box(_bordered()) == (20, 80, 25, 105)


def test_foreground_box_of_flat_image_is_whole_image() -> None:
    assert foreground_box(np.full((5, 7), 3.0)) == (0, 5, 0, 7)


def test_preprocess_image_crops_border_and_spans_full_range() -> None:
    out = preprocess_image(_bordered(), 64)
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    assert out.min() == 0 and out.max() == 255
    # The border was cropped: the left column is the darkest part of the body, not noise.
    assert out[:, 0].std() < 2 and out[:, -1].min() > 240
    # The body's horizontal ramp survives: brightness increases left to right.
    assert np.all(np.diff(out[32].astype(int)) >= 0)


def test_preprocess_image_flat_image_gives_zeros() -> None:
    out = preprocess_image(np.full((10, 10), 7.0), 8)
    assert out.shape == (8, 8) and not out.any()


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "img.png"
    path.parent.mkdir()
    Image.fromarray((_bordered() / 16).astype(np.uint8)).save(path)
    return path


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = preprocess.readers.read_image

    def counting(path):  # noqa: ANN001, ANN202
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(preprocess.readers, "read_image", counting)
    return calls


def test_image_cache_second_get_is_a_hit_without_decoding(png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(monkeypatch)
    cache = ImageCache(tmp_path / "cache", 32)
    first = cache.get(png)
    second = cache.get(png)
    assert (cache.misses, cache.hits, len(calls)) == (1, 1, 1)
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.uint8 and first.shape == (32, 32)
    # A new process (new ImageCache object) reuses the file on disk.
    again = ImageCache(tmp_path / "cache", 32)
    again.get(png)
    assert (again.hits, len(calls)) == (1, 1)
    entry = cache.entry_path(png)
    assert entry.suffix == ".npy" and entry.exists()
    assert not list(entry.parent.glob("*.tmp"))
    np.load(entry, allow_pickle=False)


def test_image_cache_corrupt_entry_is_recomputed(png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(monkeypatch)
    cache = ImageCache(tmp_path / "cache", 32)
    good = cache.get(png)
    cache.entry_path(png).write_bytes(b"\x93NUMPY garbage")
    np.testing.assert_array_equal(cache.get(png), good)
    assert (cache.misses, len(calls)) == (2, 2)
    np.testing.assert_array_equal(np.load(cache.entry_path(png), allow_pickle=False), good)


def test_image_cache_key_depends_on_settings_and_source(png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = ImageCache(tmp_path / "cache", 32)
    large = ImageCache(tmp_path / "cache", 48)
    assert small.entry_path(png) != large.entry_path(png)
    assert large.get(png).shape == (48, 48)
    before = small.entry_path(png)
    monkeypatch.setattr(preprocess, "PREPROCESS_VERSION", preprocess.PREPROCESS_VERSION + 1)
    assert ImageCache(tmp_path / "cache", 32).entry_path(png) != before
    # Rewriting the source file (new size/mtime) invalidates its entry.
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(png)
    assert small.entry_path(png) != before


def test_image_cache_reads_dicom(tmp_path: Path) -> None:
    arr = np.zeros((40, 40), np.uint16)
    arr[10:30, 10:30] = np.linspace(1000, 4000, 20, dtype=np.uint16)[:, None]
    path = write_dicom(arr, tmp_path / "x.dcm")
    out = ImageCache(tmp_path / "cache", 16).get(path)
    assert out.shape == (16, 16) and out.min() == 0 and out.max() == 255


def test_image_cache_decode_errors_are_site_data_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"junk")
    cache = ImageCache(tmp_path / "cache", 16)
    with pytest.raises(SiteDataError, match=r"bad\.dcm"):
        cache.get(bad)
    with pytest.raises(SiteDataError, match="does not exist"):
        cache.get(tmp_path / "missing.png")
