"""Stage 1 vocabulary: extension keeps ids, new words are single tokens, hashes are honest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

from medunic_core import cli
from medunic_core.config import VocabConfig
from medunic_core.constants import VOCAB_SHA_FILE
from medunic_core.data.manifest import Record, write_manifest
from medunic_core.errors import ConfigError, SiteDataError, VocabMismatchError
from medunic_core.vocab import (
    VOCAB_STATS_FILE,
    build_tokenizer,
    document_frequencies,
    load_tokenizer,
    resize_token_embeddings,
    vocab_sha256,
    word_splitter,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# 60 English entries after the specials: letters, a few continuations, punctuation, words.
BASE_TOKENS = (
    SPECIALS
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + ["##s", "##ed", "##a", "##o", "##e", "##n", ".", ","]
    + (
        "the heart is normal size lungs clear no pleural effusion left right small large "
        "there of and with lung in mild"
    ).split()
)

# Document frequencies after the uncased base's normalisation (lowercase, accents stripped):
# derrame 4; cardiaca, silueta 3; de, mm, pulmones, 12 2; neumotorax, derecho... 1.
# "pleural" and "normal" are base entries; "12" has no letter.
ES_REPORTS = [
    "Derrame pleural derecho de 12 mm. Silueta cardíaca normal.",
    "Derrame pleural izquierdo, silueta cardíaca aumentada de tamaño.",
    "Pulmones claros. Derrame pleural pequeño. Silueta CARDÍACA normal.",
    "Derrame en base derecha; pulmones con neumotórax? no. 12 mm.",
]
EXPECTED_ADDED = ["derrame", "cardiaca", "silueta", "de", "mm", "pulmones"]
# "opacity" has df 2 here, but only reports of vocab.extend_lang are counted.
EN_REPORTS = ["Opacity in the left lung.", "Opacity with mild effusion.", "The heart is normal."]


def _reports() -> list[tuple[str, str]]:
    return [(t, "es") for t in ES_REPORTS] + [(t, "en") for t in EN_REPORTS]


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """A CXR-BERT-like base folder: vocab.txt and tokenizer_config.json only."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in BASE_TOKENS), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return folder


def _extend(base_dir: Path, out: Path, **overrides: object):
    cfg = VocabConfig(**{"base": str(base_dir), "max_new_tokens": 50, "min_df": 2, **overrides})
    return build_tokenizer(cfg, _reports(), out)


