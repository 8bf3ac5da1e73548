"""End to end on Flower's deployment engine: a SuperLink and SuperNodes on loopback.

Started on free ports inside the test and torn down afterwards, even on
failure. Every method runs for real (a fresh ClientApp process per message)
and must learn. One deployment runs with TLS and SuperNode authentication and
must refuse a SuperNode whose key was never registered.
"""

from __future__ import annotations

import pytest

from tandem.launch import FlowerHome, LoopbackDeployment
from tandem.tracking import read_jsonl

pytestmark = pytest.mark.e2e

RUNS = {
    "fedavg": {"num-server-rounds": 2},
    "simultrain": {"simultrain-steps": 16, "simultrain-eval-every": 8},
    "acesync": {"num-server-rounds": 2},
}


def _deploy(root, **kwargs):
    dep = LoopbackDeployment(root, num_nodes=2, **kwargs)
    try:
        dep.start()
        yield dep
    finally:
        procs = list(dep.processes)
        dep.stop()
        assert all(p.poll() is not None for p in procs)  # all ended


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    yield from _deploy(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def secure_deployment(tmp_path_factory):
    yield from _deploy(tmp_path_factory.mktemp("secure"), secure=True, unregistered=1)


def _run(dep, tmp_path, method):
    cli = FlowerHome(tmp_path / "cli", connections=dep.connections)
    out = tmp_path / "runs"
    status = cli.run(
        run_config={
            "method": method,
            "mnist1d-samples": 2000,
            "output-dir": str(out),
            **RUNS[method],
        },
        connection="deploy",
        timeout=300,
    )
    logs = "\n".join(p.read_text()[-1500:] for p in dep.root.glob("*.log"))
    assert status.ok, f"{status.status}: {status.details}\n{logs}"
    return cli, read_jsonl(out / f"{method}-{status.run_id}" / "metrics.jsonl")


def _learned(records):
    rounds = [r for r in records if r["event"] == "round"]
    assert rounds[-1]["eval-accuracy"] > rounds[0]["eval-accuracy"] + 0.1
    per_node = {r["node-id"] for r in records if r["event"] == "bytes"}
    assert len(per_node) == 2


@pytest.mark.parametrize("method", sorted(RUNS))
def test_each_method_on_the_deployment_engine(deployment, tmp_path, method):
    _, records = _run(deployment, tmp_path, method)
    _learned(records)
    assert records[-1]["rejected-replies"] == 0


def test_tls_and_node_auth_refuse_an_unregistered_node(secure_deployment, tmp_path):
    dep = secure_deployment
    cli, records = _run(dep, tmp_path, "fedavg")
    _learned(records)
    # the SuperLink knows exactly the two registered nodes ...
    listed = cli.flwr("supernode", "list", "deploy")
    assert listed.count("online") == 2
    # ... and refused the third: it gave up with Flower's activation error
    intruder = (dep.root / "intruder0.log").read_text()
    assert "Failed to activate SuperNode" in intruder
    superlink = (dep.root / "superlink.log").read_text()
    assert "activate-node" in superlink and "2004" in superlink
