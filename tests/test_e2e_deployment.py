"""End to end on Flower's deployment engine: a SuperLink and SuperNodes on loopback.

Started on free ports inside the test and torn down afterwards, even on
failure. Every method runs for real (a fresh ClientApp process per message)
and must learn. SimulTrain also runs on its stream transport (the ClientApp
of each edge streams for its whole session); one deployment runs with TLS
and SuperNode authentication, streams over TLS, and must refuse a SuperNode
whose key was never registered; an edge killed mid-stream is dropped while
the others finish.
"""

from __future__ import annotations

import time

import pytest

from tandem.launch import FlowerHome, LoopbackDeployment
from tandem.tracking import read_jsonl

# One deployment test at a time (each deployment's ClientApp processes need
# the cores), in one worker beside the simulation engine's (pytest -n 2
# --dist loadgroup)
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("deployment-engine")]

RUNS = {
    "fedavg": {"num-server-rounds": 2},
    "simultrain": {  # on messages here (two per edge); the stream is tested below
        "simultrain-transport": "message",
        "simultrain-steps": 16,
        "simultrain-chunk": 8,
        "simultrain-eval-every": 8,
    },
}


def _deploy(root, num_nodes=2, **kwargs):
    dep = LoopbackDeployment(root, num_nodes=num_nodes, **kwargs)
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


#: SimulTrain on its stream: 32 steps per edge, chunks of 4 (the max-chunk)
STREAM = {
    "simultrain-transport": "stream",
    "simultrain-steps": 32,
    "simultrain-eval-every": 16,
}


