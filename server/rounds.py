"""The coordinator's round loop: train, merge the alignment state, evaluate, checkpoint.

Flower's ``Strategy.start`` always begins at round 1, so the loop is ours: it calls the
strategy's configure/aggregate methods round by round, which lets a restarted
coordinator resume after the last completed round with the same weights, alignment state
and server-optimizer state. Every round appends one JSON line to ``rounds.jsonl`` (and
to wandb, offline by default); the end exports the model (medunic_core.export) and
evaluates it with ``medunic eval`` and writes the run's report (server.report).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.serverapp import Grid

from client.site import build_model, run_medunic_config
from medunic_core import __version__
from medunic_core.align import AlignmentState, alignment_layout
from medunic_core.checkpoint import atomic_save, check_finite, load_checkpoint
from medunic_core.config import save_config, to_dict
from medunic_core.data.dataset import prepare_images
from medunic_core.data.manifest import Record, read_manifest
from medunic_core.data.preprocess import ImageCache
from medunic_core.errors import ConfigError
from medunic_core.evaluation.run import evaluate, evaluate_model
from medunic_core.exchange import arrays_sha256, load_arrays, model_arrays
from medunic_core.export import export_model
from medunic_core.federation import payload as P
from medunic_core.federation.replies import check_alignment_reply, check_evaluate_reply
from medunic_core.train import start_wandb
from medunic_core.vocab import load_tokenizer, vocab_sha256
from server.messages import arrays_record, broadcast, record_arrays
from server.registry import site_identities
from server.report import write_federated_report
from server.strategy import MedUniCAggregation, federation_size, make_strategy, wait_for_sites

log = logging.getLogger("flwr.medunic")  # Flower's handlers: streamed by `flwr run --stream`

SERVER_CHECKPOINT = "server_checkpoint.pt"
ROUNDS_FILE = "rounds.jsonl"
EXPORT_DIR = "model"


class FederatedRun:
    """One federated Med-UniC run, built from Flower's run config."""

    def __init__(self, run_config: Mapping[str, Any]) -> None:
        self.cfg = run_medunic_config(run_config)
        self.out = Path(self.cfg.fed.out_dir)
        self.num_sites, self.min_sites = federation_size(self.cfg, run_config)
        self.tokenizer_dir = str(run_config.get("tokenizer", "") or "")
        if not self.tokenizer_dir:
            raise ConfigError("run config 'tokenizer' (the run's tokenizer folder) is not set")
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.vocab_sha = vocab_sha256(self.tokenizer)
        self.identities = site_identities(self.cfg.data.langs, run_config)
        self.model = self._build_model()
        self.strategy = self._make_strategy()
        self.community: Optional[AlignmentState] = None
        self.resumed: Optional[dict[str, Any]] = None  # what _restore loaded, for the first resumed row
        self.run_key = secrets.token_hex(8)  # names this run in the sites' privacy ledgers; kept on resume
        self._central_test: Optional[list[Record]] = None
        self._invalid: dict[str, dict[str, str]] = {}  # exchange -> site -> why its reply was rejected

    # -- the loop ---------------------------------------------------------------------
    def run(self, grid: Grid) -> Path:
        fed = self.cfg.fed
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "config.yaml")
        arrays, start = model_arrays(self.model), 1
        ckpt = self.out / SERVER_CHECKPOINT
        if fed.resume and ckpt.is_file():
            arrays, start = self._restore(ckpt)
            log.info("resuming after round %d from %s: %s", start - 1, ckpt, json.dumps(self.resumed))
            self._drop_rows_from(start)
        elif (self.out / ROUNDS_FILE).exists():
            (self.out / ROUNDS_FILE).unlink()
        wandb_run = start_wandb(self.cfg, self.out) if self.cfg.logging.wandb else None
        for rnd in range(start, fed.rounds + 1):
            t0 = time.perf_counter()
            self._before_round(grid, rnd, arrays)
            messages = self.strategy.configure_train(rnd, arrays_record(arrays), ConfigRecord({"run-key": self.run_key}),
                                                    grid)
            replies = grid.send_and_receive(messages, timeout=fed.round_timeout)
            aggregated, metrics = self.strategy.aggregate_train(rnd, replies)
            row: dict[str, Any] = {"round": rnd, **self.strategy.last_round}
            row["invalid"] = {P.TRAIN: row["invalid"]} if row.get("invalid") else {}
            row["invalid"].update(self._invalid)
            self._invalid = {}
            if rnd == start and self.resumed:
                row["resumed"] = self.resumed
            if aggregated is None:
                log.error("round %d: no usable update (failed or rejected); weights unchanged", rnd)
            else:
                arrays = record_arrays(aggregated, np.float32)
                row["train"] = {k: float(v) for k, v in (metrics or {}).items()}
            if rnd % fed.eval_every == 0 or rnd == fed.rounds:
                self._evaluate_round(grid, rnd, arrays, row)
            row["seconds"] = time.perf_counter() - t0
            with (self.out / ROUNDS_FILE).open("a") as f:  # the row first: a resume redoes its round
                f.write(json.dumps(row) + "\n")
            self._save(ckpt, rnd, arrays)
            if wandb_run:
                wandb_run.log(_flatten(row), step=rnd)
            log.info("round %d done in %.1f s: %s", rnd, row["seconds"], json.dumps(row.get("central", {}))[:300])
        if wandb_run:
            wandb_run.finish()
        return self._export(arrays)

    # -- what a stage changes (server.mlm overrides these) ------------------------------
    def _build_model(self) -> torch.nn.Module:
        return build_model(self.cfg, self.tokenizer)

    def _make_strategy(self) -> MedUniCAggregation:
        layout = alignment_layout(self.model, self.cfg.loss.ctr, self.cfg.align.image)
        return make_strategy(self.cfg, self.num_sites, self.vocab_sha, layout=layout, identities=self.identities)

    def _before_round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray]) -> None:
        """Round 1 of ``align.train_norm=mixed`` starts from a statistics-only pass."""
        if rnd == 1 and self.cfg.align.train_norm == "mixed" and self.cfg.align.round1 == "stats":
            self.strategy.alignment = self._query_state(grid, P.QUERY_STATS, arrays, {P.BATCHES: 4})

    def _evaluate_round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray], row: dict[str, Any]) -> None:
        # per-language P_l statistics: every evaluated round with eval_norm=community,
        # and always at the end, so that the export supports both eval norms
        if self.cfg.align.eval_norm == "community" or rnd == self.cfg.fed.rounds:
            # a community without a reply this time keeps its last statistics
            fresh = self._query_state(grid, P.QUERY_COMMUNITY, arrays, {})
            self.community = (self.community or AlignmentState()).replaced_by(fresh)
        row["sites_eval"] = self._evaluate_sites(grid, rnd, arrays)
        row["central"] = self._evaluate_central(arrays)

    # -- messages ---------------------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        return wait_for_sites(grid, self.num_sites, self.min_sites, self.cfg.fed.site_wait, "coordinator")

    def _content(self, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> RecordDict:
        return RecordDict(
            {
                P.ARRAYS: arrays_record(arrays, P.WIRE_DTYPES[self.cfg.fed.wire_dtype]),
                P.CONFIG: ConfigRecord({P.VOCAB_SHA: self.vocab_sha, P.APP_VERSION: __version__, **config}),
            }
        )

    def _query_state(self, grid: Grid, message_type: str, arrays: dict[str, np.ndarray], config: dict) -> AlignmentState:
        """Alignment sums from every site (statistics pass or community statistics)."""
        if message_type == P.QUERY_STATS:
            layout = alignment_layout(self.model, self.cfg.loss.ctr, self.cfg.align.image)
            most = int(config[P.BATCHES]) * self.cfg.train.batch_size
        else:  # P_l's statistics over a site's training reports
            layout = alignment_layout(self.model, ctr=False, heads=("text_head.",))
            most = self.cfg.fed.max_site_records
        got = broadcast(grid, self._wait_for_nodes(grid), self._content(arrays, config), message_type,
                        self.cfg.fed.round_timeout, self.identities,
                        lambda content, community: check_alignment_reply(content, community, layout, most), message_type)
        self._note_invalid(message_type, got.invalid)
        state = AlignmentState()
        for part in got.accepted.values():
            state = state.merged(part)
        return state

    def _evaluate_sites(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        content = self._content(arrays, {P.SERVER_ROUND: rnd})
        if self.community is not None and self.cfg.align.eval_norm == "community":
            content[P.ALIGN] = arrays_record(self.community.to_flat())
        got = broadcast(grid, self._wait_for_nodes(grid), content, MessageType.EVALUATE, self.cfg.fed.round_timeout,
                        self.identities, lambda c, _: check_evaluate_reply(c, self.cfg.fed.max_site_records),
                        f"evaluate, round {rnd}")
        self._note_invalid(MessageType.EVALUATE, got.invalid)
        return {site: {"community": got.communities[site], P.NUM_EXAMPLES: n, **metrics}
                for site, (n, metrics) in got.accepted.items()}

    def _note_invalid(self, exchange: str, invalid: dict[str, str]) -> None:
        if invalid:
            self._invalid.setdefault(exchange, {}).update(invalid)

    def _evaluate_central(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """The global model on the coordinator's held-out set (public data), if it has one."""
        manifest = Path(self.cfg.data.manifest)
        if not manifest.is_file():
            return {}
        load_arrays(self.model, arrays)
        cache = ImageCache(self.cfg.data.cache_dir, self.cfg.model.image.cache_size)
        if self._central_test is None:  # read and decode the held-out set once per run
            test = [r for r in read_manifest(manifest, self.cfg.data.langs) if r.split == self.cfg.eval.split]
            self._central_test = prepare_images(test, cache, 1.0, progress=False)[0]
        test = self._central_test
        community = self.community if self.cfg.align.eval_norm == "community" else None
        langs = [lang for lang in self.cfg.data.langs if community is None or lang in community.communities]
        if len(langs) < len(self.cfg.data.langs):
            log.warning("central evaluation without %s: no site of that community has sent statistics yet",
                        sorted(set(self.cfg.data.langs) - set(langs)))
        test = [r for r in test if r.lang in langs]
        res = evaluate_model(self.model, self.tokenizer, self.cfg, test, community=community, full=False,
                             cache=cache, prompt_langs=langs)
        out: dict[str, Any] = {f"zeroshot_{lang}": z["macro_auc"] for lang, z in res["zeroshot"].items()}
        if "retrieval" in res:
            out.update({k: v for k, v in res["retrieval"]["mean"].items()})
            bias = res["bias"]["text"]
            out.update({f"bias_{k}": v for k, v in bias.items() if isinstance(v, (int, float))})
        return out

    # -- checkpoint, export -----------------------------------------------------------
    def _save(self, path: Path, rnd: int, arrays: dict[str, np.ndarray]) -> None:
        check_finite(arrays, f"{path} after round {rnd}")  # validated replies average to finite weights
        atomic_save(
            {
                "round": rnd,
                "arrays": arrays,
                "alignment": self.strategy.alignment.to_flat(),
                "community": self.community.to_flat() if self.community else None,
                "strategy": self.strategy.state(),
                "vocab_sha": self.vocab_sha,
                "run_key": self.run_key,
                "config": to_dict(self.cfg),
            },
            path,
        )

    def _restore(self, path: Path) -> tuple[dict[str, np.ndarray], int]:
        state = load_checkpoint(path)
        if state.get("vocab_sha") != self.vocab_sha:
            raise ConfigError(f"{path} was written with vocabulary {state.get('vocab_sha')}, this run has {self.vocab_sha}")
        load_arrays(self.model, state["arrays"])  # refuses a checkpoint of another architecture
        self.strategy.alignment = AlignmentState.from_flat(state["alignment"])
        self.community = AlignmentState.from_flat(state["community"]) if state.get("community") else None
        self.strategy.load_state(state["strategy"])
        self.resumed = {"after_round": int(state["round"]), "weights_sha256": arrays_sha256(model_arrays(self.model)),
                        "alignment_sha256": arrays_sha256(self.strategy.alignment.to_flat())}
        self.run_key = state.get("run_key", self.run_key)
        return state["arrays"], int(state["round"]) + 1

    def _drop_rows_from(self, start: int) -> None:
        """Keep the rows.jsonl rows of the rounds before ``start``: a row written just before the
        coordinator died (its checkpoint not yet saved) belongs to a round the resume redoes."""
        path = self.out / ROUNDS_FILE
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line)["round"]) < start:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut off by the crash
                continue
        path.write_text("".join(kept))

    def _export(self, arrays: dict[str, np.ndarray]) -> Path:
        load_arrays(self.model, arrays)
        folder = export_model(self.model, self.cfg, self.tokenizer_dir, self.out / EXPORT_DIR, self.community)
        if Path(self.cfg.data.manifest).is_file():
            evaluate(folder, folder / "eval", progress=False)
        log.info("exported the final model to %s; report: %s", folder, write_federated_report(self.out))
        return folder


def _flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out
