"""Which language a report is written in, from function words and radiology terms, and
which language communities a site holds.

Good enough to catch an English report in a Spanish site's export (the mistake that
matters: it would train the wrong community), without a language-ID model. Each language
has a list of short, frequent words and of radiology words that the other language does
not use; a report is scored by how many of its words fall in each list.
"""

from __future__ import annotations

import argparse
import re
from typing import Optional

from medunic_core.constants import LANGUAGES
from medunic_core.errors import ConfigError

SITE_LANGUAGE_SEP = "+"

MARKERS: dict[str, frozenset[str]] = {
    "en": frozenset(
        "the and of is are no with without there in on at to or not seen normal heart lungs lung "
        "clear effusion pleural pneumothorax consolidation enlarged silhouette chest right left "
        "bilateral mild moderate severe small large findings impression evidence stable acute "
        "opacity nodule edema size within limits".split()
    ),
    "es": frozenset(
        "el la los las de del y con sin se en un una es no por para que al signos derrame neumotórax "
        "neumotorax consolidación consolidacion cardiomegalia silueta pulmonar pulmonares derecho "
        "izquierdo bilateral leve moderado severo hallazgos significativos normal tórax torax "
        "nódulo nodulo edema seno senos costofrénico costofrenico costofrénicos libres campos aumento "
        "índice pulmones aireados alteraciones imagen base proyección importante dudosa "
        "cardiomediastínica estructuras óseas".split()
    ),
}
_WORD = re.compile(r"[a-záéíóúüñ]+")


def language_scores(text: str) -> dict[str, int]:
    """Number of words of ``text`` that are markers of each language."""
    words = _WORD.findall(text.lower())
    return {lang: sum(w in markers for w in words) for lang, markers in MARKERS.items()}


def detect_language(text: str, min_margin: int = 2) -> Optional[str]:
    """The language with the most marker words, or None when the margin is too small
    (very short or mixed text: not enough evidence to call it wrong)."""
    scores = language_scores(text)
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    if ranked[0][1] - ranked[1][1] < min_margin:
        return None
    return ranked[0][0]


def site_languages(spec: str) -> tuple[str, ...]:
    """The language communities of a site: ``"en"`` -> ``("en",)``, ``"en+es"`` (a site whose
    reports come in both languages) -> ``("en", "es")``, in :data:`LANGUAGES` order, so
    that a site's languages have one spelling (:func:`site_language`)."""
    parts = str(spec).split(SITE_LANGUAGE_SEP)
    if not all(p in LANGUAGES for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"language {str(spec)[:20]!r} is not one of {list(LANGUAGES)} or several of them joined "
                          f"by '{SITE_LANGUAGE_SEP}' (e.g. en, es, en{SITE_LANGUAGE_SEP}es)")
    return tuple(lang for lang in LANGUAGES if lang in parts)


def site_language(spec: str) -> str:
    """The one spelling of a site's languages (``"es+en"`` -> ``"en+es"``)."""
    return SITE_LANGUAGE_SEP.join(site_languages(spec))


def site_language_arg(value: str) -> str:
    """argparse ``type`` of a site's ``--language`` (``en``, ``es`` or ``en+es``)."""
    try:
        return site_language(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
