"""The site as a service: its config file and systemd unit, what its outputs may contain,
its privacy ledger in the state folder, and the artefacts it checks by hash."""

from __future__ import annotations

import json
import re
import shutil
import time
import tomllib
from pathlib import Path

import pytest

from client.daemon import SiteSettings, start
from client.site import SiteState, check_encoder
from medunic_core.cli import main
from medunic_core.errors import ConfigError, PrivacyBudgetError
from medunic_core.export import folder_sha256

MARKER = "PATIENT-Jane-Doe-1970"


def _settings(tmp_path: Path, data: Path, tokenizer: Path, **extra) -> SiteSettings:
    return SiteSettings("en-1", "en", str(data), "127.0.0.1:9", str(tokenizer), state=str(tmp_path / "state"),
                        insecure=True, **extra)


def test_init_writes_a_site_config_and_a_service_unit_that_start_reads(tmp_path, synthetic_data, fed_tokenizer, capsys):
    config, unit = tmp_path / "etc" / "site.toml", tmp_path / "medunic-site.service"
    assert main(["client", "init", "--site", "en-1", "--language", "en", "--data", str(synthetic_data),
                 "--superlink", "coordinator.example.org:9092", "--tokenizer", str(fed_tokenizer), "--ca", "ca.crt",
                 "--key", "keys/en-1", "--state", str(tmp_path / "state"), "--dp-max-epsilon", "8",
                 "--out", str(config), "--systemd-unit", str(unit), "--user", "medunic"]) == 0
    settings = SiteSettings.load(config)
    assert settings.superlink == "coordinator.example.org:9092" and settings.dp_max_epsilon == 8.0
    assert (settings.min_pairs, settings.min_df) == (32, 2)  # release floors without being asked
    assert "min-pairs=32 min-df=2" in settings.node_config()
    assert settings.cache == str(tmp_path / "state" / "cache")  # caches live apart from nothing they must keep
    assert tomllib.loads(config.read_text())["site"] == "en-1"
    text = unit.read_text()
    assert "User=medunic" in text and f"--config {config.resolve()}" in text
    assert "ProtectSystem=strict" in text and f"ReadWritePaths={(tmp_path / 'state').resolve()}" in text
    node = settings.node_config()
    assert f"state-dir='{(tmp_path / 'state').resolve()}'" in node and "dp-max-epsilon=8.0" in node
    assert main(["client", "init", "--site", "en-1", "--language", "en", "--data", "d", "--superlink", "s",
                 "--tokenizer", "t", "--out", str(config)]) == 2  # never overwritten without --force
    config.write_text(config.read_text() + 'colour = "blue"\n')
    with pytest.raises(ConfigError, match="unknown keys \\['colour'\\]"):
        SiteSettings.load(config)
    for key, bad in (("min-pairs", "0"), ("min-df", '"2"'), ("min-pairs", "2.5")):
        text = re.sub(rf"^{key} = .*$", f"{key} = {bad}", config.read_text().replace('colour = "blue"\n', ""),
                      flags=re.M)
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ConfigError, match=f"{key} .*a whole number >= 1"):
            SiteSettings.load(tmp_path / "bad.toml")


def test_a_site_of_both_languages_has_one_spelling_and_no_other(tmp_path, synthetic_data, fed_tokenizer):
    settings = SiteSettings("mix-1", "es+en", str(synthetic_data), "127.0.0.1:9", str(fed_tokenizer), insecure=True,
                            state=str(tmp_path / "state"))
    assert settings.language == "en+es" and "lang='en+es'" in settings.node_config()
    for bad in ("en+fr", "en,es", "EN"):
        with pytest.raises(ConfigError, match="not one of"):
            SiteSettings("x", bad, str(synthetic_data), "127.0.0.1:9", str(fed_tokenizer), insecure=True)


def test_no_report_text_reaches_the_outputs_of_check_and_start(tmp_path, synthetic_data, fed_tokenizer, capfd):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data.parent, data, ignore=shutil.ignore_patterns("cache"))
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    en = [r for r in rows if r["lang"] == "en"]
    en[0]["report"] = f"paciente {MARKER}: consolidación en el lóbulo inferior derecho"  # reads as Spanish
    en[1]["labels"] = MARKER  # a shifted column
    en[2]["lang"] = f"{MARKER} en"
    en[3]["split"] = MARKER
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["client", "check", "--data", str(data / "manifest.jsonl"), "--language", "en", "--site", "en-1",
          "--no-progress", "--max-bad", "0.5"])
    log = tmp_path / "site.log"
    proc = start(_settings(tmp_path, data / "manifest.jsonl", fed_tokenizer, max_bad=0.5), log=str(log))
    time.sleep(8)  # the SuperNode starts and tries to reach a coordinator that is not there
    proc.kill()
    proc.wait(timeout=30)
    out = capfd.readouterr()
    texts = [out.out, out.err, log.read_text(errors="replace"),
             (tmp_path / "state" / "logs" / "site.log").read_text(errors="replace")]
    assert "wrong language" in out.out and "bad labels" in out.out  # the rows are named ...
    assert not any(MARKER in text for text in texts)  # ... never their text


def test_a_lost_privacy_ledger_stops_the_site_until_the_operator_accepts_it(tmp_path, synthetic_data, fed_tokenizer):
    state = SiteState(tmp_path / "state")
    state.ledger.parent.mkdir(parents=True)
    state.ledger.write_text('{"releases": []}')
    state.note_releases(3)
    state.check_ledger()  # the ledger is there
    state.ledger.unlink()  # e.g. someone cleaned up the wrong folder
    with pytest.raises(PrivacyBudgetError, match="released 3 noisy update"):
        start(_settings(tmp_path, synthetic_data, fed_tokenizer))
    proc = start(_settings(tmp_path, synthetic_data, fed_tokenizer), reset_privacy_ledger=True)
    proc.kill()
    proc.wait(timeout=30)
    marker = json.loads(state.marker.read_text())
    assert marker["dp_releases"] == 0 and marker["ledger_resets"][0]["releases_lost"] == 3
    state.check_ledger()


def test_a_site_starts_only_from_the_coordinators_text_encoder(tmp_path):
    from medunic_core.config import load_config

    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    (encoder / "model.safetensors").write_bytes(b"weights")
    cfg = load_config("tiny", [f"model.text.pretrained={encoder}"])
    node = {"site": "es-1", "text-encoder": str(encoder)}
    check_encoder(cfg, node, folder_sha256(encoder))
    with pytest.raises(ConfigError, match="has sha256 .* the run's has"):
        check_encoder(cfg, node, "0" * 64)
    with pytest.raises(ConfigError, match="--text-encoder"):
        check_encoder(cfg, {"site": "es-1"}, folder_sha256(encoder))
    check_encoder(load_config("tiny"), {"site": "es-1"}, "")  # a run without one needs none
