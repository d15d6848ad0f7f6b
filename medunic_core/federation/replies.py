"""A site's reply as plain data, and its validation (DESIGN.md, "Deployment": every reply is
validated against what was sent and who sent it).

Whatever arrives over the network is hostile until checked. A reply is accepted only if

- its records are exactly those of its message type (no missing, extra or mistyped record);
- its arrays have exactly the names, shapes and dtype the coordinator sent, all finite;
- its counts (``num-examples``, alignment ``n``, report counts) are finite, whole,
  positive and at most what the run makes possible;
- its alignment sums are of the site's own community (communities, at a site of
  several languages), of the model's layout, finite and consistent (variances >= 0,
  cross-moments within Cauchy-Schwarz);
- its metrics are finite numbers (rates within [0, 1]).

A reply that fails raises :class:`InvalidReply` with a one-line reason; the coordinator
leaves out that site only. No other exception leaves these functions, whatever the input.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Optional

import numpy as np

from medunic_core.align import CROSS_KEY, CTR_NORM, AlignmentState
from medunic_core.data.language import site_languages
from medunic_core.errors import ConfigError, MedunicError
from medunic_core.federation import payload as P
from medunic_core.privacy import RELEASE_FIELDS

MAX_WORD_CHARS = 100
MAX_WORDS = 1_000_000


class InvalidReply(MedunicError):
    """A site's reply that does not fit what was sent or what is known of the site."""


