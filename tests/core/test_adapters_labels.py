"""Label-only adapters (CheXpert, RSNA Pneumonia, SIIM-ACR) on small fixtures in the released
formats: rows, labels and splits, bad rows reported by id, and manifests that evaluation reads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from medunic_core.cli import main
from medunic_core.data.adapters import prepare_dataset
from medunic_core.data.adapters.base import hash_split
from medunic_core.data.dataset import prepare_images
from medunic_core.data.dicom import write_dicom
from medunic_core.data.manifest import read_manifest
from medunic_core.data.preprocess import ImageCache
from medunic_core.errors import ConfigError, SiteDataError

CHEXPERT_COLUMNS = [
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(path)


def _dicom(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((32, 32), 200, dtype=np.uint16)
    arr[8:24, 8:24] = 3000
    write_dicom(arr, path, patient_id=path.stem)


def _sr_dicom(path: Path) -> None:
    """A valid DICOM file without pixel data (a structured report): not an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[path.name])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def _problems(out: Path) -> dict[str, str]:
    """problems.csv as id -> message (the ids a person looks up)."""
    with (out / "problems.csv").open(newline="", encoding="utf-8") as fh:
        return {row["id"]: row["problem"] for row in csv.DictReader(fh)}


def _manifest(out: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def _unreadable_ids(manifest: Path, tmp_path: Path) -> list[str]:
    """Ids that the training/evaluation image check refuses (prepare checks existence only)."""
    records = read_manifest(manifest, require_report=False)
    _, bad = prepare_images(records, ImageCache(tmp_path / "cache", 32), max_bad_fraction=1.0, progress=False)
    return sorted(p.id for p in bad)


# -- CheXpert --------------------------------------------------------------------------------


def _chexpert_row(path: str, view: str = "Frontal", **labels: str) -> list[str]:
    values = {c: "" for c in CHEXPERT_COLUMNS}
    values.update({"Path": path, "Sex": "Female", "Age": "68", "Frontal/Lateral": view,
                   "AP/PA": "AP" if view == "Frontal" else ""})
    values.update({k.replace("_", " "): v for k, v in labels.items()})
    return [values[c] for c in CHEXPERT_COLUMNS]


@pytest.fixture
def chexpert_root(tmp_path: Path) -> Path:
    """A container folder holding CheXpert-v1.0-small/{train,valid}.csv and the JPGs."""
    top = tmp_path / "chexpert"
    release = top / "CheXpert-v1.0-small"
    p = "CheXpert-v1.0-small/train"
    train = [
        _chexpert_row(f"{p}/patient00001/study1/view1_frontal.jpg", Cardiomegaly="1.0", Edema="-1.0",
                      Pleural_Effusion="0.0", Lung_Lesion="1.0", Fracture="1.0"),
        _chexpert_row(f"{p}/patient00001/study1/view2_lateral.jpg", "Lateral", Cardiomegaly="1.0"),
        _chexpert_row(f"{p}/patient00002/study1/view1_frontal.jpg", Pneumothorax="2.0"),  # malformed value
        _chexpert_row(f"{p}/patient00003/study1/view1_frontal.jpg", Consolidation="0.0"),  # no image
        _chexpert_row(f"{p}/patient00001/study1/view1_frontal.jpg", Cardiomegaly="0.0"),  # duplicate
        _chexpert_row(f"{p}/study1/view1_frontal.jpg"),  # malformed Path
        _chexpert_row(f"{p}/patient00005/study2/view1_frontal.jpg", "Oblique"),  # malformed view
        *[_chexpert_row(f"{p}/patient{i:05d}/study1/view1_frontal.jpg", Edema="0.0") for i in range(10, 30)],
    ]
    valid = [_chexpert_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
                           Cardiomegaly="1.0", Edema="0.0", Pneumothorax="0.0", Consolidation="0.0",
                           Pleural_Effusion="1.0", Lung_Lesion="0.0")]
    _write_csv(release / "train.csv", CHEXPERT_COLUMNS, train)
    _write_csv(release / "valid.csv", CHEXPERT_COLUMNS, valid)
    for row in train + valid:
        if "patient00003" not in row[0] and "patient" in row[0]:
            _jpg(top / row[0])
    return top


