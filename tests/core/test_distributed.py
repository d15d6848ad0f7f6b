"""Training under torchrun: two CPU processes (gloo), each on its own shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_torchrun_two_processes_train_and_checkpoint(synthetic_data, train_overrides, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", "29517",
        "-m", "medunic_core.cli", "train", "--no-progress",
        *train_overrides(synthetic_data, out, "train.max_steps=2", "train.batch_size=4"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # only rank 0 writes
    assert (out / "checkpoint.pt").is_file()
