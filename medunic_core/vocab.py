"""Stage 1 of MEDUNIC.md: the cross-lingual WordPiece vocabulary and its token embeddings.

Two ways to get a vocabulary, both saved as a standard Hugging Face tokenizer folder
(``tokenizer.json``, ``tokenizer_config.json``, ``vocab.txt``) plus ``vocab.sha256`` and
``vocab_stats.json``:

* **extend** (``vocab.base`` set): the base WordPiece vocabulary (e.g. CXR-BERT) keeps every
  entry at its id, and the most document-frequent ``vocab.extend_lang`` words that it lacks
  are appended as ordinary WordPiece entries, so such a word becomes one token.
* **train** (``vocab.base`` null): a BERT WordPiece vocabulary is trained on all reports.

The vocabulary hash (:func:`vocab_sha256`) is what sites and the server compare before any
weights travel: same hash, same token ids.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import WordPiece
from torch import nn
from transformers import AutoTokenizer, BertTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from medunic_core.cli import add_config_args
from medunic_core.config import VocabConfig, load_config
from medunic_core.constants import VOCAB_SHA_FILE
from medunic_core.data.manifest import read_manifest
from medunic_core.errors import ConfigError, SiteDataError, VocabMismatchError

__all__ = [
    "SPECIAL_TOKENS",
    "VOCAB_FILE",
    "VOCAB_STATS_FILE",
    "build_tokenizer",
    "build_tokenizer_from_counts",
    "document_frequencies",
    "load_tokenizer",
    "register",
    "resize_token_embeddings",
    "site_word_counts",
    "vocab_sha256",
    "vocabulary_words",
    "word_splitter",
]

logger = logging.getLogger(__name__)

VOCAB_FILE = "vocab.txt"
VOCAB_STATS_FILE = "vocab_stats.json"
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOP_IN_STATS = 100  # added tokens listed (with their df) in vocab_stats.json
TOP_PRINTED = 20  # added tokens printed by `medunic vocab`


def word_splitter(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], list[str]]:
    """Whole words exactly as ``tokenizer`` sees them before WordPiece.

    Uses the tokenizer's own normaliser (lowercasing, accent stripping) and pre-tokeniser,
    so a counted word is the very string WordPiece will later look up.
    """
    backend: Tokenizer = tokenizer.backend_tokenizer
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer

    def split(text: str) -> list[str]:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        if pre_tokenizer is None:
            return text.split()
        return [word for word, _ in pre_tokenizer.pre_tokenize_str(text)]

    return split


def document_frequencies(
    texts: Iterable[str], split_words: Callable[[str], Iterable[str]]
) -> Counter:
    """Number of texts each word occurs in (a report repeating a word counts once)."""
    df: Counter = Counter()
    for text in texts:
        df.update(set(split_words(text)))
    return df


def _ordered_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Tokens in id order; refuses vocabularies with holes, whose ids a list cannot express."""
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in ordered] != list(range(len(ordered))):
        raise VocabMismatchError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has non-contiguous token ids "
            f"({len(ordered)} tokens, highest id {max(vocab.values())}); "
            "rebuild the vocabulary with `medunic vocab`"
        )
    return ordered


def _hash_tokens(tokens: Sequence[str]) -> str:
    return hashlib.sha256("".join(f"{t}\n" for t in tokens).encode("utf-8")).hexdigest()


def vocab_sha256(tokenizer_or_folder: PreTrainedTokenizerBase | str | Path) -> str:
    """SHA-256 identifying a vocabulary, compared by sites and server before weights travel.

    Definition: hex SHA-256 of the UTF-8 bytes of every token in id order (ids 0..n-1,
    added tokens included), each followed by one ``"\\n"``. That is byte for byte the
    ``vocab.txt`` this module writes, so ``sha256sum vocab.txt`` gives the same value.
    Normalisation settings (lowercasing, accents) are not part of the hash.
    """
    if isinstance(tokenizer_or_folder, (str, Path)):
        tokenizer_or_folder = _auto_tokenizer(Path(tokenizer_or_folder))
    return _hash_tokens(_ordered_tokens(tokenizer_or_folder))


