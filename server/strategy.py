"""The Med-UniC strategy: Flower's FedAvg / FedAvgM / FedProx / FedAdam, or its robust
FedMedian / FedTrimmedAvg, plus what Med-UniC needs.

Flower's strategies do the sampling, the messages and the weighted average (and FedAdam's
server optimizer). :class:`MedUniCAggregation` is put in front of one of them and adds:

- the alignment state: sent down with every training message; the sums that come back
  are added per community, and each community present this round replaces its old sums
  (the communities stay apart: "disentangled");
- token-embedding rows averaged only over the sites that used them (an English site must
  not dilute Spanish rows); rows nobody used are averaged as every other weight;
- under a server optimizer (FedAvgM, FedAdam) the BatchNorm running statistics take the
  plain weighted mean: they are statistics, not parameters, and momentum or Adam steps
  would push a running variance below zero;
- rejection of non-finite and outlier updates (norm above ``reject_factor`` times the
  median of the other sites' norms), logged and counted, never averaged;
- under a robust strategy, no aggregation from fewer accepted sites than it needs to
  outvote one malicious site (:func:`robust_minimum`): the global weights stay;
- under update-level DP, each site's ``privacy`` record (the epsilon it has spent) kept
  for the round's log; such sites send no token rows, so every row is averaged;
- validation of every reply before anything of it is used
  (medunic_core.federation.replies): the weights sent (names, shapes, wire dtype), finite
  and bounded counts, the alignment sums of the site's own community (its registered one,
  server.registry) in the model's layout. A reply that fails is left out alone, logged with
  its reason and counted in the round's ``invalid``; the round goes on with the others.

The aggregation math is in medunic_core.federation.aggregate; Flower's aggregation runs
on fresh messages that hold only the accepted weights and metrics (replies are never
edited).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Mapping, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg

from medunic_core.align import AlignmentState
from medunic_core.config import MedUniCConfig
from medunic_core.constants import LANGUAGES
from medunic_core.errors import ConfigError, FederationError
from medunic_core.exchange import TOKEN_EMBEDDINGS
from medunic_core.federation import payload as P
from medunic_core.federation.aggregate import fill_unused_rows, outliers, running_statistics, update_norms
from medunic_core.federation.replies import Sent, check_train_reply
from medunic_core.federation.runconfig import parse_sites
from server.messages import arrays_record, collect, record_arrays
from server.registry import SiteIdentities

log = logging.getLogger("flwr.medunic")  # Flower's handlers: streamed by `flwr run --stream`

FEDADAM_LR = 0.01  # FedAdam's server step (eta) when fed.server_lr is not set
STRATEGY_STATE = ("m_t", "v_t", "momentum_vector")  # FedAdam's moments, FedAvgM's: checkpointed with the round


def robust_minimum(strategy: str, trim: float) -> int:
    """Fewest accepted sites with which one malicious site's values never reach the
    aggregate: a median needs a majority of 3 (a median of 2 is their mean), a trimmed mean
    at least one value cut at each end (``int(trim x sites)``, as Flower cuts). 1 for the
    averaging strategies, which no site count makes robust."""
    if strategy == "fedmedian":
        return 3
    if strategy != "fedtrimmedavg":
        return 1
    if not 0 < trim < 0.5:
        raise ConfigError(f"bad value for 'fed.trim': {trim}; fedtrimmedavg cuts a fraction in (0, 0.5) at each end "
                          "(0 would be a plain unweighted mean)")
    sites = 3
    while int(trim * sites) < 1:
        sites += 1
    return sites


def round_minimum(cfg: MedUniCConfig, sites: int) -> int:
    """The fewest sites a round may go on with: ``fed.min_sites`` (0: all ``sites``). A
    robust strategy is refused where that is fewer than it needs (:func:`robust_minimum`),
    before any site is waited for."""
    need = min(cfg.fed.min_sites or sites, sites)
    robust = robust_minimum(cfg.fed.strategy, cfg.fed.trim)
    if need < robust:
        trim = f" fed.trim={cfg.fed.trim}" if cfg.fed.strategy == "fedtrimmedavg" else ""
        raise ConfigError(f"fed.strategy={cfg.fed.strategy}{trim} outvotes a malicious site only in rounds of at least "
                          f"{robust} sites, and this federation's rounds may have {need} (its sites, or fed.min_sites): "
                          "add sites, or use an averaging strategy")
    return need


def federation_size(cfg: MedUniCConfig, run_config: Mapping[str, Any]) -> tuple[int, int]:
    """(sites of the federation, fewest a round may go on with): ``fed.expected_sites`` or
    the run config's ``sites`` list, and :func:`round_minimum`."""
    spec = str(run_config.get("sites", "") or "")
    expected = cfg.fed.expected_sites or (len(parse_sites(spec)) if spec else 0)
    if expected <= 0:
        raise ConfigError("say how many sites the federation has: run config 'sites' or fed.expected_sites")
    return expected, round_minimum(cfg, expected)


