"""The strategy's own aggregation rules, on hand-made replies (Flower's FedAvg underneath)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from client.records import arrays_record, record_arrays
from medunic_core.align import AlignmentState
from medunic_core.config import load_config
from medunic_core.exchange import TOKEN_EMBEDDINGS
from server.strategy import make_strategy, mask_unused_rows, outliers

ROWS, DIM = 4, 3


class TwoNodes:
    def get_node_ids(self):
        return [11, 12]


def _reply(request: Message, emb: np.ndarray, other: float, n: int, used: list[int], lang: str) -> Message:
    rows = np.zeros(ROWS, dtype=np.uint8)
    rows[used] = 1
    align = AlignmentState()
    align.add(lang, "text_head.norm#0.n", torch.tensor(float(n)))
    return Message(
        RecordDict({
            "arrays": arrays_record({TOKEN_EMBEDDINGS: emb.astype(np.float16), "w": np.array([other], np.float16)}),
            "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0}),
            "align": arrays_record(align.to_flat()),
            "usage": arrays_record({"token_rows": rows}),
            "site": ConfigRecord({"site": f"{lang}-1", "community": lang}),
        }),
        reply_to=request,
    )


@pytest.fixture
def strategy_and_requests():
    cfg = load_config("tiny", ["fed.wire_dtype=float16"])
    strategy = make_strategy(cfg, num_sites=2, vocab_sha="abc")
    strategy.alignment = AlignmentState.from_flat({"fr/text_head.norm#0.n": np.array([5.0])})
    global_arrays = {TOKEN_EMBEDDINGS: np.full((ROWS, DIM), 9.0, np.float32), "w": np.array([0.0], np.float32)}
    messages = list(strategy.configure_train(1, arrays_record(global_arrays),
                                             ConfigRecord(), TwoNodes()))
    return strategy, messages


def test_messages_carry_weights_in_wire_dtype_state_and_vocab_hash(strategy_and_requests):
    _, messages = strategy_and_requests
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]
    content = messages[0].content
    assert record_arrays(content["arrays"])[TOKEN_EMBEDDINGS].dtype == np.float16
    assert content["config"]["vocab-sha"] == "abc" and content["config"]["server-round"] == 1
    assert list(record_arrays(content["align"])) == ["fr/text_head.norm#0.n"]


def test_token_rows_average_over_the_sites_that_used_them(strategy_and_requests):
    strategy, (m1, m2) = strategy_and_requests
    e1, e2 = np.full((ROWS, DIM), 1.0), np.full((ROWS, DIM), 4.0)
    replies = [_reply(m1, e1, 1.0, 30, [0, 1], "en"), _reply(m2, e2, 4.0, 10, [1, 2], "es")]
    arrays, metrics = strategy.aggregate_train(1, replies)
    emb = record_arrays(arrays)[TOKEN_EMBEDDINGS]
    assert emb.dtype == np.float32  # averaged in fp32 even though fp16 travelled
    np.testing.assert_allclose(emb[0], 1.0)  # only en used row 0
    np.testing.assert_allclose(emb[1], (30 * 1.0 + 10 * 4.0) / 40)  # both: weighted by samples
    np.testing.assert_allclose(emb[2], 4.0)  # only es
    np.testing.assert_allclose(emb[3], 9.0)  # nobody: unchanged
    np.testing.assert_allclose(record_arrays(arrays)["w"], (30 * 1.0 + 10 * 4.0) / 40)  # plain FedAvg
    assert metrics["train_loss"] == pytest.approx(1.0)
    # alignment: communities kept apart; fr had no site this round and keeps its sums
    assert strategy.alignment.communities == ["en", "es", "fr"]
    assert float(strategy.alignment.sums["es"]["text_head.norm#0.n"]) == 10
    assert float(strategy.alignment.sums["fr"]["text_head.norm#0.n"]) == 5


def test_non_finite_and_outlier_updates_are_rejected(strategy_and_requests):
    strategy, (m1, m2) = strategy_and_requests
    bad = np.full((ROWS, DIM), 9.0)
    bad[0, 0] = np.nan
    replies = [_reply(m1, bad, 1.0, 30, [0], "en"), _reply(m2, np.full((ROWS, DIM), 8.0), 2.0, 10, [0], "es")]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_round["rejected"] == ["en-1"] and strategy.last_round["sites"] == ["es-1"]
    np.testing.assert_allclose(record_arrays(arrays)["w"], 2.0)
    assert "en" not in strategy.alignment.communities  # a rejected site's sums are not merged either
    assert outliers([1.0, 1.2, 50.0], factor=10) == [2]
    assert outliers([1.0, float("inf")], factor=10) == [1]
    assert outliers([1.0, 3.0], factor=10) == []


def test_mask_unused_rows_keeps_a_plain_weighted_mean_exact():
    rng = np.random.default_rng(0)
    arrays = [{TOKEN_EMBEDDINGS: rng.normal(size=(5, 2))} for _ in range(3)]
    usage = [np.array([1, 1, 0, 0, 0]), np.array([0, 1, 1, 0, 0]), np.array([0, 1, 1, 1, 0])]
    weights = [1.0, 2.0, 3.0]
    original = [a[TOKEN_EMBEDDINGS].copy() for a in arrays]
    mask_unused_rows(arrays, usage, weights, current=np.zeros((5, 2)))
    mean = sum(w * a[TOKEN_EMBEDDINGS] for w, a in zip(weights, arrays)) / sum(weights)
    np.testing.assert_allclose(mean[2], (2 * original[1][2] + 3 * original[2][2]) / 5)
    np.testing.assert_allclose(mean[3], original[2][3])
    np.testing.assert_allclose(mean[4], 0.0)


def test_strategy_choice():
    assert type(make_strategy(load_config("tiny", ["fed.strategy=fedprox"]), 2, "x")).__name__ == "MedUniCFedProx"
    adam = make_strategy(load_config("tiny", ["fed.strategy=fedadam", "fed.server_lr=0.05"]), 2, "x")
    assert type(adam).__name__ == "MedUniCFedAdam" and adam.eta == 0.05


def test_failed_replies_are_counted_not_averaged(strategy_and_requests):
    strategy, (m1, m2) = strategy_and_requests
    ok = _reply(m2, np.full((ROWS, DIM), 8.0), 2.0, 10, [0], "es")
    died = Message(Error(code=0, reason="site died mid-round"), reply_to=m1)
    arrays, _ = strategy.aggregate_train(1, [died, ok])
    assert strategy.last_round["failed"] == 1 and strategy.last_round["sites"] == ["es-1"]
    # the error may come from the SuperLink (a lost node): the silent node is the one named
    assert strategy.last_round["failed_sites"] == [f"node-{m1.metadata.dst_node_id}"]
    np.testing.assert_allclose(record_arrays(arrays)["w"], 2.0)
    assert strategy.aggregate_train(2, [died]) == (None, None)