@dataclass
class Content:
    """A reply's records as plain data: ``arrays`` (array records: name -> {key: ndarray}),
    ``metrics`` (metric records) and ``configs`` (config records)."""

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def kinds(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for kind, records in (("arrays", self.arrays), ("metrics", self.metrics), ("config", self.configs)):
            for name in records:
                out[name] = kind if name not in out else "duplicate"
        return out


@dataclass(frozen=True)
class Sent:
    """What the coordinator sent with a training message and what bounds a reply."""

    arrays: Mapping[str, tuple[int, ...]]  # name -> shape of the weights sent
    wire_dtype: str  # payload.WIRE_DTYPES key: the dtype the weights must come back in
    max_examples: int  # most pairs a site can have seen this round
    layout: Optional[Mapping[str, tuple[int, ...]]] = None  # alignment key -> shape (None: no align record)
    token_rows: int = 0  # length of the usage flags
    dp: bool = False  # update-level DP: a privacy record instead of the usage flags


@dataclass
class TrainReply:
    """A validated training reply (weights in float32)."""

    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    alignment: Optional[AlignmentState]
    token_rows: Optional[np.ndarray]  # bool per token-embedding row, None under DP
    privacy: Optional[dict[str, float]]


# -- scalars ------------------------------------------------------------------------------
def number(value: Any, what: str) -> float:
    """A finite real number (bools, strings, lists and NaN/inf are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidReply(f"{what} is a {type(value).__name__}, not a number")
    try:
        v = float(value)
    except OverflowError:
        raise InvalidReply(f"{what} is too large") from None
    if not math.isfinite(v):
        raise InvalidReply(f"{what} is {v}")
    return v


def count(value: Any, what: str, maximum: float, minimum: int = 1) -> int:
    """A whole number in [minimum, maximum]."""
    v = number(value, what)
    if v != round(v):
        raise InvalidReply(f"{what} = {v} is not a whole number")
    if not minimum <= v <= maximum:
        raise InvalidReply(f"{what} = {v:g} is outside [{minimum}, {maximum:g}]")
    return int(v)


# -- records ------------------------------------------------------------------------------
def check_records(content: Content, required: Mapping[str, str], optional_prefix: str = "") -> None:
    """The reply has exactly the ``required`` records (name -> kind), plus, when
    ``optional_prefix`` is given, config records whose names start with it."""
    kinds = content.kinds()
    missing = [n for n in required if n not in kinds]
    extra = [n for n in kinds if n not in required and not (optional_prefix and n.startswith(optional_prefix))]
    wrong = [f"'{n}' is {kinds[n]}, expected {k}" for n, k in required.items() if n in kinds and kinds[n] != k]
    if missing or extra or wrong:
        parts = ([f"missing record(s) {missing}"] if missing else []) + \
                ([f"unexpected record(s) {[str(e)[:40] for e in extra[:5]]}"] if extra else []) + wrong
        raise InvalidReply("; ".join(parts))


def check_identity(content: Content) -> tuple[str, str]:
    """(site name, community) the reply claims; the coordinator compares them with what it
    knows of the node (server.registry)."""
    record = content.configs.get(P.SITE)
    if record is None:
        raise InvalidReply(f"no '{P.SITE}' record")
    if set(record) != {P.SITE_NAME, P.COMMUNITY}:
        raise InvalidReply(f"'{P.SITE}' record has keys {sorted(map(str, record))[:5]}, expected "
                           f"{[P.SITE_NAME, P.COMMUNITY]}")
    name, community = record[P.SITE_NAME], record[P.COMMUNITY]
    if not isinstance(name, str) or not isinstance(community, str) or not name or len(name) > 64:
        raise InvalidReply("site name and community must be short non-empty strings")
    return name, community


def check_arrays(arrays: Mapping[str, np.ndarray], sent: Mapping[str, tuple[int, ...]], dtype: str) -> dict[str, np.ndarray]:
    """Exactly the sent names and shapes, in the wire dtype, all finite, BatchNorm variances
    not negative (one negative entry, however small its norm, averages into a variance whose
    square root is NaN in every evaluation) -> float32 copies."""
    missing = sorted(set(sent) - set(arrays))
    extra = sorted(set(arrays) - set(sent))
    if missing or extra:
        raise InvalidReply(f"weights do not match those sent: missing {missing[:3]}, unexpected "
                           f"{[str(e)[:60] for e in extra[:3]]} ({len(missing)} missing, {len(extra)} unexpected)")
    want = np.dtype(P.WIRE_DTYPES[dtype])
    out = {}
    for name, shape in sent.items():
        a = arrays[name]
        if not isinstance(a, np.ndarray) or a.dtype != want:
            raise InvalidReply(f"weight {name}: dtype {getattr(a, 'dtype', type(a).__name__)}, sent {want}")
        if tuple(a.shape) != tuple(shape):
            raise InvalidReply(f"weight {name}: shape {tuple(a.shape)}, sent {tuple(shape)}")
        if not np.isfinite(a).all():
            raise InvalidReply(f"weight {name} is not finite")
        if name.endswith(".running_var") and (a < 0).any():
            raise InvalidReply(f"weight {name}: a BatchNorm variance below 0")
        out[name] = a.astype(np.float32)
    return out


def check_metrics(metrics: Mapping[str, Any], max_examples: float, rates: bool = False) -> tuple[int, dict[str, float]]:
    """(num-examples, the other metrics): every value a finite number, ``num-examples`` a
    whole number in [1, max_examples]; with ``rates`` the others must lie in [0, 1]."""
    if P.NUM_EXAMPLES not in metrics:
        raise InvalidReply(f"no '{P.NUM_EXAMPLES}' metric")
    n = count(metrics[P.NUM_EXAMPLES], P.NUM_EXAMPLES, max_examples)
    out = {}
    for key, value in metrics.items():
        if key == P.NUM_EXAMPLES:
            continue
        v = number(value, f"metric {str(key)[:40]}")
        if rates and not 0.0 <= v <= 1.0:
            raise InvalidReply(f"metric {key} = {v:g} is not a rate in [0, 1]")
        out[str(key)] = v
    return n, out


def check_alignment(flat: Mapping[str, np.ndarray], community: str, layout: Mapping[str, tuple[int, ...]],
                    max_n: float) -> AlignmentState:
    """The sums of the site's own community (``community``; at a site of several languages,
    ``en+es``, of some or all of them), each with exactly the ``layout``'s keys and shapes,
    finite, whole and equal counts (at most ``max_n`` in all), non-negative variances and
    cross-moments within Cauchy-Schwarz."""
    if not flat:
        raise InvalidReply("empty alignment record")
    own = _languages(community)
    sums: dict[str, dict[str, np.ndarray]] = {}
    for name, value in flat.items():
        c, sep, key = str(name).partition("/")
        if not sep or c not in own:
            raise InvalidReply(f"alignment entry '{str(name)[:60]}' is not of the site's community '{community}'")
        sums.setdefault(c, {})[key] = value
    total = sum(_community_count(sums[c], c, layout, max_n) for c in sums)
    if total > max_n:
        raise InvalidReply(f"alignment counts add up to {total:g}, more than the {max_n:g} pairs of a round")
    return AlignmentState.from_flat({f"{c}/{k}": v for c, part in sums.items() for k, v in part.items()})


def _languages(community: str) -> tuple[str, ...]:
    try:
        return site_languages(community)
    except ConfigError:
        raise InvalidReply(f"community '{str(community)[:20]}' is not a language or languages") from None


def _community_count(sums: Mapping[str, np.ndarray], community: str, layout: Mapping[str, tuple[int, ...]],
                     max_n: float) -> float:
    """One community's sums checked (see :func:`check_alignment`) -> its count."""
    missing, extra = sorted(set(layout) - set(sums)), sorted(set(sums) - set(layout))
    if missing or extra:
        raise InvalidReply(f"{community} alignment keys do not match the model: missing {missing[:3]}, unexpected "
                           f"{[e[:60] for e in extra[:3]]}")
    for key, shape in layout.items():
        v = sums[key]
        if not isinstance(v, np.ndarray) or v.dtype != np.float32 or tuple(v.shape) != tuple(shape):
            raise InvalidReply(f"alignment {community}/{key}: {getattr(v, 'dtype', '?')} {getattr(v, 'shape', '?')}, "
                               f"expected float32 {tuple(shape)}")
        if not np.isfinite(v).all():
            raise InvalidReply(f"alignment {community}/{key} is not finite")
    counts = {count(sums[k].reshape(-1)[0], f"alignment {community}/{k}", max_n) for k in layout if k.endswith(".n")}
    if len(counts) > 1:
        raise InvalidReply(f"{community} alignment counts differ between layers: {sorted(counts)[:4]}")
    n = float(counts.pop()) if counts else 1.0
    for key in layout:
        if not key.endswith(".sum"):
            continue
        base = key.removesuffix(".sum")
        mean = sums[key].astype(np.float64) / n
        second = sums[f"{base}.sumsq"].astype(np.float64) / n
        if (second < -1e-6).any() or (second - mean * mean < -1e-3 * (1.0 + mean * mean)).any():
            raise InvalidReply(f"alignment {community}/{base}: a negative variance")
    if CROSS_KEY in layout:
        a, b = (sums[f"{CTR_NORM}#{call}.sumsq"].astype(np.float64) for call in (0, 1))
        bound = np.sqrt(np.outer(a, b)) * (1 + 1e-3) + 1e-6
        if (np.abs(sums[CROSS_KEY].astype(np.float64)) > bound).any():
            raise InvalidReply(f"{community} alignment cross-moment exceeds its Cauchy-Schwarz bound")
    return n


