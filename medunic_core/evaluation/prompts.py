"""Zero-shot prompts per language and finding, read from ``configs/prompts.yaml``.

Prompts are data so that a site can adapt the wording to its report style without code
changes; a missing language, finding or side is a :class:`ConfigError`, never a silently
skipped class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medunic_core.config import CONFIG_DIR
from medunic_core.constants import FINDINGS, LANGUAGES
from medunic_core.errors import ConfigError
from medunic_core.vocab import document_frequencies

PROMPTS_FILE = CONFIG_DIR / "prompts.yaml"
SIDES: tuple[str, ...] = ("positive", "negative")

Prompts = dict[str, dict[str, dict[str, list[str]]]]


def _prompt_list(value: object, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(
            f"{where}: expected a prompt or a non-empty list of prompts, got {value!r}"
        )
    if not all(isinstance(p, str) and p.strip() for p in items):
        raise ConfigError(f"{where}: every prompt must be a non-empty string, got {items!r}")
    return [p.strip() for p in items]


def load_prompts(
    path: str | Path = PROMPTS_FILE,
    langs: Iterable[str] = LANGUAGES,
    findings: Iterable[str] = FINDINGS,
) -> Prompts:
    """Read prompts as ``{lang: {finding: {"positive": [...], "negative": [...]}}}``.

    Every language of ``langs`` must list every finding of ``findings`` with both sides;
    a side may be one string or a list. Extra languages and findings are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: not a valid prompt file: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of language -> finding -> prompts")
    langs, findings = list(langs), list(findings)
    missing_langs = [lang for lang in langs if lang not in raw]
    if missing_langs:
        raise ConfigError(
            f"{path}: no prompts for language(s) {missing_langs}; present: {sorted(raw)}; "
            f"add a section per language"
        )
    prompts: Prompts = {}
    for lang, per_finding in raw.items():
        if not isinstance(per_finding, dict):
            raise ConfigError(f"{path}: section '{lang}' must map finding -> prompts")
        missing = [f for f in findings if f not in per_finding] if lang in langs else []
        if missing:
            raise ConfigError(
                f"{path}: language '{lang}' has no prompts for finding(s) {missing}; "
                f"every finding of {findings} needs a positive and a negative prompt"
            )
        prompts[str(lang)] = {}
        for finding, sides in per_finding.items():
            where = f"{path}: {lang}.{finding}"
            if not isinstance(sides, dict) or set(sides) != set(SIDES):
                got = sorted(sides) if isinstance(sides, dict) else sides
                raise ConfigError(f"{where}: expected exactly the keys {list(SIDES)}, got {got!r}")
            prompts[str(lang)][str(finding)] = {
                side: _prompt_list(sides[side], f"{where}.{side}") for side in SIDES
            }
    return prompts


def unseen_prompt_words(
    prompts: dict[str, dict[str, list[str]]], reports: Iterable[str], split_words: Callable[[str], list[str]]
) -> dict[str, dict[str, list[str]]]:
    """For one language's prompts, the words that no training report of that language uses:
    ``{"finding.side": {prompt: [words]}}``, only prompts with such words. ``split_words``
    is the tokenizer's :func:`medunic_core.vocab.word_splitter`, so that a word outside the
    vocabulary is still named, not ``[UNK]``.

    Training never gives those words' embeddings a gradient in context, so a prompt that
    leans on them scores with what initialisation left there: adapt its wording to how the
    community writes its reports (the prompt file's purpose)."""
    seen = document_frequencies(reports, split_words)
    out: dict[str, dict[str, list[str]]] = {}
    for finding, sides in prompts.items():
        for side, phrases in sides.items():
            for phrase in phrases:
                unseen = list(dict.fromkeys(w for w in split_words(phrase) if w not in seen))
                if unseen:
                    out.setdefault(f"{finding}.{side}", {})[phrase] = unseen
    return out
