"""`shared_ray`: one Ray cluster that each run's simulation joins (the bench's)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tandem.launch import FlowerHome, shared_ray

# Starts a Ray cluster: one at a time with the other simulation-engine tests
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("simulation-engine")]

# What a run's simulation process does with RAY_ADDRESS set: Flower's own
# ``RayBackend.init_ray`` call (its arguments as Flower passes them), then
# one task on the cluster; it prints the cluster it is on.
JOIN = """
import os, sys, ray
ray.init(runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
         include_dashboard=False)
@ray.remote
def pid():
    return os.getpid()
worker = ray.get(pid.remote())
print(ray.get_runtime_context().gcs_address, worker != os.getpid())
ray.shutdown()
"""


def _join(address: str) -> list[str]:
    env = {**os.environ, "RAY_ADDRESS": address}
    proc = subprocess.run(
        [sys.executable, "-c", JOIN],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_runs_join_the_shared_cluster_and_it_stops_at_the_end(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with shared_ray() as address:
        assert address and ray.is_initialized()
        # two runs one after the other: both on this cluster, their tasks in
        # worker processes of their own
        assert _join(address) == [address, "True"]
        assert _join(address) == [address, "True"]
        assert ray.is_initialized()  # a run's ray.shutdown only disconnected it
    assert not ray.is_initialized()


def test_a_cluster_of_the_caller_s_is_used_as_it_is(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    with shared_ray() as address:
        assert address == "10.0.0.7:6379"


def test_the_home_passes_the_address_to_the_superlink_it_starts(tmp_path):
    home = FlowerHome(tmp_path / "home", extra_env={"RAY_ADDRESS": "1.2.3.4:5"})
    assert home.env["RAY_ADDRESS"] == "1.2.3.4:5"
    assert home.env["FLWR_HOME"] == str(tmp_path / "home")
