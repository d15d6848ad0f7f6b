"""The coordinator's round loop of a stage that trains weights (``mlm``, ``vlp``).

Flower's ``Strategy.start`` always begins at round 1, so the loop is ours: it calls the
stage's strategy round by round (configure, send, aggregate), lets the stage act before
and after each round (a statistics pass, evaluations), and keeps, in one place, what makes
a run resumable and readable: every round appends one JSON line to ``rounds.jsonl`` (and
to wandb, offline by default) and then writes ``server_checkpoint.pt`` atomically
(weights, alignment state, server-optimizer state, the stage's own state, the run key).
A restarted coordinator resumes after the last completed round; the end exports the
model through the stage.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from torch import nn

from medunic_core.align import AlignmentState
from medunic_core.checkpoint import atomic_save, check_finite, load_checkpoint
from medunic_core.config import MedUniCConfig, check_resumable, flatten, save_config, to_dict
from medunic_core.errors import ConfigError
from medunic_core.exchange import arrays_sha256, load_arrays, model_arrays
from medunic_core.federation import payload as P
from medunic_core.train import start_wandb
from server.messages import arrays_record, record_arrays
from server.strategy import MedUniCAggregation

log = logging.getLogger("flwr.medunic")  # Flower's handlers: streamed by `flwr run --stream`

SERVER_CHECKPOINT = "server_checkpoint.pt"
ROUNDS_FILE = "rounds.jsonl"


class WeightStage(Protocol):
    """What the round loop needs of a stage (server.stages.MlmStage, VlpStage)."""

    cfg: MedUniCConfig
    out: Path
    model: nn.Module
    strategy: MedUniCAggregation
    vocab_sha: str

    def message_config(self, **extra: Any) -> dict[str, Any]: ...
    def before_round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray]) -> None: ...
    def after_round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray], row: dict[str, Any]) -> None: ...
    def take_invalid(self) -> dict[str, dict[str, str]]: ...
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: Mapping[str, Any]) -> None: ...
    def export(self, arrays: dict[str, np.ndarray]) -> Path: ...


def run_rounds(stage: WeightStage, grid: Grid) -> Path:
    """``fed.rounds`` rounds of ``stage`` (resumed after the last checkpointed one), then its export."""
    fed, out = stage.cfg.fed, stage.out
    out.mkdir(parents=True, exist_ok=True)
    save_config(stage.cfg, out / "config.yaml")
    arrays, start, run_key, resumed = model_arrays(stage.model), 1, secrets.token_hex(8), None
    ckpt = out / SERVER_CHECKPOINT
    if fed.resume and ckpt.is_file():
        arrays, start, run_key, resumed = _restore(stage, ckpt)
        log.info("resuming after round %d from %s: %s", start - 1, ckpt, json.dumps(resumed))
        _drop_rows_from(out / ROUNDS_FILE, start)
    elif (out / ROUNDS_FILE).exists():
        (out / ROUNDS_FILE).unlink()
    wandb_run = start_wandb(stage.cfg, out) if stage.cfg.logging.wandb else None
    for rnd in range(start, fed.rounds + 1):
        t0 = time.perf_counter()
        stage.before_round(grid, rnd, arrays)
        # run_key names this run in the sites' privacy ledgers; kept on resume
        messages = stage.strategy.configure_train(rnd, arrays_record(arrays),
                                                  ConfigRecord(stage.message_config(**{P.RUN_KEY: run_key})), grid)
        sent = time.perf_counter()
        replies = grid.send_and_receive(messages, timeout=fed.round_timeout)
        exchange = time.perf_counter() - sent  # the sites' rounds as the coordinator waits for them
        aggregated, metrics = stage.strategy.aggregate_train(rnd, replies)
        row: dict[str, Any] = {"round": rnd, **stage.strategy.last_round, "train_exchange_seconds": exchange}
        row["invalid"] = {P.TRAIN: row["invalid"]} if row.get("invalid") else {}
        if rnd == start and resumed:
            row["resumed"] = resumed
        if aggregated is None:
            log.error("round %d: no usable update (failed or rejected); weights unchanged", rnd)
        else:
            arrays = record_arrays(aggregated, np.float32)
            row["train"] = {k: float(v) for k, v in (metrics or {}).items()}
        if rnd % fed.eval_every == 0 or rnd == fed.rounds:
            stage.after_round(grid, rnd, arrays, row)
        row["invalid"].update(stage.take_invalid())  # of the round's other exchanges
        row["seconds"] = time.perf_counter() - t0
        with (out / ROUNDS_FILE).open("a") as f:  # the row first: a resume redoes its round
            f.write(json.dumps(row) + "\n")
        _save(stage, ckpt, rnd, arrays, run_key)
        if wandb_run:
            wandb_run.log(_numbers(row), step=rnd)
        log.info("round %d done in %.1f s: %s", rnd, row["seconds"], json.dumps(row.get("central", {}))[:300])
    if wandb_run:
        wandb_run.finish()
    return stage.export(arrays)


def _save(stage: WeightStage, path: Path, rnd: int, arrays: dict[str, np.ndarray], run_key: str) -> None:
    check_finite(arrays, f"{path} after round {rnd}")  # validated replies average to finite weights
    atomic_save({"round": rnd, "arrays": arrays, "alignment": stage.strategy.alignment.to_flat(),
                 "strategy": stage.strategy.state(), "vocab_sha": stage.vocab_sha, "run_key": run_key,
                 "config": to_dict(stage.cfg), **stage.state()}, path)


def _restore(stage: WeightStage, path: Path) -> tuple[dict[str, np.ndarray], int, str, dict[str, Any]]:
    """(weights, first round to run, run key, what was loaded) from a server checkpoint."""
    state = load_checkpoint(path)
    check_resumable(state.get("config") or {}, stage.cfg, path, "fed.resume")
    if state.get("vocab_sha") != stage.vocab_sha:
        raise ConfigError(f"{path} was written with vocabulary {state.get('vocab_sha')}, this run has {stage.vocab_sha}")
    load_arrays(stage.model, state["arrays"])  # refuses a checkpoint of another architecture
    stage.strategy.alignment = AlignmentState.from_flat(state["alignment"])
    stage.strategy.load_state(state["strategy"])
    stage.load_state(state)
    resumed = {"after_round": int(state["round"]), "weights_sha256": arrays_sha256(model_arrays(stage.model)),
               "alignment_sha256": arrays_sha256(stage.strategy.alignment.to_flat())}
    return state["arrays"], int(state["round"]) + 1, str(state.get("run_key") or secrets.token_hex(8)), resumed


def _drop_rows_from(path: Path, start: int) -> None:
    """Keep the rows of the rounds before ``start``: a row written just before the
    coordinator died (its checkpoint not yet saved) belongs to a round the resume redoes."""
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


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """A round's row as wandb takes it: its numbers, nested keys joined by '/'."""
    return {k: float(v) for k, v in flatten(row, "/").items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
