"""The ClientApp called directly with real Messages: what a reply carries, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from client.records import arrays_record, record_arrays
from medunic_core.federation.runconfig import load_run_config
from medunic_core.federation.stages import VLP, stage_model
from medunic_core.data.manifest import read_manifest
from medunic_core.errors import (
    CheckpointMismatchError, ConfigError, PrivacyBudgetError, SiteDataError, VocabMismatchError,
)
from medunic_core.exchange import TOKEN_EMBEDDINGS, model_arrays, wire_names
from medunic_core.vocab import load_tokenizer, vocab_sha256

from tests.inprocess import InProcessGrid

# DESIGN.md, "What travels": the records a training reply may hold, and nothing else.
TRAIN_REPLY = {"arrays", "metrics", "align", "usage", "site"}


def _train_message(model, sha: str, node: int = 1, align=None) -> Message:
    content = RecordDict(
        {"arrays": arrays_record(model_arrays(model)), "config": ConfigRecord({"server-round": 1, "vocab-sha": sha})}
    )
    if align is not None:
        content["align"] = align
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)


@pytest.fixture
def setup(run_config, fed_tokenizer):
    rc = run_config()
    cfg = load_run_config(rc)
    tok = load_tokenizer(fed_tokenizer)
    return rc, cfg, stage_model(cfg, tok, VLP), vocab_sha256(tok)


def test_train_reply_carries_only_what_may_travel(setup, synthetic_data):
    rc, cfg, model, sha = setup
    grid = InProcessGrid(rc)
    reply = grid.send_and_receive([_train_message(model, sha, node=2)])[0]  # partition 1: es-1
    assert not reply.has_error()
    assert set(reply.content.keys()) == TRAIN_REPLY
    arrays = record_arrays(reply.content["arrays"])
    assert list(arrays) == wire_names(model)  # trainable parameters + BN statistics, by name
    state = model.state_dict()
    assert all(arrays[k].shape == tuple(state[k].shape) for k in arrays)
    assert any(not np.array_equal(arrays[k], model_arrays(model)[k]) for k in arrays)  # it trained
    metrics = dict(reply.content["metrics"])
    assert metrics["num-examples"] == 2 * cfg.train.batch_size
    assert set(metrics) - {"num-examples"} <= {f"train_{k}" for k in  # round means of the losses, and timing
                                               ("loss", "cvl_loss", "ssv_loss", "tf_loss", "tt_loss", "ctr_loss", "lr",
                                                "seconds", "pairs_per_s", "steady_pairs_per_s")}
    align = record_arrays(reply.content["align"])
    assert align and all(k.startswith("es/") for k in align)  # only its own community's sums
    assert all(v.dtype == np.float32 and v.ndim <= 2 for v in align.values())  # sums, not per-sample rows
    rows = record_arrays(reply.content["usage"])["token_rows"]
    assert rows.shape == (model.state_dict()[TOKEN_EMBEDDINGS].shape[0],) and 0 < rows.sum() < rows.size
    assert dict(reply.content["site"]) == {"site": "es-1", "community": "es"}
    # no report text anywhere in the reply
    reports = {r.report for r in read_manifest(synthetic_data)}
    assert not any(str(v) in reports for rec in reply.content.config_records.values() for v in rec.values())


def test_site_with_another_vocabulary_is_refused(setup):
    rc, _, model, _ = setup
    with pytest.raises(VocabMismatchError, match="differs from the expected"):
        InProcessGrid(rc).send_and_receive([_train_message(model, "0" * 64)])


def test_site_with_another_app_version_is_refused(setup):
    rc, _, model, sha = setup
    msg = _train_message(model, sha)
    msg.content["config"]["app-version"] = "0.0.1"
    with pytest.raises(ConfigError, match="runs medunic .*, the run uses 0.0.1"):
        InProcessGrid(rc).send_and_receive([msg])


def test_weights_of_another_architecture_are_refused(setup, run_config):
    rc, _, model, sha = setup
    other = InProcessGrid(run_config("model.head.embed_dim=64"))
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        other.send_and_receive([_train_message(model, sha)])


def test_partition_without_site_is_a_clear_error(setup):
    rc, _, model, sha = setup
    grid = InProcessGrid({**rc, "sites": "en-1:en"})
    with pytest.raises(Exception, match="partition 1 has no site"):
        grid.send_and_receive([_train_message(model, sha, node=2)])


def test_site_with_rows_of_another_language_is_refused(setup):
    rc, _, model, sha = setup
    grid = InProcessGrid({**rc, "sites": "en-1:es,es-1:es"})  # en-1's rows are English
    with pytest.raises(SiteDataError, match="declared 'es'"):
        grid.send_and_receive([_train_message(model, sha, node=1)])


def test_evaluate_and_statistics_queries(setup):
    rc, _, model, sha = setup
    grid = InProcessGrid(rc)
    content = RecordDict({"arrays": arrays_record(model_arrays(model)), "config": ConfigRecord({"vocab-sha": sha})})
    ev = grid.send_and_receive([Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=1)])[0]
    metrics = dict(ev.content["metrics"])
    assert 0.0 <= metrics["zeroshot_auc"] <= 1.0 and metrics["num-examples"] > 0
    for query, prefix in (("query.stats", "en/"), ("query.community", "en/text_head.")):
        reply = grid.send_and_receive([Message(content=content, message_type=query, dst_node_id=1)])[0]
        keys = list(record_arrays(reply.content["align"]))
        assert keys and all(k.startswith(prefix) for k in keys)


def test_dp_train_reply_is_clipped_noised_and_sends_no_token_rows(run_config, fed_tokenizer, tmp_path):
    clip = 0.5
    rc = run_config("dp.updates.enabled=true", "dp.updates.delta=1e-5", "dp.updates.noise_multiplier=1e-6",
                    f"dp.updates.clip={clip}", f"data.cache_dir={tmp_path / 'cache'}")
    cfg = load_run_config(rc)
    tok = load_tokenizer(fed_tokenizer)
    model = stage_model(cfg, tok, VLP)
    reply = InProcessGrid(rc).send_and_receive([_train_message(model, vocab_sha256(tok))])[0]
    assert not reply.has_error()
    assert set(reply.content.keys()) == TRAIN_REPLY - {"usage"} | {"privacy"}
    sent, received = record_arrays(reply.content["arrays"]), model_arrays(model)
    update = np.sqrt(sum(float(np.sum((sent[k].astype(np.float64) - received[k]) ** 2)) for k in sent))
    assert update <= clip * 1.01  # clipped (the noise is negligible here)
    privacy = dict(reply.content["privacy"])
    assert privacy["releases"] == 1 and privacy["delta"] == 1e-5 and privacy["clip"] == clip
    assert set(privacy) == {"epsilon", "epsilon_all_runs", "delta", "releases", "noise_multiplier", "clip"}


def test_site_privacy_budget_stops_releases(run_config, fed_tokenizer, synthetic_data, tmp_path):
    """Deployment node config with a budget: a run without DP is refused; with DP the site
    releases while its epsilon over all releases stays within the budget, then refuses."""
    from flwr.app import Context

    from client.app import app as client_app
    from medunic_core.privacy import UPDATE_SENSITIVITY, rdp_epsilon

    node = {"site": "en-1", "lang": "en", "data-path": str(synthetic_data), "cache-dir": str(tmp_path / "cache"),
            "state-dir": str(tmp_path / "state"), "tokenizer": str(fed_tokenizer), "dp-max-epsilon": 0.0,
            "min-pairs": 16}  # the tests' rounds: 2 steps x 8 pairs
    noise = 2.0
    one = rdp_epsilon([(noise / UPDATE_SENSITIVITY, 1.0, 1)], 1e-5)
    two = rdp_epsilon([(noise / UPDATE_SENSITIVITY, 1.0, 2)], 1e-5)
    node["dp-max-epsilon"] = (one + two) / 2  # room for exactly one release
    tok = load_tokenizer(fed_tokenizer)

    def send(rc):
        model = stage_model(load_run_config(rc), tok, VLP)
        ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=rc)
        return client_app(_train_message(model, vocab_sha256(tok)), ctx)

    with pytest.raises(Exception, match="trains only in runs with dp.updates.enabled=true"):
        send(run_config())
    dp = run_config("dp.updates.enabled=true", "dp.updates.delta=1e-5", f"dp.updates.noise_multiplier={noise}")
    assert dict(send(dp).content["privacy"])["epsilon"] == pytest.approx(one)
    with pytest.raises(Exception, match="over its budget dp-max-epsilon"):
        send(dp)


def test_site_release_floors_refuse_a_coordinators_small_rounds(run_config, fed_tokenizer, synthetic_data, tmp_path):
    """The attack: a coordinator asks a deployment site for rounds of one pair
    (``train.batch_size=1 fed.local_steps=1``: one report's token flags, one pair's alignment
    sums), a one-batch statistics pass, one-report MLM rounds, every word (``vocab.min_df=1``),
    or an evaluation on a split of a few reports.
    The site refuses each before it trains and sends nothing (its audit log stays empty); a
    run of the site's size goes through."""
    from flwr.app import Context

    from client.app import app as client_app
    from client.site import resolve_site
    from medunic_core.federation.stages import MLM
    from medunic_core.constants import DEFAULT_MIN_DF, DEFAULT_MIN_PAIRS

    node = {"site": "en-1", "lang": "en", "data-path": str(synthetic_data), "cache-dir": str(tmp_path / "cache"),
            "state-dir": str(tmp_path / "state"), "tokenizer": str(fed_tokenizer)}
    site = resolve_site(run_config(), node, load_run_config(run_config()))
    assert (site.min_pairs, site.min_df) == (DEFAULT_MIN_PAIRS, DEFAULT_MIN_DF)  # floors without being asked
    node["min-pairs"] = 12  # this site's operator: the tests' data has about 30 training pairs a site
    tok = load_tokenizer(fed_tokenizer)
    audit = tmp_path / "state" / "audit.jsonl"

    def send(rc, message_type=MessageType.TRAIN, stage=VLP, **config):
        model = stage_model(load_run_config(rc), tok, stage)
        content = RecordDict({"arrays": arrays_record(model_arrays(model)),
                              "config": ConfigRecord({"server-round": 1, "vocab-sha": vocab_sha256(tok), **config})})
        ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=rc)
        return client_app(Message(content=content, message_type=message_type, dst_node_id=1), ctx)

    attacks = [
        (run_config("train.batch_size=1", "fed.local_steps=1"), MessageType.TRAIN, VLP, {},
         "fewer than 12 distinct pairs .* round 1 would draw on at most 1 "),
        (run_config(), "query.stats", VLP, {"batches": 1}, "the statistics pass of round 1 would draw on at most 8 "),
        (run_config("mlm.batch_size=1", "fed.local_steps=1"), "train.mlm", MLM, {},
         "MLM round 1 would draw on at most 1 "),
        (run_config("vocab.min_df=1"), "query.vocab", VLP, {}, "at least 2 of its reports .* vocab.min_df=1"),
        (run_config("eval.split=val"), MessageType.EVALUATE, VLP, {}, "the evaluation on its 'val' split would draw "
         "on at most 4 "),
    ]
    for rc, message_type, stage, config, message in attacks:
        with pytest.raises(PrivacyBudgetError, match=message):
            send(rc, message_type, stage, **config)
    assert not audit.exists()  # nothing was sent
    reply = send(run_config())  # 2 steps x 8 pairs
    assert list(record_arrays(reply.content["align"])) and len(audit.read_text().splitlines()) == 1


