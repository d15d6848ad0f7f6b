"""Adapters of datasets with reports (MIMIC-CXR, PadChest, Open-i, a hospital export).

Each test builds a tiny copy of the dataset in its released layout (file names, column
names, path patterns, section headers, XML structure as released), with bad rows mixed in,
and checks the written manifest, that every bad row is reported by id, and that the
manifest reads back with medunic_core.data.manifest.read_manifest.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medunic_core.cli import main
from medunic_core.constants import FINDINGS
from medunic_core.data.adapters import prepare_dataset
from medunic_core.data.adapters.base import hash_split
from medunic_core.data.adapters.sections import report_text, split_sections
from medunic_core.data.dicom import write_dicom
from medunic_core.data.manifest import Record, read_manifest
from medunic_core.errors import ConfigError

ALL_NEGATIVE = {f: 0 for f in FINDINGS}


def _image(path: Path, bits16: bool = False) -> Path:
    """A 32x32 grayscale PNG/JPG (16-bit PNG for PadChest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint16 if bits16 else np.uint8)
    Image.fromarray(arr * (200 if bits16 else 1)).save(path)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as fh:  # type: ignore[operator]
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _problems(out: Path) -> dict[str, str]:
    """problems.csv as id -> problem kind (the text before the first colon)."""
    with (out / "problems.csv").open(encoding="utf-8", newline="") as fh:
        return {r["id"]: r["problem"].split(":")[0] for r in csv.DictReader(fh)}


def _manifest(out: Path) -> dict[str, Record]:
    records = read_manifest(out / "manifest.jsonl")
    assert all(Path(r.image_path).is_file() for r in records)
    return {r.id: r for r in records}


# ---------------------------------------------------------------- report sections

@pytest.mark.parametrize("text, expected", [
    (" FINDINGS: Heart is\n normal.\n\n IMPRESSION:  No acute process.", "Heart is normal. No acute process."),
    ("Findings : Clear lungs.\nImpressions: Normal.", "Clear lungs. Normal."),
    (" FINDINGS AND IMPRESSION:  Stable cardiomegaly.", "Stable cardiomegaly."),
    (" INDICATION: cough\n\n IMPRESSION\n Small left effusion.", "Small left effusion."),
    (" CONCLUSION: Pneumothorax.", "Pneumothorax."),
    (" FINDINGS: Unchanged from prior\n findings\n IMPRESSION: Stable.", "Unchanged from prior findings Stable."),
    # sentences with a colon and all-caps sub-headings stay in their section
    (" FINDINGS: PA and lateral views: clear.\n LUNGS: no edema.", "PA and lateral views: clear. LUNGS: no edema."),
])
def test_report_text_finds_header_variants(text: str, expected: str) -> None:
    assert report_text(text) == expected


def test_report_text_falls_back_to_the_last_paragraph_not_to_a_request_section() -> None:
    body = " FINAL REPORT\n PORTABLE CHEST\n\n COMPARISON:  ___.\n\n Tubes unchanged.\n No pneumothorax.\n"
    assert report_text(body) == "Tubes unchanged. No pneumothorax."
    assert report_text(body, fallback="none") is None
    assert report_text(" FINAL REPORT\n EXAMINATION: CHEST\n\n COMPARISON: None.\n") is None
    assert report_text("") is None
    assert split_sections(" INDICATION: a\n FINDINGS: b\n FINDINGS: c")["findings"] == "b c"


# ---------------------------------------------------------------- MIMIC-CXR

CHEXPERT_COLUMNS = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                    "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
                    "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]

MIMIC_REPORTS = {
    ("10000032", "50000001"): """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 Heart size is enlarged.  There is a
 small nodule in the right upper lobe.
 LUNGS: no edema.

 IMPRESSION:

 Cardiomegaly.  Right upper lobe nodule.
""",
    ("10000032", "50000002"): """ FINAL REPORT
 INDICATION: fever.

 Impression : No acute cardiopulmonary process.
""",
    ("11000011", "50000003"): """                                 FINAL REPORT
 PORTABLE CHEST, ___

 COMPARISON:  ___ radiograph.

 Lines and tubes are in unchanged position.  No pneumothorax.
""",
    ("11000011", "50000004"): """ FINAL REPORT
 EXAMINATION: CHEST

 COMPARISON: None.
""",
}


