"""The federated stages at the coordinator (DESIGN.md, "Stages"), each a small class that
says what it sends, how it aggregates and what it exports:

- :class:`VocabStage`: one exchange: per language, the document frequencies of the words in
  at least ``vocab.min_df`` of each site's reports -> ``<out>/tokenizer``;
- :class:`MlmStage`: rounds of masked-language post-training of the text encoder (the
  strategy averages its weights) -> ``<out>/text_encoder`` (the encoder, ``save_pretrained``);
- :class:`VlpStage`: rounds of Med-UniC with the alignment state, a statistics pass before
  round 1 (``align.round1``), per-language statistics and evaluations after rounds ->
  ``<out>/model`` (exported, evaluated) and ``<out>/report``.

The weight stages run in server.rounds' loop (checkpoints, resume, ``rounds.jsonl``). What
a run's stages share (its config, who the sites are, the config every message carries) is
a :class:`Federation`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.serverapp import Grid

from medunic_core import __version__
from medunic_core.align import AlignmentState, alignment_layout
from medunic_core.config import MedUniCConfig, load_config
from medunic_core.constants import LANGUAGES
from medunic_core.data.dataset import prepare_images
from medunic_core.data.manifest import Record
from medunic_core.data.preprocess import ImageCache
from medunic_core.errors import ConfigError, FederationError
from medunic_core.evaluation.run import evaluate, evaluate_model, heldout_manifest, heldout_records
from medunic_core.exchange import load_arrays
from medunic_core.export import export_model, folder_sha256
from medunic_core.federation import payload as P
from medunic_core.federation.replies import check_alignment_reply, check_evaluate_reply, check_vocab_reply
from medunic_core.federation.runconfig import run_overrides
from medunic_core.federation.stages import MLM, VLP, max_examples, stage_model, token_key
from medunic_core.vocab import build_tokenizer_from_counts, counts_language, load_tokenizer, vocab_sha256
from server.messages import arrays_record, broadcast
from server.registry import SiteIdentities, site_identities
from medunic_core.evaluation.report import write_federated_report
from server.rounds import run_rounds
from server.strategy import federation_size, make_strategy, wait_for_sites

log = logging.getLogger("flwr.medunic")

TOKENIZER_DIR = "tokenizer"
TEXT_ENCODER_DIR = "text_encoder"
EXPORT_DIR = "model"
VOCAB_SUMMARY = "vocab_stage.json"


@dataclass(frozen=True)
class Federation:
    """One Flower run at the coordinator, as its stages see it: the preset and overrides of
    its config, the overrides its earlier stages made (``staged``: in a simulation they travel
    with every message, medunic_core.federation.runconfig), and who the sites are."""

    run_config: Mapping[str, Any]
    identities: SiteIdentities
    preset: str
    overrides: tuple[str, ...]
    staged: tuple[str, ...] = ()
    simulation: bool = False
    _cfg: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "Federation":
        preset = str(run_config.get("preset", "tiny") or "tiny")
        overrides = tuple(run_overrides(run_config))
        cfg = load_config(preset, list(overrides))
        simulation = bool(str(run_config.get("sites", "") or "")) and not run_config.get("registry")
        return cls(run_config, site_identities(cfg.data.langs, run_config), preset, overrides, (), simulation)

    @property
    def cfg(self) -> MedUniCConfig:
        if "cfg" not in self._cfg:
            self._cfg["cfg"] = load_config(self.preset, [*self.overrides, *self.staged])
        return self._cfg["cfg"]

    def staging(self, *more: str) -> "Federation":
        """This federation with more stage overrides (a later stage's config)."""
        return replace(self, staged=(*self.staged, *more), _cfg={})

    def sizes(self) -> tuple[int, int]:
        return federation_size(self.cfg, self.run_config)

    def message_config(self, vocab_sha: str = "", **extra: Any) -> dict[str, Any]:
        """The config record of every message: app version, vocabulary hash and, in a
        simulation, the stage overrides."""
        config = {P.APP_VERSION: __version__, P.VOCAB_SHA: vocab_sha, **extra}
        if self.simulation:
            config[P.STAGE_OVERRIDES] = json.dumps(list(self.staged))
        return config

    def nodes(self, grid: Grid, what: str) -> list[int]:
        """The sites' node ids (server.strategy.wait_for_sites); a simulation may not have more
        SuperNodes than listed sites (a partition without a site cannot answer)."""
        expected, minimum = self.sizes()
        if self.simulation and len(list(grid.get_node_ids())) > expected:
            raise FederationError(
                f"the simulation has {len(list(grid.get_node_ids()))} SuperNodes but run config sites lists "
                f"{expected} sites; run with --federation-config \"num-supernodes={expected}\"")
        return wait_for_sites(grid, expected, minimum, self.cfg.fed.site_wait, what)


class _Stage:
    """What the weight stages share: the tokenizer, the model and its strategy."""

    stage = VLP

    def __init__(self, federation: Federation) -> None:
        self.federation, self.cfg = federation, federation.cfg
        self.out = Path(self.cfg.fed.out_dir)
        if not self.cfg.train.tokenizer:
            raise ConfigError(f"stage {self.stage} needs the run's tokenizer: run config tokenizer=FOLDER (made by "
                              "the vocab stage), or stage=all to make it")
        self.tokenizer = load_tokenizer(self.cfg.train.tokenizer)
        self.vocab_sha = vocab_sha256(self.tokenizer)
        pretrained = self.cfg.model.text.pretrained
        self.encoder_sha = folder_sha256(pretrained) if pretrained and self.stage == VLP else ""
        self.model = stage_model(self.cfg, self.tokenizer, self.stage)
        self._invalid: dict[str, dict[str, str]] = {}

    def message_config(self, **extra: Any) -> dict[str, Any]:
        if self.encoder_sha:
            extra[P.ENCODER_SHA] = self.encoder_sha
        return self.federation.message_config(self.vocab_sha, **extra)

    def content(self, arrays: dict[str, np.ndarray], **config: Any) -> RecordDict:
        return RecordDict({P.ARRAYS: arrays_record(arrays, P.WIRE_DTYPES[self.cfg.fed.wire_dtype]),
                           P.CONFIG: ConfigRecord(self.message_config(**config))})

    def take_invalid(self) -> dict[str, dict[str, str]]:
        taken, self._invalid = self._invalid, {}
        return taken

    def _note_invalid(self, exchange: str, invalid: dict[str, str]) -> None:
        if invalid:
            self._invalid.setdefault(exchange, {}).update(invalid)

    def _strategy(self, layout: Optional[dict] = None):
        return make_strategy(self.cfg, self.federation.sizes()[0], message_type=P.TRAIN if self.stage == VLP
                             else P.TRAIN_MLM, token_key=token_key(self.model, self.stage),
                             max_examples=max_examples(self.cfg, self.stage), layout=layout,
                             identities=self.federation.identities)

    def run(self, grid: Grid) -> Path:
        self.federation.nodes(grid, f"stage {self.stage}")
        return run_rounds(self, grid)

    # the round loop's hooks that a stage may leave as they are
    def before_round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray]) -> None:
        return None

    def after_round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray], row: dict[str, Any]) -> None:
        return None

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        return None


