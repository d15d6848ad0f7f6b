"""A real Flower simulation (SuperLink + Simulation Engine + Ray) through `medunic simulate`."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from medunic_core.cli import main
from medunic_core.errors import MedunicError
from simulation.federated import simulate

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_simulate_en_and_es_sites_end_to_end(tmp_path, monkeypatch):
    flwr_home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(flwr_home))
    monkeypatch.chdir(tmp_path)  # data/ and cache/ of the run land here
    run_dir = tmp_path / "fed"
    rc = main([
        "simulate", "--no-progress", "--sites", "en-1:en,es-1:es", "--pairs-per-site", "40", "--rounds", "2",
        f"fed.out_dir={run_dir}", "fed.local_steps=2", "train.batch_size=8", "train.warmup_steps=1",
        "vocab.vocab_size=300", "model.image.kwargs.depth=2", "model.text.num_layers=2",
        "synth.image_size=96", "eval.probe_fractions=[1.0]", "eval.probe_seeds=[0]",
        "align.train_norm=mixed", "align.eval_norm=community",
    ])
    assert rc == 0
    # the vocabulary was a federated stage of the same run, from both sites' word counts
    vocab = json.loads((run_dir / "vocab" / "vocab_stage.json").read_text())
    assert set(vocab["sites"]) == {"en-1", "es-1"} and vocab["invalid"] == {}
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert sorted(r["sites"]) == ["en-1", "es-1"] and r["failed"] == 0
        assert r["train"]["train_loss"] > 0
        # each site times its own loop; the coordinator's wait for the round contains it
        assert r["train"]["train_pairs_per_s"] > 0
        assert 0 < r["train"]["train_seconds"] <= r["train_exchange_seconds"]
        assert {s["community"] for s in r["sites_eval"].values()} == {"en", "es"}
        assert 0 <= r["central"]["zeroshot_en"] <= 1 and 0 <= r["central"]["zeroshot_es"] <= 1
    report = (run_dir / "report" / "report.md").read_text()
    assert "| round |" in report and "Cross-lingual retrieval" in report
    for png in ("losses.png", "zeroshot.png", "bias.png", "tsne_text.png"):
        assert (run_dir / "report" / png).stat().st_size > 1000
    assert (run_dir / "model" / "text_encoder" / "config.json").is_file()
    # the SuperLink it started, and everything that SuperLink spawned (Ray too), is gone
    assert subprocess.run(["pgrep", "-f", str(flwr_home)], capture_output=True).stdout == b""
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _has_env(p, f"FLWR_HOME={flwr_home}")]


@pytest.mark.parametrize("overrides, sites, stage, reason", [
    ([], "en-1:en", "vlp", "stage vlp needs the run's tokenizer"),
    # a median of two sites is their mean: refused before the first stage waits for a site
    (["fed.strategy=fedmedian"], "en-1:en,es-1:es", "vocab", "outvotes a malicious site only in rounds of at least 3"),
])
def test_a_run_that_fails_is_an_error_that_says_why(tmp_path, monkeypatch, overrides, sites, stage, reason):
    """`flwr run --stream` exits 0 however the run ended; the run's status is read back."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MedunicError, match=f"ended finished:failed.*{reason}"):
        simulate("tiny", [*overrides, f"fed.out_dir={tmp_path / 'fed'}"], sites=sites, stage=stage, progress=False)