def _mimic(tmp_path: Path) -> tuple[Path, Path]:
    """MIMIC-CXR-JPG at ``jpg/`` and the reports at ``reports/`` (released separately)."""
    root, reports = tmp_path / "jpg", tmp_path / "reports"
    # dicom_id, subject_id, study_id, ViewPosition, has image
    images = [
        ("d1", "10000032", "50000001", "PA", True),
        ("d2", "10000032", "50000001", "LATERAL", True),  # not frontal: left out quietly
        ("d3", "10000032", "50000002", "AP", True),
        ("d4", "11000011", "50000003", "PA", True),  # no headers: last paragraph
        ("d5", "11000011", "50000004", "PA", True),  # request sections only
        ("d6", "11000011", "50000005", "PA", True),  # no report file
        ("d7", "10000032", "50000001", "PA", False),  # image missing
        ("d8", "10000032", "50000001", "", True),  # view not recorded
        ("d9", "10000032", "50000001", "AP", True),  # not in the split table
        ("d1", "10000032", "50000001", "PA", True),  # duplicate row
        ("", "10000032", "50000001", "PA", False),  # malformed row
    ]
    meta = []
    for dicom, subject, study, view, exists in images:
        if exists:
            _image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
        meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, "32", "32", "21800506", "213014.531",
                     "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, meta)
    splits = {"d1": "train", "d2": "train", "d3": "validate", "d4": "test", "d5": "train", "d6": "train",
              "d7": "train", "d8": "train"}
    subject_of = {d: s for d, s, *_ in images}
    study_of = {d: st for d, _, st, *_ in images}
    # released as .csv.gz; an unpacked .csv is found as well
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
               [[d, study_of[d], subject_of[d], s] for d, s in splits.items()])
    blank = {c: "" for c in CHEXPERT_COLUMNS}
    labels = [
        {**blank, "subject_id": "10000032", "study_id": "50000001", "Cardiomegaly": "1.0",
         "Pleural Effusion": "-1.0", "Edema": "0.0", "Lung Lesion": "1.0", "Support Devices": "1.0"},
        {**blank, "subject_id": "10000032", "study_id": "50000002", "No Finding": "1.0"},
    ]
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", CHEXPERT_COLUMNS,
               [[row[c] for c in CHEXPERT_COLUMNS] for row in labels])
    for (subject, study), text in MIMIC_REPORTS.items():
        path = reports / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root, reports


def test_mimic_cxr(tmp_path: Path) -> None:
    root, reports = _mimic(tmp_path)
    result = prepare_dataset("mimic-cxr", str(root), str(tmp_path / "out"), reports_root=str(reports))
    rows = _manifest(tmp_path / "out")
    assert sorted(rows) == ["d1", "d3", "d4"]
    assert rows["d1"].report == ("Heart size is enlarged. There is a small nodule in the right upper lobe. "
                                 "LUNGS: no edema. Cardiomegaly. Right upper lobe nodule.")
    assert rows["d3"].report == "No acute cardiopulmonary process."
    assert rows["d4"].report == "Lines and tubes are in unchanged position. No pneumothorax."
    assert (rows["d1"].split, rows["d3"].split, rows["d4"].split) == ("train", "val", "test")
    assert rows["d1"].labels == {"cardiomegaly": 1, "nodule": 1, "edema": 0}  # -1.0 and blank: unknown
    assert rows["d3"].labels == ALL_NEGATIVE  # No Finding
    assert rows["d4"].labels == {}  # study not in the CheXpert table
    assert {r.lang for r in rows.values()} == {"en"} and {r.site for r in rows.values()} == {"mimic-cxr"}
    assert _problems(tmp_path / "out") == {
        "d5": "no findings or impression", "d6": "missing report", "d7": "missing file", "d8": "unknown view",
        "d9": "no split", "d1": "duplicate id", "": "malformed row"}
    assert result.records == 3 and "problems: 7" in result.summary()

    out = tmp_path / "cli"
    assert main(["prepare", "mimic-cxr", "--root", str(root), "--out", str(out), "--site", "bidmc",
                 "--opt", f"reports_root={reports}", "--opt", "views=all", "--opt", "fallback=none"]) == 0
    rows = _manifest(out)
    assert sorted(rows) == ["d1", "d2", "d3", "d8"]  # lateral and unrecorded views kept; d4 has no sections
    assert rows["d2"].report == rows["d1"].report and rows["d2"].site == "bidmc"
    assert _problems(out)["d4"] == "no findings or impression"


