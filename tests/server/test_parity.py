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


def _one_site(synthetic_data: Path, site: str) -> Path:
    """A manifest of one site: en-1's rows, or for ``mix-1`` every row (en-1's and es-1's)
    as one site of en+es."""
    rows = [json.loads(x) for x in synthetic_data.read_text().splitlines()]
    rows = [{**r, "site": "mix-1"} for r in rows] if site == "mix-1" else [r for r in rows if r["site"] == site]
    manifest = synthetic_data.parent / f"{site}-only.jsonl"  # beside it: image paths stay valid
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _federated(run_config, sites: str, manifest: Path, *extra: str) -> tuple[list[float], dict[str, np.ndarray]]:
    rc = run_config(f"fed.rounds={ROUNDS}", f"fed.local_steps={STEPS}", "align.round1=local",
                    f"data.manifest={manifest}", *extra)
    rc["sites"] = sites
    VlpStage(Federation.from_run_config(rc)).run(InProcessGrid(rc, num_nodes=1))
    out = Path(load_run_config(rc).fed.out_dir)
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    return [r["train"]["train_loss"] for r in rows], load_checkpoint(out / "server_checkpoint.pt")["arrays"]


def _centralized(manifest: Path, synthetic_data: Path, fed_tokenizer: Path, out: Path, train_overrides, *extra: str):
    cfg = load_config("tiny", [*train_overrides(manifest, out), f"train.tokenizer={fed_tokenizer}",
                               f"train.max_steps={ROUNDS * STEPS}", "train.warmup_steps=1",
                               f"data.cache_dir={synthetic_data.parent / 'cache'}", *extra])
    train(cfg, progress=False)
    steps = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [float(np.mean(steps[r * STEPS:(r + 1) * STEPS])) for r in range(ROUNDS)], \
        load_checkpoint(out / "checkpoint.pt")["model"]


def test_a_one_site_federation_trains_exactly_as_centralized(synthetic_data, fed_tokenizer, tmp_path, train_overrides,
                                                             run_config):
    manifest = _one_site(synthetic_data, "en-1")
    central, weights = _centralized(manifest, synthetic_data, fed_tokenizer, tmp_path / "central", train_overrides)
    kept, arrays = _federated(run_config, "en-1:en", manifest)
    assert kept == central  # every round's mean loss, to the last bit
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, weights[name].numpy(), err_msg=name)

    # a site that restarts AdamW every round does not: rounds 2 and 3 move away
    reset, _ = _federated(run_config, "en-1:en", manifest, "fed.site_optimizer=reset",
                          f"fed.out_dir={tmp_path / 'reset'}")
    assert reset[0] == kept[0] and reset[1:] != kept[1:]


def test_without_ssv_a_one_site_federation_still_trains_exactly_as_centralized(synthetic_data, fed_tokenizer, tmp_path,
                                                                               train_overrides, run_config):
    """``loss.ssv_weight=0`` skips the strong view in a site's round as in centralized training."""
    manifest = _one_site(synthetic_data, "en-1")
    central, weights = _centralized(manifest, synthetic_data, fed_tokenizer, tmp_path / "central", train_overrides,
                                    "loss.ssv_weight=0")
    kept, arrays = _federated(run_config, "en-1:en", manifest, "loss.ssv_weight=0")
    assert kept == central
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, weights[name].numpy(), err_msg=name)


def test_a_site_of_both_languages_trains_exactly_as_centralized_on_its_data(synthetic_data, fed_tokenizer, tmp_path,
                                                                           train_overrides, run_config):
    """An en+es site under train_norm=mixed: its batches hold both communities, so it mixes no
    stored moments in and normalises over the batch, as centralized training does; under
    train_norm=local it standardises each language on its own and trains differently."""
    manifest = _one_site(synthetic_data, "mix-1")
    central, weights = _centralized(manifest, synthetic_data, fed_tokenizer, tmp_path / "central", train_overrides)
    mixed, arrays = _federated(run_config, "mix-1:en+es", manifest, "align.train_norm=mixed")
    assert mixed == central
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, weights[name].numpy(), err_msg=name)
    local, _ = _federated(run_config, "mix-1:en+es", manifest, "align.train_norm=local",
                          f"fed.out_dir={tmp_path / 'local'}")
    assert local[0] != central[0]
