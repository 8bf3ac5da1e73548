"""SimulTrain end to end on the simulation engine with three edges: it learns."""

from __future__ import annotations

import pytest

from tandem.launch import FlowerHome
from tandem.tracking import read_jsonl

# Every test that starts Flower's simulation engine (and with it a Ray
# cluster) runs in one worker, one at a time (pytest -n 2 --dist loadgroup)
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("simulation-engine")]


def test_simultrain_learns_with_three_edges(tmp_path):
    home = FlowerHome(tmp_path / "flwr-home")
    out = tmp_path / "runs"
    try:
        status = home.run(
            run_config={
                "method": "simultrain",
                "simultrain-steps": 60,
                "simultrain-eval-every": 20,
                "simultrain-reconcile-every": 20,
                "mnist1d-samples": 2000,
                "output-dir": str(out),
            },
            federation_config={"num-supernodes": 3},
            timeout=300,
        )
    finally:
        home.stop_superlink()
    assert status.ok, f"{status.status}: {status.details}"
    records = read_jsonl(out / f"simultrain-{status.run_id}" / "metrics.jsonl")
    summary = records[-1]
    assert summary["event"] == "summary"
    assert summary["edges"] == 3 and summary["steps-per-edge"] == 60
    assert summary["final-accuracy"] > 0.2  # chance is 0.1
    assert summary["rejected-replies"] == 0
    assert summary["clock-mode"] == "retimed"
    assert summary["emulated-seconds"] > 0
    # every step moved activations up and gradients down
    assert summary["bytes-up-per-step"] > 32 * 4  # at least one float per sample
    per_node = {r["node-id"] for r in records if r["event"] == "bytes"}
    assert len(per_node) == 3
