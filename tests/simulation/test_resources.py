"""How a simulation shares the machine's cores among its simulated sites."""

from __future__ import annotations

import pytest

from simulation import federated
from simulation.federated import flower_env, threads_per_site


@pytest.mark.parametrize("cores, sites, threads", [(2, 1, 2), (2, 2, 1), (2, 5, 1), (16, 2, 8), (16, 3, 5), (1, 1, 1)])
def test_sites_share_the_cores(monkeypatch, cores, sites, threads):
    monkeypatch.setattr(federated, "cores", lambda: cores)
    assert threads_per_site(sites) == threads


def test_flower_processes_get_the_sites_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert flower_env(tmp_path, "tag", threads=3)["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an operator's own setting wins
    assert flower_env(tmp_path, "tag", threads=3)["OMP_NUM_THREADS"] == "1"
