"""The vocabulary stage (``stage=vocab``): Stage 1 of MEDUNIC.md as a Flower run.

Every site sends, per language, the document frequencies of the words found in at least
``vocab.min_df`` of its reports (client.app ``query.vocab``); the coordinator adds them
per language community and builds the tokenizer from the sums
(medunic_core.vocab.build_tokenizer_from_counts): extending ``vocab.base`` with the most
frequent ``vocab.extend_lang`` words, or training WordPiece when there is no base. The
folder ``<fed.out_dir>/tokenizer`` is what the later stages (``mlm``, ``vlp``) use; its
hash travels with every later message.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from client.site import run_medunic_config
from medunic_core.errors import FederationError
from medunic_core.federation import payload as P
from medunic_core.federation.replies import check_vocab_reply
from medunic_core.vocab import build_tokenizer_from_counts, counts_language, vocab_sha256
from server.messages import broadcast
from server.registry import site_identities
from server.strategy import federation_size, wait_for_sites

log = logging.getLogger("flwr.medunic")

TOKENIZER_DIR = "tokenizer"
SUMMARY_FILE = "vocab_stage.json"


class VocabularyStage:
    """One vocabulary round over all sites."""

    def __init__(self, run_config: Mapping[str, Any]) -> None:
        self.cfg = run_medunic_config(run_config)
        self.out = Path(self.cfg.fed.out_dir)
        self.num_sites, self.min_sites = federation_size(self.cfg, run_config)
        self.identities = site_identities(self.cfg.data.langs, run_config)

    def run(self, grid: Grid) -> Path:
        nodes = wait_for_sites(grid, self.num_sites, self.min_sites, self.cfg.fed.site_wait, "vocabulary stage")
        content = RecordDict({P.CONFIG: ConfigRecord({P.STAGE: "vocab"})})
        got = broadcast(grid, nodes, content, P.QUERY_VOCAB, self.cfg.fed.round_timeout, self.identities,
                        lambda c, lang: check_vocab_reply(c, lang, counts_language(self.cfg.vocab, lang),
                                                          self.cfg.vocab.min_df, self.cfg.fed.max_site_records),
                        "vocabulary stage")
        counts: dict[str, Counter] = {}
        reports: Counter = Counter()
        sites: dict[str, dict[str, int]] = {}
        for site, (words, n) in got.accepted.items():
            lang = got.communities[site]
            sites[site] = {lang: n} if counts_language(self.cfg.vocab, lang) else {}
            if counts_language(self.cfg.vocab, lang):
                counts.setdefault(lang, Counter()).update(words)
                reports[lang] += n
        if len(sites) < self.min_sites:
            raise FederationError(f"vocabulary stage: {len(sites)} site(s) answered usably, {self.min_sites} needed "
                                  f"(rejected: {got.invalid}; failed: {got.failed})")
        folder = self.out / TOKENIZER_DIR
        tokenizer = build_tokenizer_from_counts(self.cfg.vocab, counts, dict(reports), folder,
                                                self.cfg.model.text.max_length)
        summary = {"sites": sites, "invalid": got.invalid, "failed": got.failed,
                   "words_received": {lang: len(c) for lang, c in counts.items()},
                   "vocab_size": len(tokenizer), "sha256": vocab_sha256(tokenizer), "tokenizer": str(folder)}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        log.info("vocabulary stage: %s", json.dumps(summary))
        return folder
