"""SimulTrain's cloud loop against real edge handlers, in one process.

The in-process Grid (tests/inprocess.py) hands each message to the real
ClientApp ``dispatch`` with a persistent node Context, so these runs exercise
the whole protocol (versions, stashes, reconciliation, checks) in seconds and
deterministically.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.task_identity import TaskIdentity
from inprocess import run_inprocess

from tandem.config import ConfigError
from tandem.network import assign_links
from tandem.schedules import exchanges_from_records, replay_pipeline
from tandem.strategies import simultrain
from tandem.strategies.simultrain import adapt_chunk

BASE = {
    "method": "simultrain",
    "mnist1d-samples": 2000,
    "simultrain-chunk": 2,
    "simultrain-steps": 60,
    "simultrain-eval-every": 30,
}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _events(records, kind):
    return [r for r in records if r["event"] == kind]


def test_edges_learn_and_every_step_is_accounted(tmp_path):
    records, grid = run_inprocess(BASE, nodes=2, out=tmp_path)
    summary = records[-1]
    assert summary["event"] == "summary"
    assert summary["final-accuracy"] > 0.34  # measured 0.41, chance 0.1
    assert summary["rejected-replies"] == 0 and summary["dropped-deltas"] == 0
    exchanges = _events(records, "exchange")
    assert summary["exchanges"] == len(exchanges) == sum(grid.handled.values())
    for node in (1, 2):
        mine = [e for e in exchanges if e["node-id"] == node]
        # 60 steps in 30 chunks of 2, then two messages that only deliver the
        # gradients of the last two chunks (sent before they were computed)
        assert [e["seq"] for e in mine] == list(range(32))
        assert sum(e["micro-batches"] for e in mine) == 60
        # message k + 2 carries the gradients of chunk k
        assert [e["grads-from"] for e in mine] == [-1, -1, *range(30)]
    assert summary["max-staleness"] <= 2 * 8  # bound × edges
    # the run replays the exchanges it kept in memory: the same timeline as
    # the ones rebuilt from its metrics file
    exchanges, marks = exchanges_from_records(records)
    clock = replay_pipeline(exchanges, assign_links([1, 2], "4g"), marks=marks)
    assert clock.total_seconds == summary["emulated-seconds"]
    assert list(clock.round_end) == summary["emulated-seconds-per-period"]


def test_a_bad_cut_stops_the_run_before_training(tmp_path):
    with pytest.raises(ConfigError, match="simultrain-cut"):
        run_inprocess({**BASE, "simultrain-cut": "nope"}, nodes=1, out=tmp_path)


def test_a_slow_edge_does_not_hold_back_a_fast_one(tmp_path):
    # node 2's replies become visible only after 6 more polls each
    records, _ = run_inprocess(BASE, nodes=2, out=tmp_path, lag={2: 6})
    order = [e["node-id"] for e in _events(records, "exchange")]
    first_slow = order.index(2)
    assert first_slow >= 3  # the fast edge went on meanwhile
    assert order.count(1) == order.count(2) == 32  # both finished
    assert records[-1]["final-accuracy"] > 0.3  # measured 0.36, chance 0.1


def _hostile(kind):
    def tamper(node: int, reply: Message) -> Message:
        if node != 2 or "acts" not in reply.content:
            return reply
        acts = reply.content["acts"]
        if kind == "nan":
            bad = acts["a"].numpy().astype(np.float32)
            bad[0] = np.nan
            acts = ArrayRecord(
                {"a": Array(bad), "y": acts["y"], "sizes": acts["sizes"]}
            )
            reply.content["acts"] = acts
        elif kind == "future":
            reply.content["meta"]["v-e"] = 99
        return reply

    return tamper


@pytest.mark.parametrize(
    ("kind", "reason"), [("nan", "activations"), ("future", "chunk version 99")]
)
def test_a_hostile_edge_is_rejected_and_the_others_go_on(tmp_path, kind, reason):
    config = {**BASE, "simultrain-precision": "float32"}
    records, _ = run_inprocess(config, nodes=2, out=tmp_path, tamper=_hostile(kind))
    rejected = _events(records, "rejected")
    assert len(rejected) == 1 and rejected[0]["node-id"] == 2
    assert reason in rejected[0]["reason"]
    summary = records[-1]
    assert summary["rejected-replies"] == 1
    # the honest edge finished all its steps and the model still learned
    honest = [e for e in _events(records, "exchange") if e["node-id"] == 1]
    assert sum(e["micro-batches"] for e in honest) == 60
    # measured 0.26 (one edge's data), chance 0.1
    assert np.isfinite(summary["final-accuracy"]) and summary["final-accuracy"] > 0.22


def test_staleness_beyond_the_bound_drops_the_delta(tmp_path):
    config = {**BASE, "simultrain-staleness-bound": 0, "simultrain-reconcile-every": 2}
    records, _ = run_inprocess(config, nodes=3, out=tmp_path)
    summary = records[-1]
    assert summary["dropped-deltas"] > 0
    assert summary["max-staleness"] > 0


def test_adaptive_chunk_by_hand():
    # 0.1 s exchange, 0.001 s compute for 1 micro-batch: overhead 0.099 s,
    # C >= 0.099 * 0.9 / (0.1 * 0.001) = 891 -> capped at 4
    assert adapt_chunk(0.1, 0.001, 1, 4) == 4
    # compute dominates: 1.0 s for 4 micro-batches, overhead 0.01 s -> 1
    assert adapt_chunk(1.01, 1.0, 4, 8) == 1
    # overhead 0.05 s, 0.1 s per micro-batch: C >= 0.05*0.9/(0.1*0.1) = 4.5 -> 5
    assert adapt_chunk(0.25, 0.2, 2, 8) == 5


def test_a_silent_edge_is_dropped_and_the_others_finish(tmp_path):
    config = {**BASE, "reply-timeout": 0.5}
    records, _ = run_inprocess(config, nodes=2, out=tmp_path, silent_after={2: 5})
    summary = records[-1]
    assert summary["dropped-edges"] == 1 and summary["rejected-replies"] == 1
    (rejected,) = _events(records, "rejected")
    assert rejected["node-id"] == 2 and "no reply within 0.5 s" in rejected["reason"]
    honest = [e for e in _events(records, "exchange") if e["node-id"] == 1]
    assert sum(e["micro-batches"] for e in honest) == 60
    assert summary["final-accuracy"] > 0.3  # measured 0.34, chance 0.1


def test_a_late_node_joins_from_the_cloud_copy_and_catches_up(tmp_path, monkeypatch):
    monkeypatch.setattr(simultrain, "JOIN_SCAN", 0.0)  # look for new nodes always
    # node 3 connects after 10 polls, when the others are under way
    records, _ = run_inprocess(BASE, nodes=2, out=tmp_path, late={3: 10})
    summary = records[-1]
    assert summary["joined-edges"] == 1
    (joined,) = _events(records, "joined")
    assert joined["node-id"] == 3
    late = [e for e in _events(records, "exchange") if e["node-id"] == 3]
    assert sum(e["micro-batches"] for e in late) == 60  # it did all its steps
    first = next(e for e in _events(records, "exchange") if e["node-id"] == 3)
    assert first["bytes-down"] > 2 * 1000  # its first message carried θ_e^c
    # measured 0.46, chance 0.1
    assert summary["rejected-replies"] == 0 and summary["final-accuracy"] > 0.38


def test_deferred_evaluations_report_what_evaluating_on_time_reports(
    tmp_path, monkeypatch
):
    """Real-time mode evaluates each period after the streams, on copies of
    the models taken when the period ended: every round record (accuracy,
    loss, train loss, exchanges, bytes) is the one evaluating on time gives,
    in the same order; only the wall time it was written at differs."""
    on_time, _ = run_inprocess(BASE, nodes=2, out=tmp_path / "on-time")
    init = simultrain.SimulTrainCloud.__init__

    def deferring(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.defer_evaluations = True

    monkeypatch.setattr(simultrain.SimulTrainCloud, "__init__", deferring)
    deferred, _ = run_inprocess(BASE, nodes=2, out=tmp_path / "deferred")

    def rounds(records):
        return [
            {k: v for k, v in r.items() if k != "elapsed"}
            for r in _events(records, "round")
        ]

    assert len(rounds(on_time)) == 4  # start, two periods, the final one
    assert rounds(deferred) == rounds(on_time)
    # the periods' models were copies: later training did not reach them
    assert rounds(on_time)[1]["eval-loss"] != rounds(on_time)[2]["eval-loss"]
