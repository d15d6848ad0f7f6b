"""Who this site is and what it has: read from Flower's run config and node config.

Deployment: the SuperNode's node config names the site (``site``, ``lang``,
``data-path`` to its manifest, optional ``cache-dir`` and ``tokenizer``) and may set the
site's privacy budget (``dp-max-epsilon``, ``dp-max-delta``: the site then trains only
in runs with update-level DP and stops releasing updates before the budget is spent) and its
release floors (``min-pairs``, ``min-df``; medunic_core.constants' defaults when absent).
Simulation (no floors: the researcher's own public data): the
node config only holds ``partition-id``; the run config's ``sites`` list
(``"en-1:en,es-1:es"``) maps partitions to sites of the shared manifest, and the run's
config (medunic_core.federation.runconfig, with the coordinator's stage overrides) names the
manifest and tokenizer. Either way nothing about a site is ever written in code.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from medunic_core.config import MedUniCConfig, load_config
from medunic_core.constants import DEFAULT_MIN_DF, DEFAULT_MIN_PAIRS
from medunic_core.data.language import site_language
from medunic_core.data.preprocess import ImageCache
from medunic_core.errors import ConfigError, PrivacyBudgetError
from medunic_core.export import folder_sha256
from medunic_core.federation.runconfig import parse_sites, run_overrides, stage_overrides
from medunic_core.vocab import load_tokenizer


def site_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any], raw_stage_overrides: Any) -> MedUniCConfig:
    """The run's config at this site: the run config, and in a simulation the coordinator's
    stage overrides (the data it generated, the tokenizer and encoder earlier stages made).
    A deployment site refuses them: its data, tokenizer and encoder come from its node config."""
    extra = stage_overrides(raw_stage_overrides)
    if extra and "site" in node_config:
        raise ConfigError(f"site '{node_config['site']}': the coordinator sent stage overrides {extra[:2]}, which "
                          "only simulated sites take; run the stages as separate runs (`medunic server run --stage`)")
    if "text-encoder" in node_config:  # a deployment site's own copy of the run's MLM text encoder
        extra.append(f"model.text.pretrained={node_config['text-encoder']}")
    return load_config(str(run_config.get("preset", "tiny") or "tiny"), [*run_overrides(run_config), *extra])


def check_encoder(cfg: MedUniCConfig, node_config: Mapping[str, Any], expected_sha: str) -> None:
    """A deployment site starts from its own copy of the run's MLM text encoder, refused unless
    it is the coordinator's (same SHA-256), before anything is built from it."""
    if "site" not in node_config or not cfg.model.text.pretrained:
        return
    site = node_config["site"]
    if "text-encoder" not in node_config:
        raise ConfigError(f"site '{site}': this run starts from the federation's MLM text encoder (sha256 "
                          f"{expected_sha[:12]}...); copy it to the site and start the daemon with --text-encoder DIR")
    try:
        found = folder_sha256(node_config["text-encoder"])
    except FileNotFoundError as exc:
        raise ConfigError(f"site '{site}': text encoder {exc}") from None
    if found != expected_sha:
        raise ConfigError(f"site '{site}': its text encoder {node_config['text-encoder']} has sha256 {found[:12]}..., "
                          f"the run's has {expected_sha[:12]}...; copy the coordinator's folder again")


