"""End to end: `flwr run` on Flower's simulation engine through the project's flwr.toml.

Starts a local SuperLink on free ports (its own FLWR_HOME whose config.toml is
the project's flwr.toml), runs FedAvg on a small MNIST-1D federation with W&B
offline, checks the final status with `flwr list` (`flwr run` exits 0 even on
failure), reads the run's metrics back, and stops the SuperLink afterwards.
"""

from __future__ import annotations

import pytest

from tandem.launch import FlowerHome
from tandem.models import build_model
from tandem.tracking import read_jsonl
from tests.wandb_reader import read_history

# Every test that starts Flower's simulation engine (and with it a Ray
# cluster) runs in one worker, one at a time (pytest -n 2 --dist loadgroup)
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("simulation-engine")]

NODES = 3
ROUNDS = 3


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    home = FlowerHome(tmp_path_factory.mktemp("flwr-home"))
    try:
        yield home
    finally:
        home.stop_superlink()
        assert home.superlink_pids() == []


@pytest.fixture(scope="module")
def fedavg_run(flower, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    status = flower.run(
        run_config={
            "num-server-rounds": ROUNDS,
            "local-steps": 20,
            "mnist1d-samples": 2000,
            "output-dir": str(out),
            "wandb": True,
            "wandb-mode": "offline",
        },
        federation_config={"num-supernodes": NODES},
        timeout=300,
    )
    return status, out / f"fedavg-{status.run_id}"


def test_fedavg_run_completes_and_learns(fedavg_run):
    status, run_dir = fedavg_run
    assert status.ok, f"{status.status}: {status.details}"
    records = read_jsonl(run_dir / "metrics.jsonl")
    rounds = [r for r in records if r["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    assert rounds[0]["eval-accuracy"] < 0.2  # an untrained 10-class model
    assert rounds[-1]["eval-accuracy"] > rounds[0]["eval-accuracy"] + 0.2
    summary = records[-1]
    assert summary["event"] == "summary"
    assert summary["final-accuracy"] == rounds[-1]["eval-accuracy"]
    assert (run_dir / "model.pt").exists()


def test_bytes_are_counted_per_node_and_round(fedavg_run):
    _, run_dir = fedavg_run
    records = read_jsonl(run_dir / "metrics.jsonl")
    model_bytes = 4 * sum(
        p.numel() for p in build_model("cnn1d", (1, 40), 10).parameters()
    )
    per_node = [r for r in records if r["event"] == "bytes"]
    assert {r["round"] for r in per_node} == set(range(1, ROUNDS + 1))
    assert len(per_node) == NODES * ROUNDS
    for r in per_node:
        # the whole float32 model each way, plus Flower's framing (and, up,
        # the reply's metrics and node records)
        assert model_bytes < r["bytes-down"] < model_bytes + 4096
        assert model_bytes < r["bytes-up"] < model_bytes + 6144
    rounds = [r for r in records if r["event"] == "round" and r["round"] > 0]
    for r in rounds:
        mine = [b for b in per_node if b["round"] == r["round"]]
        assert r["bytes-down"] == sum(b["bytes-down"] for b in mine)
        assert r["messages-up"] == NODES


def test_wandb_offline_history_from_the_server_app(fedavg_run):
    _, run_dir = fedavg_run
    history = read_history(run_dir)
    steps = sorted(row["_step"] for row in history if "round/eval-accuracy" in row)
    assert steps == list(range(ROUNDS + 1))


def test_invalid_config_fails_the_run_before_training(flower, tmp_path):
    status = flower.run(
        run_config={"lr": -1.0, "output-dir": str(tmp_path)},
        federation_config={"num-supernodes": 2},
        timeout=120,
    )
    assert status.status == "finished:failed"
    assert "run config 'lr' = -1.0: must be > 0" in status.details
    assert not list(tmp_path.iterdir())  # nothing ran, nothing was written
