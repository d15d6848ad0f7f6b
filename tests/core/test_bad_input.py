"""Bad input at the CLI: a one-line error naming the file, row or key and a non-zero exit;
never a traceback, never a lost checkpoint."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medunic_core.cli import main
from medunic_core.constants import CHECKPOINT_FILE, DATA_PROBLEMS_FILE
from medunic_core.data.dicom import read_dicom, write_dicom
from medunic_core.data.manifest import read_manifest
from medunic_core.data.readers import read_image
from medunic_core.errors import SiteDataError


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"medunic {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=-4", "train.batch_size"), ("train.accum_steps=0", "train.accum_steps"),
    ("train.lr=-1", "train.lr"), ("train.device=tpu", "train.device"), ("data.langs=[en,fr]", "data.langs"),
    ("loss.temperature=0", "loss.temperature"),
])
def test_impossible_config_values_name_their_key(override, key, capsys, tmp_path):
    assert main(["train", "--no-progress", override, f"train.out_dir={tmp_path}"]) == 2
    assert f"'{key}'" in _one_line_error(capsys, "train")


def test_an_unparseable_config_file_is_named(capsys, tmp_path, synthetic_data, train_overrides):
    bad = tmp_path / "config.yaml"
    bad.write_text("train:\n  lr: [1e-4\n  batch_size: 8\n")
    assert main(["train", "--no-progress", "--config", str(bad)]) == 2
    assert str(bad) in _one_line_error(capsys, "train")
    run = tmp_path / "run"  # a run folder whose saved config was damaged
    assert main(["train", "--no-progress", *train_overrides(synthetic_data, run, "train.max_steps=1")]) == 0
    capsys.readouterr()
    (run / "config.yaml").write_text(": : :\n\t- [")
    assert main(["eval", str(run)]) == 2
    assert str(run / "config.yaml") in _one_line_error(capsys, "eval")


def test_a_non_finite_loss_stops_training_and_keeps_the_good_checkpoint(capsys, tmp_path, synthetic_data,
                                                                          train_overrides):
    import torch

    from medunic_core.config import load_config
    from medunic_core.train import train

    run = tmp_path / "run"
    overrides = train_overrides(synthetic_data, run, "train.max_steps=12", "train.ckpt_every=2")
    train(load_config("tiny", overrides), progress=False, stop_at_step=6)  # stopped (preempted) after step 6
    # weights scaled by 1e30 (finite, and kept as they are): the resumed run overflows at its first step
    state = torch.load(run / CHECKPOINT_FILE, weights_only=False)
    state["model"] = {k: v * 1e30 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, run / CHECKPOINT_FILE)
    kept = (run / CHECKPOINT_FILE).read_bytes()
    capsys.readouterr()
    rc = main(["train", "--no-progress", *overrides])
    assert rc == 8
    line = _one_line_error(capsys, "train")
    assert "step 7" in line and "not finite" in line and "nothing was saved" in line
    assert (run / CHECKPOINT_FILE).read_bytes() == kept  # never replaced by non-finite weights
    fresh = tmp_path / "fresh"
    assert main(["train", "--no-progress", *train_overrides(synthetic_data, fresh, "loss.temperature=1e-45")]) == 8
    assert not (fresh / CHECKPOINT_FILE).exists()


def test_a_truncated_checkpoint_is_named(capsys, tmp_path, synthetic_data, train_overrides):
    run = tmp_path / "run"
    assert main(["train", "--no-progress", *train_overrides(synthetic_data, run, "train.max_steps=1")]) == 0
    capsys.readouterr()
    ckpt = run / CHECKPOINT_FILE
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    assert main(["eval", str(run)]) == 4
    assert f"checkpoint {ckpt} cannot be read" in _one_line_error(capsys, "eval")
    assert main(["train", "--no-progress", *train_overrides(synthetic_data, run, "train.max_steps=2")]) == 4
    assert "truncated or damaged" in _one_line_error(capsys, "train")


def _manifest_with(tmp_path: Path, synthetic_data: Path, line: bytes) -> Path:
    lines = synthetic_data.read_bytes().splitlines(keepends=True)
    out = tmp_path / "manifest.jsonl"  # beside a copy of the images: relative image paths resolve
    shutil.copytree(synthetic_data.parent / "images", tmp_path / "images")
    out.write_bytes(b"".join(lines[:3]) + line + b"".join(lines[3:]))
    return out


@pytest.mark.parametrize("line, reason", [
    (b'["not", "an", "object"]\n', "row 4 (id=?): line 4 is a JSON list, not an object"),
    (b'{"id": "x1", "image_path": "a.png", "report": "caf\xe9", "lang": "en", "split": "train"}\n',
     "row 4 (id=?): line 4 is not UTF-8 text (byte 0xe9"),
])
def test_a_bad_manifest_line_is_named_by_row(line, reason, capsys, tmp_path, synthetic_data, train_overrides):
    manifest = _manifest_with(tmp_path, synthetic_data, line)
    with pytest.raises(SiteDataError, match="rows are bad"):
        read_manifest(manifest)
    assert main(["train", "--no-progress", *train_overrides(manifest, tmp_path / "run")]) == 3
    assert reason in _one_line_error(capsys, "train")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (no real pixel data): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_images_too_large_or_too_small_are_refused_by_name(tmp_path):
    for side in (12000, 20000):  # above our limit; above Pillow's own
        bomb = _png_header_only(tmp_path / f"bomb{side}.png", side, side)
        with pytest.raises(SiteDataError, match=rf"bomb{side}\.png: .*decompression bomb"):
            read_image(bomb)
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "dot.png")
    with pytest.raises(SiteDataError, match=r"dot.png: the image is 1 x 1 pixels, smaller than 32 x 32"):
        read_image(tmp_path / "dot.png")
    dicom = write_dicom(np.zeros((64, 64), np.uint16), tmp_path / "big.dcm")
    ds = pydicom.dcmread(dicom)
    ds.Rows = ds.Columns = 20000
    ds.save_as(dicom, enforce_file_format=True)
    with pytest.raises(SiteDataError, match=r"big.dcm: its header claims 20000 x 20000 pixels"):
        read_image(dicom)


def test_unreadable_images_are_listed_and_left_out_up_to_the_allowed_share(capsys, tmp_path, synthetic_data,
                                                                          train_overrides):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data.parent, data, ignore=shutil.ignore_patterns("cache"))
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    broken = next(r for r in rows if r["split"] == "train")
    (data / broken["image_path"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = tmp_path / "run"
    overrides = train_overrides(data / "manifest.jsonl", run, f"data.cache_dir={tmp_path / 'cache'}")
    assert main(["train", "--no-progress", *overrides]) == 0  # 1 of 56 is within data.max_bad_fraction
    problems = json.loads((run / DATA_PROBLEMS_FILE).read_text())
    assert len(problems) == 1 and broken["id"] in problems[0] and broken["image_path"] in problems[0]
    assert main(["train", "--no-progress", *overrides, "data.max_bad_fraction=0", "train.resume=false"]) == 3
    err = capsys.readouterr().err
    assert "1 of 56 images are unreadable" in err and str(run / DATA_PROBLEMS_FILE) in err


def test_enhanced_multiframe_dicom_applies_rescale_and_window_from_functional_groups(tmp_path):
    pixels = np.full((40, 40), 100, np.uint16)
    pixels[10:30, 10:30] = 3000
    path = write_dicom(pixels, tmp_path / "enhanced.dcm")
    ds = pydicom.dcmread(path)
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([pixels, pixels]).astype("<u2").tobytes()
    transform, window, frame = Dataset(), Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = "2", "-1000", "US"
    window.WindowCenter, window.WindowWidth = "2000", "4000"
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    frame_window = Dataset()
    frame_window.WindowCenter, frame_window.WindowWidth = "1000", "2000"  # the first frame's own window wins
    frame.FrameVOILUTSequence = Sequence([frame_window])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame, Dataset()])
    ds.save_as(path, enforce_file_format=True)
    out, meta = read_dicom(path)
    assert meta["rescale"] == (2.0, -1000.0) and meta["voi"] == "window"
    # 100 -> -800 (below the window 0..2000: lowest); 3000 -> 5000 (above: highest)
    assert out[0, 0] == out.min() and out[20, 20] == out.max() and out.max() > out.min()
    mid = pixels.copy()
    mid[0, 0] = 1000  # 2 * 1000 - 1000 = 1000, the frame window's centre
    ds.PixelData = np.stack([mid, mid]).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    out, _ = read_dicom(path)
    assert out[0, 0] == pytest.approx((out.min() + out.max()) / 2, rel=0.01)
