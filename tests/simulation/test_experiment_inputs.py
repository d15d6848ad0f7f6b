"""A seed's runs are paired only when they start from the same inputs: the rule that decides
which recorded runs a resumed experiment may reuse (simulation/experiments.py)."""

from __future__ import annotations

import json
import logging

from simulation.experiments import (INPUTS, _evaluate_again, _set_aside, _timed, evaluated_elsewhere, stale_runs,
                                   started_runs)

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


def test_a_complete_seed_evaluated_on_another_set_is_not_reused(tmp_path):
    """Its figures are another set's; the runs with weights were evaluated again before this
    rule (below), the others are trained again."""
    runs = {tmp_path / name / "seed1": THERE for name in ("a", "b")}
    assert sorted(stale_runs(runs, {**HERE, "eval_manifest": "4029" * 16}, variants=2)) == sorted(runs)
    on_the_set = {run: {**THERE, "eval_manifest": "4029" * 16} for run in runs}
    assert stale_runs(on_the_set, {**HERE, "eval_manifest": "4029" * 16}, variants=2) == []


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


def _trained(run, inputs, norms=("community",)):
    """A finished federated run: weights under model/, one record per evaluation norm."""
    (run / "model").mkdir(parents=True)
    (run / "model" / "checkpoint.pt").write_bytes(b"")
    for norm in norms:
        (run / "model" / f"eval-{norm}").mkdir()
        (run / "model" / f"eval-{norm}" / "eval.json").write_text("{}")
    (run / INPUTS).write_text(json.dumps(inputs))
    return run / "model"


def test_runs_evaluated_on_another_set_are_evaluated_again_not_trained_again(tmp_path, caplog):
    """Copied into a suite with ``eval_set``, the runs of one that evaluated on the sites'
    test split form a complete seed from one set of inputs, which the block rule reuses: it
    must not reuse their figures as this set's."""
    today = {**HERE, "eval_manifest": "4029" * 16}
    run = tmp_path / "fedavg" / "seed4"
    model = _trained(run, HERE, norms=("community", "global"))
    assert evaluated_elsewhere(model, HERE, today)
    with caplog.at_level(logging.WARNING):
        _evaluate_again(run, model, HERE, today)
    assert (model / "checkpoint.pt").is_file() and not (model / "eval-community").exists()
    assert (model / "eval-community.other-eval-set" / "eval.json").is_file()
    assert (model / "eval-global.other-eval-set").is_dir()
    assert json.loads((run / INPUTS).read_text()) == today
    assert "eval_manifest none" in caplog.text and "here 40294029" in caplog.text
    assert not evaluated_elsewhere(model, today, today)  # done once
    assert evaluated_elsewhere(model, today, HERE)  # and back to the test split
    (model / "eval-community").mkdir()
    _evaluate_again(run, model, today, HERE)
    assert (model / "eval-community.other-eval-set-2").is_dir()


def test_only_a_run_trained_from_todays_inputs_with_its_weights_is_evaluated_again(tmp_path):
    today = {**HERE, "eval_manifest": "4029" * 16}
    model = _trained(tmp_path / "central" / "seed1", THERE)
    assert not evaluated_elsewhere(model, {**THERE, "eval_manifest": "4029" * 16}, today)  # same set
    assert not evaluated_elsewhere(model, THERE, today)  # trained from other inputs: the pairing rules
    assert not evaluated_elsewhere(model, None, today)  # unknown inputs
    (model / "checkpoint.pt").unlink()
    assert not evaluated_elsewhere(model, HERE, today)  # records only: nothing to evaluate


def test_a_finished_run_is_not_trained_again_to_be_evaluated(tmp_path):
    """Its seconds are kept; only a run with neither records nor weights left trains again
    (resuming weights copied from another folder would be refused: another tokenizer path)."""
    (tmp_path / "seconds.json").write_text('{"seconds": 284.5}')
    calls = []
    assert _timed(tmp_path, lambda: calls.append(1), trained=True) == 284.5 and not calls
    assert _timed(tmp_path, lambda: calls.append(1), trained=False) == 284.5 and calls == [1]
