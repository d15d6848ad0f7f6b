"""The Med-UniC strategy: Flower's FedAvg / FedProx / FedAdam plus what Med-UniC needs.

Flower's strategies do the sampling, the messages and the weighted average (and FedAdam's
server optimizer). :class:`MedUniCAggregation` is put in front of one of them and adds:

- the alignment state: sent down with every training message; the sums that come back
  are added per community, and each community present this round replaces its old sums
  (the communities stay apart: "disentangled");
- token-embedding rows averaged only over the sites that used them (an English site must
  not dilute Spanish rows); rows nobody used keep their current value;
- rejection of non-finite and outlier updates (norm above ``reject_factor`` times the
  median of the other sites' norms), logged and counted, never averaged;
- under update-level DP, each site's ``privacy`` record (the epsilon it has spent) kept
  for the round's log; such sites send no token rows, so every row is averaged.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Mapping, Optional

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from client.records import arrays_record, record_arrays
from client.site import parse_sites
from medunic_core import __version__
from medunic_core.align import AlignmentState
from medunic_core.config import MedUniCConfig
from medunic_core.errors import ConfigError, FederationError
from medunic_core.exchange import TOKEN_EMBEDDINGS, WIRE_DTYPES

log = logging.getLogger("flwr.medunic")  # Flower's handlers: streamed by `flwr run --stream`

EXTRA_RECORDS = ("align", "usage", "site", "privacy")  # popped before Flower's aggregation
STRATEGY_STATE = ("m_t", "v_t")  # FedAdam's moments: checkpointed with the round


def update_norms(arrays: list[dict[str, np.ndarray]], current: dict[str, np.ndarray]) -> list[float]:
    """L2 norm of each site's update (received - current), over all travelling arrays."""
    norms = []
    for a in arrays:
        total = 0.0
        for k, v in a.items():
            d = v.astype(np.float64) - current[k].astype(np.float64)
            total += float(np.sum(d * d))
        norms.append(float(np.sqrt(total)))
    return norms


def outliers(norms: list[float], factor: float) -> list[int]:
    """Indices whose norm is not finite or exceeds ``factor`` x the median of the others."""
    bad = [i for i, n in enumerate(norms) if not np.isfinite(n)]
    finite = [i for i in range(len(norms)) if i not in bad]
    for i in finite:
        others = [norms[j] for j in finite if j != i]
        if others and norms[i] > factor * max(float(np.median(others)), 1e-12):
            bad.append(i)
    return sorted(bad)


def mask_unused_rows(
    arrays: list[dict[str, np.ndarray]], usage: list[np.ndarray], weights: list[float], current: np.ndarray,
    key: str = TOKEN_EMBEDDINGS,
) -> None:
    """Rewrite each site's token-embedding rows it did not use, in place, so that Flower's
    plain weighted average gives, row by row, the average over the sites that used it.

    A site's unused row is set to the users' weighted mean m; the overall weighted mean is
    then m exactly. Rows nobody used are set to the current global row.
    """
    used = np.stack([u.astype(bool) for u in usage])  # sites x rows
    w = np.asarray(weights, dtype=np.float64)[:, None]
    stacked = np.stack([a[key].astype(np.float64) for a in arrays])  # sites x rows x d
    wu = used * w
    denom = wu.sum(0)
    mean = np.einsum("sr,srd->rd", wu, stacked) / np.maximum(denom, 1e-12)[:, None]
    mean[denom == 0] = current[denom == 0]
    for i, a in enumerate(arrays):
        rows = ~used[i]
        patched = a[key].astype(np.float64)
        patched[rows] = mean[rows]
        a[key] = patched.astype(a[key].dtype)


def federation_size(cfg: MedUniCConfig, run_config: Mapping[str, Any]) -> tuple[int, int]:
    """(sites of the federation, fewest a round may go on with): ``fed.expected_sites`` or
    the run config's ``sites`` list, and ``fed.min_sites`` (0: all of them)."""
    spec = str(run_config.get("sites", "") or "")
    expected = cfg.fed.expected_sites or (len(parse_sites(spec)) if spec else 0)
    if expected <= 0:
        raise ConfigError("say how many sites the federation has: run config 'sites' or fed.expected_sites")
    return expected, min(cfg.fed.min_sites or expected, expected)


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


def _pop_extras(msg: Message) -> dict[str, Any]:
    """Remove and return the records of :data:`EXTRA_RECORDS` (None where absent)."""
    out = {}
    for key in EXTRA_RECORDS:
        out[key] = msg.content[key] if key in msg.content else None
        if key in msg.content:
            del msg.content[key]
    return out


