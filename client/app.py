"""The Med-UniC ClientApp: a thin adapter from Flower Messages to medunic_core.

Each handler reads the site (client.site), builds the run's model, loads the received
weights, calls medunic_core and replies with what may leave a site (medunic_core.exchange):

- ``train``: local training for one round -> weights, ``num-examples``, losses, this
  round's alignment sums of the site's community (of each, at a site of ``en+es``) and the
  token rows it used; under
  ``dp.updates`` the weights are the clipped, noised update (medunic_core.privacy), the
  token rows are not sent and a ``privacy`` record says what the site has spent;
- ``query.stats``: alignment sums of a few batches without training (round 1);
- ``query.community``: per-language P_l statistics for ``align.eval_norm = community``;
- ``evaluate``: zero-shot with the prompts of the site's language(s) (and, with two
  languages, retrieval and bias) on the site's held-out split;
- ``train.mlm``: the MLM stage: ``fed.local_steps`` masked-LM steps on the site's
  reports -> weights of the text encoder and MLM head, loss, token rows (DP as in train);
- ``query.vocab``: the vocabulary stage: per language, document frequencies of the words
  in at least ``vocab.min_df`` of the site's reports (rarer words never leave the site).

A deployment site also holds its release floors (client.site, medunic_core.privacy): it
sends nothing drawn from fewer than ``min-pairs`` distinct pairs (a round, statistics pass
or evaluation too small is refused before it starts; a language's alignment sums drawn
from fewer stay at the site) and
no word found in fewer than ``min-df`` of its reports, whatever the run config asks.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Optional

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.records import arrays_record, record_arrays
from client.site import Site, check_encoder, device, resolve_site, site_cache, site_config, site_tokenizer
from medunic_core import __version__
from medunic_core.align import AlignmentState, community_statistics
from medunic_core.data.dataset import prepare_images
from medunic_core.data.language import site_languages
from medunic_core.errors import ConfigError
from medunic_core.evaluation.run import Encoder, evaluate_model
from medunic_core.exchange import is_batchnorm_entry, load_arrays, model_arrays
from medunic_core.federation import payload as P
from medunic_core.federation.audit import audit_entry
from medunic_core.federation.replies import Content
from medunic_core.federation.stages import MLM, VLP, stage_model
from medunic_core.local import collect_statistics, site_records, train_site
from medunic_core.mlm import train_mlm_site
from medunic_core.privacy import (
    ReleaseLedger, check_min_df, check_release, check_round_size, release_update, releasable_languages,
)
from medunic_core.round_state import RoundState
from medunic_core.vocab import site_word_counts

log = logging.getLogger(__name__)
app = ClientApp()

LOCAL_BN = "local-bn"  # context.state record of this site's BatchNorms (fed.bn = local)


class _Setup:
    """Everything a handler needs, from one incoming message and the node's context."""

    def __init__(self, msg: Message, context: Context, stage: str = VLP) -> None:
        config = msg.content.config_records.get(P.CONFIG, ConfigRecord())
        self.cfg = site_config(context.run_config, context.node_config, config.get(P.STAGE_OVERRIDES))
        self.site = resolve_site(context.run_config, context.node_config, self.cfg)
        check_encoder(self.cfg, context.node_config, str(config.get(P.ENCODER_SHA, "")))
        self.round = int(config.get(P.SERVER_ROUND, 0))
        version = str(config.get(P.APP_VERSION, __version__))
        if version != __version__:
            raise ConfigError(f"site '{self.site.name}' runs medunic {__version__}, the run uses {version}; "
                              "install the coordinator's version at this site")
        self.tokenizer = site_tokenizer(self.site, str(config.get(P.VOCAB_SHA, "")) or None)
        self.model = stage_model(self.cfg, self.tokenizer, stage)
        self.device = device()
        self.cache = site_cache(self.site, self.cfg)
        self.run_key = str(config.get(P.RUN_KEY, f"flower-run-{context.run_id}"))
        self.received: dict[str, np.ndarray] = {}
        if P.ARRAYS in msg.content.array_records:
            keep = {}
            if self.cfg.fed.bn == "local" and LOCAL_BN in context.state.array_records:
                keep = {k: torch.from_numpy(v) for k, v in record_arrays(context.state[LOCAL_BN]).items()}
            self.received = record_arrays(msg.content[P.ARRAYS], np.float32)
            load_arrays(self.model, self.received, keep)


