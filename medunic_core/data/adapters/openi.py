"""Open-i / Indiana University chest X-rays (English): XML reports with MeSH tags, PNG images.

Released layout (NLM): ``NLMCXR_reports.tgz`` unpacks to ``ecgen-radiology/<n>.xml`` and
``NLMCXR_png.tgz`` to ``<image id>.png`` files, conventionally put in ``NLMCXR_png/``. Each
XML is one report (``<uId id="CXR1"/>``) with ``<AbstractText Label="FINDINGS">`` and
``Label="IMPRESSION"`` and one ``<parentImage id="CXR1_1_IM-0001-3001">`` per image.

One row per image (id = image id); all images of a report share its text and its split
(a hash of the report id: the collection has no patient ids, a report is one study).
The XML does not say which image is frontal, so every image of a report is kept.

Labels come from the manually coded MeSH terms (``<major>``, e.g. "Pleural Effusion/left/
small": the term before the first "/" is the finding); the ``<automatic>`` terms are
machine-extracted and include negated mentions, so they are not used. "normal" makes every
finding 0; "No Indexing" says nothing.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Iterator

from medunic_core.data.adapters.base import Candidate, Problem, Row, map_tags, register, split_rule
from medunic_core.errors import SiteDataError

# MeSH major terms -> ours (hydro-/hemopneumothorax are pneumothoraces).
TAGS = {
    "cardiomegaly": "cardiomegaly",
    "pleural effusion": "pleural_effusion",
    "pneumothorax": "pneumothorax",
    "hydropneumothorax": "pneumothorax",
    "hemopneumothorax": "pneumothorax",
    "consolidation": "consolidation",
    "nodule": "nodule",
    "pulmonary edema": "edema",
    "edema": "edema",
}
NORMAL = ("normal",)
SECTIONS = ("FINDINGS", "IMPRESSION")


@register("openi")
def read(root: Path, site: str, *, reports_dir: str = "ecgen-radiology", images_dir: str = "NLMCXR_png",
         absent: str = "unknown", split: str = "hash", val_fraction: str = "0.1", test_fraction: str = "0.2"
         ) -> Iterator[Row]:
    """Open-i / IU X-ray (en): every image of every XML report, MeSH labels, split by report.

    ``reports_dir``/``images_dir``: the XML and PNG folders (absolute or under ``root``);
    ``absent``: ``unknown`` (a finding without a MeSH term is unknown unless the report is
    coded normal) or ``negative``; ``split``: ``hash`` (of the report id, with the fractions)
    or one split for every row.
    """
    split_of = split_rule("openi", split, val_fraction, test_fraction)
    map_tags([], TAGS, absent=absent)  # checks the option now, not at the first report
    reports = root / reports_dir
    files = sorted(reports.glob("*.xml"), key=lambda p: (len(p.stem), p.stem)) if reports.is_dir() else []
    if not files:
        raise SiteDataError(f"openi: no *.xml reports in {reports}; point --opt reports_dir= at ecgen-radiology")
    return _rows(files, root / images_dir, site, absent, split_of)


def _rows(files: list[Path], images: Path, site: str, absent: str, split_of: Callable[[str], str]
          ) -> Iterator[Row]:
    for path in files:
        try:
            doc = ET.parse(path).getroot()
        except ET.ParseError as exc:
            yield Problem(path.stem, path.name, f"malformed XML: {exc}")
            continue
        uid = doc.find("uId")
        report_id = (uid.get("id") if uid is not None else None) or path.stem
        sections = {a.get("Label", "").strip().upper(): " ".join((a.text or "").split())
                    for a in doc.iter("AbstractText")}
        report = " ".join(sections[s] for s in SECTIONS if sections.get(s))
        terms = [(e.text or "").split("/")[0] for e in doc.findall("MeSH/major")]
        labels = map_tags(terms, TAGS, NORMAL, absent)
        image_ids = [i for e in doc.findall("parentImage") if (i := (e.get("id") or "").strip())]
        if not image_ids:
            yield Problem(report_id, path.name, "no images: the report lists no parentImage")
            continue
        split = split_of(report_id)
        for image_id in image_ids:
            yield Candidate(image_id, str(images / f"{image_id}.png"), report, "en", split, site, labels,
                            f"{path.name} ({report_id})")
