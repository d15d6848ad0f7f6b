"""The `medunic` command: overrides anywhere, clear errors with exit codes."""

from __future__ import annotations

import pytest

from medunic_core.cli import build_parser, main


def test_every_sub_command_is_registered():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"synth", "vocab", "mlm", "train", "eval", "demo", "compare"} <= set(commands)


def test_overrides_may_follow_options(tmp_path, capsys):
    rc = main(["train", "train.lrr=1", "--no-progress", f"train.out_dir={tmp_path}"])
    assert rc == 2  # ConfigError exit code, raised only if both overrides were parsed
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def test_missing_manifest_is_a_site_data_error(tmp_path, capsys):
    rc = main(["train", f"data.manifest={tmp_path / 'nope.jsonl'}", f"train.out_dir={tmp_path}"])
    assert rc == 3 and "nope.jsonl does not exist" in capsys.readouterr().err


def test_stray_arguments_are_refused(capsys):
    assert main(["train", "--no-progress", "not-an-override"]) == 2
    assert "not of the form key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "a=b", "--no-progress", "--bogus-flag"])