def test_mimic_cxr_without_the_reports_folder_says_which_option(tmp_path: Path) -> None:
    root, _ = _mimic(tmp_path)
    with pytest.raises(ConfigError, match="reports_root"):
        prepare_dataset("mimic-cxr", str(root), str(tmp_path / "out"), reports_root=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- PadChest

PADCHEST_COLUMNS = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                    "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
                    "Modality_DICOM", "Manufacturer_DICOM", "PhotometricInterpretation_DICOM",
                    "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM", "SpatialResolution_DICOM",
                    "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM",
                    "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
                    "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
                    "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS"]


def _padchest(tmp_path: Path) -> Path:
    root = tmp_path / "padchest"
    # ImageID, ImageDir, PatientID, Projection, Report, Labels, has image
    rows = [
        ("n1.png", "0", "pat1", "PA", " sin hallazg patolog edad pacient .", "['normal']", True),
        ("c1.png", "0", "pat1", "AP_horizontal", " cardiomegali derram pleural izquierd .",
         "['cardiomegaly', ' pleural effusion', '']", True),
        ("l1.png", "0", "pat1", "L", " sin hallazg .", "['normal']", True),  # lateral: left out quietly
        ("e1.png", "1", "pat2", "PA", "nan", "nan", True),  # NaN report
        ("u1.png", "1", "pat2", "PA", " aument densid .", "nan", True),  # no labels: kept, labels unknown
        ("b1.png", "1", "pat3", "PA", " nodul pulmonar .", "['normal'", True),  # unparseable Labels
        ("x1.png", "1", "pat3", "PA", " i presion", "['exclude']", True),
        ("k1.png", "1", "pat3", "UNK", " sin hallazg .", "['normal']", True),
        ("m1.png", "2", "pat4", "AP", " neumotorax derech .", "['pneumothorax']", False),  # image missing
        ("n1.png", "0", "pat1", "PA", " sin hallazg .", "['normal']", True),  # duplicate ImageID
        ("nc.png", "2", "pat4", "PA", " cardiomegali .", "['cardiomegaly', ' normal']", True),
        ("ps.png", "2", "pat5", "AP", " pseudonodul mamil .", "['pseudonodule', 'nodule', 'pulmonary edema']", True),
        ("q1.png", "2", "pat6", "PA", " granulom calcific .", "['calcified granuloma']", True),
    ]
    table = []
    for i, (image, folder, patient, projection, report, labels, exists) in enumerate(rows):
        if exists:
            _image(root / folder / image, bits16=True)
        cells = {"": str(i), "ImageID": image, "ImageDir": folder, "PatientID": patient, "Projection": projection,
                 "Report": report, "Labels": labels, "MethodLabel": "Physician", "StudyID": f"st{i}"}
        table.append([cells.get(c, "None") for c in PADCHEST_COLUMNS])
    _write_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", PADCHEST_COLUMNS, table)
    return root


