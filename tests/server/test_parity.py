"""A one-site federation of R rounds x S local steps is centralized training of R x S steps
on the site's data: the site carries its AdamW moments, data stream and RNG over the rounds
(medunic_core.round_state), and averaging one site changes nothing. On CPU the two are
equal to the last bit, losses and weights, so that any gap a larger federation shows is
the federation's own (averaging, non-IID sites), not the round mechanics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medunic_core.checkpoint import load_checkpoint
from medunic_core.config import load_config
from medunic_core.federation.runconfig import load_run_config
from medunic_core.train import train
from server.stages import Federation, VlpStage
from tests.inprocess import InProcessGrid

ROUNDS, STEPS = 3, 2


def _one_site(synthetic_data: Path, tmp_path: Path) -> Path:
    rows = [json.loads(x) for x in synthetic_data.read_text().splitlines()]
    manifest = synthetic_data.parent / "en-1-only.jsonl"  # beside it: image paths stay valid
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows if r["site"] == "en-1"))
    return manifest


def _federated(run_config, *extra: str) -> tuple[list[float], dict[str, np.ndarray]]:
    rc = run_config(f"fed.rounds={ROUNDS}", f"fed.local_steps={STEPS}", "align.round1=local", *extra)
    rc["sites"] = "en-1:en"
    VlpStage(Federation.from_run_config(rc)).run(InProcessGrid(rc, num_nodes=1))
    out = Path(load_run_config(rc).fed.out_dir)
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    return [r["train"]["train_loss"] for r in rows], load_checkpoint(out / "server_checkpoint.pt")["arrays"]


def test_a_one_site_federation_trains_exactly_as_centralized(synthetic_data, fed_tokenizer, tmp_path, train_overrides,
                                                             run_config):
    manifest = _one_site(synthetic_data, tmp_path)
    cfg = load_config("tiny", [*train_overrides(manifest, tmp_path / "central"), f"train.tokenizer={fed_tokenizer}",
                               f"train.max_steps={ROUNDS * STEPS}", "train.warmup_steps=1",
                               f"data.cache_dir={synthetic_data.parent / 'cache'}"])
    train(cfg, progress=False)
    steps = [json.loads(x)["loss"] for x in (tmp_path / "central" / "metrics.jsonl").read_text().splitlines()]
    central = [float(np.mean(steps[r * STEPS:(r + 1) * STEPS])) for r in range(ROUNDS)]
    weights = load_checkpoint(tmp_path / "central" / "checkpoint.pt")["model"]

    kept, arrays = _federated(run_config)
    assert kept == central  # every round's mean loss, to the last bit
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, weights[name].numpy(), err_msg=name)

    # a site that restarts AdamW every round does not: rounds 2 and 3 move away
    reset, _ = _federated(run_config, "fed.site_optimizer=reset", f"fed.out_dir={tmp_path / 'reset'}")
    assert reset[0] == kept[0] and reset[1:] != kept[1:]
