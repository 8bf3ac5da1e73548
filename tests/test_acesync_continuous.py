"""ACE-Sync's continuous synchronization against the real edge handlers, in
one process (tests/inprocess.py): every device trains every round, a device
on a two-round interval gets the model in the interval's first round and
sends its update in the last one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from inprocess import run_inprocess

from tandem.accounting import payload_bytes
from tandem.clients.acesync import PROGRESS_KEY, compression_mod, held_model
from tandem.compression.budget import byte_budget
from tandem.compression.downlink import model_digest
from tandem.compression.layout import GroupLayout
from tandem.config import ConfigError, RunConfig
from tandem.coordination import Phase, interval_phase
from tandem.importance import ImportancePredictor
from tandem.network import parse_link
from tandem.protocol.acesync import (
    HOLD_METRICS,
    KEY_PREDICTOR,
    AceSyncOptions,
    DownlinkHeader,
    EdgePlan,
    predictor_record,
)
from tandem.wire import PayloadError

BASE = {
    "method": "acesync",
    "mnist1d-samples": 2000,
    "num-server-rounds": 5,
    "local-steps": 20,
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "acesync-clusters": 1,
    "acesync-interval-mode": "continuous",
    "acesync-min-interval": 2,
    "acesync-max-interval": 2,
}


pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")


def _events(records, kind):
    return [r for r in records if r["event"] == kind]


def test_every_device_trains_every_round_and_syncs_every_other(tmp_path):
    records, _ = run_inprocess(BASE, nodes=3, out=tmp_path)
    summary = records[-1]
    plans = {(p["round"], p["node-id"]): p for p in _events(records, "plan")}
    # every device, every round, one round of steps each
    assert sorted(plans) == [(r, n) for r in range(1, 6) for n in (1, 2, 3)]
    assert all(p["local-steps"] == 20 for p in plans.values())
    # round 1 is a whole interval (r = 1 before any divergence is known);
    # then r = 2: the model in rounds 2 and 4, the update in rounds 3 and 5
    for n in (1, 2, 3):
        phases = [(plans[(r, n)]["resume"], plans[(r, n)]["hold"]) for r in range(1, 6)]
        assert phases == [
            (False, False),
            (False, True),
            (True, False),
            (False, True),
            (True, False),
        ]
    syncs = {(e["round"], e["node-id"]) for e in _events(records, "sync")}
    assert syncs == {(r, n) for r in (1, 3, 5) for n in (1, 2, 3)}
    assert summary["rejected-replies"] == 0 and summary["dropouts"] == 0
    assert summary["downlink-digest-mismatches"] == 0
    assert summary["final-accuracy"] > 0.25  # chance is 0.1


def test_the_run_s_last_round_ends_every_interval(tmp_path):
    """Four rounds: an interval of two would begin in round 4 and hold the
    update past the run's end; it is cut to one round, so every device gets
    the model and syncs in round 4 and no step is lost."""
    records, _ = run_inprocess({**BASE, "num-server-rounds": 4}, nodes=3, out=tmp_path)
    plans = {(p["round"], p["node-id"]): p for p in _events(records, "plan")}
    for n in (1, 2, 3):
        phases = [(plans[(r, n)]["resume"], plans[(r, n)]["hold"]) for r in range(1, 5)]
        assert phases == [(False, False), (False, True), (True, False), (False, False)]
    syncs = {(e["round"], e["node-id"]) for e in _events(records, "sync")}
    assert syncs == {(r, n) for r in (1, 3, 4) for n in (1, 2, 3)}
    summary = records[-1]
    assert summary["accepted-replies"] == 9 and summary["rejected-replies"] == 0
    assert summary["edge-steps"] == 3 * 4 * 20


# ----------------------------------------------------------------- edge alone
MODEL = {
    "w": np.arange(12, dtype=np.float32).reshape(4, 3) / 10,
    "b": np.zeros(3, np.float32),
    "bn.count": np.array(7, np.int64),
}
PLAN = EdgePlan(
    budget=10_000,
    codecs=AceSyncOptions().options,
    chunk=4,
    gamma=1.0,
    importance="magnitude",
    fill_decay=0.5,
    history=2,
    local_steps=3,
    server_round=2,
)


def _context():
    return Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )


def _message(plan, with_model=True):
    content = RecordDict(
        {"config": ConfigRecord({**plan.to_config(), **DownlinkHeader(2).to_config()})}
    )
    if with_model:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in MODEL.items()})
    return Message(content, dst_node_id=1, message_type="train")


def _plus_one(seen):
    """A train handler that adds 1 to every float tensor of the model it is
    given (and records that model)."""

    def train(msg, context):
        arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        seen.append(arrays)
        trained = {k: v + 1 if v.dtype.kind == "f" else v for k, v in arrays.items()}
        metrics = {
            "train-loss": 0.5,
            "num-examples": 10,
            "train-seconds": 0.01,
            "compute-seconds": 0.01,
            "steps": 3,
        }
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in trained.items()}),
                "metrics": MetricRecord(metrics),
            }
        )
        return Message(content=content, reply_to=msg)

    return train


def test_the_edge_holds_resumes_and_sends_the_whole_intervals_update():
    context, seen = _context(), []
    train = _plus_one(seen)
    hold = dataclasses.replace(PLAN, hold=True)
    # round 1 of 3: the model comes, is trained, kept; only metrics go up
    reply = compression_mod(_message(hold), context, train)
    assert set(reply.content.keys()) == {"metrics"}
    assert set(reply.content["metrics"].keys()) == HOLD_METRICS
    progress = context.state.array_records[PROGRESS_KEY]
    np.testing.assert_array_equal(progress["w"].numpy(), MODEL["w"] + 1)
    # round 2: on from the model in progress (the message carries none)
    resume = dataclasses.replace(PLAN, hold=True, resume=True)
    compression_mod(_message(resume, with_model=False), context, train)
    np.testing.assert_array_equal(seen[1]["w"], MODEL["w"] + 1)
    assert int(seen[1]["bn.count"]) == 7
    # round 3: on again, and the update of all three rounds goes up
    send = dataclasses.replace(PLAN, resume=True)
    reply = compression_mod(_message(send, with_model=False), context, train)
    np.testing.assert_array_equal(seen[2]["w"], MODEL["w"] + 2)
    metrics = reply.content["metrics"]
    assert metrics["update-norm"] == pytest.approx(3 * np.sqrt(15), rel=1e-6)
    held, _ = held_model(context)
    assert metrics["model-digest"] == model_digest(
        GroupLayout.from_arrays(held, 4).flat(held)
    )
    assert PROGRESS_KEY not in context.state
    # without a model in progress (a restarted device) a resume is refused
    with pytest.raises(PayloadError, match="no model in progress"):
        compression_mod(_message(resume, with_model=False), context, train)
    # and a resume message must not carry a model
    compression_mod(_message(hold), context, train)
    with pytest.raises(PayloadError, match="carries record 'arrays'"):
        compression_mod(_message(resume), context, train)
    # a fresh message starts a new interval: the model in progress goes
    compression_mod(_message(PLAN), context, train)
    assert PROGRESS_KEY not in context.state


def test_interval_phases_by_hand():
    assert interval_phase(4, 4, 1) == Phase(resume=False, send=True)
    assert [interval_phase(r, 4, 3) for r in (4, 5, 6)] == [
        Phase(resume=False, send=False),
        Phase(resume=True, send=False),
        Phase(resume=True, send=True),
    ]
    with pytest.raises(ValueError, match=r"outside the interval of rounds 4\.\.6"):
        interval_phase(7, 4, 3)
    with pytest.raises(ValueError, match="interval must be >= 1"):
        interval_phase(4, 4, 0)


def test_plan_flags_round_trip_and_must_be_bools():
    plan = dataclasses.replace(PLAN, resume=True, hold=True)
    assert EdgePlan.from_config(plan.to_config()) == plan
    legacy = {k: v for k, v in PLAN.to_config().items() if "resume" not in k}
    assert EdgePlan.from_config(legacy) == PLAN  # absent: False
    for key in ("acesync-resume", "acesync-hold"):
        with pytest.raises(PayloadError, match=f"'{key}' = 1: must be a bool"):
            EdgePlan.from_config({**plan.to_config(), key: 1})


def test_continuous_mode_is_the_default_and_checked_when_the_run_starts():
    with pytest.raises(ConfigError, match="acesync-interval-mode"):
        RunConfig.from_flat({**BASE, "acesync-interval-mode": "sometimes"})
    flat = {"method": "acesync", "acesync-personalize": True}
    options = RunConfig.from_flat(flat).options_as(AceSyncOptions)
    assert options.interval_mode == "continuous"  # the default, with clusters too


def _spoil_hold(node_id, round_, change):
    """A tamper that rewrites ``node_id``'s reply to its ``round_``-th message."""
    seen = {}

    def tamper(node, reply):
        seen[node] = seen.get(node, 0) + 1
        if node == node_id and seen[node] == round_:
            change(reply)
        return reply

    return tamper