def check_usage(record: Mapping[str, np.ndarray], rows: int) -> np.ndarray:
    """One flag (uint8, 0 or 1) per token-embedding row -> bool."""
    if set(record) != {P.TOKEN_ROWS}:
        raise InvalidReply(f"'{P.USAGE}' record has keys {sorted(map(str, record))[:3]}, expected {[P.TOKEN_ROWS]}")
    flags = record[P.TOKEN_ROWS]
    if not isinstance(flags, np.ndarray) or flags.dtype != np.uint8 or flags.shape != (rows,):
        raise InvalidReply(f"token-row flags: {getattr(flags, 'dtype', '?')} {getattr(flags, 'shape', '?')}, "
                           f"expected uint8 ({rows},)")
    if (flags > 1).any():
        raise InvalidReply("token-row flags must be 0 or 1")
    return flags.astype(bool)


def check_privacy(record: Mapping[str, Any]) -> dict[str, float]:
    """What a DP release has spent: exactly the fields of medunic_core.privacy.release_update."""
    if set(record) != set(RELEASE_FIELDS):
        raise InvalidReply(f"'{P.PRIVACY}' record has keys {sorted(map(str, record))[:8]}, expected {list(RELEASE_FIELDS)}")
    out = {k: number(record[k], f"privacy {k}") for k in RELEASE_FIELDS}
    if min(out.values()) < 0 or not 0 < out["delta"] < 1:
        raise InvalidReply(f"privacy record out of range: {out}")
    return out