def _has_env(pid: str, entry: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry.encode() in f.read().split(b"\0")
    except OSError:
        return False


def test_experiment_runner_writes_one_table_of_all_variants(tmp_path, monkeypatch):
    from simulation.experiments import load_suite

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "exp"
    argv = [  # 80 pairs per site: the suite's 250 x 64 variant needs a batch of 64 training pairs
        "experiment", "--no-progress", "--seeds", "1", "--pairs-per-site", "80", "--out", str(out), "--eval-set", "20",
        "fed.rounds=1", "fed.local_steps=2", "train.batch_size=8", "train.warmup_steps=1",
        "vocab.vocab_size=300", "model.image.kwargs.depth=2", "model.text.num_layers=2",
        "synth.image_size=96", "eval.probe_fractions=[1.0]", "eval.probe_seeds=[0]",
        "mlm.steps=4", "mlm.warmup_steps=1",
    ]
    assert main(argv) == 0
    suite = load_suite("default")
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert set(runs) == {f"{v.name} / eval {n}" for v in suite.variants for n in ("global", "community")}
    assert len(runs) == 14 and {"centralized / ctr 250 x 64 / eval community", "federated mixed / no-ctr / eval global"} < set(runs)
    assert all(runs[name]["retrieval/mean/R@1"]["values"] for name in runs)  # every variant was evaluated
    table = (out / "compare.md").read_text()
    assert "| run | retrieval/mean/R@1 |" in table and "MLM-initialised" in table
    # every model was evaluated on the one bilingual set; one seed pairs but resolves nothing
    evals = [json.loads(p.read_text()) for p in out.glob("*/seed*/**/eval-community/eval.json")]
    assert len(evals) == 7 and {e["meta"]["n_test"] for e in evals} == {40}
    paired = json.loads((out / "paired.json").read_text())
    assert paired["seeds"] == [1] and {c["verdict"] for c in paired["comparisons"]} == {"not resolved"}
    assert "Paired over seeds 1:" in table
    assert json.loads((out / "run.json").read_text())["seeds"] == [1]  # command, commit and machine beside it
    inputs = json.loads((out / "inputs.json").read_text())
    assert set(inputs) == {"text_encoder", "vocab", "train_manifest", "eval_manifest"}
    assert all(json.loads(p.read_text()) == inputs for p in out.glob("*/seed1/inputs.json")) and paired["inputs"] == {
        "1": inputs}

    # a run's records (seconds.json, eval-*/eval.json) are all the tables need: without any
    # weights the same command trains nothing and writes the same table
    weights = list(out.glob("*/seed1/**/*.pt"))
    assert weights
    for path in weights:
        path.unlink()
    assert main(argv) == 0
    assert json.loads((out / "compare.json").read_text())["runs"] == runs
    assert not list(out.glob("*/seed1/**/*.pt"))

    # a run recorded from another text encoder (another machine's MLM stage) cannot be paired
    # with the seed's other runs: it is set aside and trained again, alone
    moved = out / "centralized-ctr" / "seed1"
    (moved / "inputs.json").write_text(json.dumps({**inputs, "text_encoder": "0" * 64}))
    assert main(argv) == 0
    assert (out / "centralized-ctr" / "seed1.other-inputs" / "seconds.json").is_file()
    assert json.loads((moved / "inputs.json").read_text()) == inputs
    assert [p.parent for p in out.glob("*/seed1/**/checkpoint.pt")] == [moved]


@pytest.mark.parametrize("stop", ["kill", "ctrl-c twice"])
def test_a_terminated_simulation_stops_what_it_started(tmp_path, stop):
    """`kill` (SIGTERM) of `medunic simulate` mid-run, or Ctrl-C pressed twice in its terminal
    (SIGINT to its whole process group, the second during the cleanup the first began),
    leaves no SuperLink, flwr or Ray behind: none of the processes it had started by then,
    found by parentage (Ray's agents overwrite the environment /proc shows), and none that
    carries its FLWR_HOME."""
    import signal
    import sys
    import time

    from tests.deployment.loopback import descendants, processes, send_signal

    flwr_home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(flwr_home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medunic_core.cli", "simulate", "--no-progress", "--sites", "en-1:en", "--rounds", "50",
         "--pairs-per-site", "40", f"fed.out_dir={tmp_path / 'fed'}", "train.batch_size=8", "vocab.vocab_size=300"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    deadline = time.monotonic() + 120
    while not any(argv[0].startswith("ray::") for argv in descendants(proc.pid).values() if argv):  # Ray is up
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("the simulation did not start Ray within 120 s")
        time.sleep(1)
    time.sleep(2)
    before = descendants(proc.pid)
    if stop == "kill":
        proc.send_signal(signal.SIGTERM)
    else:  # as a terminal does: the foreground group, `medunic simulate` and its `flwr run`
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)
    try:
        assert proc.wait(timeout=60) != 0
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *before]:  # so that a failure leaves nothing running
            send_signal(pid, signal.SIGKILL)
        raise

    def alive() -> dict[int, list[str]]:
        return {pid: argv for pid, (_, state, argv) in processes().items() if state != "Z" and (
            pid in before or _has_env(str(pid), f"FLWR_HOME={flwr_home}"))}

    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive()
    for pid in left:  # so that a failure leaves nothing running either
        send_signal(pid, signal.SIGKILL)
    assert any("raylet" in " ".join(argv) for argv in before.values()) and left == {}