def _nan_loss(reply):
    metrics = dict(reply.content["metrics"])
    reply.content["metrics"] = MetricRecord({**metrics, "train-loss": float("nan")})


def _uploads(reply):
    reply.content["arrays"] = ArrayRecord({"w": Array(np.zeros(3, np.float32))})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_nan_loss, "hold metric 'train-loss' = nan"),
        (_uploads, "a hold reply carries records ['arrays']"),
    ],
)
def test_a_bad_hold_reply_is_refused_and_the_device_starts_over(
    tmp_path, change, reason
):
    """Node 2's hold reply of round 2 is spoiled: it is refused with the
    reason and counted; node 2 gets the full model in round 3 and starts a
    new interval there (hold in 3, sync in 4) while the others sync in 3."""
    config = {**BASE, "num-server-rounds": 4}
    records, _ = run_inprocess(
        config, nodes=3, out=tmp_path, tamper=_spoil_hold(2, 2, change)
    )
    rejects = _events(records, "rejected")
    assert [(r["round"], r["node-id"]) for r in rejects] == [(2, 2)]
    assert reason in rejects[0]["reason"]
    assert records[-1]["rejected-replies"] == 1
    plans = {(p["round"], p["node-id"]): p for p in _events(records, "plan")}
    assert (plans[(3, 2)]["resume"], plans[(3, 2)]["hold"]) == (False, True)
    assert (plans[(4, 2)]["resume"], plans[(4, 2)]["hold"]) == (True, False)
    assert (plans[(3, 1)]["resume"], plans[(3, 1)]["hold"]) == (True, False)
    downlinks = {(d["round"], d["node-id"]) for d in _events(records, "downlink")}
    assert (3, 2) not in downlinks  # the full model, not a delta
    assert (2, 1) in downlinks and (4, 1) in downlinks
    assert records[-1]["downlink-digest-mismatches"] == 0


