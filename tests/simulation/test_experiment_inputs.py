"""A seed's runs are paired only when they start from the same inputs: the rule that decides
which recorded runs a resumed experiment may reuse (simulation/experiments.py)."""

from __future__ import annotations

import json
import logging

from simulation.experiments import INPUTS, _set_aside, stale_runs, started_runs

HERE = {"text_encoder": "15a3" * 16, "vocab": "faf2" * 16}
THERE = {"text_encoder": "069f" * 16, "vocab": "faf2" * 16}


def test_runs_from_todays_inputs_are_always_reused(tmp_path):
    a, b = tmp_path / "a" / "seed5", tmp_path / "b" / "seed5"
    assert stale_runs({a: HERE}, HERE, variants=3) == []
    assert stale_runs({a: HERE, b: HERE}, HERE, variants=2) == []


def test_a_complete_seed_from_another_machine_is_reused_as_a_block(tmp_path):
    runs = {tmp_path / name / "seed1": THERE for name in ("a", "b", "c")}
    assert stale_runs(runs, HERE, variants=3) == []


def test_a_seed_with_runs_still_to_train_sets_aside_those_from_other_inputs(tmp_path):
    """The case seen on 2026-12-02: seed 5's first run was trained on another machine, whose
    kernels gave another MLM text encoder; the seed's other runs start from today's."""
    old, new = tmp_path / "centralized-ctr" / "seed5", tmp_path / "centralized-no-ctr" / "seed5"
    assert stale_runs({old: THERE, new: HERE}, HERE, variants=7) == [old]
    assert stale_runs({old: THERE}, HERE, variants=7) == [old]


def test_runs_with_unknown_inputs_are_never_paired(tmp_path):
    runs = {tmp_path / name / "seed1": None for name in ("a", "b")}
    assert sorted(stale_runs(runs, HERE, variants=2)) == sorted(runs)
    mixed = {tmp_path / "a" / "seed1": THERE, tmp_path / "b" / "seed1": None}
    assert sorted(stale_runs(mixed, HERE, variants=2)) == sorted(mixed)


def test_a_complete_seed_that_mixes_inputs_keeps_only_todays_runs(tmp_path):
    a, b = tmp_path / "a" / "seed2", tmp_path / "b" / "seed2"
    assert stale_runs({a: THERE, b: HERE}, HERE, variants=2) == [a]


def test_a_run_set_aside_keeps_its_records_and_says_what_changed(tmp_path, caplog):
    run = tmp_path / "centralized-ctr" / "seed5"
    run.mkdir(parents=True)
    (run / INPUTS).write_text(json.dumps(THERE))
    (run / "seconds.json").write_text('{"seconds": 1.0}')
    with caplog.at_level(logging.WARNING):
        _set_aside(run, HERE)
    aside = run.with_name("seed5.other-inputs")
    assert not run.exists() and json.loads((aside / "seconds.json").read_text()) == {"seconds": 1.0}
    assert "text_encoder 069f069f here 15a315a3" in caplog.text and "vocab" not in caplog.text
    run.mkdir()  # the same seed set aside twice keeps both
    _set_aside(run, HERE)
    assert (run.with_name("seed5.other-inputs-2")).is_dir()


def test_an_interrupted_federation_counts_as_started(tmp_path):
    """A federated run stopped mid-way holds only the server's checkpoint: resuming it from
    other inputs would mix them within one run, so it is checked like a finished one."""
    interrupted, finished, empty = (tmp_path / name / "seed1" for name in ("fed", "central", "new"))
    interrupted.mkdir(parents=True)
    (interrupted / "server_checkpoint.pt").write_bytes(b"")
    (finished / "model").mkdir(parents=True)
    (finished / "model" / "checkpoint.pt").write_bytes(b"")
    (finished / INPUTS).write_text(json.dumps(THERE))
    empty.mkdir(parents=True)
    (empty / INPUTS).write_text(json.dumps(HERE))  # written before training began: not started
    assert started_runs([interrupted, finished, empty]) == {interrupted: None, finished: THERE}
