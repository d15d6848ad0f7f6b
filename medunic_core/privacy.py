"""Differential privacy, and exactly what each mechanism guarantees.

Both mechanisms give (epsilon, delta)-DP, accounted with Renyi DP (Opacus's RDP
accountant); delta is always given by the user, never defaulted.

- **DP-SGD** (``dp.sgd``), where the loss is a mean of per-sample losses (MLM, linear
  probing): Opacus clips each sample's gradient to ``max_grad_norm``, adds Gaussian noise
  to the sum, and samples batches by Poisson sampling. Guarantee: for each record (a
  report, or an image's features and labels) against anyone who sees the trained weights.
- **Update-level DP** (``dp.updates``), for federated VLP: the contrastive and CTR losses
  couple the samples of a batch, so per-sample gradients do not exist. Instead each site
  clips its whole update (every travelling array minus what it received) to L2 norm
  ``clip`` and adds N(0, (noise_multiplier x clip)^2) to every coordinate before the update
  leaves the site. Any change of the site's data, one record or all of it, moves the
  clipped update by at most 2 x clip, so each release is a Gaussian mechanism with noise
  multiplier ``noise_multiplier / 2``; the site's releases compose. Guarantee: for each of
  the site's records and for its data as a whole, against everyone who sees its updates,
  the coordinator included. The site keeps its own ledger of releases
  (:class:`ReleaseLedger`), so a coordinator cannot make it under-count.

Not covered by either epsilon, and said so in every report: the alignment sums (per-
community feature moments over the site's batches), sample counts and the training and
evaluation metrics a site sends. Token-usage rows are not sent at all under update DP.
The noise comes from the operating system's entropy, never from the training seed.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from medunic_core.config import DpSgdConfig, DpUpdateConfig
from medunic_core.errors import PrivacyBudgetError

NOT_COVERED = ("alignment sums (per-community feature moments)", "sample counts", "training and evaluation metrics")
# each release of a clipped update: sensitivity 2 x clip (replace one record or all of them)
UPDATE_SENSITIVITY = 2.0


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a composition of Gaussian mechanisms ``(noise_multiplier, sample_rate, steps)``."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def _noise_for_target(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp"))


# -- update-level DP (federated VLP) -------------------------------------------------------
def update_noise_multiplier(dp: DpUpdateConfig, rounds: int) -> float:
    """Noise std / clip of one site release: as configured, or the least that keeps
    ``rounds`` releases within the target epsilon."""
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    return UPDATE_SENSITIVITY * _noise_for_target(float(dp.epsilon), float(dp.delta), 1.0, rounds)


def privatize_update(
    received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], clip: float, noise_multiplier: float,
    rng: Optional[np.random.Generator] = None,
) -> tuple[dict[str, np.ndarray], float]:
    """``received + clip(trained - received) + noise``, and the update's norm before clipping."""
    rng = rng or np.random.default_rng(secrets.randbits(128))
    delta = {k: trained[k].astype(np.float64) - received[k].astype(np.float64) for k in trained}
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values())))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip
    released = {
        k: (received[k].astype(np.float64) + d * scale + rng.normal(0.0, std, size=d.shape)).astype(np.float32)
        for k, d in delta.items()
    }
    return released, norm