def _auto_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    if not folder.is_dir():
        raise ConfigError(
            f"tokenizer folder {folder} does not exist; build it with `medunic vocab` "
            "or point train.tokenizer at a tokenizer folder"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"tokenizer folder {folder} cannot be loaded ({exc}); rebuild it with `medunic vocab`"
        ) from exc


def load_tokenizer(
    folder: str | Path, expected_sha256: Optional[str] = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder and prove it is the vocabulary the model was built with.

    Checks the loaded vocabulary against the folder's own ``vocab.sha256`` (a stale or
    hand-edited folder) and against ``expected_sha256`` (e.g. the server's), raising
    :class:`VocabMismatchError` with both hashes: a wrong vocabulary gives no error on its
    own, only embeddings of the wrong tokens.
    """
    folder = Path(folder)
    tokenizer = _auto_tokenizer(folder)
    actual = vocab_sha256(tokenizer)
    sha_file = folder / VOCAB_SHA_FILE
    if sha_file.is_file():
        recorded = sha_file.read_text(encoding="utf-8").strip()
        if recorded != actual:
            raise VocabMismatchError(
                f"tokenizer {folder}: vocabulary sha256 {actual} differs from {sha_file} "
                f"({recorded}); the folder was changed after it was built: "
                "rebuild it with `medunic vocab`"
            )
    if expected_sha256 is not None and expected_sha256 != actual:
        raise VocabMismatchError(
            f"tokenizer {folder}: vocabulary sha256 {actual} differs from the expected "
            f"{expected_sha256}; re-sync the vocabulary (copy the coordinator's tokenizer folder)"
        )
    return tokenizer


def _load_base(base: Path) -> BertTokenizer:
    """The base WordPiece tokenizer; BertTokenizer also reads CXR-BERT-style vocab.txt folders."""
    if not base.is_dir():
        raise ConfigError(
            f"vocab.base {base} is not a folder; give a local BERT tokenizer folder "
            "(e.g. a downloaded CXR-BERT) or vocab.base=null to train a vocabulary"
        )
    try:
        tokenizer = BertTokenizer.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"vocab.base {base} cannot be loaded as a BERT tokenizer: {exc}") from exc
    if not isinstance(tokenizer.backend_tokenizer.model, WordPiece):
        raise ConfigError(
            f"vocab.base {base} is a {type(tokenizer.backend_tokenizer.model).__name__} tokenizer; "
            "Stage 1 extends a WordPiece vocabulary (e.g. CXR-BERT)"
        )
    return tokenizer


def _bert_tokenizer(
    tokens: Sequence[str], like: Optional[BertTokenizer], lowercase: bool, max_length: Optional[int]
) -> BertTokenizer:
    """A BertTokenizer over ``tokens`` (id = position).

    Normalisation and special tokens are copied from ``like`` when given (``lowercase`` is
    then unused), else BERT's defaults with ``lowercase``.
    """
    if like is not None:
        kwargs: dict = dict(
            do_lower_case=like.do_lower_case,
            strip_accents=like.strip_accents,
            tokenize_chinese_chars=like.tokenize_chinese_chars,
            unk_token=str(like.unk_token),
            sep_token=str(like.sep_token),
            pad_token=str(like.pad_token),
            cls_token=str(like.cls_token),
            mask_token=str(like.mask_token),
            model_max_length=like.model_max_length,
        )
    else:
        kwargs = dict(do_lower_case=lowercase)
    if max_length is not None:
        kwargs["model_max_length"] = max_length
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, **kwargs)


def _select_new_words(
    df: Counter, known: set[str], min_df: int, max_new: int, max_chars: int
) -> tuple[list[tuple[str, int]], int]:
    """Top ``max_new`` (word, df) by df (ties by word), and how many words qualified.

    Known words and words without a letter are skipped: numbers and measurements are not
    community vocabulary, and words longer than WordPiece's ``max_input_chars_per_word``
    would map to [UNK] even when listed.
    """
    candidates = [
        (word, n)
        for word, n in df.items()
        if n >= min_df
        and word not in known
        and len(word) <= max_chars
        and any(c.isalpha() for c in word)
    ]
    candidates.sort(key=lambda item: (-item[1], item[0]))
    return candidates[:max_new], len(candidates)


def _train_wordpiece(texts: Sequence[str], vocab_size: int, lowercase: bool) -> list[str]:
    """Tokens (in id order) of a BERT WordPiece vocabulary trained on ``texts``.

    The ``##c`` continuation pieces are declared up front in sorted order because the
    trainer otherwise numbers them in hash-map order, which makes the merges (and so the
    vocabulary) change between runs (huggingface/tokenizers#1794).
    """
    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    continuations: set[str] = set()
    for text in texts:
        normalized = tokenizer.normalizer.normalize_str(text)
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
            continuations.update(word[1:])
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *(f"##{c}" for c in sorted(continuations))],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    vocab = tokenizer.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


def build_tokenizer(
    cfg: VocabConfig,
    reports: Sequence[tuple[str, str]],
    out_dir: str | Path,
    max_length: Optional[int] = None,
) -> PreTrainedTokenizerBase:
    """Build the Stage 1 vocabulary from ``(text, lang)`` reports and save it to ``out_dir``.

    With ``cfg.base`` the base keeps all its ids and the base's normalisation; only
    ``cfg.extend_lang`` reports are counted. Without it, WordPiece is trained on all reports.
    ``max_length`` (TextConfig.max_length) becomes the tokenizer's ``model_max_length``.
    Returns the tokenizer as reloaded from ``out_dir``.
    """
    out_dir = Path(out_dir)
    if cfg.base is not None:
        texts = [text for text, lang in reports if lang == cfg.extend_lang]
        if not texts:
            langs = sorted({lang for _, lang in reports})
            raise SiteDataError(
                f"no '{cfg.extend_lang}' reports to extend the vocabulary with "
                f"({len(reports)} reports in languages {langs}); add them to the manifest's "
                "train split or set vocab.extend_lang"
            )
        df = document_frequencies(texts, vocabulary_words(cfg, max_length))
        tokens, tokenizer, stats, new_words = _extend_base(cfg, df, len(texts), max_length)
    else:
        texts = [text for text, _ in reports]
        if not texts:
            raise SiteDataError(
                "no reports to train a WordPiece vocabulary on; check the manifest's train split"
            )
        tokens = _train_wordpiece(texts, cfg.vocab_size, cfg.lowercase)
        tokenizer = _bert_tokenizer(tokens, None, cfg.lowercase, max_length)
        new_words = []
        stats = {"mode": "train", "base": None, "base_size": 0, "added": 0, "reports": len(texts)}

    return _save_tokenizer(tokens, tokenizer, stats, new_words, out_dir)


def _extend_base(
    cfg: VocabConfig, df: Counter, reports: int, max_length: Optional[int]
) -> tuple[list[str], BertTokenizer, dict, list[tuple[str, int]]]:
    """``cfg.base`` plus its most document-frequent missing ``cfg.extend_lang`` words:
    (tokens, tokenizer, stats, added words with their df)."""
    base = _load_base(Path(cfg.base))
    base_tokens = _ordered_tokens(base)
    if cfg.lowercase != base.do_lower_case:
        logger.warning(
            "vocab.lowercase=%s is ignored: the base %s has do_lower_case=%s, and its "
            "normalisation must stay as it is for its original tokens to be found",
            cfg.lowercase, cfg.base, base.do_lower_case,
        )
    splitter = _bert_tokenizer(base_tokens, base, cfg.lowercase, max_length)
    new_words, candidates = _select_new_words(
        df, set(base_tokens), cfg.min_df, cfg.max_new_tokens, splitter.backend_tokenizer.model.max_input_chars_per_word,
    )
    tokens = base_tokens + [word for word, _ in new_words]
    tokenizer = _bert_tokenizer(tokens, base, cfg.lowercase, max_length)
    stats = {
        "mode": "extend",
        "base": str(cfg.base),
        "base_size": len(base_tokens),
        "added": len(new_words),
        "extend_lang": cfg.extend_lang,
        "reports": reports,
        "min_df": cfg.min_df,
        "max_new_tokens": cfg.max_new_tokens,
        "candidates": candidates,
    }
    return tokens, tokenizer, stats, new_words


def _save_tokenizer(
    tokens: list[str], tokenizer: BertTokenizer, stats: dict, new_words: list[tuple[str, int]], out_dir: Path
) -> PreTrainedTokenizerBase:
    """Write the tokenizer folder (with vocab.txt, vocab.sha256, vocab_stats.json) and
    return it as every site will load it."""
    sha = _hash_tokens(tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 saves only tokenizer.json; vocab.txt is what BERT tooling and people read.
    (out_dir / VOCAB_FILE).write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    stats.update(
        vocab_size=len(tokens),
        sha256=sha,
        top_added=[{"token": w, "df": n} for w, n in new_words[:TOP_IN_STATS]],
    )
    stats_text = json.dumps(stats, indent=2, ensure_ascii=False) + "\n"
    (out_dir / VOCAB_STATS_FILE).write_text(stats_text, encoding="utf-8")
    (out_dir / VOCAB_SHA_FILE).write_text(sha + "\n", encoding="utf-8")
    # Reload through the standard loader: what callers get is what every site will load.
    return load_tokenizer(out_dir, expected_sha256=sha)


# -- the federated vocabulary stage ---------------------------------------------------------
def vocabulary_words(cfg: VocabConfig, max_length: Optional[int] = None) -> Callable[[str], list[str]]:
    """Whole words as the vocabulary being built will see them: through the base's
    normalisation (extend) or BERT's with ``cfg.lowercase`` (train)."""
    if cfg.base is not None:
        base = _load_base(Path(cfg.base))
        return word_splitter(_bert_tokenizer(_ordered_tokens(base), base, cfg.lowercase, max_length))
    return word_splitter(_bert_tokenizer(list(SPECIAL_TOKENS), None, cfg.lowercase, max_length))


def counts_language(cfg: VocabConfig, lang: str) -> bool:
    """Whether the vocabulary stage counts a language's words: all languages when training
    WordPiece, only ``cfg.extend_lang`` when extending a base (it covers the others)."""
    return cfg.base is None or lang == cfg.extend_lang


def site_word_counts(
    cfg: VocabConfig, reports: Sequence[tuple[str, str]], max_length: Optional[int] = None
) -> dict[str, tuple[dict[str, int], int]]:
    """What a site sends in the vocabulary stage: per language, the document frequency of
    each word found in at least ``cfg.min_df`` of its reports, and its number of reports.

    A word in fewer reports never leaves the site. In extend mode only ``cfg.extend_lang``
    reports are counted (the base already covers the other language).
    """
    split = vocabulary_words(cfg, max_length)
    out: dict[str, tuple[dict[str, int], int]] = {}
    for lang in sorted({lang for _, lang in reports}):
        if not counts_language(cfg, lang):
            continue
        texts = [text for text, l in reports if l == lang]
        df = document_frequencies(texts, split)
        out[lang] = ({w: n for w, n in df.items() if n >= cfg.min_df}, len(texts))
    return out


def build_tokenizer_from_counts(
    cfg: VocabConfig, counts: dict[str, Counter], reports: dict[str, int], out_dir: str | Path,
    max_length: Optional[int] = None,
) -> PreTrainedTokenizerBase:
    """The Stage 1 vocabulary from the merged word counts of the sites (per language).

    Extend mode selects new words exactly as :func:`build_tokenizer` does, from the summed
    document frequencies of ``cfg.extend_lang``. Train mode trains WordPiece on the words
    weighted by their document frequency: the sites' report text never reaches the server,
    so words below a site's ``min_df`` are not in the training data.
    """
    out_dir = Path(out_dir)
    if cfg.base is not None:
        df = counts.get(cfg.extend_lang)
        if not df:
            raise SiteDataError(f"no site sent '{cfg.extend_lang}' word counts to extend the vocabulary with "
                                f"(communities that sent counts: {sorted(counts)})")
        tokens, tokenizer, stats, new_words = _extend_base(cfg, df, reports.get(cfg.extend_lang, 0), max_length)
        stats["federated"] = True
    else:
        words = [w for lang in sorted(counts) for w, n in sorted(counts[lang].items()) for _ in range(n)]
        if not words:
            raise SiteDataError("no site sent word counts to train a WordPiece vocabulary on")
        tokens = _train_wordpiece(words, cfg.vocab_size, cfg.lowercase)
        tokenizer = _bert_tokenizer(tokens, None, cfg.lowercase, max_length)
        new_words = []
        stats = {"mode": "train", "federated": True, "base": None, "base_size": 0, "added": 0,
                 "reports": sum(reports.values()), "min_df": cfg.min_df}
    return _save_tokenizer(tokens, tokenizer, stats, new_words, out_dir)


def resize_token_embeddings(
    model: PreTrainedModel, new_size: int, std: float = 0.02, seed: int = 0
) -> None:
    """Grow the word embeddings (V, H) to (new_size, H) for an extended vocabulary.

    Rows 0..V-1 stay bit-identical; new rows are drawn from N(0, std) (MEDUNIC.md Stage 1)
    with a CPU ``torch.Generator`` seeded by ``seed``, so every site and the server get the
    same rows on any device. A tied MLM decoder shares the new matrix and gets zero biases;
    an untied one grows the same way. ``model.config.vocab_size`` is updated.
    """
    old = model.get_input_embeddings()
    old_size, dim = old.weight.shape
    if new_size < old_size:
        raise VocabMismatchError(
            f"{type(model).__name__} has {old_size} token embeddings but the vocabulary has "
            f"{new_size} tokens; shrinking would drop trained rows: "
            "load the tokenizer the model was built with"
        )
    if new_size == old_size:
        return
    generator = torch.Generator().manual_seed(seed)

    def grown(weight: torch.Tensor) -> nn.Parameter:
        fresh = torch.normal(0.0, std, size=(new_size - old_size, dim), generator=generator)
        data = torch.cat([weight.detach(), fresh.to(device=weight.device, dtype=weight.dtype)])
        return nn.Parameter(data, requires_grad=weight.requires_grad)

    head = model.get_output_embeddings()
    tied = head is not None and head.weight is old.weight
    embedding = nn.Embedding(new_size, dim, padding_idx=old.padding_idx, device="meta")
    embedding.weight = grown(old.weight)
    model.set_input_embeddings(embedding)
    if head is not None:
        new_head = nn.Linear(dim, new_size, bias=head.bias is not None, device="meta")
        new_head.weight = embedding.weight if tied else grown(head.weight)
        if head.bias is not None:
            bias = torch.cat([head.bias.detach(), head.bias.new_zeros(new_size - old_size)])
            new_head.bias = nn.Parameter(bias, requires_grad=head.bias.requires_grad)
        model.set_output_embeddings(new_head)
    model.config.get_text_config().vocab_size = new_size


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``medunic vocab``: build the Stage 1 tokenizer from a manifest's train split."""
    parser = subparsers.add_parser(
        "vocab",
        help="build the cross-lingual tokenizer (Stage 1)",
        description="Extend vocab.base with frequent vocab.extend_lang words, or train WordPiece "
        "when vocab.base is null, from the train split of the manifest.",
    )
    add_config_args(parser)
    parser.add_argument("--manifest", default=None, help="manifest to read (default: data.manifest)")
    parser.add_argument("--out", default=None, help="tokenizer folder (default: <train.out_dir>/tokenizer)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.overrides, config_file=args.config)
    manifest = args.manifest or cfg.data.manifest
    records = read_manifest(manifest, langs=cfg.data.langs, split="train")
    out = Path(args.out) if args.out else Path(cfg.train.out_dir) / "tokenizer"
    reports = [(r.report, r.lang) for r in records]
    build_tokenizer(cfg.vocab, reports, out, max_length=cfg.model.text.max_length)
    stats = json.loads((out / VOCAB_STATS_FILE).read_text(encoding="utf-8"))
    print(f"tokenizer: {out}")
    if stats["mode"] == "extend":
        print(f"base: {stats['base']} ({stats['base_size']} tokens)")
        print(
            f"added: {stats['added']} '{stats['extend_lang']}' words "
            f"({stats['candidates']} with df >= {stats['min_df']} in {stats['reports']} reports)"
        )
    else:
        print(f"base: none, WordPiece trained on {stats['reports']} reports")
    print(f"vocab size: {stats['vocab_size']}")
    print(f"sha256: {stats['sha256']}")
    if stats["top_added"]:
        top = ", ".join(f"{t['token']} ({t['df']})" for t in stats["top_added"][:TOP_PRINTED])
        print(f"top added: {top}")
    return 0
