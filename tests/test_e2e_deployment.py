"""End to end on Flower's deployment engine: a SuperLink and 2 SuperNodes on loopback.

Started on free ports inside the test and torn down afterwards, even on failure.
FedAvg runs for real (a fresh ClientApp process per message) and must learn.
"""

from __future__ import annotations

import pytest

from tandem.launch import FlowerHome, LoopbackDeployment
from tandem.tracking import read_jsonl

pytestmark = pytest.mark.e2e


@pytest.fixture
def deployment(tmp_path):
    dep = LoopbackDeployment(tmp_path / "deploy", num_nodes=2)
    try:
        dep.start()
        yield dep
    finally:
        procs = list(dep.processes)
        dep.stop()
        assert all(p.poll() is not None for p in procs)  # all ended


def test_fedavg_on_the_deployment_engine(deployment, tmp_path):
    cli = FlowerHome(tmp_path / "cli", connections=deployment.connections)
    out = tmp_path / "runs"
    status = cli.run(
        run_config={
            "num-server-rounds": 2,
            "mnist1d-samples": 2000,
            "output-dir": str(out),
        },
        connection="deploy",
        timeout=300,
    )
    logs = "\n".join(p.read_text() for p in (tmp_path / "deploy").glob("*.log"))
    assert status.ok, f"{status.status}: {status.details}\n{logs[-3000:]}"
    records = read_jsonl(out / f"fedavg-{status.run_id}" / "metrics.jsonl")
    rounds = [r for r in records if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["eval-accuracy"] > rounds[0]["eval-accuracy"] + 0.1
    per_node = [r for r in records if r["event"] == "bytes"]
    assert len({r["node-id"] for r in per_node}) == 2
