"""Dealing a manifest's pairs to other sites (an IID split of the same data)."""

from __future__ import annotations

from collections import Counter

import pytest

from medunic_core.data.manifest import Record, deal, read_manifest, write_manifest


def _records() -> list[Record]:
    rows = [(lang, split) for lang in ("en", "es") for split in ("train",) * 7 + ("test",) * 3]
    return [Record(f"r{i}", f"/img/{i}.png", f"report {i}", lang, split, f"{lang}-1", {"edema": i % 2})
            for i, (lang, split) in enumerate(rows)]


def test_every_site_gets_an_even_share_of_every_language_and_split():
    records = _records()
    dealt = deal(records, ["a", "b"])
    assert [(r.id, r.image_path, r.report, r.lang, r.split, r.labels) for r in dealt] == \
        [(r.id, r.image_path, r.report, r.lang, r.split, r.labels) for r in records]  # only the site changes
    shares = Counter((r.site, r.lang, r.split) for r in dealt)
    for lang in ("en", "es"):
        assert abs(shares["a", lang, "train"] - shares["b", lang, "train"]) <= 1
        assert abs(shares["a", lang, "test"] - shares["b", lang, "test"]) <= 1
    assert {r.site for r in dealt} == {"a", "b"}


def test_dealt_pairs_round_trip_through_a_manifest(tmp_path):
    path = write_manifest(deal(_records(), ["a", "b", "c"]), tmp_path / "dealt.jsonl")
    back = read_manifest(path)
    assert [r.site for r in back] == [r.site for r in deal(_records(), ["a", "b", "c"])]
    assert all(r.image_path.startswith("/img/") for r in back)  # paths outside the folder stay absolute


def test_dealing_to_no_site_is_refused():
    with pytest.raises(ValueError, match="no sites"):
        deal(_records(), [])