def test_padchest(tmp_path: Path) -> None:
    root = _padchest(tmp_path)
    prepare_dataset("padchest", str(root), str(tmp_path / "out"))
    rows = _manifest(tmp_path / "out")
    assert sorted(rows) == ["c1.png", "n1.png", "nc.png", "ps.png", "q1.png", "u1.png"]
    assert rows["n1.png"].labels == ALL_NEGATIVE
    assert rows["c1.png"].labels == {"cardiomegaly": 1, "pleural_effusion": 1}
    assert rows["nc.png"].labels == {**ALL_NEGATIVE, "cardiomegaly": 1}  # the positive wins over 'normal'
    assert rows["ps.png"].labels == {"nodule": 1, "edema": 1}  # a pseudonodule is not a nodule
    assert rows["u1.png"].labels == {} and rows["q1.png"].labels == {}
    assert rows["c1.png"].report == "cardiomegali derram pleural izquierd ."
    assert rows["n1.png"].split == rows["c1.png"].split == hash_split("pat1")  # by patient
    assert {r.lang for r in rows.values()} == {"es"}
    assert _problems(tmp_path / "out") == {
        "e1.png": "empty report", "b1.png": "bad labels", "x1.png": "excluded", "k1.png": "unknown view",
        "m1.png": "missing file", "n1.png": "duplicate id"}

    out = tmp_path / "cli"
    (root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz").rename(root / "labels.csv.gz")
    assert main(["prepare", "padchest", "--root", str(root), "--out", str(out), "--opt", "csv=labels.csv",
                 "--opt", "projections=all", "--opt", "absent=negative", "--opt", "split=test"]) == 0
    rows = _manifest(out)
    assert {"l1.png", "k1.png"} <= set(rows) and {r.split for r in rows.values()} == {"test"}
    assert rows["q1.png"].labels == ALL_NEGATIVE and rows["u1.png"].labels == {}
    assert "k1.png" not in _problems(out)


def test_padchest_rejects_a_bad_option_before_reading(tmp_path: Path) -> None:
    root = _padchest(tmp_path)
    with pytest.raises(ConfigError, match="absent"):
        prepare_dataset("padchest", str(root), str(tmp_path / "out"), absent="maybe")
    with pytest.raises(ConfigError, match="unknown option"):
        prepare_dataset("padchest", str(root), str(tmp_path / "out"), view="PA")


# ---------------------------------------------------------------- Open-i

def _openi_xml(uid: str, findings: str, impression: str, major: list[str], automatic: list[str],
               images: list[str]) -> str:
    def text(label: str, value: str) -> str:
        return f'<AbstractText Label="{label}">{value}</AbstractText>' if value else f'<AbstractText Label="{label}"/>'

    figures = "".join(
        f'<parentImage id="{i}"><figureId>F{n}</figureId><caption>Xray Chest PA and Lateral</caption>'
        f'<panel type="single"><url>/hadoop/storage/radiology/extract/{i}.jpg</url><imgModality>7</imgModality>'
        f'</panel></parentImage>' for n, i in enumerate(images, start=1))
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr"/>'
        f'<uId id="{uid}"/><pmcId id="{uid[3:]}"/><docSource>CXR</docSource><IUXRId id="{uid[3:]}"/>'
        '<MedlineCitation Owner="Indiana University" Status="supplied by publisher"><Article PubModel="Electronic">'
        '<ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle><Abstract>'
        + text("COMPARISON", "None.") + text("INDICATION", "Positive TB test")
        + text("FINDINGS", findings) + text("IMPRESSION", impression)
        + '</Abstract></Article></MedlineCitation><MeSH>'
        + "".join(f"<major>{m}</major>" for m in major) + "".join(f"<automatic>{a}</automatic>" for a in automatic)
        + "</MeSH>" + figures + "</eCitation>\n")


def _openi(tmp_path: Path) -> Path:
    root = tmp_path / "openi"
    xml = root / "ecgen-radiology"
    xml.mkdir(parents=True)
    reports = {
        "1": ("CXR1", "The cardiac silhouette is within normal limits.", "Normal chest x-XXXX.", ["normal"], [],
              ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]),
        "2": ("CXR2", "Heart is enlarged. Small left effusion.", "Cardiomegaly.",
              ["Cardiomegaly/mild", "Pleural Effusion/left/small"], ["pneumothorax"], ["CXR2_IM-0652-1001"]),
        "3": ("CXR3", "Clear lungs.", "Normal.", ["normal"], [], []),  # no images
        "5": ("CXR5", "", "", ["No Indexing"], [], ["CXR5_IM-2117-1003002"]),  # no text
        "6": ("CXR6", "", "Right upper lobe nodule.", ["Nodule/lung/upper lobe/right"], [],
              ["CXR6_IM-2192-1001", "CXR6_IM-2192-2001"]),  # second image missing
        "7": ("CXR7", "Clear.", "Normal.", ["normal"], [], ["CXR1_1_IM-0001-3001"]),  # id used by report 1
    }
    for name, (uid, findings, impression, major, automatic, images) in reports.items():
        (xml / f"{name}.xml").write_text(_openi_xml(uid, findings, impression, major, automatic, images),
                                         encoding="utf-8")
        for image in images:
            if image != "CXR6_IM-2192-2001":
                _image(root / "NLMCXR_png" / f"{image}.png")
    (xml / "4.xml").write_text('<?xml version="1.0"?>\n<eCitation><uId id="CXR4"/>', encoding="utf-8")
    return root