# -- replies ------------------------------------------------------------------------------
def check_train_reply(content: Content, sent: Sent, community: str) -> TrainReply:
    """A training reply (``train`` or ``train.mlm``) of a site of ``community``."""
    required = {P.ARRAYS: "arrays", P.METRICS: "metrics", P.SITE: "config"}
    if sent.layout is not None:
        required[P.ALIGN] = "arrays"
    if sent.dp:
        required[P.PRIVACY] = "config"
    elif sent.token_rows:
        required[P.USAGE] = "arrays"
    check_records(content, required)
    arrays = check_arrays(content.arrays[P.ARRAYS], sent.arrays, sent.wire_dtype)
    n, metrics = check_metrics(content.metrics[P.METRICS], sent.max_examples)
    alignment = (check_alignment(content.arrays[P.ALIGN], community, sent.layout, sent.max_examples)
                 if sent.layout is not None else None)
    rows = check_usage(content.arrays[P.USAGE], sent.token_rows) if P.USAGE in required else None
    privacy = check_privacy(content.configs[P.PRIVACY]) if sent.dp else None
    return TrainReply(arrays, n, metrics, alignment, rows, privacy)


def check_alignment_reply(content: Content, community: str, layout: Mapping[str, tuple[int, ...]],
                          max_n: float) -> AlignmentState:
    """A statistics reply (``query.stats``, ``query.community``): alignment sums only."""
    check_records(content, {P.ALIGN: "arrays", P.SITE: "config"})
    return check_alignment(content.arrays[P.ALIGN], community, layout, max_n)


def check_evaluate_reply(content: Content, max_records: float) -> tuple[int, dict[str, float]]:
    """An evaluation reply: the number of held-out pairs and metrics that are rates."""
    check_records(content, {P.METRICS: "metrics", P.SITE: "config"})
    return check_metrics(content.metrics[P.METRICS], max_records, rates=True)


def check_vocab_reply(content: Content, community: str, counted: Collection[str], min_df: int,
                      max_records: float) -> dict[str, tuple[Counter, int]]:
    """A vocabulary reply: for each of the site's languages (``community``: one, or several
    joined by '+') that the stage ``counted``, the document frequencies of its words, each in
    at least ``min_df`` and at most all of its reports -> {language: (word counts, number of
    reports)}; no vocabulary record of any other language."""
    langs = [lang for lang in _languages(community) if lang in counted]
    check_records(content, {P.SITE: "config", **{f"{P.VOCAB_PREFIX}{lang}": "config" for lang in langs}})
    out = {lang: _vocab_record(content.configs[f"{P.VOCAB_PREFIX}{lang}"], min_df, max_records) for lang in langs}
    if sum(n for _, n in out.values()) > max_records:
        raise InvalidReply(f"vocabulary report counts add up to more than the {max_records:g} records of a site")
    return out


def _vocab_record(record: Mapping[str, Any], min_df: int, max_records: float) -> tuple[Counter, int]:
    if set(record) != {P.WORDS, P.DF, P.REPORTS}:
        raise InvalidReply(f"vocabulary record has keys {sorted(map(str, record))[:5]}, expected "
                           f"{[P.WORDS, P.DF, P.REPORTS]}")
    reports = count(record[P.REPORTS], "vocabulary reports", max_records)
    words, df = record[P.WORDS], record[P.DF]
    if not isinstance(words, list) or not isinstance(df, list) or len(words) != len(df) or len(words) > MAX_WORDS:
        raise InvalidReply("vocabulary words and document frequencies must be two lists of the same length")
    if not all(isinstance(w, str) and 0 < len(w) <= MAX_WORD_CHARS and not any(c.isspace() for c in w) for w in words):
        raise InvalidReply("vocabulary words must be non-empty strings without spaces, at most "
                           f"{MAX_WORD_CHARS} characters")
    if len(set(words)) != len(words):
        raise InvalidReply("vocabulary words repeat")
    counts = Counter({w: count(d, f"document frequency of '{w[:20]}'", reports, minimum=min_df) for w, d in zip(words, df)})
    return counts, reports