def wait_for_sites(grid: Grid, expected: int, minimum: int, wait: float, what: str) -> list[int]:
    """Node ids once ``expected`` sites are connected, or after ``wait`` seconds with at
    least ``minimum``; fewer than that stops the run with a message saying so."""
    deadline = time.monotonic() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() >= deadline:
            if len(nodes) >= minimum:
                log.warning("%s: %d of %d sites connected after %.0f s; going on with them", what, len(nodes),
                            expected, wait)
                return nodes
            raise FederationError(
                f"{what}: only {len(nodes)} of {expected} sites connected after {wait:.0f} s and a round needs "
                f"{minimum} (fed.min_sites); stopping. Restart the coordinator to resume after the last round."
            )
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.01)))


class MedUniCAggregation:
    """Mixin in front of a Flower strategy (see :func:`make_strategy`)."""

    server_optimizer = False  # True: Flower's strategy steps the mean with a server optimizer

    def __init__(
        self, *args: Any, reject_factor: float = 10.0, min_accepted: int = 1, wire_dtype: str = "float32",
        expected_sites: int = 1, site_wait: float = 600.0, message_type: str = P.TRAIN,
        token_key: str = TOKEN_EMBEDDINGS, max_examples: int = 1, layout: Optional[dict] = None, dp: bool = False,
        identities: Optional[SiteIdentities] = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.message_type, self.token_key = message_type, token_key
        self.expected_sites, self.site_wait = expected_sites, site_wait
        self.reject_factor, self.min_accepted = reject_factor, min_accepted
        self.wire_dtype = wire_dtype
        self.max_examples, self.layout, self.dp = max_examples, layout, dp
        self.identities = identities or SiteIdentities(LANGUAGES)
        self.alignment = AlignmentState()
        self.global_arrays: dict[str, np.ndarray] = {}
        self.last_round: dict[str, Any] = {}  # what the last aggregation did, for the logs
        self.sent_to: list[int] = []  # nodes asked to train this round

    def expected(self) -> Sent:
        """What this round's replies are checked against (medunic_core.federation.replies)."""
        rows = self.global_arrays[self.token_key].shape[0] if self.token_key in self.global_arrays else 0
        return Sent({k: v.shape for k, v in self.global_arrays.items()}, self.wire_dtype, self.max_examples,
                    self.layout, rows, self.dp)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_arrays = record_arrays(arrays, np.float32)
        nodes = wait_for_sites(grid, self.expected_sites, self.min_train_nodes, self.site_wait, f"round {server_round}")
        self.min_available_nodes = len(nodes)  # Flower's sampling would otherwise wait forever
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.message_type != MessageType.TRAIN:  # e.g. "train.mlm": another handler at the sites
            messages = [Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=self.message_type,
                                group_id=m.metadata.group_id) for m in messages]
        self.sent_to = [m.metadata.dst_node_id for m in messages]
        down = arrays_record(self.global_arrays, P.WIRE_DTYPES[self.wire_dtype])
        record = arrays_record(self.alignment.to_flat()) if self.alignment.communities else None
        for msg in messages:  # all messages share one content record
            msg.content[P.ARRAYS] = down
            if record is not None:
                msg.content[P.ALIGN] = record
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Any]:
        """Validate every reply (a bad one is left out, alone), reject outlier updates, then
        Flower's aggregation over fresh messages holding the accepted weights."""
        sent = self.expected()
        got = collect(replies, self.sent_to, self.identities,
                      lambda content, community: check_train_reply(content, sent, community), f"round {server_round}")
        sites = list(got.accepted)
        updates = [got.accepted[s] for s in sites]
        norms = update_norms([u.arrays for u in updates], self.global_arrays)
        rejected = outliers(norms, self.reject_factor)
        for i in rejected:
            log.warning("round %d: update of %s rejected (norm %.4g; others %s)", server_round, sites[i], norms[i],
                        [round(n, 4) for j, n in enumerate(norms) if j != i])
        keep = [i for i in range(len(sites)) if i not in rejected]
        self.last_round = {
            "sites": [sites[i] for i in keep],
            "rejected": [sites[i] for i in rejected],
            "invalid": got.invalid,
            "failed": len(got.failed),
            "failed_sites": list(got.failed),
            "update_norms": dict(zip(sites, norms)),
        }
        privacy = {s: u.privacy for s, u in zip(sites, updates) if u.privacy is not None}
        if privacy:  # every release counts, also one rejected afterwards
            self.last_round["privacy"] = privacy
        if len(keep) < self.min_accepted:
            if keep:
                log.warning("round %d: %d accepted update(s), and %s needs %d to outvote a malicious site; the "
                            "global weights stay", server_round, len(keep), type(self).__name__, self.min_accepted)
            return None, None
        kept = [updates[i] for i in keep]
        arrays = [u.arrays for u in kept]
        weights = [float(u.num_examples) for u in kept]
        if self.token_key in self.global_arrays and all(u.token_rows is not None for u in kept):
            arrays = fill_unused_rows(arrays, [u.token_rows for u in kept], weights, self.token_key)
        self._merge_alignment([u.alignment for u in kept])
        metric_keys = set.intersection(*(set(u.metrics) for u in kept))
        fresh = [Message(RecordDict({P.ARRAYS: arrays_record(a), P.METRICS: MetricRecord(
                     {P.NUM_EXAMPLES: u.num_examples, **{k: u.metrics[k] for k in sorted(metric_keys)}})}),
                         dst_node_id=got.nodes[sites[i]], message_type=self.message_type)
                 for i, u, a in zip(keep, kept, arrays)]
        aggregated, metrics = super().aggregate_train(server_round, fresh)
        if aggregated is not None and self.server_optimizer:
            for key, value in running_statistics(arrays, weights).items():
                aggregated[key] = Array(value.astype(np.float32))
        return aggregated, metrics

    def _merge_alignment(self, states: list[Optional[AlignmentState]]) -> None:
        fresh = AlignmentState()
        for state in states:
            if state is not None:
                fresh = fresh.merged(state)
        self.alignment = self.alignment.replaced_by(fresh)

    # -- checkpoint support -------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in STRATEGY_STATE if hasattr(self, k)}

    def load_state(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class MedUniCFedAvg(MedUniCAggregation, FedAvg):
    """Weighted FedAvg over sample counts."""


class MedUniCFedAvgM(MedUniCAggregation, FedAvgM):
    """FedAvg's mean as a pseudo-gradient for server SGD (``fed.server_lr``, default 1) with
    momentum (``fed.server_momentum``)."""

    server_optimizer = True


class MedUniCFedProx(MedUniCAggregation, FedProx):
    """FedAvg with a proximal term at the sites (``fed.proximal_mu``)."""


class MedUniCFedAdam(MedUniCAggregation, FedAdam):
    """FedAvg's mean as a pseudo-gradient for a server-side Adam (``fed.server_lr``)."""

    server_optimizer = True


class MedUniCFedMedian(MedUniCAggregation, FedMedian):
    """The coordinate-wise median of the sites' weights (not weighted by samples): a
    minority of sites cannot move a coordinate beyond the honest sites' values."""


class MedUniCFedTrimmedAvg(MedUniCAggregation, FedTrimmedAvg):
    """The coordinate-wise mean without the ``fed.trim`` fraction of the sites' most extreme
    values at each end (not weighted by samples)."""


def make_strategy(cfg: MedUniCConfig, num_sites: int, message_type: str = MessageType.TRAIN,
                  token_key: str = TOKEN_EMBEDDINGS, max_examples: int = 0, layout: Optional[dict] = None,
                  identities: Optional[SiteIdentities] = None) -> MedUniCAggregation:
    """The configured strategy: a round waits ``fed.site_wait`` for all ``num_sites``, then
    goes on with at least ``fed.min_sites`` (default: all of them). ``message_type`` and
    ``token_key`` name the sites' handler and the token-embedding matrix of the stage;
    ``max_examples`` (default: a VLP round's ``local_steps x batch_size x accum_steps``)
    bounds a reply's ``num-examples``, ``layout`` is the alignment record a reply must
    carry (None: none) and ``identities`` binds nodes to sites."""
    need = round_minimum(cfg, num_sites)
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=need,
        min_evaluate_nodes=need,
        min_available_nodes=need,
        expected_sites=num_sites,
        site_wait=cfg.fed.site_wait,
        reject_factor=cfg.fed.reject_factor,
        min_accepted=robust_minimum(cfg.fed.strategy, cfg.fed.trim),
        wire_dtype=cfg.fed.wire_dtype,
        message_type=message_type,
        token_key=token_key,
        max_examples=max_examples or cfg.fed.local_steps * cfg.train.batch_size * cfg.train.accum_steps,
        layout=layout,
        dp=cfg.dp.updates.enabled,
        identities=identities or SiteIdentities(cfg.data.langs),
    )
    if cfg.fed.strategy == "fedprox":
        return MedUniCFedProx(proximal_mu=cfg.fed.proximal_mu, **common)
    if cfg.fed.strategy == "fedmedian":
        return MedUniCFedMedian(**common)
    if cfg.fed.strategy == "fedtrimmedavg":
        return MedUniCFedTrimmedAvg(beta=cfg.fed.trim, **common)
    server_lr = cfg.fed.server_lr
    if cfg.fed.strategy == "fedadam":
        return MedUniCFedAdam(eta=FEDADAM_LR if server_lr is None else server_lr, eta_l=cfg.train.lr, **common)
    if cfg.fed.strategy == "fedavgm":
        return MedUniCFedAvgM(server_learning_rate=1.0 if server_lr is None else server_lr,
                              server_momentum=cfg.fed.server_momentum, **common)
    return MedUniCFedAvg(**common)
