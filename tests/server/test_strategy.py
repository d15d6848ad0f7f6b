"""The strategy's own rules on hand-made replies (Flower's FedAvg underneath): token rows,
fp32 averaging, the alignment state, rejection of outliers, failed and invalid replies,
and a fuzz test that throws hundreds of malformed replies at it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from medunic_core.align import AlignmentState
from medunic_core.config import load_config
from medunic_core.errors import ConfigError
from medunic_core.exchange import TOKEN_EMBEDDINGS
from medunic_core.federation.replies import InvalidReply
from server.messages import arrays_record, record_arrays
from server.registry import SiteIdentities
from server.strategy import make_strategy

ROWS, DIM = 4, 3
NORM = "text_head.norm#0"
LAYOUT = {f"{NORM}.n": (1,), f"{NORM}.sum": (DIM,), f"{NORM}.sumsq": (DIM,)}


class Nodes:
    def __init__(self, *ids: int) -> None:
        self.ids = list(ids)

    def get_node_ids(self):
        return self.ids


def _align(lang: str, n: int) -> dict[str, np.ndarray]:
    state = AlignmentState()
    x = torch.arange(n * DIM, dtype=torch.float64).reshape(n, DIM) / (n * DIM)
    state.add(lang, f"{NORM}.n", torch.tensor(float(n)))
    state.add(lang, f"{NORM}.sum", x.sum(0))
    state.add(lang, f"{NORM}.sumsq", (x * x).sum(0))
    return state.to_flat()


def _records(emb: np.ndarray, other: float, n: int, used: list[int], lang: str, site: str) -> dict:
    rows = np.zeros(ROWS, dtype=np.uint8)
    rows[used] = 1
    return {
        "arrays": {TOKEN_EMBEDDINGS: emb.astype(np.float16), "w": np.array([other], np.float16)},
        "metrics": {"num-examples": n, "train_loss": 1.0},
        "align": _align(lang, n),
        "usage": {"token_rows": rows},
        "site": {"site": site, "community": lang},
    }


def _message(request: Message, records: dict) -> Message:
    """A reply from plain records: dicts of arrays -> ArrayRecord, 'metrics' -> MetricRecord,
    other dicts -> ConfigRecord; a ready-made record is kept as it is."""
    content = {}
    for name, value in records.items():
        if not isinstance(value, dict):
            content[name] = value
        elif value and all(isinstance(v, np.ndarray) for v in value.values()):
            content[name] = ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in value.items()})
        elif name == "metrics":
            content[name] = MetricRecord(value)
        else:
            content[name] = ConfigRecord(value)
    return Message(RecordDict(content), reply_to=request)


def _strategy(nodes=(11, 12), identities=None, *overrides: str):
    cfg = load_config("tiny", ["fed.wire_dtype=float16", *overrides])
    strategy = make_strategy(cfg, num_sites=len(nodes), layout=LAYOUT, identities=identities)
    strategy.alignment = AlignmentState.from_flat({"fr/text_head.norm#0.n": np.array([5.0])})
    global_arrays = {TOKEN_EMBEDDINGS: np.full((ROWS, DIM), 9.0, np.float32), "w": np.array([0.0], np.float32)}
    messages = list(strategy.configure_train(1, arrays_record(global_arrays), ConfigRecord(), Nodes(*nodes)))
    return strategy, sorted(messages, key=lambda m: m.metadata.dst_node_id)


@pytest.fixture
def strategy_and_requests():
    return _strategy()


def test_messages_carry_weights_in_wire_dtype_and_the_alignment_state(strategy_and_requests):
    _, messages = strategy_and_requests
    assert [m.metadata.dst_node_id for m in messages] == [11, 12]
    content = messages[0].content
    assert record_arrays(content["arrays"])[TOKEN_EMBEDDINGS].dtype == np.float16
    assert content["config"]["server-round"] == 1
    assert list(record_arrays(content["align"])) == ["fr/text_head.norm#0.n"]


def test_token_rows_average_over_the_sites_that_used_them(strategy_and_requests):
    strategy, (m1, m2) = strategy_and_requests
    e1, e2 = np.full((ROWS, DIM), 1.0), np.full((ROWS, DIM), 4.0)
    replies = [_message(m1, _records(e1, 1.0, 30, [0, 1], "en", "en-1")),
               _message(m2, _records(e2, 4.0, 10, [1, 2], "es", "es-1"))]
    before = [dict(r.content.array_records) for r in replies]
    arrays, metrics = strategy.aggregate_train(1, replies)
    emb = record_arrays(arrays)[TOKEN_EMBEDDINGS]
    assert emb.dtype == np.float32  # averaged in fp32 even though fp16 travelled
    np.testing.assert_allclose(emb[0], 1.0)  # only en used row 0
    np.testing.assert_allclose(emb[1], (30 * 1.0 + 10 * 4.0) / 40)  # both: weighted by samples
    np.testing.assert_allclose(emb[2], 4.0)  # only es
    np.testing.assert_allclose(emb[3], (30 * 1.0 + 10 * 4.0) / 40)  # nobody: as every other weight
    np.testing.assert_allclose(record_arrays(arrays)["w"], (30 * 1.0 + 10 * 4.0) / 40)  # plain FedAvg
    assert metrics["train_loss"] == pytest.approx(1.0)
    assert [dict(r.content.array_records) for r in replies] == before  # replies are never edited
    # alignment: communities kept apart; fr had no site this round and keeps its sums
    assert strategy.alignment.communities == ["en", "es", "fr"]
    assert float(strategy.alignment.sums["es"][f"{NORM}.n"]) == 10
    assert float(strategy.alignment.sums["fr"][f"{NORM}.n"]) == 5


def test_outlier_updates_are_rejected_with_their_alignment_sums():
    strategy, (m1, m2, m3) = _strategy((11, 12, 13))
    replies = [_message(m1, _records(np.full((ROWS, DIM), 9.0 + 5e3), 1.0, 30, [0], "en", "en-1")),
               _message(m2, _records(np.full((ROWS, DIM), 8.0), 2.0, 10, [0], "es", "es-1")),
               _message(m3, _records(np.full((ROWS, DIM), 8.5), 2.0, 10, [0], "es", "es-2"))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_round["rejected"] == ["en-1"] and strategy.last_round["sites"] == ["es-1", "es-2"]
    np.testing.assert_allclose(record_arrays(arrays)["w"], 2.0)
    assert "en" not in strategy.alignment.communities  # a rejected site's sums are not merged either


def test_strategy_choice():
    assert type(make_strategy(load_config("tiny", ["fed.strategy=fedprox"]), 2)).__name__ == "MedUniCFedProx"
    adam = make_strategy(load_config("tiny", ["fed.strategy=fedadam", "fed.server_lr=0.05"]), 2)
    assert type(adam).__name__ == "MedUniCFedAdam" and adam.eta == 0.05
    assert make_strategy(load_config("tiny", ["fed.strategy=fedadam"]), 2).eta == 0.01
    avgm = make_strategy(load_config("tiny", ["fed.strategy=fedavgm"]), 2)
    assert (avgm.server_learning_rate, avgm.server_momentum) == (1.0, 0.9)
    avgm = make_strategy(load_config("tiny", ["fed.strategy=fedavgm", "fed.server_lr=2", "fed.server_momentum=0"]), 2)
    assert (avgm.server_learning_rate, avgm.server_momentum) == (2.0, 0.0)
    with pytest.raises(ConfigError, match="fed.server_lr"):
        load_config("tiny", ["fed.server_lr=0"])


def test_failed_replies_are_counted_not_averaged(strategy_and_requests):
    strategy, (m1, m2) = strategy_and_requests
    ok = _message(m2, _records(np.full((ROWS, DIM), 8.0), 2.0, 10, [0], "es", "es-1"))
    died = Message(Error(code=0, reason="site died mid-round"), reply_to=m1)
    arrays, _ = strategy.aggregate_train(1, [died, ok])
    assert strategy.last_round["failed"] == 1 and strategy.last_round["sites"] == ["es-1"]
    # the error may come from the SuperLink (a lost node): the silent node is the one named
    assert strategy.last_round["failed_sites"] == [f"node-{m1.metadata.dst_node_id}"]
    np.testing.assert_allclose(record_arrays(arrays)["w"], 2.0)
    assert strategy.aggregate_train(2, [died]) == (None, None)


def test_a_site_is_who_it_was_bound_to_not_who_it_says():
    strategy, (m1, m2) = _strategy()
    strategy.aggregate_train(1, [_message(m1, _records(np.ones((ROWS, DIM)), 1.0, 8, [0], "en", "en-1")),
                                 _message(m2, _records(np.ones((ROWS, DIM)), 1.0, 8, [0], "es", "es-1"))])
    # round 2: the English node calls itself es-1 and writes into the Spanish statistics
    replies = [_message(m1, _records(np.ones((ROWS, DIM)), 5.0, 8, [0], "es", "es-1")),
               _message(m2, _records(np.ones((ROWS, DIM)), 1.0, 8, [0], "es", "es-1"))]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert strategy.last_round["sites"] == ["es-1"] and list(strategy.last_round["invalid"]) == ["en-1"]
    assert "is site 'en-1' (en)" in strategy.last_round["invalid"]["en-1"]
    np.testing.assert_allclose(record_arrays(arrays)["w"], 1.0)


def test_a_site_of_both_languages_is_bound_to_both_and_to_nothing_else():
    """A site whose reports come in both languages is one site of en+es: its sums of each
    community count (split between its batches' languages); an en+es claim from a node
    bound to en, a claim spelt another way, or a third language is refused."""
    strategy, (m1, m2) = _strategy()
    both = {**_records(np.ones((ROWS, DIM)), 1.0, 8, [0], "en+es", "mix-1"),
            "align": {**_align("en", 5), **_align("es", 3)}}
    strategy.aggregate_train(1, [_message(m1, both),
                                 _message(m2, _records(np.ones((ROWS, DIM)), 1.0, 8, [0], "es", "es-1"))])
    assert sorted(strategy.last_round["sites"]) == ["es-1", "mix-1"]
    assert float(strategy.alignment.sums["en"][f"{NORM}.n"]) == 5
    assert float(strategy.alignment.sums["es"][f"{NORM}.n"]) == 3 + 8
    # round 2: the Spanish node claims both languages, mix-1 sends sums of more pairs than a round has
    half = strategy.expected().max_examples // 2 + 1
    replies = [_message(m1, {**both, "align": {**_align("en", half), **_align("es", half)}}),
               _message(m2, {**_records(np.ones((ROWS, DIM)), 1.0, 8, [0], "en+es", "es-1"),
                             "align": {**_align("en", 4), **_align("es", 4)}})]
    assert strategy.aggregate_train(2, replies) == (None, None)
    assert f"add up to {2 * half}" in strategy.last_round["invalid"]["mix-1"]
    assert "is site 'es-1' (es)" in strategy.last_round["invalid"]["es-1"]

    identities = SiteIdentities(["en", "es"])
    assert identities.resolve(1, ("mix-1", "en+es")) == ("mix-1", "en+es")
    for node, claim in ((2, ("mix-2", "es+en")), (3, ("mix-3", "en+fr")), (4, ("fr-1", "fr")), (5, ("x", "en+en"))):
        with pytest.raises(InvalidReply, match="not one of this run's"):
            identities.resolve(node, claim)


# -- hostile replies ----------------------------------------------------------------------
def _nan(a: np.ndarray) -> np.ndarray:
    a = a.astype(a.dtype, copy=True)
    a.reshape(-1)[0] = np.nan
    return a


def _plain(records: dict, record: str) -> dict:
    if not isinstance(records.get(record), dict):  # removed or replaced by an earlier mutation
        raise KeyError(record)
    return records[record]


def _set(records: dict, record: str, key: str, value) -> dict:
    return {**records, record: {**_plain(records, record), key: value}}


def _without(records: dict, record: str, key: str) -> dict:
    return {**records, record: {k: v for k, v in _plain(records, record).items() if k != key}}


def _flat(records: dict, name: str, value) -> dict:
    """Replace one alignment entry (by its key after the community)."""
    align = {k: (value if k.endswith("/" + name) else v) for k, v in _plain(records, "align").items()}
    return {**records, "align": align}


MUTATIONS = {  # each makes a reply that must be rejected
    "num-examples NaN": lambda r: _set(r, "metrics", "num-examples", float("nan")),
    "num-examples inf": lambda r: _set(r, "metrics", "num-examples", float("inf")),
    "num-examples 1e12": lambda r: _set(r, "metrics", "num-examples", 10**12),
    "num-examples negative": lambda r: _set(r, "metrics", "num-examples", -20),
    "num-examples zero": lambda r: _set(r, "metrics", "num-examples", 0),
    "num-examples fraction": lambda r: _set(r, "metrics", "num-examples", 2.5),
    "num-examples list": lambda r: _set(r, "metrics", "num-examples", [1, 2]),
    "num-examples missing": lambda r: _without(r, "metrics", "num-examples"),
    "loss NaN": lambda r: _set(r, "metrics", "train_loss", float("nan")),
    "weight NaN": lambda r: _set(r, "arrays", "w", _nan(r["arrays"]["w"])),
    "weight inf": lambda r: _set(r, "arrays", "w", np.array([np.inf], np.float16)),
    "weight shape broadcasts": lambda r: _set(r, "arrays", TOKEN_EMBEDDINGS, np.ones((1, DIM), np.float16)),
    "weight shape transposed": lambda r: _set(r, "arrays", TOKEN_EMBEDDINGS, np.ones((DIM, ROWS), np.float16)),
    "weight dtype float32": lambda r: _set(r, "arrays", "w", np.array([1.0], np.float32)),
    "weight dtype int": lambda r: _set(r, "arrays", "w", np.array([1], np.int64)),
    "weight missing": lambda r: _without(r, "arrays", "w"),
    "weight extra": lambda r: _set(r, "arrays", "evil", np.ones(2, np.float16)),
    "extra ArrayRecord": lambda r: {**r, "evil": {"x": np.ones(2, np.float32)}},
    "extra MetricRecord": lambda r: {**r, "metrics2": MetricRecord({"num-examples": 3})},
    "extra ConfigRecord": lambda r: {**r, "note": {"hello": "world"}},
    "arrays missing": lambda r: {k: v for k, v in r.items() if k != "arrays"},
    "arrays as config": lambda r: {**r, "arrays": ConfigRecord({"w": "1.0"})},
    "metrics missing": lambda r: {k: v for k, v in r.items() if k != "metrics"},
    "site missing": lambda r: {k: v for k, v in r.items() if k != "site"},
    "site renames itself": lambda r: _set(r, "site", "site", "es-9"),
    "site claims another community": lambda r: _set(r, "site", "community", "es" if r["site"]["community"] == "en" else "en"),
    "site claims both communities": lambda r: _set(r, "site", "community", "en+es"),
    "site extra key": lambda r: _set(r, "site", "hospital", "x"),
    "site name not a string": lambda r: _set(r, "site", "site", 7),
    "align missing": lambda r: {k: v for k, v in r.items() if k != "align"},
    "align community xx": lambda r: {**r, "align": {k.replace(k.split('/')[0], "xx", 1): v for k, v in r["align"].items()}},
    "align other community": lambda r: {**r, "align": {("es" if k.startswith("en/") else "en") + k[2:]: v
                                                        for k, v in r["align"].items()}},
    "align adds the other community": lambda r: {**r, "align": {**r["align"], **{
        ("es" if k.startswith("en/") else "en") + k[2:]: v for k, v in r["align"].items()}}},
    "align NaN": lambda r: _flat(r, f"{NORM}.sum", _nan(np.ones(DIM, np.float32))),
    "align inf count": lambda r: _flat(r, f"{NORM}.n", np.array([np.inf], np.float32)),
    "align negative count": lambda r: _flat(r, f"{NORM}.n", np.array([-4.0], np.float32)),
    "align huge count": lambda r: _flat(r, f"{NORM}.n", np.array([1e9], np.float32)),
    "align negative variance": lambda r: _flat(r, f"{NORM}.sumsq", np.full(DIM, -1.0, np.float32)),
    "align wrong shape": lambda r: _flat(r, f"{NORM}.sum", np.ones(DIM + 1, np.float32)),
    "align wrong dtype": lambda r: _flat(r, f"{NORM}.sum", np.ones(DIM, np.float64)),
    "align missing key": lambda r: {**r, "align": {k: v for k, v in r["align"].items() if not k.endswith(".sumsq")}},
    "align extra key": lambda r: {**r, "align": {**r["align"], f"{r['site']['community']}/image_head.x#0.n": np.ones(1, np.float32)}},
    "usage wrong length": lambda r: _set(r, "usage", "token_rows", np.ones(ROWS + 3, np.uint8)),
    "usage values": lambda r: _set(r, "usage", "token_rows", np.full(ROWS, 7, np.uint8)),
    "usage dtype": lambda r: _set(r, "usage", "token_rows", np.ones(ROWS, np.float32)),
    "usage missing": lambda r: {k: v for k, v in r.items() if k != "usage"},
    "privacy instead of usage": lambda r: {**{k: v for k, v in r.items() if k != "usage"}, "privacy": {"epsilon": 1.0}},
}


def _weighted_average(updates: list[tuple[np.ndarray, float, int, list[int]]]) -> tuple[np.ndarray, float]:
    """The expected global model: token rows over the sites that used them (else over all), w over all."""
    emb = np.full((ROWS, DIM), 9.0)
    for row in range(ROWS):
        users = [(e, n) for e, _, n, used in updates if row in used] or [(e, n) for e, _, n, _ in updates]
        emb[row] = sum(n * e[row].astype(np.float16).astype(np.float64) for e, n in users) / sum(n for _, n in users)
    total = sum(n for _, _, n, _ in updates)
    w = sum(n * float(np.float16(o)) for _, o, n, _ in updates) / total
    return emb, w


def test_hundreds_of_malformed_replies_never_crash_a_round_or_poison_the_model():
    rng, arrays_rng = random.Random(7), np.random.default_rng(7)
    honest, hostile = [11, 12], [13, 14, 15, 16]
    identities = SiteIdentities(["en", "es"])
    names = {11: ("en-1", "en"), 12: ("es-1", "es"), 13: ("en-2", "en"), 14: ("es-2", "es"), 15: ("en-3", "en"),
             16: ("es-3", "es")}
    strategy, _ = _strategy(tuple(names), identities)
    # round 0: every node sends a valid reply, which binds its identity
    messages = list(strategy.configure_train(1, arrays_record({TOKEN_EMBEDDINGS: np.full((ROWS, DIM), 9.0, np.float32),
                                                               "w": np.array([0.0], np.float32)}),
                                             ConfigRecord(), Nodes(*names)))
    strategy.aggregate_train(1, [_message(m, _records(np.full((ROWS, DIM), 9.0), 0.0, 8, [0], names[n][1], names[n][0]))
                                 for m in messages for n in [m.metadata.dst_node_id]])
    thrown, kinds = 0, set()
    for rnd in range(2, 132):
        start = {TOKEN_EMBEDDINGS: np.full((ROWS, DIM), 9.0, np.float32), "w": np.array([0.0], np.float32)}
        messages = {m.metadata.dst_node_id: m for m in
                    strategy.configure_train(rnd, arrays_record(start), ConfigRecord(), Nodes(*names))}
        replies, valid = [], []
        for node in honest:
            emb, other = 9.0 + arrays_rng.uniform(-1, 1, (ROWS, DIM)), rng.uniform(-1, 1)
            n, used = rng.randint(1, 64), rng.sample(range(ROWS), rng.randint(1, ROWS))
            replies.append(_message(messages[node], _records(emb, other, n, used, names[node][1], names[node][0])))
            valid.append((emb, other, n, used))
        for node in hostile:
            records = _records(9.0 + arrays_rng.uniform(-1, 1, (ROWS, DIM)), rng.uniform(-1, 1), rng.randint(1, 64), [0, 1],
                               names[node][1], names[node][0])
            for kind in rng.sample(sorted(MUTATIONS), rng.randint(1, 3)):
                try:
                    records = MUTATIONS[kind](records)
                    kinds.add(kind)
                except (KeyError, TypeError, AttributeError):  # an earlier mutation removed what it changes
                    pass
            replies.append(_message(messages[node], records))
            thrown += 1
        rng.shuffle(replies)
        arrays, _ = strategy.aggregate_train(rnd, replies)  # nothing escapes
        assert sorted(strategy.last_round["sites"]) == ["en-1", "es-1"], strategy.last_round
        assert sorted(strategy.last_round["invalid"]) == ["en-2", "en-3", "es-2", "es-3"]
        got = record_arrays(arrays)
        assert all(np.isfinite(a).all() for a in got.values())
        emb, w = _weighted_average(valid)
        np.testing.assert_allclose(got[TOKEN_EMBEDDINGS], emb, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["w"], w, rtol=1e-5, atol=1e-6)
        assert strategy.alignment.communities == ["en", "es", "fr"]
        assert all(torch.isfinite(v).all() for b in strategy.alignment.sums.values() for v in b.values())
    assert thrown >= 500 and kinds == set(MUTATIONS)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_a_server_optimizer_never_steps_the_batchnorm_running_statistics(name):
    """Momentum (or Adam) on a running variance drives it below zero: the statistics take the
    plain mean, the parameters the server optimizer's step."""
    from medunic_core.federation.aggregate import running_statistics

    arrays = [{"bn.running_var": np.full(3, v), "bn.running_mean": np.full(3, v), "w": np.full(3, v)}
              for v in (1.0, 3.0)]
    stats = running_statistics(arrays, [1.0, 3.0])
    assert sorted(stats) == ["bn.running_mean", "bn.running_var"]
    assert all(np.allclose(v, 2.5) for v in stats.values())
    cfg = load_config("tiny", [f"fed.strategy={name}"])
    assert make_strategy(cfg, 2).server_optimizer


# -- a malicious site within the outlier bound --------------------------------------------
SITES = {11: ("en-1", "en"), 12: ("en-2", "en"), 13: ("en-3", "en"), 14: ("es-1", "es"), 15: ("es-2", "es")}


def _poisoned_round(strategy_name: str, attacker_w: float = -30.0):
    """Four honest sites move ``w`` from 0 to about 1 and the token rows alike; en-3 sends
    ``w`` = ``attacker_w`` (norm about 8 x the honest ones': under fed.reject_factor 10, so
    accepted). Returns the aggregate's ``w``, the honest values and the round's record."""
    strategy, messages = _strategy(tuple(SITES), SiteIdentities(["en", "es"]), f"fed.strategy={strategy_name}")
    honest = {11: 0.9, 12: 1.0, 14: 1.1, 15: 0.95}
    replies = []
    for m in messages:
        node = m.metadata.dst_node_id
        w = honest.get(node, attacker_w)
        replies.append(_message(m, _records(np.full((ROWS, DIM), 8.0), w, 30, [0, 1], SITES[node][1], SITES[node][0])))
    arrays, _ = strategy.aggregate_train(1, replies)
    return float(record_arrays(arrays)["w"][0]), sorted(honest.values()), strategy.last_round


def test_averaging_lets_one_malicious_site_steer_the_model_and_robust_strategies_do_not():
    """The attack: a registered site sends a scaled update the opposite way, small enough to
    pass the outlier check. FedAvg's mean follows it; the median and the trimmed mean stay
    within the honest sites' values, whatever the attacker sends."""
    w, honest, record = _poisoned_round("fedavg")
    assert record["rejected"] == [] and len(record["sites"]) == 5  # the attack passed every check
    assert w < -5  # the honest sites moved w to about +1; one site of five reversed it five times over
    for name in ("fedmedian", "fedtrimmedavg"):
        for attacker_w in (-30.0, 30.0, 1.02):
            w, honest, record = _poisoned_round(name, attacker_w)
            assert record["rejected"] == [] and len(record["sites"]) == 5
            assert honest[0] <= w <= honest[-1], (name, attacker_w, w)


def test_robust_strategies_refuse_rounds_too_small_to_outvote_a_site():
    """A median of two sites is their mean; a trimmed mean that cuts nothing is a mean: both
    refused before round 1, and a round left with too few accepted replies keeps the weights."""
    assert type(make_strategy(load_config("tiny", ["fed.strategy=fedmedian"]), 3)).__name__ == "MedUniCFedMedian"
    trimmed = make_strategy(load_config("tiny", ["fed.strategy=fedtrimmedavg"]), 5)
    assert type(trimmed).__name__ == "MedUniCFedTrimmedAvg" and trimmed.beta == 0.2
    for overrides, sites, needed in ((["fed.strategy=fedmedian"], 2, 3),
                                     (["fed.strategy=fedtrimmedavg"], 4, 5),  # int(0.2 x 4) = 0 cut
                                     (["fed.strategy=fedmedian", "fed.min_sites=2"], 5, 3)):
        with pytest.raises(ConfigError, match=f"rounds of at least {needed} sites"):
            make_strategy(load_config("tiny", overrides), sites)
    assert make_strategy(load_config("tiny", ["fed.strategy=fedtrimmedavg", "fed.trim=0.25"]), 4).min_accepted == 4
    for trim in ("0", "0.5"):
        with pytest.raises(ConfigError, match="fed.trim"):
            make_strategy(load_config("tiny", ["fed.strategy=fedtrimmedavg", f"fed.trim={trim}"]), 9)

    strategy, (m1, m2, m3) = _strategy((11, 12, 13), None, "fed.strategy=fedmedian")
    died = Message(Error(code=0, reason="site died mid-round"), reply_to=m3)
    replies = [_message(m1, _records(np.full((ROWS, DIM), 8.0), 1.0, 10, [0], "en", "en-1")),
               _message(m2, _records(np.full((ROWS, DIM), 8.0), -30.0, 10, [0], "es", "es-1")), died]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.last_round["sites"] == ["en-1", "es-1"] and strategy.last_round["failed"] == 1