def _vocab_lines(folder: Path) -> list[str]:
    return (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()


def test_document_frequencies_count_each_report_once() -> None:
    df = document_frequencies(["a b a", "b c", "c c c"], str.split)

    assert df == {"a": 1, "b": 2, "c": 2}


def test_word_splitter_follows_tokenizer_normalisation(base_dir: Path, tmp_path: Path) -> None:
    tokenizer = _extend(base_dir, tmp_path / "tok")

    words = word_splitter(tokenizer)("Silueta CARDÍACA, derrame.")

    assert words == ["silueta", "cardiaca", ",", "derrame", "."]


def test_build_tokenizer_extend_keeps_original_ids(base_dir: Path, tmp_path: Path) -> None:
    tokenizer = _extend(base_dir, tmp_path / "tok")

    assert [tokenizer.convert_tokens_to_ids(t) for t in BASE_TOKENS] == list(range(len(BASE_TOKENS)))
    assert _vocab_lines(tmp_path / "tok")[: len(BASE_TOKENS)] == BASE_TOKENS


def test_build_tokenizer_extend_adds_frequent_words_by_df_then_word(base_dir: Path, tmp_path: Path) -> None:
    _extend(base_dir, tmp_path / "tok")

    assert _vocab_lines(tmp_path / "tok")[len(BASE_TOKENS) :] == EXPECTED_ADDED
    stats = json.loads((tmp_path / "tok" / VOCAB_STATS_FILE).read_text(encoding="utf-8"))
    assert stats["base_size"] == len(BASE_TOKENS)
    assert stats["added"] == len(EXPECTED_ADDED)
    assert stats["vocab_size"] == len(BASE_TOKENS) + len(EXPECTED_ADDED)
    assert stats["top_added"][:2] == [{"token": "derrame", "df": 4}, {"token": "cardiaca", "df": 3}]


def test_build_tokenizer_extend_respects_min_df_and_max_new_tokens(base_dir: Path, tmp_path: Path) -> None:
    _extend(base_dir, tmp_path / "df3", min_df=3)
    _extend(base_dir, tmp_path / "top2", max_new_tokens=2)
    _extend(base_dir, tmp_path / "df1", min_df=1)

    assert _vocab_lines(tmp_path / "df3")[len(BASE_TOKENS) :] == ["derrame", "cardiaca", "silueta"]
    assert _vocab_lines(tmp_path / "top2")[len(BASE_TOKENS) :] == ["derrame", "cardiaca"]
    assert "neumotorax" in _vocab_lines(tmp_path / "df1")
    assert "neumotorax" not in _vocab_lines(tmp_path / "top2")


def test_build_tokenizer_extend_new_words_are_wordpiece_entries(base_dir: Path, tmp_path: Path) -> None:
    tokenizer = _extend(base_dir, tmp_path / "tok")
    new_ids = {tokenizer.convert_tokens_to_ids(w) for w in EXPECTED_ADDED}

    assert tokenizer.tokenize("Derrame cardíaca, PULMONES") == ["derrame", "cardiaca", ",", "pulmones"]
    # A WordPiece entry is a prefix inside a longer word; an added token would be split out.
    assert tokenizer.tokenize("derrames") == ["derrame", "##s"]
    assert not new_ids & set(tokenizer.added_tokens_decoder)
    assert min(new_ids) == len(BASE_TOKENS)


def test_build_tokenizer_extend_folder_loads_with_standard_loaders(base_dir: Path, tmp_path: Path) -> None:
    built = _extend(base_dir, tmp_path / "tok")
    text = "Silueta cardíaca normal. Derrame pleural."

    for loader in (AutoTokenizer, BertTokenizerFast):
        reloaded = loader.from_pretrained(str(tmp_path / "tok"))
        assert reloaded(text)["input_ids"] == built(text)["input_ids"]
        assert len(reloaded) == len(BASE_TOKENS) + len(EXPECTED_ADDED)


def test_vocab_sha256_is_the_hash_of_vocab_txt_and_stable_on_reload(base_dir: Path, tmp_path: Path) -> None:
    tokenizer = _extend(base_dir, tmp_path / "a")
    _extend(base_dir, tmp_path / "b")
    _extend(base_dir, tmp_path / "top2", max_new_tokens=2)

    sha = vocab_sha256(tokenizer)
    assert sha == hashlib.sha256((tmp_path / "a" / "vocab.txt").read_bytes()).hexdigest()
    assert sha == (tmp_path / "a" / VOCAB_SHA_FILE).read_text().strip()
    assert sha == vocab_sha256(tmp_path / "a") == vocab_sha256(load_tokenizer(tmp_path / "a"))
    assert vocab_sha256(tmp_path / "b") == sha
    assert vocab_sha256(tmp_path / "top2") != sha


def test_load_tokenizer_wrong_expected_hash_names_both(base_dir: Path, tmp_path: Path) -> None:
    sha = vocab_sha256(_extend(base_dir, tmp_path / "tok"))
    wrong = "0" * 64

    with pytest.raises(VocabMismatchError) as info:
        load_tokenizer(tmp_path / "tok", expected_sha256=wrong)

    assert sha in str(info.value) and wrong in str(info.value)
    assert "re-sync" in str(info.value)


def test_load_tokenizer_refuses_folder_edited_after_build(base_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    _extend(base_dir, folder)
    (folder / VOCAB_SHA_FILE).write_text("f" * 64 + "\n")

    with pytest.raises(VocabMismatchError, match="f" * 64):
        load_tokenizer(folder)


def test_build_tokenizer_missing_base_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere"):
        build_tokenizer(VocabConfig(base=str(tmp_path / "nowhere")), _reports(), tmp_path / "tok")


def test_build_tokenizer_without_extend_lang_reports_fails(base_dir: Path, tmp_path: Path) -> None:
    english_only = [(t, "en") for t in EN_REPORTS]

    with pytest.raises(SiteDataError, match="'es'"):
        build_tokenizer(VocabConfig(base=str(base_dir)), english_only, tmp_path / "tok")


def test_build_tokenizer_trains_deterministic_wordpiece_without_base(tmp_path: Path) -> None:
    cfg = VocabConfig(base=None, vocab_size=120)
    reports = _reports() * 3

    first = build_tokenizer(cfg, reports, tmp_path / "a")
    second = build_tokenizer(cfg, reports, tmp_path / "b")

    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert [reloaded.convert_tokens_to_ids(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    assert len(SPECIALS) < len(reloaded) <= 120
    assert reloaded.tokenize("DERRAME Pleural") == reloaded.tokenize("derrame pleural")
    assert vocab_sha256(first) == vocab_sha256(second)
    assert _vocab_lines(tmp_path / "a") == _vocab_lines(tmp_path / "b")


def _tiny_bert_config(vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )


def test_resize_token_embeddings_keeps_old_rows_and_draws_new_from_normal() -> None:
    torch.manual_seed(0)
    model = BertModel(_tiny_bert_config(65))
    old = model.get_input_embeddings().weight.detach().clone()

    resize_token_embeddings(model, 65 + 2000, std=0.02, seed=7)

    weight = model.get_input_embeddings().weight.detach()
    assert weight.shape == (2065, 64)
    assert torch.equal(weight[:65], old)
    new_rows = weight[65:]  # 128,000 draws: the sample std is within ~1e-4 of 0.02
    assert abs(new_rows.std().item() - 0.02) < 5e-4
    assert abs(new_rows.mean().item()) < 5e-4
    assert model.config.vocab_size == 2065
    out = model(input_ids=torch.tensor([[2, 2064, 3]])).last_hidden_state
    assert out.shape == (1, 3, 64)


def test_resize_token_embeddings_is_seeded() -> None:
    models = [BertModel(_tiny_bert_config(65)) for _ in range(3)]

    for model, seed in zip(models, (1, 1, 2)):
        resize_token_embeddings(model, 80, seed=seed)

    rows = [m.get_input_embeddings().weight.detach()[65:] for m in models]
    assert torch.equal(rows[0], rows[1])
    assert not torch.equal(rows[0], rows[2])


def test_resize_token_embeddings_keeps_mlm_decoder_tied() -> None:
    model = BertForMaskedLM(_tiny_bert_config(65))
    old_bias = model.cls.predictions.bias.detach().clone()

    resize_token_embeddings(model, 70)

    decoder = model.get_output_embeddings()
    assert decoder.weight is model.get_input_embeddings().weight
    assert torch.equal(decoder.bias[:65], old_bias)
    assert torch.equal(decoder.bias[65:], torch.zeros(5))
    assert model.cls.predictions.bias is decoder.bias
    logits = model(input_ids=torch.tensor([[2, 69, 3]])).logits
    assert logits.shape == (1, 3, 70)


def test_resize_token_embeddings_refuses_to_shrink() -> None:
    model = BertModel(_tiny_bert_config(65))

    with pytest.raises(VocabMismatchError, match="65 token embeddings"):
        resize_token_embeddings(model, 60)


def _manifest(tmp_path: Path) -> Path:
    rows = [(t, "es", "train") for t in ES_REPORTS] + [(t, "en", "train") for t in EN_REPORTS]
    # Frequent, but held out: test reports never shape the vocabulary.
    rows += [("Hallazgo hallazgo.", "es", "test")] * 3
    records = [
        Record(f"r{i}", f"img/r{i}.png", text, lang, split, f"{lang}-1")
        for i, (text, lang, split) in enumerate(rows)
    ]
    return write_manifest(records, tmp_path / "data" / "manifest.jsonl")


def test_cli_vocab_builds_into_train_out_dir(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(tmp_path)

    rc = cli.main(
        ["vocab", "--manifest", str(manifest), f"vocab.base={base_dir}", f"train.out_dir={tmp_path / 'run'}"]
    )

    assert rc == 0
    folder = tmp_path / "run" / "tokenizer"
    assert _vocab_lines(folder)[len(BASE_TOKENS) :] == EXPECTED_ADDED
    printed = capsys.readouterr().out
    assert f"sha256: {vocab_sha256(folder)}" in printed
    assert f"({len(BASE_TOKENS)} tokens)" in printed
    assert "added: 6 " in printed
    assert "derrame (4)" in printed
    assert AutoTokenizer.from_pretrained(str(folder)).model_max_length == 64  # tiny text.max_length


def test_cli_vocab_missing_manifest_exits_with_site_data_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["vocab", "--manifest", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "tok")])

    assert rc == SiteDataError.exit_code
    assert "missing.jsonl" in capsys.readouterr().err