def test_openi(tmp_path: Path) -> None:
    root = _openi(tmp_path)
    prepare_dataset("openi", str(root), str(tmp_path / "out"))
    rows = _manifest(tmp_path / "out")
    assert sorted(rows) == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001", "CXR6_IM-2192-1001"]
    first, second = rows["CXR1_1_IM-0001-3001"], rows["CXR1_1_IM-0001-4001"]
    assert first.report == second.report == "The cardiac silhouette is within normal limits. Normal chest x-XXXX."
    assert first.split == second.split == hash_split("CXR1")  # by report
    assert first.labels == ALL_NEGATIVE
    # MeSH major terms only: the automatic "pneumothorax" is not a label
    assert rows["CXR2_IM-0652-1001"].labels == {"cardiomegaly": 1, "pleural_effusion": 1}
    assert rows["CXR6_IM-2192-1001"].report == "Right upper lobe nodule."
    assert rows["CXR6_IM-2192-1001"].labels == {"nodule": 1}
    assert _problems(tmp_path / "out") == {
        "CXR3": "no images", "4": "malformed XML", "CXR5_IM-2117-1003002": "empty report",
        "CXR6_IM-2192-2001": "missing file", "CXR1_1_IM-0001-3001": "duplicate id"}

    out = tmp_path / "cli"
    (root / "NLMCXR_png").rename(root / "png")
    assert main(["prepare", "openi", "--root", str(root), "--out", str(out), "--opt", "images_dir=png",
                 "--opt", "absent=negative"]) == 0
    assert _manifest(out)["CXR2_IM-0652-1001"].labels == {
        **ALL_NEGATIVE, "cardiomegaly": 1, "pleural_effusion": 1}


# ---------------------------------------------------------------- hospital export