def test_a_language_drawn_from_too_few_pairs_keeps_its_sums_at_the_site(run_config, fed_tokenizer, synthetic_data,
                                                                        tmp_path):
    """A site of en+es with 3 Spanish reports: its rounds and statistics send English sums
    only (3 Spanish pairs are below its floor); its weights still learn from all of them."""
    from flwr.app import Context

    from client.app import app as client_app

    rows = [json.loads(x) for x in synthetic_data.read_text().splitlines()]
    es = [r for r in rows if r["site"] == "es-1" and r["split"] == "train"][:3]
    mixed = [{**r, "site": "mix-1"} for r in rows if r["site"] == "en-1" or r in es]
    manifest = synthetic_data.parent / "mix-1-few-es.jsonl"  # beside it: image paths stay valid
    manifest.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    node = {"site": "mix-1", "lang": "en+es", "data-path": str(manifest), "cache-dir": str(tmp_path / "cache"),
            "state-dir": str(tmp_path / "state"), "tokenizer": str(fed_tokenizer), "min-pairs": 8}
    tok = load_tokenizer(fed_tokenizer)
    rc = run_config()
    model = stage_model(load_run_config(rc), tok, VLP)
    content = RecordDict({"arrays": arrays_record(model_arrays(model)),
                          "config": ConfigRecord({"server-round": 1, "vocab-sha": vocab_sha256(tok), "batches": 4})})
    for message_type in (MessageType.TRAIN, "query.stats", "query.community"):
        ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=rc)
        reply = client_app(Message(content=content, message_type=message_type, dst_node_id=1), ctx)
        keys = list(record_arrays(reply.content["align"]))
        assert keys and all(k.startswith("en/") for k in keys), message_type