class ReleaseLedger:
    """A site's record of every noised update it released, in a JSON file of its own.

    Epsilon composes over all releases of the same data, across runs, so the ledger is
    kept per site (in its cache folder) and the budget of a site's node config
    (``dp-max-epsilon``) is checked against all of them.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.releases: list[dict[str, Any]] = []
        if self.path.is_file():
            self.releases = json.loads(self.path.read_text())["releases"]

    def history(self, run: Optional[str] = None) -> list[tuple[float, float, int]]:
        return [(r["noise_multiplier"] / UPDATE_SENSITIVITY, 1.0, 1) for r in self.releases
                if run is None or r["run"] == run]

    def epsilon(self, delta: float, run: Optional[str] = None, next_noise: Optional[float] = None) -> float:
        """Epsilon spent by one run (or by all of them); with ``next_noise``, after one more
        release with that noise multiplier (the budget check before a release)."""
        history = self.history(run)
        if next_noise is not None:
            history.append((next_noise / UPDATE_SENSITIVITY, 1.0, 1))
        return rdp_epsilon(history, delta)

    def add(self, run: str, server_round: int, noise_multiplier: float, clip: float) -> None:
        self.releases.append({"run": run, "round": server_round, "noise_multiplier": noise_multiplier, "clip": clip,
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"releases": self.releases}, indent=1))
        os.replace(tmp, self.path)


# The delta a site's epsilon budget holds at when the site sets no dp-max-delta. Without it
# the run's delta would set it: epsilon falls as delta grows, so a run with delta 0.9 would
# let a site with dp-max-epsilon release many times what its budget means at 1e-5.
DEFAULT_MAX_DELTA = 1e-5


def check_release(
    dp: DpUpdateConfig, rounds: int, ledger: ReleaseLedger, server_round: int, site: str,
    max_epsilon: Optional[float] = None, max_delta: Optional[float] = None,
) -> float:
    """The noise multiplier of this site's next release, if its budget allows one.

    A site with a budget (``max_epsilon``, ``max_delta``) refuses a run without update DP,
    a run whose delta is above its own (``DEFAULT_MAX_DELTA`` when it gave only epsilon),
    and any release after which its epsilon over all releases of its data would exceed the
    budget. Checked before training, so that a refused round costs the site nothing.
    """
    if max_epsilon is not None and max_delta is None:
        max_delta = DEFAULT_MAX_DELTA
    if max_epsilon is not None or max_delta is not None:
        if not dp.enabled:
            raise PrivacyBudgetError(f"site '{site}' has a privacy budget (node config dp-max-epsilon/dp-max-delta) "
                                     "and trains only in runs with dp.updates.enabled=true")
        if max_delta is not None and dp.delta > max_delta:
            raise PrivacyBudgetError(f"site '{site}': the run's dp.updates.delta={dp.delta:g} is above the site's "
                                     f"dp-max-delta={max_delta:g}")
    noise = update_noise_multiplier(dp, rounds)
    if max_epsilon is not None:
        after = ledger.epsilon(dp.delta, next_noise=noise)
        if after > max_epsilon:
            raise PrivacyBudgetError(
                f"site '{site}': releasing round {server_round} would spend epsilon {after:.3f} (delta {dp.delta:g}, "
                f"all {len(ledger.releases) + 1} releases of its data) over its budget dp-max-epsilon={max_epsilon:g}; "
                "the site sends no more updates")
    return noise


# What a site reports of each release (the ``privacy`` record of its reply).
RELEASE_FIELDS = ("epsilon", "epsilon_all_runs", "delta", "releases", "noise_multiplier", "clip")


def release_update(
    received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], dp: DpUpdateConfig, noise: float,
    ledger: ReleaseLedger, run: str, server_round: int,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """What a site sends under update-level DP (``noise`` from :func:`check_release`), and
    the privacy it has spent: only data-independent numbers, the raw norm stays at the site."""
    released, _ = privatize_update(received, trained, dp.clip, noise)
    ledger.add(run, server_round, noise, dp.clip)
    spent = (ledger.epsilon(dp.delta, run=run), ledger.epsilon(dp.delta), float(dp.delta), len(ledger.history(run)),
             noise, float(dp.clip))
    return released, dict(zip(RELEASE_FIELDS, spent))


# -- release floors (not DP) ----------------------------------------------------------------
# What a deployment site releases at least, whatever the run config asks, unless its
# operator sets other floors (``medunic client start --min-pairs --min-df``). Without them a
# coordinator could set ``train.batch_size=1 fed.local_steps=1`` and receive one report's
# token-usage flags and one pair's alignment sums (not noised under update DP either), or
# ``vocab.min_df=1`` and receive every word a site has. Defaults: medunic_core.constants.


def check_round_size(planned: int, available: int, min_pairs: int, site: str, what: str) -> None:
    """Refuse, before any work, a round that cannot draw on ``min_pairs`` distinct pairs:
    ``planned`` pairs (steps x batch) out of the site's ``available`` records."""
    if min(planned, available) < min_pairs:
        raise PrivacyBudgetError(
            f"site '{site}' releases nothing drawn from fewer than {min_pairs} distinct pairs (node config "
            f"min-pairs); {what} would draw on at most {min(planned, available)} ({planned} planned, "
            f"{available} records)")


def releasable_languages(drawn: Mapping[str, int], min_pairs: int, site: str, what: str) -> tuple[str, ...]:
    """After the work, from the distinct pairs it drew per language: the languages whose
    own alignment sums may leave (each drawn from at least ``min_pairs``). Refused when the
    pairs of all languages together, or of every single language, fall short."""
    total = sum(drawn.values())
    check_round_size(total, total, min_pairs, site, what)
    languages = tuple(sorted(lang for lang, n in drawn.items() if n >= min_pairs))
    if not languages:
        raise PrivacyBudgetError(
            f"site '{site}' releases no language's alignment sums drawn from fewer than {min_pairs} distinct pairs "
            f"(node config min-pairs); {what} drew {dict(sorted(drawn.items()))}")
    return languages


def check_min_df(run_min_df: int, site_min_df: int, site: str) -> None:
    """Refuse a vocabulary stage that would release words rarer than the site allows."""
    if run_min_df < site_min_df:
        raise PrivacyBudgetError(
            f"site '{site}' releases only words found in at least {site_min_df} of its reports (node config "
            f"min-df); the run asks for vocab.min_df={run_min_df}")


# -- DP-SGD (MLM, linear probe) ------------------------------------------------------------
@dataclass
class PrivateTraining:
    """A model, optimizer and Poisson-sampled loader made private by Opacus."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    engine: PrivacyEngine
    noise_multiplier: float
    sample_rate: float
    delta: float

    def epsilon(self) -> float:
        return float(self.engine.get_epsilon(self.delta))

    def summary(self) -> dict[str, float]:
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": sum(h[2] for h in self.engine.accountant.history)}


def make_private(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader,
    dp: DpSgdConfig, steps: int,
) -> PrivateTraining:
    """Wrap for DP-SGD; with a target epsilon the noise is the least that keeps ``steps``
    steps within it. The caller's loss must be a mean of per-sample losses."""
    sample_rate = 1.0 / len(loader)
    noise = (float(dp.noise_multiplier) if dp.noise_multiplier is not None
             else _noise_for_target(float(dp.epsilon), float(dp.delta), sample_rate, steps))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
        max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
        noise_generator=torch.Generator().manual_seed(secrets.randbits(63)),  # not the training seed
    )
    return PrivateTraining(model, optimizer, loader, engine, noise, sample_rate, float(dp.delta))
