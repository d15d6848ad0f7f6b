"""The coordinator's round loop over the real ClientApp (in-process grid): logs,
export, alignment state, and resume after a coordinator crash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Error, Message

from client.app import LOCAL_BN
from client.records import record_arrays
from medunic_core.errors import ConfigError, FederationError
from medunic_core.evaluation.run import community_stats_of_run, load_run
from medunic_core.exchange import arrays_sha256, model_arrays
from server.rounds import ROUNDS_FILE, SERVER_CHECKPOINT
from server.stages import EXPORT_DIR, Federation, VlpStage
from tests.inprocess import InProcessGrid


def FederatedRun(run_config: dict) -> VlpStage:  # noqa: N802 -- reads like the run it builds
    return VlpStage(Federation.from_run_config(run_config))


class CrashingGrid(InProcessGrid):
    """Dies when the coordinator sends the training messages of ``crash_round``."""

    def __init__(self, run_config: dict, crash_round: int) -> None:
        super().__init__(run_config)
        self.crash_round = crash_round

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train" and m.content["config"]["server-round"] == self.crash_round
               for m in messages):
            raise RuntimeError("coordinator killed")
        return super().send_and_receive(messages, timeout)


def _final_arrays(run_dir) -> dict[str, np.ndarray]:
    return torch.load(run_dir / SERVER_CHECKPOINT, weights_only=False)["arrays"]


def test_two_rounds_mixed_norm_export_and_report(run_config, tmp_path):
    rc = run_config("align.train_norm=mixed", "align.eval_norm=community")
    grid = InProcessGrid(rc)
    run = FederatedRun(rc)
    export = run.run(grid)

    types = [m.metadata.message_type for m in grid.sent]
    assert types[:2] == ["query.stats", "query.stats"]  # round 1 starts from a statistics pass
    assert types.count("train") == 4 and types.count("query.community") == 4 and types.count("evaluate") == 4
    round2_train = [m for m in grid.sent if m.metadata.message_type == "train"][2]
    assert sorted({k.split("/")[0] for k in round2_train.content["align"].keys()}) == ["en", "es"]

    rows = [json.loads(line) for line in (run.out / ROUNDS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert sorted(r["sites"]) == ["en-1", "es-1"] and r["rejected"] == [] and r["failed"] == 0
        assert np.isfinite(r["train"]["train_loss"]) and r["train"]["train_tf_loss"] > 0
        assert set(r["sites_eval"]) == {"en-1", "es-1"}
        assert 0 <= r["central"]["zeroshot_en"] <= 1 and 0 <= r["central"]["R@5"] <= 1
        assert "bias_silhouette_lang" in r["central"]

    # the export is a run folder for `medunic eval` and carries the community statistics
    cfg, _, model = load_run(export)
    assert cfg.align.eval_norm == "community"
    assert community_stats_of_run(export / "checkpoint.pt").communities == ["en", "es"]
    assert (export / "eval" / "eval.json").is_file()
    assert (export / "text_encoder" / "config.json").is_file() and (export / "image_encoder" / "config.json").is_file()
    import timm
    from transformers import AutoModel

    AutoModel.from_pretrained(export / "text_encoder", local_files_only=True)
    timm.create_model(f"local-dir:{export / 'image_encoder'}", pretrained=True)


def test_coordinator_restart_resumes_with_the_same_weights(run_config, tmp_path):
    straight = run_config(f"fed.out_dir={tmp_path / 'straight'}", "align.train_norm=mixed", "fed.strategy=fedadam")
    FederatedRun(straight).run(InProcessGrid(straight))

    crashed = run_config(f"fed.out_dir={tmp_path / 'crashed'}", "align.train_norm=mixed", "fed.strategy=fedadam")
    with pytest.raises(RuntimeError, match="coordinator killed"):
        FederatedRun(crashed).run(CrashingGrid(crashed, crash_round=2))
    saved = torch.load(tmp_path / "crashed" / SERVER_CHECKPOINT, weights_only=False)
    assert saved["round"] == 1
    with (tmp_path / "crashed" / ROUNDS_FILE).open("a") as f:  # as if it died after round 2's row, before its save
        f.write(json.dumps({"round": 2, "stale": True}) + "\n")
    other = run_config(f"fed.out_dir={tmp_path / 'crashed'}", "align.train_norm=mixed", "fed.strategy=fedadam",
                       "fed.rounds=3", "fed.round_timeout=60")
    with pytest.raises(ConfigError, match=r"written by a run of other settings \(fed.rounds 2 -> 3\): .*fed.resume=false"):
        FederatedRun(other).run(InProcessGrid(other))  # a checkpoint continues the run that wrote it only
    resumed_grid = InProcessGrid(crashed)
    FederatedRun(crashed).run(resumed_grid)
    assert [m.content["config"]["server-round"] for m in resumed_grid.sent
            if m.metadata.message_type == "train"] == [2, 2]  # nothing redone, nothing lost

    a, b = _final_arrays(tmp_path / "straight"), _final_arrays(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    rows = [json.loads(x) for x in (tmp_path / "crashed" / ROUNDS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and "stale" not in rows[1]
    assert rows[1]["resumed"] == {"after_round": 1, "weights_sha256": arrays_sha256(saved["arrays"]),
                                  "alignment_sha256": arrays_sha256(saved["alignment"])}
    assert "resumed" not in rows[0]
    assert (tmp_path / "crashed" / EXPORT_DIR / "checkpoint.pt").is_file()


def test_fedbn_sites_keep_their_own_batchnorms(run_config):
    rc = run_config("fed.bn=local", "align.round1=local", "align.train_norm=mixed")
    grid = InProcessGrid(rc)
    FederatedRun(rc).run(grid)
    assert "query.stats" not in [m.metadata.message_type for m in grid.sent]  # round 1 trained locally
    kept = [record_arrays(ctx.state[LOCAL_BN]) for ctx in grid.contexts.values()]
    assert kept[0] and kept[0].keys() == kept[1].keys()
    assert all(".mlp.1." in k or ".norm." in k for k in kept[0])  # BatchNorm entries only
    # each site's BatchNorm statistics are its own, not the average
    assert any(not np.allclose(kept[0][k], kept[1][k]) for k in kept[0] if k.endswith("running_mean"))


class LosingGrid(InProcessGrid):
    """Node 2 answers round 1 with an error (it died mid-round) and is gone afterwards."""

    def get_node_ids(self):
        return [1] if self.lost else [1, 2]

    lost = False

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train" for m in messages) and not self.lost:
            self.lost = True
            alive = [m for m in messages if m.metadata.dst_node_id == 1]
            died = [Message(Error(code=0, reason="site died mid-round"), reply_to=m)
                    for m in messages if m.metadata.dst_node_id == 2]
            return super().send_and_receive(alive, timeout) + died
        return super().send_and_receive(messages, timeout)


def test_a_site_lost_mid_round_does_not_stop_the_run(run_config):
    rc = run_config("fed.min_sites=1", "fed.site_wait=0.5")
    run = FederatedRun(rc)
    run.run(LosingGrid(rc))
    rows = [json.loads(x) for x in (run.out / ROUNDS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["failed"] == 1 and rows[0]["sites"] == ["en-1"]  # round 1 aggregated the survivor
    assert rows[1]["failed"] == 0 and rows[1]["sites"] == ["en-1"]  # round 2 went on without waiting forever


class RefusingGrid(InProcessGrid):
    """Every site refuses every message (a site that does not allow the run's app)."""

    def send_and_receive(self, messages, timeout=None):
        return [Message(Error(code=0, reason="site refused the app"), reply_to=m) for m in messages]


def test_a_run_that_every_site_refuses_keeps_its_weights_and_does_not_crash(run_config):
    """No round has an update, and no community sent statistics, so community-normalised
    central evaluation has nothing to evaluate: it is skipped (it crashed the ServerApp)."""
    rc = run_config("align.eval_norm=community")
    run = FederatedRun(rc)
    start = {k: v.copy() for k, v in model_arrays(run.model).items()}
    run.run(RefusingGrid(rc))
    rows = [json.loads(x) for x in (run.out / ROUNDS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["failed"] == 2 and r["sites"] == [] and not r.get("central") for r in rows)
    final = _final_arrays(run.out)
    assert all(np.array_equal(final[k], v) for k, v in start.items())


def test_too_few_sites_stop_the_run_with_a_clear_message(run_config):
    rc = run_config("fed.site_wait=0.3")  # min_sites defaults to all sites
    grid = LosingGrid(rc)
    grid.lost = True
    with pytest.raises(FederationError, match=r"only 1 of 2 sites connected after 0 s.*fed.min_sites"):
        FederatedRun(rc).run(grid)


def test_dp_run_reports_each_sites_epsilon_per_round(run_config):
    """Update-level DP: every round logs each site's spent epsilon, equal to Opacus's RDP
    accountant computed here for the same settings; the report has the privacy table."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants import RDPAccountant

    rc = run_config("dp.updates.enabled=true", "dp.updates.delta=1e-5", "dp.updates.epsilon=20", "dp.updates.clip=5",
                    "fed.eval_every=2")
    run = FederatedRun(rc)
    run.run(InProcessGrid(rc))
    rows = [json.loads(line) for line in (run.out / ROUNDS_FILE).read_text().splitlines()]
    orders = RDPAccountant.DEFAULT_ALPHAS
    for r in rows:
        assert set(r["privacy"]) == {"en-1", "es-1"}
        for p in r["privacy"].values():
            assert p["releases"] == r["round"] and p["delta"] == 1e-5 and p["clip"] == 5
            # sensitivity 2 x clip, noise std noise_multiplier x clip, q = 1, one release per round
            rdp = compute_rdp(q=1.0, noise_multiplier=p["noise_multiplier"] / 2, steps=r["round"], orders=orders)
            assert p["epsilon"] == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0], rel=1e-9)
    assert 19.8 <= rows[-1]["privacy"]["en-1"]["epsilon"] <= 20  # the target over fed.rounds releases
    report = (run.out / "report" / "report.md").read_text()
    assert "epsilon (max over sites)" in report and "## Differential privacy" in report
    assert "Not covered by epsilon: alignment sums" in report
