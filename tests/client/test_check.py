"""`medunic client check` on a site folder with every kind of bad row, in real formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from medunic_core.cli import main
from medunic_core.data.dicom import write_dicom
from medunic_core.data.language import detect_language

GOOD_ES = "derrame pleural derecho. silueta cardiaca normal. sin neumotórax."


def _sr_without_pixels(path: Path) -> Path:
    ds = pydicom.Dataset()
    ds.Modality = "SR"
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def _site(tmp_path: Path) -> Path:
    img = tmp_path / "img"
    img.mkdir()
    phantom = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    rows = []
    for i in range(8):  # good rows
        write_dicom(phantom, img / f"ok{i}.dcm")
        rows.append({"id": f"ok{i}", "image_path": f"img/ok{i}.dcm", "report": GOOD_ES, "lang": "es",
                     "split": "train" if i < 6 else "test"})
    (img / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 10)
    _sr_without_pixels(img / "report_sr.dcm")
    write_dicom(phantom, img / "en.dcm")
    write_dicom(phantom, img / "empty.dcm")
    rows += [
        {"id": "corrupt", "image_path": "img/corrupt.dcm", "report": GOOD_ES, "lang": "es", "split": "train"},
        {"id": "sr", "image_path": "img/report_sr.dcm", "report": GOOD_ES, "lang": "es", "split": "train"},
        {"id": "gone", "image_path": "img/missing.png", "report": GOOD_ES, "lang": "es", "split": "train"},
        {"id": "empty", "image_path": "img/empty.dcm", "report": "  ", "lang": "es", "split": "train"},
        {"id": "english", "image_path": "img/en.dcm", "lang": "es", "split": "train",
         "report": "There is a small right pleural effusion. The heart size is normal. No pneumothorax."},
        {"id": "twice", "image_path": "img/ok0.dcm", "report": GOOD_ES, "lang": "es", "split": "train"},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest


def test_check_lists_every_bad_row_by_name_and_counts_them(tmp_path, capsys):
    manifest = _site(tmp_path)
    rc = main(["client", "check", "--data", str(manifest), "--language", "es", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 3 and "REFUSED" in out  # 6 bad rows of 14 is far above 5%
    counts = {line.split()[0] + (" " + line.split()[1] if not line.split()[1].isdigit() else ""): int(line.split()[-1])
              for line in out.splitlines()[4:10]}
    assert counts == {"malformed row": 0, "missing file": 1, "unreadable image": 2, "empty report": 1,
                      "wrong language": 1, "duplicate image": 1}
    for name in ("corrupt.dcm", "report_sr.dcm", "missing.png", "id=empty", "en.dcm", "id=twice"):
        assert name in out, name
    assert "no pixel data" in out and "reads as 'en'" in out
    assert "rows: 14, usable: 8, bad: 6" in out and "train 6, val 0, test 2" in out
    assert "row 12 (id=empty)" in out and "row 13 (id=english)" in out  # manifest row numbers


def test_check_accepts_a_clean_site(tmp_path, capsys):
    manifest = _site(tmp_path)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()][:8]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["client", "check", "--data", str(manifest), "--language", "es", "--no-progress"]) == 0
    assert "OK: this site can join" in capsys.readouterr().out


def test_a_site_of_both_languages_checks_each_row_against_its_own(tmp_path, capsys):
    """--language en+es: a row may be English or Spanish, and its report must read as the
    language the row declares."""
    manifest = _site(tmp_path)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()][:8]
    english = "There is a small right pleural effusion. The heart size is normal. No pneumothorax."
    rows[1] = {**rows[1], "lang": "en", "report": english}
    rows[2] = {**rows[2], "lang": "en"}  # a Spanish report declared English
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    main(["client", "check", "--data", str(manifest), "--language", "es+en", "--no-progress"])
    out = capsys.readouterr().out
    assert "(language en+es)" in out and "rows: 8, usable: 7, bad: 1" in out and "row 3 (id=ok2)" in out
    assert "reads as 'es'" in out
    main(["client", "check", "--data", str(manifest), "--language", "es", "--no-progress"])
    assert "declared 'en' in a 'es' site" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["client", "check", "--data", str(manifest), "--language", "en+fr", "--no-progress"])


def test_language_detection_on_both_communities():
    assert detect_language(GOOD_ES) == "es"
    assert detect_language("FINDINGS: The lungs are clear. No pleural effusion. IMPRESSION: Normal.") == "en"
    assert detect_language("edema") is None  # too little evidence to call it wrong
