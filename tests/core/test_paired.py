"""Paired comparisons over seeds: the interval, the verdict and which row is "best"."""

from __future__ import annotations

import math

import pytest

from medunic_core.evaluation.paired import (
    Comparison, higher_is_better, margin_verdict, paired_comparisons, paired_difference, paired_table)


def test_a_consistent_gain_is_better_and_noise_is_not_resolved():
    base = [0.70, 0.62, 0.75, 0.66, 0.71]
    gain = paired_difference([b + 0.02 + 0.001 * i for i, b in enumerate(base)], base)
    assert gain["verdict"] == "better" and gain["ci"][0] > 0 and gain["mean"] == pytest.approx(0.022)
    # the same seeds spread far more than the gain: unpaired this would never resolve, paired it does
    assert max(base) - min(base) > 10 * gain["mean"] / 2
    noise = paired_difference([0.71, 0.60, 0.77, 0.65, 0.70], base)
    assert noise["verdict"] == "not resolved" and noise["ci"][0] < 0 < noise["ci"][1]
    assert paired_difference(base, [b + 0.05 for b in base[:4]] + [base[4] + 0.06])["verdict"] == "worse"


def test_the_interval_is_the_t_interval():
    d = paired_difference([3.0, 5.0, 4.0], [0.0, 0.0, 0.0])  # mean 4, sd 1, n 3: t(0.975, 2) = 4.303
    assert d["ci"] == pytest.approx([4 - 4.302653 / math.sqrt(3), 4 + 4.302653 / math.sqrt(3)], rel=1e-5)


def test_lower_is_better_for_losses_and_language_separation():
    assert not higher_is_better("heldout_loss/cvl_loss") and not higher_is_better("bias/text/lang_mean_dist_over_spread")
    assert higher_is_better("retrieval/mean/R@1")
    lower = paired_difference([1.0, 1.1, 0.9], [2.0, 2.2, 2.1], higher=False)
    assert lower["verdict"] == "better"


def test_one_seed_or_unpaired_values():
    one = paired_difference([0.8], [0.7])
    assert one["verdict"] == "not resolved" and one["ci"] == [None, None]
    assert "| n/a |" in paired_table([{"comparison": "c", "a": "x", "b": "y", "metric": "m", **one}])
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([0.8, 0.7], [0.7])


def test_best_of_several_rows_is_compared_with_its_own_counterpart():
    runs = {
        "local on": {"m": {"mean": 0.60, "values": [0.6, 0.6, 0.6]}},
        "mixed on": {"m": {"mean": 0.70, "values": [0.7, 0.71, 0.69]}},
        "local off": {"m": {"mean": 0.50, "values": [0.5, 0.5, 0.5]}},
        "mixed off": {"m": {"mean": 0.72, "values": [0.72, 0.73, 0.71]}},
    }
    rows = paired_comparisons(runs, [Comparison("ctr", ["local on", "mixed on"], ["local off", "mixed off"])], ["m"])
    assert [(r["a"], r["b"], r["verdict"]) for r in rows] == [("mixed on", "mixed off", "worse")]
    assert "| ctr | mixed on | mixed off | m | 3 | -0.020 |" in paired_table(rows)
    with pytest.raises(ValueError, match="no rows"):
        paired_comparisons(runs, [Comparison("x", ["nope"], ["local on"])], ["m"])
    # a metric the comparison names itself and a row lacks is a misspelt name, not a row to leave out
    with pytest.raises(ValueError, match=r"\['zeroshot/en/auc/pneumothorx'\] are not in every row"):
        paired_comparisons(runs, [Comparison("y", ["local on"], ["local off"], metrics=["m", "zeroshot/en/auc/pneumothorx"])],
                           ["m"])


@pytest.mark.parametrize("ci, higher, verdict", [
    ((-0.02, 0.025), True, "equivalent"),      # all of it within +-0.03
    ((-0.02, 0.09), True, "non-inferior"),     # at worst 0.02 below B, perhaps far above
    ((-0.09, 0.02), True, "not resolved"),     # may be 0.09 below
    ((-0.09, -0.04), True, "inferior"),        # below B by more than the margin, all of it
    ((0.02, 0.09), False, "not resolved"),     # a loss: A's worse end is 0.09 higher
    ((-0.09, 0.02), False, "non-inferior"),
    ((None, None), True, "not resolved"),      # one seed
])
def test_a_margin_verdict_reads_the_interval_from_As_worse_end(ci, higher, verdict):
    assert margin_verdict(ci, 0.03, higher) == verdict


def test_a_comparison_with_margins_says_whether_A_stays_within_them():
    runs = {"fed": {"auc": {"mean": 0.70, "values": [0.70, 0.71, 0.69, 0.70]}, "r1": {"mean": 0.5, "values": [0.5] * 4}},
            "central": {"auc": {"mean": 0.70, "values": [0.70, 0.70, 0.70, 0.71]}, "r1": {"mean": 0.7, "values": [0.7] * 4}}}
    rows = paired_comparisons(runs, [Comparison("parity", ["fed"], ["central"], margins={"auc": 0.03})], ["auc", "r1"])
    assert [(r["metric"], r.get("within_margin")) for r in rows] == [("auc", "equivalent"), ("r1", None)]
    table = paired_table(rows)
    assert "| within margin |" in table and "| equivalent (+-0.03) |" in table
