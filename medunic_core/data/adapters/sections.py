"""FINDINGS and IMPRESSION out of a free-text radiology report (MIMIC-CXR style).

Not an adapter (it registers nothing): the text that adapters of free-text reports share.

Reports are written by many radiologists over many years, so the headers vary in case,
spacing and wording ("FINDINGS:", "Findings :", "IMPRESSIONS:", "CONCLUSION:", "FINDINGS
AND IMPRESSION:", a header alone on its line without a colon). Only header names listed
here start a section, so that a sentence with a colon ("PA and lateral views: ...") or an
all-caps sub-heading inside the findings ("LUNGS: clear") stays part of its section.

What we train on is FINDINGS + IMPRESSION (the image-describing parts; indication, history,
technique and comparison describe the request, not the image). A report with neither falls
back to its last paragraph, as the MIMIC-CXR authors' own section parser does: in such
reports the body usually stands, without a header, after the COMPARISON/INDICATION lines.
If that paragraph is itself one of the request sections, there is no usable text.
"""

from __future__ import annotations

import re
from typing import Optional

FINDINGS_HEADERS = frozenset({
    "findings", "finding", "findings and impression", "findings and impressions", "impression and findings",
    "findings/impression", "findings / impression",
})
IMPRESSION_HEADERS = frozenset({"impression", "impressions", "conclusion", "conclusions"})
REQUEST_HEADERS = frozenset({
    "final report", "examination", "exam", "type of examination", "indication", "indications",
    "clinical indication", "history", "clinical history", "clinical information", "reason for exam",
    "reason for examination", "technique", "comparison", "comparisons", "procedure", "wet read",
    "notification", "recommendation", "recommendations", "recommendation(s)",
})
FALLBACKS = ("last_paragraph", "none")

# A header: at the start of a line, a short name, then a colon or the end of the line.
_HEADER = re.compile(r"^[ \t]*(?P<name>[A-Za-z][A-Za-z ()/&,-]{0,50}?)[ \t]*(?::|$)", re.MULTILINE)
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def _kind(match: re.Match[str]) -> Optional[str]:
    """The kind of section a header starts; None for a line that is not a known header (a
    header without a colon must be in capitals: a wrapped line "findings" is text)."""
    name = match.group("name")
    if not match.group(0).rstrip().endswith(":") and not name.isupper():
        return None
    name = " ".join(name.lower().split())
    if name in FINDINGS_HEADERS:
        return "findings"
    if name in IMPRESSION_HEADERS:
        return "impression"
    if name in REQUEST_HEADERS:
        return "request"
    return None


def split_sections(text: str) -> dict[str, str]:
    """Section kind ("findings", "impression", "request", "preamble") -> its text, with
    repeated sections joined and whitespace collapsed (line breaks in these reports are
    layout, not meaning)."""
    text = text.replace("\r\n", "\n")
    headers = [(m, kind) for m in _HEADER.finditer(text) if (kind := _kind(m))]
    parts: dict[str, list[str]] = {"preamble": [text[: headers[0][0].start()] if headers else text]}
    for i, (match, kind) in enumerate(headers):
        end = headers[i + 1][0].start() if i + 1 < len(headers) else len(text)
        parts.setdefault(kind, []).append(text[match.end(): end])
    joined = {k: " ".join(" ".join(v).split()) for k, v in parts.items()}
    return {k: v for k, v in joined.items() if v}


def report_text(text: str, fallback: str = "last_paragraph") -> Optional[str]:
    """FINDINGS + IMPRESSION of a report; without either, its last paragraph (``fallback=
    "last_paragraph"``) unless that is a request section; None when there is no usable text."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r} must be one of {FALLBACKS}")
    text = text.replace("\r\n", "\n")
    sections = split_sections(text)
    body = " ".join(sections[k] for k in ("findings", "impression") if k in sections)
    if body or fallback == "none":
        return body or None
    paragraphs = [p for p in _PARAGRAPH.split(text) if p.strip()]
    if not paragraphs:
        return None
    last = paragraphs[-1]
    match = _HEADER.match(last)
    if match and _kind(match) == "request":
        return None
    return " ".join(last.split()) or None