def _run(dep, tmp_path, method, extra=None):
    cli = FlowerHome(tmp_path / "cli", connections=dep.connections)
    out = tmp_path / "runs"
    status = cli.run(
        run_config={
            "method": method,
            "mnist1d-samples": 2000,
            "output-dir": str(out),
            **(extra or {}),
        },
        connection="deploy",
        timeout=600,  # a hang guard: ACE-Sync's run took 200-220 s in CI's load
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
    _, records = _run(deployment, tmp_path, method, RUNS[method])
    _learned(records)
    assert records[-1]["rejected-replies"] == 0


def test_acesync_on_the_deployment_engine(deployment, tmp_path):
    """ACE-Sync's defaults (continuous synchronization) with every device on
    a two-round interval after round 1: the SuperNodes keep each device's
    model in progress between its hold round (2) and its sync round (3), so
    the update of both rounds' steps goes up in round 3."""
    extra = {"num-server-rounds": 3, "acesync-min-interval": 2}
    _, records = _run(deployment, tmp_path, "acesync", extra)
    _learned(records)
    phases = {
        (p["round"], p["node-id"]): (p["resume"], p["hold"])
        for p in _events(records, "plan")
    }
    assert sorted(set(phases.values())) == [
        (False, False),
        (False, True),
        (True, False),
    ]
    assert [phases[k] for k in sorted(phases)] == [(False, False)] * 2 + [
        (False, True)
    ] * 2 + [(True, False)] * 2
    summary = records[-1]
    assert summary["rejected-replies"] == 0 and summary["dropouts"] == 0
    assert summary["accepted-replies"] == 4  # the syncs of rounds 1 and 3
    assert summary["downlink-digest-mismatches"] == 0
    assert summary["edge-steps"] == 2 * 3 * summary["local-steps"]


def _streamed(records, tls):
    """The run's chunks went through the stream: every chunk frame answered."""
    (stream,) = _events(records, "stream")
    assert stream["tls"] is tls and stream["refused"] == 0
    assert stream["address"].startswith("127.0.0.1:")
    exchanges = _events(records, "exchange")
    assert stream["frames-down"] == len(exchanges) == 2 * 32 // 4
    assert stream["frames-up"] >= len(exchanges) + 2  # and one hello per edge
    summary = records[-1]
    assert summary["dropped-edges"] == 0 and summary["rejected-replies"] == 0
    assert summary["steps-per-edge"] == 32


def test_simultrain_streams_on_the_deployment_engine(deployment, tmp_path):
    _, records = _run(deployment, tmp_path, "simultrain", STREAM)
    _learned(records)
    _streamed(records, tls=False)


def test_simultrain_streams_over_tls_and_node_auth_refuses_a_stranger(
    secure_deployment, tmp_path
):
    """The deployment with TLS and SuperNode authentication: SimulTrain's
    stream runs over TLS with the SuperLink's CA and certificate, and the
    SuperLink refused the SuperNode whose key was never registered."""
    dep = secure_deployment
    tls = dep.tls
    keys = {
        "simultrain-stream-tls-cert": str(tls.server_cert),
        "simultrain-stream-tls-key": str(tls.server_key),
        "simultrain-stream-tls-ca": str(tls.ca_cert),
    }
    cli, records = _run(dep, tmp_path, "simultrain", {**STREAM, **keys})
    _learned(records)
    _streamed(records, tls=True)
    # the SuperLink knows exactly the two registered nodes ...
    listed = cli.flwr("supernode", "list", "deploy")
    assert listed.count("online") == 2
    # ... and refused the third: it gave up with Flower's activation error
    intruder = (dep.root / "intruder0.log").read_text()
    assert "Failed to activate SuperNode" in intruder
    superlink = (dep.root / "superlink.log").read_text()
    assert "activate-node" in superlink and "2004" in superlink


def test_an_edge_killed_mid_stream_is_dropped_and_the_others_finish(tmp_path):
    deploy = _deploy(tmp_path / "deploy", num_nodes=3)
    dep = next(deploy)
    steps = 300
    try:
        cli = FlowerHome(tmp_path / "cli", connections=dep.connections)
        out = tmp_path / "runs"
        run_id = cli.submit(
            {
                "method": "simultrain",
                "mnist1d-samples": 2000,
                "output-dir": str(out),
                **STREAM,
                "simultrain-steps": steps,
                "simultrain-chunk": 1,
                "simultrain-eval-every": 100,
                "reply-timeout": 60,
            },
            connection="deploy",
        )
        metrics = out / f"simultrain-{run_id}" / "metrics.jsonl"

        def streaming(records):
            ids = dep.node_ids("node2")
            return bool(ids) and ids[0] in _exchanged(records)

        # node2 streams: its ClientApp (and its SuperNode) die at once
        _follow(metrics, streaming)
        dep.kill_node("node2")
        (victim,) = dep.node_ids("node2")
        status = cli.wait(run_id, 400, "deploy", metrics)
        logs = "\n".join(p.read_text()[-1500:] for p in dep.root.glob("*.log"))
        assert status.ok, f"{status.status}: {status.details}\n{logs}"
        records = read_jsonl(metrics)
    finally:
        next(deploy, None)  # tear down
    summary = records[-1]
    (dropped,) = _events(records, "dropped")
    assert dropped["node-id"] == victim and summary["dropped-edges"] == 1
    done = _exchanged(records)
    assert done[victim] < steps  # killed mid-stream
    assert sorted(done.values())[1:] == [steps, steps]  # the others finished
    rounds = _events(records, "round")
    assert rounds[-1]["eval-accuracy"] > rounds[0]["eval-accuracy"] + 0.1


def _exchanged(records):
    """Micro-batches each node streamed, by node id."""
    done = {}
    for e in _events(records, "exchange"):
        done[e["node-id"]] = done.get(e["node-id"], 0) + e["micro-batches"]
    return done


# A SuperNode killed mid-run (SIGKILL: no goodbye to the SuperLink) and started
# again at once. Without node authentication it comes back under a new node
# id: a new device to the run. The SuperLink marks the dead node offline once
# it misses its heartbeats (2 x 30 s) and answers for it with a "node
# unavailable" error; reply-timeout bounds every wait in any case.
CRASH_RUNS = {
    "simultrain": {
        "simultrain-transport": "message",
        "simultrain-steps": 24,  # six exchanges per edge: node2 dies mid-run
        "simultrain-chunk": 4,
        "simultrain-eval-every": 8,
        "reply-timeout": 120,
    },
    "acesync": {
        "num-server-rounds": 4,  # round 4 at the latest has the restarted node
        "reply-timeout": 120,
        "acesync-personalize-rounds": 0,
        "acesync-bandwidth": "measured",  # B_k from real transit times
    },
}


def _follow(path, until, timeout=300):
    """Records of the run's metrics file once ``until(records)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_jsonl(path, growing=True) if path.exists() else []
        if until(records):
            return records
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting on {path}")


def _events(records, kind):
    return [r for r in records if r["event"] == kind]


def _every_node_answered(method, records):
    if method == "simultrain":
        return len({r["node-id"] for r in _events(records, "exchange")}) == 3
    return any(r["round"] >= 1 for r in _events(records, "round"))


# About 3.5 to 4 minutes each, most of it Flower noticing the dead node (two missed
# 30-s heartbeats) and one ClientApp process per message: marked slow, left
# out of CI's run (pytest -m slow runs them; see the README)
@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CRASH_RUNS))
def test_a_killed_supernode_drops_out_and_a_restarted_one_rejoins(tmp_path, method):
    deploy = _deploy(tmp_path / "deploy", num_nodes=3)  # its own: nodes die here
    dep = next(deploy)
    try:
        cli = FlowerHome(tmp_path / "cli", connections=dep.connections)
        out = tmp_path / "runs"
        run_id = cli.submit(
            {
                "method": method,
                "mnist1d-samples": 2000,
                "output-dir": str(out),
                **CRASH_RUNS[method],
            },
            connection="deploy",
        )
        metrics = out / f"{method}-{run_id}" / "metrics.jsonl"
        # 1. once every node has answered once, node2 crashes
        first = _follow(metrics, lambda rs: _every_node_answered(method, rs))
        before = {r["node-id"] for r in first if r["event"] in ("bytes", "exchange")}
        assert len(before) == 3
        (lost,) = dep.node_ids("node2")
        dep.kill_node("node2")
        # 2. node2 starts again at once, under a new node id: a new device to
        # the run, which takes it in while it still waits on the lost one ...
        dep.start_node("node2")
        # 3. ... until it notices the loss (heartbeats or reply-timeout). The
        # run cannot end before then, so the newcomer is always in time.
        drop_event = "dropped" if method == "simultrain" else "dropout"
        _follow(metrics, lambda rs: bool(_events(rs, drop_event)), timeout=180)
        status = cli.wait(run_id, 400, "deploy", metrics)
        _, back = dep.node_ids("node2")
        logs = "\n".join(p.read_text()[-1500:] for p in dep.root.glob("*.log"))
        assert status.ok, f"{status.status}: {status.details}\n{logs}"
        records = read_jsonl(metrics)
    finally:
        next(deploy, None)  # tear down
    summary = records[-1]
    assert lost in before and back not in before
    assert lost in {r["node-id"] for r in _events(records, drop_event)}
    rounds = _events(records, "round")
    assert rounds[-1]["eval-accuracy"] > rounds[0]["eval-accuracy"] + 0.1
    if method == "simultrain":
        assert summary["dropped-edges"] >= 1 and summary["joined-edges"] == 1
        # the newcomer did all its steps, from θ_e^c (reconciliation)
        done = sum(
            e["micro-batches"]
            for e in _events(records, "exchange")
            if e["node-id"] == back
        )
        assert done == CRASH_RUNS["simultrain"]["simultrain-steps"]
    else:
        assert summary["dropouts"] >= 1 and summary["rejected-replies"] == 0
        # the newcomer trained in the later rounds (fresh residuals)
        planned = [p["round"] for p in _events(records, "plan") if p["node-id"] == back]
        syncs = [e for e in _events(records, "sync") if e["node-id"] == back]
        assert planned and syncs
        # it is asked every round until dynamic sync lengthens its interval:
        # a last round without it is one its interval skips
        last_round = CRASH_RUNS["acesync"]["num-server-rounds"]
        assert planned == list(range(min(planned), max(planned) + 1))
        assert max(planned) == last_round or (
            max(planned) + syncs[-1]["next-interval"] > last_round
        )
        assert any(e["node-id"] == back for e in _events(records, "sync"))  # used
        # the budgets follow measured bandwidth once a node has replied
        measured = [
            p["bandwidth-mbps"]
            for p in _events(records, "plan")
            if p["round"] == 2 and p["node-id"] in before
        ]
        assert measured and all(b > 0 for b in measured)
