"""``medunic eval``: run a trained model over a held-out split and write the report.

Zero-shot classification with English and Spanish prompts, EN<->ES retrieval,
community-bias metrics of report embeddings, a linear probe on frozen image features,
and a t-SNE plot of report embeddings coloured by language.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medunic_core.align import Aligner, AlignmentState, community_statistics
from medunic_core.checkpoint import load_checkpoint
from medunic_core.config import MedUniCConfig, load_config
from medunic_core.constants import CHECKPOINT_FILE, FINDINGS
from medunic_core.data.dataset import EvalDataset, pair_stream, prepare_images
from medunic_core.data.manifest import Record, read_manifest
from medunic_core.data.preprocess import ImageCache
from medunic_core.errors import ConfigError
from medunic_core.evaluation.bias import community_bias
from medunic_core.evaluation.linear_probe import dp_linear_probe, linear_probe
from medunic_core.evaluation.prompts import load_prompts, unseen_prompt_words
from medunic_core.evaluation.report import format_eval_markdown, plot_tsne, write_eval_report
from medunic_core.evaluation.retrieval import cross_lingual_retrieval
from medunic_core.evaluation.zeroshot import (
    class_embedding, label_matrix, report_class_embeddings, zeroshot_metrics,
)
from medunic_core.models import MedUniC, create_model
from medunic_core.train import forward_loss, resolve_device
from medunic_core.vocab import load_tokenizer, word_splitter

log = logging.getLogger(__name__)


class Encoder:
    """Batched, gradient-free embedding of images and reports with a model in eval mode."""

    def __init__(
        self,
        model: MedUniC,
        tokenizer,
        cfg: MedUniCConfig,
        device: torch.device,
        community: Optional[AlignmentState] = None,
    ) -> None:
        self.model, self.tokenizer, self.cfg, self.device = model.eval(), tokenizer, cfg, device
        self.community = community  # per-language P_l statistics for align.eval_norm=community

    def texts(self, texts: Sequence[str], langs: Optional[Sequence[str]] = None) -> tuple[np.ndarray, np.ndarray]:
        """Reports -> (P_l embeddings, F_l [CLS] features), each (N, d).

        With community statistics set, each report is standardised with its own
        language's statistics (``langs``, one per report); a language without statistics (a
        model trained on the other language only) is standardised globally, as
        :func:`evaluate_model` records under ``norm``.
        """
        if self.community is None:
            return self._texts(texts, None)
        if langs is None or len(langs) != len(texts):
            raise ValueError("community normalisation needs the language of every report")
        known = set(self.community.communities)
        own = [i for i, lang in enumerate(langs) if lang in known]
        if len(own) == len(texts):
            return self._texts(texts, langs)
        rest = [i for i, lang in enumerate(langs) if lang not in known]
        heads: list[Optional[np.ndarray]] = [None] * len(texts)
        feats: list[Optional[np.ndarray]] = [None] * len(texts)
        for index, group_langs in ((own, [langs[i] for i in own]), (rest, None)):
            if index:
                h, f = self._texts([texts[i] for i in index], group_langs)
                for j, i in enumerate(index):
                    heads[i], feats[i] = h[j], f[j]
        return np.stack(heads), np.stack(feats)  # type: ignore[arg-type]

    @torch.no_grad()
    def _texts(self, texts: Sequence[str], langs: Optional[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """The batched forward pass; ``langs`` given: community normalisation, else global."""
        heads, feats = [], []
        bs = self.cfg.eval.batch_size
        aligner = Aligner(self.model, mode="community", others=self.community) if langs is not None else None
        for i in range(0, len(texts), bs):
            tok = self.tokenizer(
                list(texts[i : i + bs]), padding=True, truncation=True,
                max_length=self.cfg.model.text.max_length, return_tensors="pt",
            ).to(self.device)
            h = self.model.text_encoder(tok["input_ids"], tok["attention_mask"])
            feats.append(h.float().cpu())
            if aligner is None:
                heads.append(self.model.text_head(h).float().cpu())
                continue
            with aligner.attached():
                aligner.begin_batch(list(langs[i : i + bs]))  # type: ignore[index]
                heads.append(self.model.text_head(h).float().cpu())
        return torch.cat(heads).numpy(), torch.cat(feats).numpy()

    @torch.no_grad()
    def images(self, records: Sequence[Record], cache: ImageCache, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (P_V embeddings, F_v features), each (N, d)."""
        heads, feats = [], []
        for images in tqdm(image_batches(records, cache, self.cfg), desc="embedding images", disable=not progress):
            f = self.model.image_encoder(images.to(self.device))
            feats.append(f.float().cpu())
            heads.append(self.model.image_head(f).float().cpu())
        return torch.cat(heads).numpy(), torch.cat(feats).numpy()