class MedUniCAggregation:
    """Mixin in front of a Flower strategy (see :func:`make_strategy`)."""

    def __init__(
        self, *args: Any, reject_factor: float = 10.0, vocab_sha: str = "", wire_dtype: str = "float32",
        expected_sites: int = 1, site_wait: float = 600.0, message_type: str = MessageType.TRAIN,
        token_key: str = TOKEN_EMBEDDINGS, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.message_type, self.token_key = message_type, token_key
        self.expected_sites, self.site_wait = expected_sites, site_wait
        self.reject_factor = reject_factor
        self.vocab_sha = vocab_sha
        self.wire_dtype = WIRE_DTYPES[wire_dtype]
        self.alignment = AlignmentState()
        self.global_arrays: dict[str, np.ndarray] = {}
        self.last_round: dict[str, Any] = {}  # what the last aggregation did, for the logs
        self.sent_to: list[int] = []  # nodes asked to train this round
        self.node_sites: dict[int, str] = {}  # node id -> site name, from earlier replies

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_arrays = record_arrays(arrays, np.float32)
        nodes = wait_for_sites(grid, self.expected_sites, self.min_train_nodes, self.site_wait, f"round {server_round}")
        self.min_available_nodes = len(nodes)  # Flower's sampling would otherwise wait forever
        config["vocab-sha"] = self.vocab_sha
        config["app-version"] = __version__
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.message_type != MessageType.TRAIN:  # e.g. "train.mlm": another handler at the sites
            messages = [Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=self.message_type,
                                group_id=m.metadata.group_id) for m in messages]
        self.sent_to = [m.metadata.dst_node_id for m in messages]
        down = arrays_record(self.global_arrays, self.wire_dtype)
        record = arrays_record(self.alignment.to_flat()) if self.alignment.communities else None
        for msg in messages:  # all messages share one content record
            msg.content["arrays"] = down
            if record is not None:
                msg.content["align"] = record
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Any]:
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        extras = [_pop_extras(m) for m in ok]  # Flower's FedAvg accepts one ArrayRecord per reply
        sites = [str(e["site"]["site"]) if e["site"] is not None else f"node-{m.metadata.src_node_id}"
                 for e, m in zip(extras, ok)]
        self.node_sites.update({m.metadata.src_node_id: site for m, site in zip(ok, sites)})
        # an error reply may come from the SuperLink (a lost node), so name the silent nodes
        answered = {m.metadata.src_node_id for m in ok}
        failed = [self.node_sites.get(n, f"node-{n}") for n in self.sent_to if n not in answered]
        reasons = [m.error.reason for m in replies if m.has_error()]
        if failed:
            log.warning("round %d: no update from %s (%s)", server_round, ", ".join(failed),
                        "; ".join(reasons) or "no reply before fed.round_timeout")
        arrays = [record_arrays(m.content["arrays"], np.float32) for m in ok]  # never average in fp16
        norms = update_norms(arrays, self.global_arrays) if self.global_arrays else [0.0] * len(ok)
        rejected = outliers(norms, self.reject_factor)
        for i in rejected:
            log.warning("round %d: update of %s rejected (norm %.4g; others %s)", server_round, sites[i], norms[i],
                        [round(n, 4) for j, n in enumerate(norms) if j != i])
        keep = [i for i in range(len(ok)) if i not in rejected]
        self.last_round = {
            "sites": [sites[i] for i in keep],
            "rejected": [sites[i] for i in rejected],
            "failed": len(failed),
            "failed_sites": failed,
            "update_norms": dict(zip(sites, norms)),
        }
        privacy = {site: dict(e["privacy"]) for site, e in zip(sites, extras) if e["privacy"] is not None}
        if privacy:  # every release counts, also one rejected afterwards
            self.last_round["privacy"] = privacy
        if not keep:
            return None, None
        accepted = [ok[i] for i in keep]
        kept_arrays = [arrays[i] for i in keep]
        if self.token_key in self.global_arrays and all(extras[i]["usage"] is not None for i in keep):
            weights = [float(m.content["metrics"][self.weighted_by_key]) for m in accepted]
            mask_unused_rows(
                kept_arrays,
                [record_arrays(extras[i]["usage"])["token_rows"] for i in keep],
                weights,
                self.global_arrays[self.token_key],
                self.token_key,
            )
        for m, a in zip(accepted, kept_arrays):
            m.content["arrays"] = arrays_record(a)
        self._merge_alignment(extras, keep)
        return super().aggregate_train(server_round, accepted)

    def _merge_alignment(self, extras: list[dict], keep: list[int]) -> None:
        fresh = AlignmentState()
        for i in keep:
            if extras[i]["align"] is not None:
                fresh = fresh.merged(AlignmentState.from_flat(record_arrays(extras[i]["align"])))
        self.alignment = self.alignment.replaced_by(fresh)

    # -- checkpoint support -------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in STRATEGY_STATE if hasattr(self, k)}

    def load_state(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class MedUniCFedAvg(MedUniCAggregation, FedAvg):
    """Weighted FedAvg over sample counts."""


class MedUniCFedProx(MedUniCAggregation, FedProx):
    """FedAvg with a proximal term at the sites (``fed.proximal_mu``)."""


class MedUniCFedAdam(MedUniCAggregation, FedAdam):
    """FedAvg's mean as a pseudo-gradient for a server-side Adam (``fed.server_lr``)."""


def make_strategy(cfg: MedUniCConfig, num_sites: int, vocab_sha: str, message_type: str = MessageType.TRAIN,
                  token_key: str = TOKEN_EMBEDDINGS) -> MedUniCAggregation:
    """The configured strategy: a round waits ``fed.site_wait`` for all ``num_sites``, then
    goes on with at least ``fed.min_sites`` (default: all of them). ``message_type`` and
    ``token_key`` name the sites' handler and the token-embedding matrix of the stage."""
    need = min(cfg.fed.min_sites or num_sites, num_sites)
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=need,
        min_evaluate_nodes=need,
        min_available_nodes=need,
        expected_sites=num_sites,
        site_wait=cfg.fed.site_wait,
        reject_factor=cfg.fed.reject_factor,
        vocab_sha=vocab_sha,
        wire_dtype=cfg.fed.wire_dtype,
        message_type=message_type,
        token_key=token_key,
    )
    if cfg.fed.strategy == "fedprox":
        return MedUniCFedProx(proximal_mu=cfg.fed.proximal_mu, **common)
    if cfg.fed.strategy == "fedadam":
        return MedUniCFedAdam(eta=cfg.fed.server_lr, eta_l=cfg.train.lr, **common)
    return MedUniCFedAvg(**common)
