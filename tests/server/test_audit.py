"""A site's audit log describes exactly what the coordinator received (the same SHA-256)."""

from __future__ import annotations

import json
from pathlib import Path

from medunic_core.federation.audit import content_sha256
from medunic_core.federation.runconfig import load_run_config
from server.messages import content_of
from server.stages import Federation, VlpStage
from tests.inprocess import InProcessGrid


class RecordingGrid(InProcessGrid):
    """Keeps every reply the coordinator received."""

    def __init__(self, run_config: dict) -> None:
        super().__init__(run_config)
        self.replies = []

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        self.replies += replies
        return replies


def test_every_reply_is_in_the_sites_audit_log_with_the_digest_the_coordinator_computes(run_config):
    rc = run_config("fed.rounds=1", "align.train_norm=mixed")
    logs = [Path(load_run_config(rc).data.cache_dir) / "state" / site / "audit.jsonl" for site in ("en-1", "es-1")]
    before = [len(log.read_text().splitlines()) if log.exists() else 0 for log in logs]  # other tests' runs
    grid = RecordingGrid(rc)
    VlpStage(Federation.from_run_config(rc)).run(grid)
    logged = [json.loads(line) for log, n in zip(logs, before) for line in log.read_text().splitlines()[n:]]
    received = [content_sha256(content_of(r)) for r in grid.replies]
    assert len(received) == 8  # per site: statistics pass, training, community statistics, evaluation
    assert sorted(e["sha256"] for e in logged) == sorted(received)
    train = next(e for e in logged if e["message_type"] == "train" and e["site"] == "en-1")
    assert train["round"] == 1 and set(train["records"]) == {"arrays", "metrics", "align", "usage", "site"}
    arrays = train["records"]["arrays"]["arrays"]
    assert all(set(a) == {"shape", "dtype", "bytes"} for a in arrays.values()) and train["bytes"] > 0