def _send(msg: Message, site: Site, content: Content) -> Message:
    """The reply, packed from plain data (the one place a site builds a Flower reply), after
    its description went to the site's audit log (medunic_core.federation.audit)."""
    config = msg.content.config_records.get(P.CONFIG, ConfigRecord())
    site.state.audit(audit_entry(content, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), run=msg.metadata.run_id,
                                 round=int(config.get(P.SERVER_ROUND, 0)), message_type=msg.metadata.message_type,
                                 site=site.name))
    records: dict = {name: arrays_record(arrays) for name, arrays in content.arrays.items()}
    records.update({name: MetricRecord(metrics) for name, metrics in content.metrics.items()})
    records.update({name: ConfigRecord(values) for name, values in content.configs.items()})
    return Message(RecordDict(records), reply_to=msg)


def _identity(site: Site) -> dict[str, str]:
    return {P.SITE_NAME: site.name, P.COMMUNITY: site.lang}


def _privacy(s: _Setup) -> Optional[tuple[float, ReleaseLedger]]:
    """Update-level DP of this round, when the run asks for it or the site's budget requires
    it: (noise multiplier, the site's ledger). Refused here, before training, when the
    site's budget allows no release or its ledger was lost."""
    budget = (s.site.dp_max_epsilon, s.site.dp_max_delta)
    if not s.cfg.dp.updates.enabled and budget == (None, None):
        return None
    s.site.state.check_ledger()
    ledger = ReleaseLedger(s.site.state.ledger)
    return check_release(s.cfg.dp.updates, s.cfg.fed.rounds, ledger, s.round, s.site.name, *budget), ledger


def _update_reply(msg: Message, context: Context, s: _Setup, metrics: dict, token_rows: np.ndarray,
                  extra: dict, privacy: Optional[tuple[float, ReleaseLedger]]) -> Message:
    """The reply of a training round: the weights (clipped and noised under update DP, with
    a ``privacy`` record instead of the token-row flags), metrics, the site and ``extra``
    (array records)."""
    trained = model_arrays(s.model)
    if s.cfg.fed.bn == "local":
        context.state[LOCAL_BN] = arrays_record({k: v for k, v in trained.items() if is_batchnorm_entry(s.model, k)})
    content = Content(arrays=dict(extra), metrics={P.METRICS: metrics}, configs={P.SITE: _identity(s.site)})
    if privacy is not None:
        noise, ledger = privacy
        trained, spent = release_update(s.received, trained, s.cfg.dp.updates, noise, ledger, s.run_key, s.round)
        s.site.state.note_releases(len(ledger.releases))
        for k, v in trained.items():  # post-processing, free under DP: a noised variance stays a variance
            if k.endswith(".running_var"):
                np.maximum(v, 0.0, out=v)
        content.configs[P.PRIVACY] = spent
    else:
        content.arrays[P.USAGE] = {P.TOKEN_ROWS: token_rows.astype(np.uint8)}
    content.arrays[P.ARRAYS] = {k: v.astype(P.WIRE_DTYPES[s.cfg.fed.wire_dtype]) for k, v in trained.items()}
    return _send(msg, s.site, content)


@app.train()
def train(msg: Message, context: Context) -> Message:
    s = _Setup(msg, context)
    privacy = _privacy(s)
    others = None
    if P.ALIGN in msg.content.array_records:
        others = AlignmentState.from_flat(record_arrays(msg.content[P.ALIGN]))
    records = site_records(s.cfg, s.site.name, s.site.lang, "train", s.site.manifest)
    what = f"round {s.round}"
    tr = s.cfg.train
    check_round_size(s.cfg.fed.local_steps * tr.batch_size * tr.accum_steps, len(records), s.site.min_pairs,
                     s.site.name, what)
    result = train_site(s.model, records, s.cache, s.tokenizer, s.cfg, s.round, others, s.device,
                        carried=RoundState(s.site.state_dir, s.run_key, VLP))
    alignment = result.alignment.only(releasable_languages(result.drawn, s.site.min_pairs, s.site.name, what))
    metrics = {P.NUM_EXAMPLES: result.num_examples, **{f"train_{k}": float(v) for k, v in result.metrics.items()}}
    return _update_reply(msg, context, s, metrics, result.token_rows, {P.ALIGN: alignment.to_flat()}, privacy)


@app.train(P.MLM)
def train_mlm(msg: Message, context: Context) -> Message:
    s = _Setup(msg, context, stage=MLM)
    if s.cfg.dp.sgd.enabled:
        raise ConfigError("dp.sgd in the federated MLM stage is not supported yet; use dp.updates (update-level "
                          "DP at the site) or run `medunic mlm` with dp.sgd at one site")
    privacy = _privacy(s)
    records = site_records(s.cfg, s.site.name, s.site.lang, "train", s.site.manifest)
    what = f"MLM round {s.round}"
    check_round_size(s.cfg.fed.local_steps * min(s.cfg.mlm.batch_size, len(records)), len(records),
                     s.site.min_pairs, s.site.name, what)
    result, token_rows, drawn = train_mlm_site(s.model, [r.report for r in records], s.tokenizer, s.cfg, s.round,
                                               s.device, carried=RoundState(s.site.state_dir, s.run_key, MLM))
    check_round_size(drawn, drawn, s.site.min_pairs, s.site.name, what)
    metrics = {P.NUM_EXAMPLES: result.num_examples, "train_mlm_loss": result.metrics["loss"],
               "train_lr": result.metrics["lr"]}
    return _update_reply(msg, context, s, metrics, token_rows, {}, privacy)


