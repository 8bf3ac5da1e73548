"""End to end: `flwr run` with method=acesync on Flower's simulation engine.

A private Flower home and SuperLink on free ports (stopped afterwards), three
simulated SuperNodes, two rounds: the run must finish, learn, stay within
its byte budgets and count every message.
"""

from __future__ import annotations

import pytest

from tandem.launch import FlowerHome
from tandem.tracking import read_jsonl

# Every test that starts Flower's simulation engine (and with it a Ray
# cluster) runs in one worker, one at a time (pytest -n 2 --dist loadgroup)
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("simulation-engine")]

NODES = 3
ROUNDS = 2


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    home = FlowerHome(tmp_path_factory.mktemp("flwr-home"))
    try:
        yield home
    finally:
        home.stop_superlink()
        assert home.superlink_pids() == []


def test_acesync_run_completes_within_budget(flower, tmp_path):
    status = flower.run(
        run_config={
            "method": "acesync",
            "num-server-rounds": ROUNDS,
            "local-steps": 40,  # 20 learned +10.0 pt once: too close to the bar
            "mnist1d-samples": 2000,
            "partitioner": "dirichlet",
            "acesync-personalize-rounds": 1,
            "output-dir": str(tmp_path),
        },
        federation_config={"num-supernodes": NODES},
        timeout=300,
    )
    assert status.ok, f"{status.status}: {status.details}"
    records = read_jsonl(tmp_path / f"acesync-{status.run_id}" / "metrics.jsonl")
    rounds = [r for r in records if r["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    assert rounds[-1]["eval-accuracy"] > rounds[0]["eval-accuracy"] + 0.1
    summary = records[-1]
    assert summary["event"] == "summary" and summary["rejected-replies"] == 0
    # dynamic sync: a device may skip rounds; every request got a good reply
    plans = [r for r in records if r["event"] == "plan" and r["round"] <= ROUNDS]
    assert len(plans) <= NODES * ROUNDS
    assert summary["accepted-replies"] == len(plans)
    assert summary["bytes-encoded"] <= summary["bytes-budget"]
    assert summary["encoded-ratio"] < 0.45
    # the compressed downlink through Flower's engine: deltas after round 1,
    # and edge and cloud agreed on every device's model
    # one full model per device on its first sync (a node may join late)
    devices = {r["node-id"] for r in plans}
    assert summary["downlink-full-sends"] == len(devices)
    assert summary["downlink-delta-sends"] == len(plans) - len(devices)
    assert summary["downlink-digest-mismatches"] == 0
    # every reply is a fraction of a float32 model (9,610 parameters)
    per_node = [
        r for r in records if r["event"] == "bytes" and 0 < r["round"] <= ROUNDS
    ]
    assert len(per_node) == len(plans)
    assert all(r["bytes-up"] < 0.5 * 4 * 9610 for r in per_node)
    assert summary["personal-devices"] == NODES
    assert 0 < summary["overhead-share"] < 1