def test_chexpert_frontal_labels_splits_and_bad_rows_by_id(chexpert_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare_dataset("chexpert", str(chexpert_root), str(out))
    rows = _manifest(out)
    first = rows["train/patient00001/study1/view1_frontal"]
    # -1.0 (Edema) is unknown, Fracture is not ours, Lung Lesion -> nodule
    assert first["labels"] == {"cardiomegaly": 1, "pleural_effusion": 0, "nodule": 1}
    assert first["report"] == "" and first["lang"] == "en" and first["site"] == "chexpert"
    assert "train/patient00001/study1/view2_lateral" not in rows  # frontal only by default
    assert rows["valid/patient64541/study1/view1_frontal"]["split"] == "test"
    train_rows = [r for k, r in rows.items() if k.startswith("train/")]
    assert len(train_rows) == 21 and {r["split"] for r in train_rows} <= {"train", "val"}
    for rid, row in rows.items():
        if rid.startswith("train/"):
            assert row["split"] == hash_split(rid.split("/")[1], 0.1, 0.0)
    problems = _problems(out)
    assert problems["train/patient00002/study1/view1_frontal"].startswith("malformed label: Pneumothorax='2.0'")
    assert problems["train/patient00003/study1/view1_frontal"].startswith("missing file")
    assert problems["train/patient00001/study1/view1_frontal"].startswith("duplicate id")
    assert problems["CheXpert-v1.0-small/train/study1/view1_frontal.jpg"].startswith("malformed Path")
    assert problems["train/patient00005/study2/view1_frontal"].startswith("malformed Frontal/Lateral")
    assert len(result.problems) == 5 and result.records == 22
    records = read_manifest(result.manifest, require_report=False)
    assert len(records) == 22 and Path(records[0].image_path).is_file()
    with pytest.raises(SiteDataError, match="empty report"):
        read_manifest(result.manifest)  # training refuses label-only data


def test_chexpert_options_through_the_cli(chexpert_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["prepare", "chexpert", "--root", str(chexpert_root / "CheXpert-v1.0-small"), "--out", str(out),
               "--site", "stanford", "--opt", "views=all", "--opt", "uncertain=positive",
               "--opt", "valid_split=val", "--opt", "test_fraction=0.3"])
    assert rc == 0
    assert "chexpert: 23 rows written" in capsys.readouterr().out
    rows = _manifest(out)
    assert rows["train/patient00001/study1/view1_frontal"]["labels"]["edema"] == 1  # -1.0 -> positive
    assert rows["train/patient00001/study1/view2_lateral"]["site"] == "stanford"
    assert rows["valid/patient64541/study1/view1_frontal"]["split"] == "val"
    assert {r["split"] for k, r in rows.items() if k.startswith("train/")} <= {"train", "val", "test"}
    assert len(read_manifest(out / "manifest.jsonl", require_report=False)) == 23


def test_chexpert_release_folder_choice(chexpert_root: Path, tmp_path: Path) -> None:
    full = chexpert_root / "CheXpert-v1.0"
    _write_csv(full / "valid.csv", CHEXPERT_COLUMNS,
               [_chexpert_row("CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg", Edema="1.0")])
    _jpg(full / "valid/patient64541/study1/view1_frontal.jpg")
    with pytest.raises(ConfigError, match="folder=small or --opt folder=full"):
        prepare_dataset("chexpert", str(chexpert_root), str(tmp_path / "a"))
    result = prepare_dataset("chexpert", str(chexpert_root), str(tmp_path / "b"), folder="full")
    assert result.records == 1 and result.counts["split"] == {"test": 1}
    with pytest.raises(ConfigError, match="uncertain"):
        prepare_dataset("chexpert", str(chexpert_root), str(tmp_path / "c"), folder="small", uncertain="maybe")


# -- RSNA Pneumonia ----------------------------------------------------------------------------


@pytest.fixture
def rsna_root(tmp_path: Path) -> Path:
    root = tmp_path / "rsna"
    rows = [
        ["p-two-boxes", "264.0", "152.0", "213.0", "379.0", "1"],
        ["p-none", "", "", "", "", "0"],
        ["p-two-boxes", "562.0", "152.0", "256.0", "453.0", "1"],
        ["p-bad-target", "", "", "", "", "yes"],
        ["p-no-image", "", "", "", "", "0"],
        ["p-corrupt", "", "", "", "", "0"],
        ["", "", "", "", "", "0"],
        *[[f"p{i:02d}", "", "", "", "", str(i % 2)] for i in range(20)],
    ]
    _write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    for pid in {r[0] for r in rows} - {"p-no-image", "p-corrupt", ""}:
        _dicom(root / "stage_2_train_images" / f"{pid}.dcm")
    (root / "stage_2_train_images" / "p-corrupt.dcm").write_bytes(b"\x00" * 50 + b"not a dicom at all")
    return root


def test_rsna_one_row_per_patient_pneumonia_label_and_problems(rsna_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare_dataset("rsna-pneumonia", str(rsna_root), str(out))
    rows = _manifest(out)
    assert rows["p-two-boxes"]["labels"] == {"pneumonia": 1} and rows["p-none"]["labels"] == {"pneumonia": 0}
    assert rows["p-two-boxes"]["image_path"].endswith("stage_2_train_images/p-two-boxes.dcm")
    assert all(r["split"] == hash_split(pid) for pid, r in rows.items())
    assert result.records == 23  # 2 named + 20 numbered + the corrupt one (it exists)
    problems = _problems(out)
    assert set(problems) == {"p-bad-target", "p-no-image", ""}
    assert problems["p-bad-target"].startswith("malformed Target: 'yes' on line 5")
    assert problems["p-no-image"].startswith("missing file")
    assert problems[""].startswith("malformed row: empty patientId")
    # a corrupt DICOM is caught by the image check of training and evaluation, by id
    assert _unreadable_ids(result.manifest, tmp_path) == ["p-corrupt"]


def test_rsna_fixed_split_through_the_cli(rsna_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["prepare", "rsna-pneumonia", "--root", str(rsna_root), "--out", str(out), "--opt", "split=test"]) == 0
    assert "by split: test 23" in capsys.readouterr().out
    records = read_manifest(out / "manifest.jsonl", require_report=False)
    assert {r.split for r in records} == {"test"} and {r.site for r in records} == {"rsna-pneumonia"}
    with pytest.raises(ConfigError, match="split='holdout'"):
        prepare_dataset("rsna-pneumonia", str(rsna_root), str(tmp_path / "x"), split="holdout")


# -- SIIM-ACR ----------------------------------------------------------------------------------


@pytest.fixture
def siim_root(tmp_path: Path) -> Path:
    root = tmp_path / "siim"
    rows = [
        ["1.2.276.0.1", "-1"],
        ["1.2.276.0.2", "557374 2 1015 8 1009 14"],
        ["1.2.276.0.2", "601000 4 1020 6"],  # a second mask of the same image
        ["1.2.276.0.3", "12 x 4"],  # malformed run-length
        ["1.2.276.0.4", " -1"],
        ["1.2.276.0.4", "100 2"],  # conflicting: -1 and a mask
        ["1.2.276.0.5", "-1"],  # no DICOM anywhere
        ["1.2.276.0.6", "-1"],  # two DICOMs with that name
        ["1.2.276.0.7", "-1"],  # a DICOM without pixel data
        *[[f"1.2.276.1.{i}", "-1" if i % 3 else "5 5"] for i in range(15)],
    ]
    _write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"], rows)
    for i, image_id in enumerate({r[0] for r in rows} - {"1.2.276.0.5", "1.2.276.0.7"}):
        _dicom(root / "dicom-images-train" / f"1.2.3.{i}" / f"1.2.3.{i}.9" / f"{image_id}.dcm")
    _dicom(root / "dicom-images-test" / "9.9" / "9.9.9" / "1.2.276.0.6.dcm")
    _sr_dicom(root / "dicom-images-train" / "7.7" / "7.7.7" / "1.2.276.0.7.dcm")
    return root


def test_siim_one_row_per_image_labels_and_problems(siim_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare_dataset("siim-acr", str(siim_root), str(out))
    rows = _manifest(out)
    assert rows["1.2.276.0.1"]["labels"] == {"pneumothorax": 0}
    assert rows["1.2.276.0.2"]["labels"] == {"pneumothorax": 1}
    assert "/dicom-images-train/" in rows["1.2.276.0.2"]["image_path"]
    assert all(r["split"] == hash_split(image_id) for image_id, r in rows.items())
    assert result.records == 18 and result.counts["finding"] == {"pneumothorax": 6}
    problems = _problems(out)
    assert set(problems) == {"1.2.276.0.3", "1.2.276.0.4", "1.2.276.0.5", "1.2.276.0.6"}
    assert problems["1.2.276.0.3"].startswith("malformed EncodedPixels")
    assert problems["1.2.276.0.4"].startswith("conflicting EncodedPixels")
    assert problems["1.2.276.0.5"].startswith("missing file")
    assert problems["1.2.276.0.6"].startswith("ambiguous file: 2 files")
    assert _unreadable_ids(result.manifest, tmp_path) == ["1.2.276.0.7"]


def test_siim_through_the_cli_reads_back_label_only(siim_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["prepare", "siim-acr", "--root", str(siim_root), "--out", str(out),
               "--opt", "images=dicom-images-train", "--opt", "val_fraction=0", "--opt", "test_fraction=0.5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "problems: 3" in printed and "1.2.276.0.3" in printed  # the test folder's duplicate is out of scope
    records = read_manifest(out / "manifest.jsonl", require_report=False)
    assert len(records) == 19 and {r.split for r in records} <= {"train", "test"}
    assert all(r.report == "" and set(r.labels) == {"pneumothorax"} for r in records)