class MlmStage(_Stage):
    """Federated masked-language post-training of the text encoder (Stage 2 of MEDUNIC.md):
    no alignment state, the sites' MLM losses are its measure."""

    stage = MLM

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        self.strategy = self._strategy()

    def export(self, arrays: dict[str, np.ndarray]) -> Path:
        load_arrays(self.model, arrays)
        folder = self.out / TEXT_ENCODER_DIR
        self.model.base_model.save_pretrained(folder)
        shutil.copytree(self.cfg.train.tokenizer, self.out / TOKENIZER_DIR, dirs_exist_ok=True)
        log.info("MLM stage: text encoder in %s (sha256 %s: copy it to every site, whose daemon prints the same); "
                 "report: %s", folder, folder_sha256(folder), write_federated_report(self.out))
        return folder


class VlpStage(_Stage):
    """Federated Med-UniC (CLIP + SSV + CTR) with the language-disentangled alignment state."""

    stage = VLP

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        self.strategy = self._strategy(alignment_layout(self.model, self.cfg.loss.ctr, self.cfg.align.image))
        self.community: Optional[AlignmentState] = None
        self._central_test: Optional[list[Record]] = None

    def before_round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray]) -> None:
        """Round 1 of ``align.train_norm=mixed`` starts from a statistics-only pass."""
        if rnd == 1 and self.cfg.align.train_norm == "mixed" and self.cfg.align.round1 == "stats":
            self.strategy.alignment = self._query_state(grid, P.QUERY_STATS, arrays, {P.BATCHES: 4})

    def after_round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray], row: dict[str, Any]) -> None:
        # per-language P_l statistics: every evaluated round with eval_norm=community,
        # and always at the end, so that the export supports both eval norms
        if self.cfg.align.eval_norm == "community" or rnd == self.cfg.fed.rounds:
            # a community without a reply this time keeps its last statistics
            fresh = self._query_state(grid, P.QUERY_COMMUNITY, arrays, {})
            self.community = (self.community or AlignmentState()).replaced_by(fresh)
        row["sites_eval"] = self._evaluate_sites(grid, rnd, arrays)
        row["central"] = self._evaluate_central(arrays)

    def _query_state(self, grid: Grid, message_type: str, arrays: dict[str, np.ndarray], config: dict) -> AlignmentState:
        """Alignment sums from every site (statistics pass or community statistics)."""
        if message_type == P.QUERY_STATS:
            layout = alignment_layout(self.model, self.cfg.loss.ctr, self.cfg.align.image)
            most = int(config[P.BATCHES]) * self.cfg.train.batch_size
        else:  # P_l's statistics over a site's training reports
            layout = alignment_layout(self.model, ctr=False, heads=("text_head.",))
            most = self.cfg.fed.max_site_records
        got = broadcast(grid, self.federation.nodes(grid, message_type), self.content(arrays, **config), message_type,
                        self.cfg.fed.round_timeout, self.federation.identities,
                        lambda content, community: check_alignment_reply(content, community, layout, most), message_type)
        self._note_invalid(message_type, got.invalid)
        state = AlignmentState()
        for part in got.accepted.values():
            state = state.merged(part)
        return state

    def _evaluate_sites(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        content = self.content(arrays, **{P.SERVER_ROUND: rnd})
        if self.community is not None and self.cfg.align.eval_norm == "community":
            content[P.ALIGN] = arrays_record(self.community.to_flat())
        got = broadcast(grid, self.federation.nodes(grid, "evaluate"), content, MessageType.EVALUATE,
                        self.cfg.fed.round_timeout, self.federation.identities,
                        lambda c, _: check_evaluate_reply(c, self.cfg.fed.max_site_records), f"evaluate, round {rnd}")
        self._note_invalid(MessageType.EVALUATE, got.invalid)
        return {site: {"community": got.communities[site], P.NUM_EXAMPLES: n, **metrics}
                for site, (n, metrics) in got.accepted.items()}

    def _evaluate_central(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """The global model on the coordinator's held-out set (public data), if it has one."""
        if not heldout_manifest(self.cfg).is_file():
            return {}
        load_arrays(self.model, arrays)
        cache = ImageCache(self.cfg.data.cache_dir, self.cfg.model.image.cache_size)
        if self._central_test is None:  # read and decode the held-out set once per run
            self._central_test = prepare_images(heldout_records(self.cfg), cache, 1.0, progress=False)[0]
        test = self._central_test
        community = self.community if self.cfg.align.eval_norm == "community" else None
        langs = [lang for lang in self.cfg.data.langs if community is None or lang in community.communities]
        if len(langs) < len(self.cfg.data.langs):
            log.warning("central evaluation without %s: no site of that community has sent statistics yet",
                        sorted(set(self.cfg.data.langs) - set(langs)))
        test = [r for r in test if r.lang in langs]
        if not test:  # e.g. every site refused the run: nothing to normalise the reports by
            log.warning("central evaluation skipped: no held-out pair of a community with statistics")
            return {}
        res = evaluate_model(self.model, self.tokenizer, self.cfg, test, community=community, full=False,
                             cache=cache, prompt_langs=langs)
        out: dict[str, Any] = {f"zeroshot_{lang}": z["macro_auc"] for lang, z in res["zeroshot"].items()}
        if "retrieval" in res:
            out.update({k: v for k, v in res["retrieval"]["mean"].items()})
            bias = res["bias"]["text"]
            out.update({f"bias_{k}": v for k, v in bias.items() if isinstance(v, (int, float))})
        return out

    def state(self) -> dict[str, Any]:
        return {"community": self.community.to_flat() if self.community else None}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.community = AlignmentState.from_flat(state["community"]) if state.get("community") else None

    def export(self, arrays: dict[str, np.ndarray]) -> Path:
        load_arrays(self.model, arrays)
        folder = export_model(self.model, self.cfg, self.cfg.train.tokenizer, self.out / EXPORT_DIR, self.community)
        if Path(self.cfg.data.manifest).is_file() and heldout_manifest(self.cfg).is_file():
            evaluate(folder, folder / "eval", progress=False)
        log.info("exported the final model to %s; report: %s", folder, write_federated_report(self.out))
        return folder


class VocabStage:
    """The vocabulary stage (Stage 1 of MEDUNIC.md): one exchange of word counts; the
    coordinator adds them per language community and builds the tokenizer from the sums
    (medunic_core.vocab.build_tokenizer_from_counts): extending ``vocab.base`` with the most
    frequent ``vocab.extend_lang`` words, or training WordPiece when there is no base."""

    def __init__(self, federation: Federation) -> None:
        self.federation, self.cfg = federation, federation.cfg
        self.out = Path(self.cfg.fed.out_dir)

    def run(self, grid: Grid) -> Path:
        vocab, fed = self.cfg.vocab, self.cfg.fed
        content = RecordDict({P.CONFIG: ConfigRecord(self.federation.message_config(**{P.STAGE: "vocab"}))})
        counted = [lang for lang in LANGUAGES if counts_language(vocab, lang)]
        got = broadcast(grid, self.federation.nodes(grid, "vocabulary stage"), content, P.QUERY_VOCAB,
                        fed.round_timeout, self.federation.identities,
                        lambda c, community: check_vocab_reply(c, community, counted, vocab.min_df,
                                                               fed.max_site_records),
                        "vocabulary stage")
        counts: dict[str, Counter] = {}
        reports: Counter = Counter()
        sites: dict[str, dict[str, int]] = {}
        for site, per_language in got.accepted.items():
            sites[site] = {lang: n for lang, (_, n) in per_language.items()}
            for lang, (words, n) in per_language.items():
                counts.setdefault(lang, Counter()).update(words)
                reports[lang] += n
        minimum = self.federation.sizes()[1]
        if len(sites) < minimum:
            raise FederationError(f"vocabulary stage: {len(sites)} site(s) answered usably, {minimum} needed "
                                  f"(rejected: {got.invalid}; failed: {got.failed})")
        folder = self.out / TOKENIZER_DIR
        tokenizer = build_tokenizer_from_counts(vocab, counts, dict(reports), folder, self.cfg.model.text.max_length)
        summary = {"sites": sites, "invalid": got.invalid, "failed": got.failed,
                   "words_received": {lang: len(c) for lang, c in counts.items()},
                   "vocab_size": len(tokenizer), "sha256": vocab_sha256(tokenizer), "tokenizer": str(folder)}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / VOCAB_SUMMARY).write_text(json.dumps(summary, indent=1))
        log.info("vocabulary stage: %s", json.dumps(summary))
        return folder


STAGES = {"vocab": VocabStage, "mlm": MlmStage, "vlp": VlpStage}