def _hospital(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    write_dicom(np.full((32, 32), 1000, dtype=np.uint16), root / "img" / "a.dcm", patient_id="mrn1", study_id="s1")
    _image(root / "img" / "b.png")
    _image(root / "img" / "c.jpg")
    header = ["AccessionNumber", "FilePath", "ReportText", "Partition", "MRN", "Findings"]
    rows = [
        ["A1", "a.dcm", "Cardiomegalia. Sin edema.", "train", "mrn1", '{"cardiomegaly": 1, "edema": 0}'],
        ["A2", "b.png", "Derrame pleural dudoso.", "validation", "mrn2", '{"pleural_effusion": -1}'],
        ["A3", "c.jpg", "Sin hallazgos.", "Test", "mrn3", ""],
        ["A4", "missing.png", "Nódulo.", "train", "mrn4", ""],
        ["A5", "b.png", "   ", "train", "mrn5", ""],
        ["A1", "b.png", "Otra vez.", "train", "mrn1", ""],
        ["A6", "b.png", "Derrame.", "train", "mrn6", '{"effusion": 1}'],
        ["A7", "b.png", "Derrame.", "train", "mrn7", "derrame: si"],
        ["A8", "b.png", "Derrame.", "holdout", "mrn8", ""],
        ["", "b.png", "Sin id.", "train", "mrn9", ""],
    ]
    _write_csv(root / "informes.csv", header, rows)
    return root


HOSPITAL_OPTIONS = {"reports": "informes.csv", "lang": "es", "id_column": "AccessionNumber",
                    "image_column": "FilePath", "report_column": "ReportText", "split_column": "Partition",
                    "labels_column": "Findings", "images_dir": "img"}


def test_hospital_csv(tmp_path: Path) -> None:
    root = _hospital(tmp_path)
    prepare_dataset("hospital", str(root), str(tmp_path / "out"), site="hospital-b", **HOSPITAL_OPTIONS)
    rows = _manifest(tmp_path / "out")
    assert sorted(rows) == ["A1", "A2", "A3"]
    assert rows["A1"].image_path.endswith("a.dcm") and rows["A1"].report == "Cardiomegalia. Sin edema."
    assert rows["A1"].labels == {"cardiomegaly": 1, "edema": 0}
    assert rows["A2"].labels == {} and rows["A3"].labels == {}
    assert [rows[i].split for i in ("A1", "A2", "A3")] == ["train", "val", "test"]
    assert {r.lang for r in rows.values()} == {"es"} and {r.site for r in rows.values()} == {"hospital-b"}
    assert _problems(tmp_path / "out") == {
        "A4": "missing file", "A5": "empty report", "A1": "duplicate id", "A6": "bad labels", "A7": "bad labels",
        "A8": "unknown split", "": "malformed row"}

    out = tmp_path / "cli"
    argv = ["prepare", "hospital", "--root", str(root), "--out", str(out)]
    for key, value in {**HOSPITAL_OPTIONS, "split_column": "", "patient_column": "MRN"}.items():
        argv += ["--opt", f"{key}={value}"]
    assert main(argv) == 0
    rows = _manifest(out)
    assert rows["A2"].split == hash_split("mrn2")  # no split column: by patient


def test_hospital_jsonl_and_required_lang(tmp_path: Path) -> None:
    root = tmp_path / "export"
    _image(root / "x.png")
    lines = [
        json.dumps({"id": 1, "image": "x.png", "report": "No acute findings.", "patient": "p1",
                    "labels": {"pneumothorax": 0}}),
        "{not json",
        json.dumps({"id": 3, "image": "x.png", "report": "Clear.", "patient": ""}),
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"id": 4, "image": "x.png", "patient": "p4"}),  # no report (nor labels) key
    ]
    (root / "reports.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = {"reports": "reports.jsonl", "lang": "en", "patient_column": "patient", "labels_column": "labels"}
    prepare_dataset("hospital", str(root), str(tmp_path / "out"), **options)
    rows = _manifest(tmp_path / "out")
    assert list(rows) == ["1"] and rows["1"].labels == {"pneumothorax": 0}
    assert rows["1"].split == hash_split("p1") and rows["1"].lang == "en"
    with (tmp_path / "out" / "problems.csv").open(encoding="utf-8") as fh:
        problems = [(r["id"], r["source"], r["problem"].split(":")[0]) for r in csv.DictReader(fh)]
    assert problems == [("", "reports.jsonl line 2", "malformed row"), ("3", "reports.jsonl line 3", "no patient id"),
                        ("", "reports.jsonl line 4", "malformed row"), ("4", "reports.jsonl line 6", "empty report")]
    with pytest.raises(ConfigError, match="lang"):
        prepare_dataset("hospital", str(root), str(tmp_path / "out"), reports="reports.jsonl")
    with pytest.raises(ConfigError, match="csv"):
        prepare_dataset("hospital", str(root), str(tmp_path / "out"), reports="reports.xlsx", lang="en")


def test_a_bilingual_hospital_export_names_each_reports_language(tmp_path: Path) -> None:
    root = tmp_path / "export"
    _image(root / "x.png")
    rows = [{"id": 1, "image": "x.png", "report": "No acute findings.", "language": "EN", "patient": "p1"},
            {"id": 2, "image": "x.png", "report": "Sin hallazgos.", "language": "es", "patient": "p2"},
            {"id": 3, "image": "x.png", "report": "Aucune anomalie.", "language": "fr", "patient": "p3"},
            {"id": 4, "image": "x.png", "report": "Clear.", "patient": "p4"}]
    (root / "reports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    options = {"reports": "reports.jsonl", "lang": "en+es", "patient_column": "patient", "lang_column": "language"}
    prepare_dataset("hospital", str(root), str(tmp_path / "out"), **options)
    got = _manifest(tmp_path / "out")
    assert {i: r.lang for i, r in got.items()} == {"1": "en", "2": "es"}
    with (tmp_path / "out" / "problems.csv").open(encoding="utf-8") as fh:
        problems = {r["id"]: r["problem"] for r in csv.DictReader(fh)}
    assert problems == {"3": "wrong language: language is 'fr', not one of the site's en+es",
                        "4": "wrong language: language is empty"}
    with pytest.raises(ConfigError, match="lang_column"):
        prepare_dataset("hospital", str(root), str(tmp_path / "out2"), reports="reports.jsonl", lang="en+es")


# ---------------------------------------------------------------- public-text federation

def test_public_text_federation_renders_films_for_real_report_formats(tmp_path: Path, monkeypatch) -> None:
    """PadChest's CSV and Open-i's report tarball as torchxrayvision ships them -> a manifest
    with sites en-1 (Open-i) and es-1 (PadChest), one rendered film per report."""
    import importlib.util
    import tarfile

    from medunic_core.data import public_text

    data = tmp_path / "xrv-data"
    data.mkdir()
    (_padchest(tmp_path) / public_text.PADCHEST_CSV).rename(data / public_text.PADCHEST_CSV)
    with tarfile.open(data / public_text.OPENI_REPORTS, "w:gz") as tar:
        tar.add(_openi(tmp_path) / "ecgen-radiology", arcname="ecgen-radiology")
    manifest = public_text.build_public_text(tmp_path / "out", per_site=3, image_size=64, data=data,
                                             progress=False)
    rows = read_manifest(manifest)
    by_site = {s: [r for r in rows if r.site == s] for s in ("en-1", "es-1")}
    assert len(by_site["en-1"]) == 3 and len(by_site["es-1"]) == 3
    assert {r.lang for r in by_site["es-1"]} == {"es"} and {r.lang for r in by_site["en-1"]} == {"en"}
    assert all(r.report and Path(r.image_path).is_file() for r in rows)
    assert all(set(r.labels) == set(FINDINGS) for r in rows)  # the film defines every label
    for site_rows in by_site.values():  # both kinds: with a finding and without
        assert {any(v == 1 for v in r.labels.values()) for r in site_rows} == {True, False}

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps torchxrayvision"):
        public_text.torchxrayvision_data()