@app.query(P.STATS)
def stats(msg: Message, context: Context) -> Message:
    s = _Setup(msg, context)
    records = site_records(s.cfg, s.site.name, s.site.lang, "train", s.site.manifest)
    batches = int(msg.content[P.CONFIG].get(P.BATCHES, 4))
    what = f"the statistics pass of round {s.round}"
    check_round_size(batches * s.cfg.train.batch_size, len(records), s.site.min_pairs, s.site.name, what)
    state, drawn = collect_statistics(s.model, records, s.cache, s.tokenizer, s.cfg, batches, s.device)
    state = state.only(releasable_languages(drawn, s.site.min_pairs, s.site.name, what))
    return _send(msg, s.site, Content(arrays={P.ALIGN: state.to_flat()}, configs={P.SITE: _identity(s.site)}))


@app.query(P.COMMUNITY_STATS)
def community(msg: Message, context: Context) -> Message:
    s = _Setup(msg, context)
    records = site_records(s.cfg, s.site.name, s.site.lang, "train", s.site.manifest)
    encoder = Encoder(s.model.to(s.device), s.tokenizer, s.cfg, s.device)
    feats = torch.as_tensor(encoder.texts([r.report for r in records])[1], device=s.device)
    state = community_statistics(s.model, feats, [r.lang for r in records])
    drawn = dict(Counter(r.lang for r in records))
    state = state.only(releasable_languages(drawn, s.site.min_pairs, s.site.name, "the community statistics"))
    return _send(msg, s.site, Content(arrays={P.ALIGN: state.to_flat()}, configs={P.SITE: _identity(s.site)}))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    s = _Setup(msg, context)
    test = site_records(s.cfg, s.site.name, s.site.lang, s.cfg.eval.split, s.site.manifest)
    check_round_size(len(test), len(test), s.site.min_pairs, s.site.name,
                     f"the evaluation on its '{s.cfg.eval.split}' split")
    test, _ = prepare_images(test, s.cache, 1.0, progress=False)
    community, train_records = None, ()
    if P.ALIGN in msg.content.array_records:
        community = AlignmentState.from_flat(record_arrays(msg.content[P.ALIGN]))
    elif s.cfg.align.eval_norm == "community":  # no federation statistics: measure its own language
        train_records = site_records(s.cfg, s.site.name, s.site.lang, "train", s.site.manifest)
    langs = list(site_languages(s.site.lang))
    results = evaluate_model(
        s.model, s.tokenizer, s.cfg, test, train_records, community, full=False, cache=s.cache, prompt_langs=langs
    )
    # zero-shot with the prompts of each of the site's languages; their mean at a site of several
    auc = [float(results["zeroshot"][lang]["macro_auc"] or 0.0) for lang in langs]
    metrics = {P.NUM_EXAMPLES: len(test), "zeroshot_auc": sum(auc) / len(auc)}
    if "retrieval" in results:
        metrics.update({f"retrieval_{k}": float(v) for k, v in results["retrieval"]["mean"].items()})
    return _send(msg, s.site, Content(metrics={P.METRICS: metrics}, configs={P.SITE: _identity(s.site)}))


@app.query(P.VOCAB)
def vocab(msg: Message, context: Context) -> Message:
    config = msg.content.config_records.get(P.CONFIG, ConfigRecord())
    cfg = site_config(context.run_config, context.node_config, config.get(P.STAGE_OVERRIDES))  # no tokenizer yet
    site = resolve_site(context.run_config, context.node_config, cfg)
    check_min_df(cfg.vocab.min_df, site.min_df, site.name)
    records = site_records(cfg, site.name, site.lang, "train", site.manifest)
    counts = site_word_counts(cfg.vocab, [(r.report, r.lang) for r in records], cfg.model.text.max_length)
    content = Content(configs={P.SITE: _identity(site)})
    for lang, (df, reports) in counts.items():
        words = sorted(df)
        content.configs[f"{P.VOCAB_PREFIX}{lang}"] = {P.WORDS: words, P.DF: [df[w] for w in words], P.REPORTS: reports}
    return _send(msg, site, content)