def image_batches(records: Sequence[Record], cache: ImageCache, cfg: MedUniCConfig) -> DataLoader:
    """Batches of ``eval.batch_size`` evaluation views (one deterministic view per image)."""
    img = cfg.model.image
    return DataLoader(EvalDataset(records, cache, img.size, img.mean, img.std), batch_size=cfg.eval.batch_size,
                      num_workers=cfg.data.num_workers, collate_fn=lambda items: torch.stack([it["image"] for it in items]))


def _prompt_embeddings(encoder: Encoder, prompts: dict, lang: str) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = [], []
    for finding in FINDINGS:
        for side, out in (("positive", pos), ("negative", neg)):
            phrases = prompts[lang][finding][side]
            out.append(class_embedding(encoder.texts(phrases, [lang] * len(phrases))[0]))
    return np.stack(pos), np.stack(neg)


def community_stats_of_run(checkpoint: str | Path) -> Optional[AlignmentState]:
    """The per-community P_l statistics a federated export carries, if any."""
    flat = load_checkpoint(checkpoint).get("community_stats")
    return AlignmentState.from_flat(flat) if flat else None


def load_run(run_dir: str | Path, overrides: Optional[list[str]] = None, checkpoint: Optional[str | Path] = None):
    """(config, tokenizer, model) of a training run folder, loaded strictly."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a training run (no config.yaml); run `medunic train` first")
    cfg = load_config(config_file=config_file, overrides=overrides)
    tokenizer = load_tokenizer(cfg.train.tokenizer or run_dir / "tokenizer")
    model = create_model(
        cfg.model, len(tokenizer), tokenizer.pad_token_id, checkpoint=checkpoint or run_dir / CHECKPOINT_FILE
    )
    return cfg, tokenizer, model


HELDOUT_SEED = 20231  # the views of the held-out losses: the same for every model evaluated


@torch.no_grad()
def heldout_losses(model: MedUniC, tokenizer, cfg: MedUniCConfig, test: Sequence[Record], cache: ImageCache,
                   device: torch.device) -> dict[str, float]:
    """The training losses (L_CVL, L_SSV, total) of the model on the held-out pairs, in full
    batches with views drawn from a fixed seed: comparable across runs of any length and any
    number of rounds, unlike a run's training-loss means.

    They are computed as training computes them, each BatchNorm standardising over its own
    batch (P_V standardises each image view over its own batch), but without dropout and
    without touching the running statistics. With the running statistics instead, L_SSV
    measured a shift between the weak and the strong view that training never sees (a
    federated model: 10.9 with running statistics, 3.5 with batch statistics)."""
    reported = [r for r in test if r.report]
    size = min(cfg.train.batch_size, len(reported))
    if size < 2:
        return {}
    stream = pair_stream(reported, cache, tokenizer, size, 1, cfg.model.text.max_length, cfg.model.image,
                         HELDOUT_SEED)
    was_training = model.training
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0  # batch statistics; the running ones stay as they are
    totals: dict[str, float] = {}
    batches = stream.per_epoch
    try:
        for _, batch in zip(range(batches), stream):
            for k, v in forward_loss(model, batch, cfg, device).items():
                totals[k] = totals.get(k, 0.0) + float(v) / batches
    finally:
        for m, (momentum, tracked) in zip(norms, kept):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
        model.train(was_training)
    return totals


def evaluate_model(
    model: MedUniC,
    tokenizer,
    cfg: MedUniCConfig,
    test: Sequence[Record],
    train: Sequence[Record] = (),
    community: Optional[AlignmentState] = None,
    full: bool = True,
    progress: bool = False,
    cache: Optional[ImageCache] = None,
    prompt_langs: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """Metrics of a model on readable test records (the shared core of every evaluation).

    Zero-shot for each language of ``cfg.data.langs``; retrieval and community bias when
    the test reports are in two languages or more; with ``full``, the linear probe on
    ``train``. ``align.eval_norm = community`` uses ``community`` statistics or, when
    None, measures each language on the ``train`` reports. ``prompt_langs`` limits the
    zero-shot prompt languages (a site scores its own).

    With ``full``, also the training losses on the held-out pairs (:func:`heldout_losses`).
    Label-only rows (report "", e.g. CheXpert) count for zero-shot and the probe, which
    use images and labels only; the report metrics (retrieval, bias, the t-SNE
    embeddings) use the test rows that have a report and are skipped when none has.
    Only ``FINDINGS`` are scored: other label keys (RSNA's ``pneumonia``) are ignored.
    """
    device = resolve_device(cfg.train.device)
    encoder = Encoder(model.to(device), tokenizer, cfg, device)
    cache = cache or ImageCache(cfg.data.cache_dir, cfg.model.image.cache_size)
    train_reported = [r for r in train if r.report]
    if cfg.align.eval_norm == "community":
        if community is None:
            if not train_reported:
                raise ConfigError(
                    "align.eval_norm=community needs community statistics or train reports; a label-only "
                    "manifest has none: evaluate a federated export (it carries them) or set align.eval_norm=global"
                )
            feats = encoder.texts([r.report for r in train_reported])[1]
            community = community_statistics(
                model, torch.as_tensor(feats, device=device), [r.lang for r in train_reported]
            )
        encoder.community = community
    img_emb, img_feat = encoder.images(test, cache, progress)
    norm = {lang: ("community" if encoder.community is not None and lang in encoder.community.communities
                   else "global") for lang in sorted({*cfg.data.langs, *(prompt_langs or ())})}
    reported = [r for r in test if r.report]
    langs = [r.lang for r in reported]
    labels = label_matrix(test, FINDINGS)
    prompt_langs = list(prompt_langs or cfg.data.langs)
    prompts = load_prompts(langs=prompt_langs)
    results: dict[str, Any] = {"zeroshot": {}, "norm": norm}
    for lang in prompt_langs:
        pos, neg = _prompt_embeddings(encoder, prompts, lang)
        results["zeroshot"][lang] = zeroshot_metrics(img_emb, pos, neg, labels, cfg.loss.temperature)
    if full and train_reported:
        split_words = word_splitter(tokenizer)
        results["unseen_prompt_words"] = {
            lang: unseen_prompt_words(prompts[lang], [r.report for r in train_reported if r.lang == lang],
                                      split_words) for lang in prompt_langs}
        for lang, unseen in results["unseen_prompt_words"].items():
            if unseen:
                log.warning("%s prompts use words no %s training report contains (untrained in context; "
                            "adapt configs/prompts.yaml to the reports' wording): %s", lang, lang,
                            "; ".join(f"{key} '{phrase}': {', '.join(words)}" for key, by in unseen.items()
                                      for phrase, words in by.items()))
    if not reported:
        log.info("no %s row has a report (label-only data): skipping retrieval, bias and t-SNE", cfg.eval.split)
    else:
        if len(reported) < len(test):
            log.info("report metrics on the %d of %d test rows that have a report", len(reported), len(test))
        text_emb, text_feat = encoder.texts([r.report for r in reported], langs)
        results["embeddings"] = {"text": text_emb, "langs": langs, "findings": [r.finding_set for r in reported]}
        if len(set(langs)) >= 2:
            results["retrieval"] = cross_lingual_retrieval(
                text_emb, langs, [r.finding_set for r in reported], cfg.eval.retrieval_k
            )
            results["bias"] = {"text": community_bias(text_emb, langs), "encoder": community_bias(text_feat, langs)}
    if full:
        results["heldout_loss"] = heldout_losses(model, tokenizer, cfg, test, cache, device)
    if full and reported and train_reported and not cfg.dp.sgd.enabled:
        # How much of each finding the report embeddings hold, whatever the images do: where
        # this is low, the text tower limits zero-shot and retrieval (issue 12's diagnosis).
        train_text = encoder.texts([r.report for r in train_reported], [r.lang for r in train_reported])[0]
        train_labels = label_matrix(train_reported, FINDINGS)
        results["text_probe"] = linear_probe(train_text, train_labels,
                                             results["embeddings"]["text"], label_matrix(reported, FINDINGS),
                                             [1.0], [0])[1.0]
        # Zero-shot with each language's training reports in place of its prompts: where it
        # beats the prompts, the prompts limit zero-shot; where it does not, the alignment does.
        results["report_zeroshot"] = {}
        for lang in prompt_langs:
            own = np.array([r.lang == lang for r in train_reported])
            pos, neg, kept = report_class_embeddings(train_text[own], train_labels[own])
            if kept:
                results["report_zeroshot"][lang] = zeroshot_metrics(
                    img_emb, pos, neg, labels[:, [FINDINGS.index(f) for f in kept]], cfg.loss.temperature, kept
                )
    if full and train:
        train_emb, train_feat = encoder.images(train, cache, progress)
        if not cfg.dp.sgd.enabled:
            # The same probe on the image embeddings (P_V), the space zero-shot scores in:
            # against the probe of the features below, what the projection keeps of each finding.
            results["image_embedding_probe"] = linear_probe(train_emb, label_matrix(train, FINDINGS), img_emb,
                                                            labels, [1.0], [0])[1.0]
        if cfg.dp.sgd.enabled:  # the probe's labels are private data too: DP-SGD
            results["linear_probe"] = dp_linear_probe(
                train_feat, label_matrix(train, FINDINGS), img_feat, labels, cfg.dp.sgd,
                cfg.eval.probe_fractions, cfg.eval.probe_seeds, batch_size=cfg.eval.batch_size,
            )
        else:
            results["linear_probe"] = linear_probe(
                train_feat, label_matrix(train, FINDINGS), img_feat, labels,
                cfg.eval.probe_fractions, cfg.eval.probe_seeds,
            )
    return results


def heldout_manifest(cfg: MedUniCConfig) -> Path:
    """Where the held-out rows come from: a fixed evaluation set (``eval.manifest``, shared by
    every run of an experiment) or the training data's own ``eval.split``."""
    return Path(cfg.eval.manifest or cfg.data.manifest)


def heldout_records(cfg: MedUniCConfig, data_records: Optional[Sequence[Record]] = None) -> list[Record]:
    """The ``eval.split`` rows of :func:`heldout_manifest` (``data_records``: data.manifest, already read)."""
    if cfg.eval.manifest or data_records is None:
        data_records = read_manifest(heldout_manifest(cfg), cfg.data.langs, require_report=False)
    return [r for r in data_records if r.split == cfg.eval.split]


def evaluate(
    run_dir: str | Path,
    out_dir: Optional[str | Path] = None,
    overrides: Optional[list[str]] = None,
    checkpoint: Optional[str | Path] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a run on ``eval.split`` and write eval.json, eval.md and t-SNE plots."""
    cfg, tokenizer, model = load_run(run_dir, overrides, checkpoint)
    out_dir = Path(out_dir or Path(run_dir) / "eval")
    cache = ImageCache(cfg.data.cache_dir, cfg.model.image.cache_size)
    records = read_manifest(cfg.data.manifest, cfg.data.langs, require_report=False)  # label-only data too
    test, _ = prepare_images(heldout_records(cfg, records), cache, 1.0, progress)
    train, _ = prepare_images([r for r in records if r.split == "train"], cache, 1.0, progress)
    if not test:
        raise ConfigError(f"{heldout_manifest(cfg)} has no readable '{cfg.eval.split}' rows to evaluate on")
    community = None
    if cfg.align.eval_norm == "community":  # a federated export carries them; else measured on train
        community = community_stats_of_run(checkpoint or Path(run_dir) / CHECKPOINT_FILE)
        missing = sorted(set(r.lang for r in test) - set(community.communities if community else []))
        if community is not None and missing:
            log.warning("the run carries no statistics for %s: measuring every language on its train reports", missing)
            community = None
    results = evaluate_model(model, tokenizer, cfg, test, train, community, True, progress, cache)
    embeddings = results.pop("embeddings", None)
    results = {
        "meta": {
            "run": str(run_dir),
            "split": cfg.eval.split,
            "n_test": len(test),
            "n_test_reports": sum(1 for r in test if r.report),  # 0: label-only, no report metrics
            "n_train": len(train),
            "ctr": bool(cfg.loss.ctr),
            "eval_norm": cfg.align.eval_norm,
            "preset": cfg.preset,
        },
        **results,
    }
    if cfg.eval.tsne and embeddings is not None and len(embeddings["langs"]) >= 3:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_tsne(embeddings["text"], embeddings["langs"], out_dir / "tsne_text.png",
                  labels=embeddings["findings"], title="report embeddings (P_l) by language")
        results["tsne"] = {"text": "tsne_text.png"}
    elif cfg.eval.tsne:
        log.info("t-SNE skipped: fewer than 3 %s rows have a report", cfg.eval.split)
    write_eval_report(results, out_dir)
    return results


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a training run on its held-out split")
    parser.add_argument("run_dir", help="folder written by `medunic train` (config.yaml, checkpoint.pt)")
    parser.add_argument("--checkpoint", default=None, help="another checkpoint of the same config")
    parser.add_argument("--out", default=None, help="report folder (default RUN_DIR/eval)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.split=val")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    results = evaluate(args.run_dir, args.out, args.overrides, args.checkpoint, progress=not args.no_progress)
    print(format_eval_markdown(results))
    return 0