def test_a_delta_budget_counts_the_predictor_even_when_a_hold_comes_first(tmp_path):
    """Every delta of this run goes to a device that holds (rounds 2 and 4),
    and a hold message carries no predictor; the downlink budget is still
    eq. 5 on the device's downlink less the predictor's bytes, the round's
    broadcast that every device that sends an update receives."""
    config = {**BASE, "acesync-link": "4g"}  # one constant downlink rate
    records, _ = run_inprocess(config, nodes=3, out=tmp_path)
    deltas = _events(records, "downlink")
    assert {(d["round"], d["node-id"]) for d in deltas} == {
        (r, n) for r in (2, 4) for n in (1, 2, 3)
    }
    o = AceSyncOptions()
    eq5 = byte_budget(
        4 * 9610,  # cnn1d's 9,610 float32 parameters
        parse_link("4g").down.at(0.0) * 1e6,
        c_min=o.down_c_min,
        c_max=o.down_c_max,
        beta=o.beta,
    )
    record = predictor_record(ImportancePredictor(alpha=o.alpha))
    predictor = payload_bytes(RecordDict({KEY_PREDICTOR: record}))
    assert predictor >= 4 * 165  # 165 float32 weights, and their names
    assert all(d["budget"] == eq5 - predictor for d in deltas)