@dataclass(frozen=True)
class SiteState:
    """A site's state folder: what must outlive caches, upgrades and restarts (back it up).

    - ``privacy-ledger.json``: every noisy update the site released (medunic_core.privacy);
    - ``site.json``: the site's marker, with how many releases the ledger held last; a marker
      that counts releases next to a missing ledger means the budget's history was lost, and
      the site refuses to train until the operator says so (``--reset-privacy-ledger``);
    - ``audit.jsonl``: one line per message the site sent (medunic_core.federation.audit).
    """

    folder: Path

    @property
    def ledger(self) -> Path:
        return self.folder / "privacy-ledger.json"

    @property
    def marker(self) -> Path:
        return self.folder / "site.json"

    @property
    def audit_log(self) -> Path:
        return self.folder / "audit.jsonl"

    def _marker(self) -> dict[str, Any]:
        return json.loads(self.marker.read_text()) if self.marker.is_file() else {}

    def check_ledger(self) -> None:
        """Refuse when releases were recorded but the ledger holding them is gone."""
        released = int(self._marker().get("dp_releases", 0))
        if released and not self.ledger.is_file():
            raise PrivacyBudgetError(
                f"{self.ledger} is missing, but this site has released {released} noisy update(s): its privacy "
                "budget would start again from zero. Restore the file from a backup of the state folder, or "
                "start the site daemon once with --reset-privacy-ledger to accept the loss")

    def note_releases(self, count: int) -> None:
        self._write({**self._marker(), "dp_releases": count})

    def reset_ledger(self) -> None:
        """The operator accepts a lost ledger: the reset is recorded in the marker."""
        marker = self._marker()
        resets = [*marker.get("ledger_resets", []), {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                     "releases_lost": int(marker.get("dp_releases", 0))}]
        self._write({**marker, "dp_releases": 0, "ledger_resets": resets})

    def audit(self, entry: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.audit_log.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def _write(self, marker: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(marker, indent=1))
        os.replace(tmp, self.marker)


@dataclass(frozen=True)
class Site:
    name: str
    lang: str  # its language community, or several joined by '+' (medunic_core.data.language)
    manifest: str
    cache_dir: str
    tokenizer: str
    state_dir: str
    dp_max_epsilon: Optional[float] = None
    dp_max_delta: Optional[float] = None
    min_pairs: int = 0  # release floors: distinct pairs behind anything it sends,
    min_df: int = 0  # and the reports a word it sends must be found in

    @property
    def state(self) -> SiteState:
        return SiteState(Path(self.state_dir))


def _budget(node_config: Mapping[str, Any], key: str) -> Optional[float]:
    if key not in node_config:
        return None
    try:
        value = float(node_config[key])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"node config {key}={node_config[key]!r} is not a number") from exc
    if value <= 0:
        raise ConfigError(f"node config {key}={value}: a privacy budget must be > 0")
    return value


def _floor(node_config: Mapping[str, Any], key: str, default: int) -> int:
    value = node_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() or value < 1:
        raise ConfigError(f"node config {key}={value!r}: a whole number >= 1")
    return int(value)


def resolve_site(run_config: Mapping[str, Any], node_config: Mapping[str, Any], cfg: MedUniCConfig) -> Site:
    """This node's site from its node config (deployment) or its partition (simulation)."""
    tokenizer = str(node_config.get("tokenizer") or cfg.train.tokenizer or "")
    if "site" in node_config:
        missing = [k for k in ("lang", "data-path", "state-dir") if k not in node_config]
        if missing:
            raise ConfigError(f"node config of site '{node_config['site']}' lacks {missing}")
        try:
            lang = site_language(str(node_config["lang"]))
        except ConfigError as exc:
            raise ConfigError(f"node config lang: {exc}") from None
        return Site(
            str(node_config["site"]), lang, str(node_config["data-path"]),
            str(node_config.get("cache-dir", cfg.data.cache_dir)), tokenizer, str(node_config["state-dir"]),
            _budget(node_config, "dp-max-epsilon"), _budget(node_config, "dp-max-delta"),
            _floor(node_config, "min-pairs", DEFAULT_MIN_PAIRS), _floor(node_config, "min-df", DEFAULT_MIN_DF),
        )
    if "partition-id" not in node_config:
        raise ConfigError("node config has neither 'site' (deployment) nor 'partition-id' (simulation)")
    sites = parse_sites(str(run_config.get("sites", "")))
    pid = int(node_config["partition-id"])
    if pid >= len(sites):
        raise ConfigError(f"partition {pid} has no site: run config 'sites' lists {len(sites)}")
    name, lang = sites[pid]  # a simulated site keeps its state beside the shared cache
    return Site(name, lang, cfg.data.manifest, cfg.data.cache_dir, tokenizer, str(Path(cfg.data.cache_dir) / "state" / name))


@lru_cache(maxsize=4)
def _tokenizer(folder: str, sha: Optional[str]):
    return load_tokenizer(folder, expected_sha256=sha)


def site_tokenizer(site: Site, expected_sha: Optional[str]):
    """The site's tokenizer, refused (VocabMismatchError) unless it is the run's vocabulary."""
    if not site.tokenizer:
        raise ConfigError(f"site '{site.name}': no tokenizer folder (run config or node config 'tokenizer')")
    return _tokenizer(site.tokenizer, expected_sha or None)


def site_cache(site: Site, cfg: MedUniCConfig) -> ImageCache:
    """Preprocessed images on disk: every message may start a fresh process."""
    Path(site.cache_dir).mkdir(parents=True, exist_ok=True)
    return ImageCache(site.cache_dir, cfg.model.image.cache_size)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
