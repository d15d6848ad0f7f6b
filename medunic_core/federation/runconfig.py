"""A federated run's settings: Flower's flat run config -> the medunic config.

The run config (``[tool.flwr.app.config]`` in pyproject.toml, ``flwr run . --run-config
"rounds=3 sites='en-1:en,es-1:es'"``) has a few readable keys; everything else is a
medunic ``key=value`` in ``overrides``. Both sides read it the same way
(:func:`load_run_config`), so a site and the coordinator build the same model.

| key | medunic config | meaning |
|---|---|---|
| ``stage`` | | ``all`` (vocab -> mlm -> vlp, each when its output is missing), ``text`` (vocab -> mlm only), ``vocab``, ``mlm``, ``vlp`` |
| ``preset`` | | configs/presets/NAME.yaml |
| ``sites`` | | simulation: partition i -> site ``name:lang`` (``"en-1:en,es-1:es"``, ``lang`` may be ``en+es``); deployment: empty |
| ``rounds``, ``local-steps`` | ``fed.rounds``, ``fed.local_steps`` | 0 keeps the preset's |
| ``out`` | ``fed.out_dir`` | the run folder |
| ``data`` | ``data.manifest`` | simulation: the sites' shared manifest (generated when missing) |
| ``tokenizer`` | ``train.tokenizer`` | the run's tokenizer folder (made by the vocab stage when empty) |
| ``overrides`` | any | more ``key=value``, separated by spaces (or a JSON list) |
| ``pairs`` | | simulation: synthetic pairs per site when the data is generated |
| ``registry`` | | deployment: the coordinator's site registry (server/registry.py) |

Relative paths are relative to the folder the run was started from: the one where
``flwr run .`` started Flower's local SuperLink (the coordinator logs the absolute paths).

In a simulation, what the coordinator decides while the run goes on (the generated data,
the tokenizer the vocab stage made, the encoder of the MLM stage, the MLM stage's rounds)
travels with every message as :data:`STAGE_KEYS` overrides (:func:`stage_overrides`), so
that the simulated sites build the same config. A deployment site never takes them: its
data, tokenizer and encoder are its own (node config).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from medunic_core.config import MedUniCConfig, load_config
from medunic_core.constants import LANGUAGES
from medunic_core.data.language import site_language, site_languages
from medunic_core.errors import ConfigError

STAGES = ("all", "text", "vocab", "mlm", "vlp")
STAGE_KEYS = ("data.manifest", "data.cache_dir", "train.tokenizer", "model.text.pretrained", "fed.rounds",
              "fed.local_steps", "fed.out_dir", "mlm.out_dir")
PATH_KEYS = {"out": "fed.out_dir", "data": "data.manifest", "tokenizer": "train.tokenizer"}
COUNT_KEYS = {"rounds": "fed.rounds", "local-steps": "fed.local_steps"}


# acquisition profile of the i-th synthetic site of a language (medunic_core.data.synthetic)
PROFILES = {"en": ("default", "portable", "lowdose"), "es": ("highres", "portable", "lowdose")}
PAIRS_PER_SITE = 400
DEFAULT_SITES = "en-1:en,es-1:es"  # the simulation's sites unless told otherwise (`make demo`)


@dataclass(frozen=True)
class SiteSpec:
    """One site of a ``sites`` list; ``n`` and ``profile`` matter for synthetic sites only."""

    name: str
    lang: str
    n: int = PAIRS_PER_SITE
    profile: str = ""


def parse_site_specs(spec: str, pairs: int = PAIRS_PER_SITE) -> list[SiteSpec]:
    """``"en-1:en,es-1:es:200:portable"`` -> sites: ``name:lang[:pairs[:profile]]``, the one way
    sites are written (run config, ``medunic simulate --sites``, ``medunic synth --sites``).
    ``lang`` is a language or several joined by '+' (``en+es``: a site with reports in both,
    half of its pairs in each). A synthetic site without a profile gets its first language's
    next one (:data:`PROFILES`)."""
    sites: list[SiteSpec] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3, 4) or not parts[0] or (len(parts) > 2 and not parts[2].isdigit()):
            raise ConfigError(f"sites: '{item}' is not name:lang[:pairs[:profile]] with lang in {LANGUAGES} "
                              "(e.g. en-1:en, es-1:es:200:portable or mixed-1:en+es)")
        try:
            langs = site_languages(parts[1])
        except ConfigError as exc:
            raise ConfigError(f"sites: '{item}': {exc}") from None
        index = sum(1 for s in sites if site_languages(s.lang)[0] == langs[0])
        profile = parts[3] if len(parts) == 4 else PROFILES[langs[0]][index % len(PROFILES[langs[0]])]
        sites.append(SiteSpec(parts[0], site_language(parts[1]), int(parts[2]) if len(parts) > 2 else pairs, profile))
    if not sites:
        raise ConfigError("sites is empty: write them as 'en-1:en,es-1:es'")
    if len({s.name for s in sites}) != len(sites):
        raise ConfigError(f"sites: '{spec}' names a site twice")
    return sites


def synthetic_data_dir(sites: list[SiteSpec]) -> Path:
    """Where a simulation writes (and finds again) the synthetic data of these sites."""
    return Path("data") / ("federated-" + "-".join(f"{s.name}.{s.n}.{s.profile}" for s in sites))


def synth_sites_override(sites: list[SiteSpec]) -> str:
    """The ``synth.sites=[...]`` override that makes the synthetic generator write these sites."""
    return "synth.sites=" + json.dumps([{"name": s.name, "lang": s.lang, "n": s.n, "profile": s.profile} for s in sites])


def parse_sites(spec: str) -> list[tuple[str, str]]:
    """``"en-1:en,es-1:es"`` -> [("en-1", "en"), ("es-1", "es")] (see :func:`parse_site_specs`)."""
    return [(s.name, s.lang) for s in parse_site_specs(spec)]


def run_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """The medunic ``key=value`` overrides a run config makes: its readable keys first, then
    ``overrides`` (space-separated, or a JSON list), which may override them."""
    out = []
    for key, target in COUNT_KEYS.items():
        value = run_config.get(key, 0) or 0
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"run config {key}={value!r}: a whole number >= 0 (0 keeps the preset's)")
        if value:
            out.append(f"{target}={value}")
    for key, target in PATH_KEYS.items():
        if str(run_config.get(key, "") or ""):
            out.append(f"{target}={Path(str(run_config[key])).expanduser().resolve()}")
    raw = str(run_config.get("overrides", "") or "").strip()
    if raw.startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"run config 'overrides' is not a JSON list of key=value strings: {raw!r}") from exc
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"run config 'overrides' must be a JSON list of strings, got {raw!r}")
    else:
        try:
            items = shlex.split(raw)
        except ValueError as exc:
            raise ConfigError(f"run config 'overrides': {exc} in {raw!r}") from None
    for item in out + items:
        # An interpolation would resolve where the config is loaded, at each site: a run config
        # could read a site's environment (${oc.env:...}) or files into values and error messages.
        if "${" in item:
            raise ConfigError(f"run config override {item!r}: interpolations (${{...}}) are not allowed; "
                              "write the value itself")
    return out + items


def load_run_config(run_config: Mapping[str, Any]) -> MedUniCConfig:
    """The medunic config of a run: preset + the run config's overrides, the same at every
    site and at the coordinator."""
    return load_config(str(run_config.get("preset", "tiny") or "tiny"), run_overrides(run_config))


def run_stage(run_config: Mapping[str, Any]) -> str:
    stage = str(run_config.get("stage", "all") or "all")
    if stage not in STAGES:
        raise ConfigError(f"run config stage={stage!r} is not one of {list(STAGES)}")
    return stage


def stage_overrides(raw: Any) -> list[str]:
    """The coordinator's simulation overrides of a message (a JSON list of ``key=value``
    with keys of :data:`STAGE_KEYS` only)."""
    try:
        items = json.loads(str(raw or "[]"))
    except json.JSONDecodeError:
        raise ConfigError("the coordinator's stage overrides are not a JSON list") from None
    if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i for i in items):
        raise ConfigError("the coordinator's stage overrides must be a list of key=value strings")
    foreign = [i for i in items if i.split("=", 1)[0] not in STAGE_KEYS]
    if foreign:
        raise ConfigError(f"the coordinator's stage overrides may set only {list(STAGE_KEYS)}, not {foreign[:3]}")
    return items
