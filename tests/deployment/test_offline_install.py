"""An air-gapped host installs medunic from `make wheelhouse` alone, and runs the app the
coordinator runs (the same FAB hash)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client.supernode import installed_app_hash
from medunic_core.constants import APP_DIR

pytestmark = pytest.mark.slow

UNREACHABLE = "http://127.0.0.1:9"  # nothing listens there: any download attempt fails


def _offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and not k.lower().endswith("_proxy")}
    return {**env, "http_proxy": UNREACHABLE, "https_proxy": UNREACHABLE, "HTTP_PROXY": UNREACHABLE,
            "HTTPS_PROXY": UNREACHABLE, "PIP_FIND_LINKS": "/nonexistent", "PIP_INDEX_URL": UNREACHABLE}


def test_a_wheelhouse_installs_with_no_network_and_runs_the_coordinators_app(tmp_path, synthetic_data):
    house, prefix = tmp_path / "wheelhouse", tmp_path / "opt-medunic"
    try:
        subprocess.run(["bash", "scripts/wheelhouse.sh", str(house)], cwd=APP_DIR, check=True, timeout=900,
                       env={**os.environ, "VENV": str(Path(sys.executable).parents[1])})
        lock = (house / "requirements.lock").read_text().splitlines()
        assert any(line.startswith("torch==") for line in lock) and all("--hash=sha256:" in line for line in lock)
        shutil.copy(house / "install-offline.sh", tmp_path / "kept.sh")
        out = subprocess.run(["bash", str(house / "install-offline.sh"), str(house), str(prefix)],
                             env=_offline_env(), capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout + out.stderr
        medunic = prefix / "venv" / "bin" / "medunic"
        # the site allows the FAB built from its own tree: the same bytes as the coordinator's `flwr run`
        assert f"app hash (compare with the coordinator's): {installed_app_hash()}" in out.stdout
        check = subprocess.run([str(medunic), "client", "check", "--data", str(synthetic_data), "--language", "en",
                                "--site", "en-1"],
                               env=_offline_env(), capture_output=True, text=True, timeout=300)
        assert check.returncode == 0 and "usable" in check.stdout, check.stdout + check.stderr
        # a wheelhouse changed on the way is refused before anything is installed
        with (house / "medunic-src.tar.gz").open("ab") as f:
            f.write(b"\0")
        bad = subprocess.run(["bash", str(house / "install-offline.sh"), str(house), str(tmp_path / "other")],
                             env=_offline_env(), capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and "SHA256SUMS do not match" in bad.stderr
        assert not (tmp_path / "other").exists()
    finally:  # 3 GiB of wheels and a 6 GiB environment
        shutil.rmtree(house, ignore_errors=True)
        shutil.rmtree(prefix, ignore_errors=True)
