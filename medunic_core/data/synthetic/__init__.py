"""Synthetic bilingual chest X-ray federation, deterministic from a seed.

``render_image`` draws a film from a finding specification, ``write_report`` writes its
report in English or Spanish in a community's style, and ``generate`` turns a
``SynthConfig`` into images plus a manifest (``medunic synth`` on the command line).
"""

from medunic_core.data.synthetic.generator import generate, sample_findings, specify_findings
from medunic_core.data.synthetic.renderer import PROFILES, Finding, Profile, get_profile, render_image
from medunic_core.data.synthetic.reports import DEFAULT_STYLE, STYLES, ReportStyle, write_report

__all__ = [
    "DEFAULT_STYLE",
    "PROFILES",
    "STYLES",
    "Finding",
    "Profile",
    "ReportStyle",
    "generate",
    "get_profile",
    "render_image",
    "sample_findings",
    "specify_findings",
    "write_report",
]
