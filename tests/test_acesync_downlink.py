"""ACE-Sync's compressed downlink and dynamic synchronization.

- the downlink round trip: the edge's model after applying compressed deltas
  equals the cloud's record of it, bit for bit, and their digests agree;
- error feedback on the downlink: what is not sent arrives later;
- a new, stale or forgotten device gets the full model;
- hostile downlink frames are refused by the edge with a clear error and
  leave its model as it was;
- the sync-interval policy (eq. 9) on hand-made divergence traces.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from tandem.clients.acesync import held_model, receive_model
from tandem.compression.codecs import CodecError, Option, parse_codecs
from tandem.compression.downlink import (
    DeviceReplica,
    apply_downlink,
    compress_downlink,
    model_digest,
    needs_full,
)
from tandem.compression.layout import GroupLayout
from tandem.coordination import IntervalPolicy, adjust_intervals, due_devices
from tandem.protocol.acesync import (
    KEY_DOWNLINK,
    AceSyncOptions,
    DownlinkHeader,
    EdgePlan,
    downlink_record,
)
from tandem.strategies.acesync import AceSync
from tandem.wire import PayloadError

CODECS = parse_codecs("full,half,int8,topk@0.1,sign,defer")
# two float tensors (3 groups of at most 4) and an integer counter
MODEL = {
    "fc.weight": np.arange(8, dtype=np.float32).reshape(2, 4) / 10,
    "fc.bias": np.array([0.5, -0.5], np.float32),
    "bn.count": np.array(7, np.int64),
}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are built outside a ClientApp (Flower reads the task's ids)."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _layout(model=MODEL, chunk=4):
    return GroupLayout.from_arrays(model, chunk)


# ------------------------------------------------------------------ pure maths
def test_two_groups_full_or_defer_hand_computed():
    """Budget for one group in full: the larger delta goes first, the other
    waits in the residual and goes next time (error feedback, γ = 1)."""
    model = {"w": np.zeros(4, np.float32), "v": np.zeros(4, np.float32)}
    layout = GroupLayout.from_arrays(model, 4)
    options = (Option("full"), Option("defer"))
    replica = DeviceReplica.full(np.zeros(8, np.float32), 0, layout, history=2)
    target = np.array([1, 1, 1, 1, 3, 3, 3, 3], np.float32)
    out = compress_downlink(
        target, replica, budget=16, codecs=options, layout=layout, server_round=1
    )
    # group 2 (energy 36) is sent in full, group 1 (energy 4) deferred
    assert out.codecs.tolist() == [1, 0] and out.encoded_bytes == 16
    assert replica.model.tolist() == [0, 0, 0, 0, 3, 3, 3, 3]
    assert replica.version == 1
    assert out.kept_fraction == pytest.approx(36 / 40)
    assert out.residual_norm == pytest.approx(2.0)
    edge = apply_downlink(
        np.zeros(8, np.float32),
        out.codecs,
        out.payload,
        options=options,
        layout=layout,
        max_bytes=16,
    )
    assert edge.tolist() == replica.model.tolist()
    # next round, same target: the deferred group arrives
    out = compress_downlink(
        target, replica, budget=16, codecs=options, layout=layout, server_round=2
    )
    assert out.codecs.tolist() == [0, 1]
    assert replica.model.tolist() == target.tolist() and out.residual_norm == 0.0


def test_downlink_round_trip_edge_equals_cloud_record():
    """Ten rounds of a moving global model through every codec: the edge's
    model equals the cloud's record bit for bit, and so do their digests."""
    rng = np.random.default_rng(0)
    layout = GroupLayout.from_arrays({"w": np.zeros(1000, np.float32)}, 64)
    target = rng.normal(size=1000).astype(np.float32)
    replica = DeviceReplica.full(target, 0, layout, history=3)
    edge = target.copy()
    for server_round in range(1, 11):
        target = (target + rng.laplace(scale=0.1, size=1000)).astype(np.float32)
        out = compress_downlink(
            target,
            replica,
            budget=1200,  # about 0.3 of float32
            codecs=CODECS,
            layout=layout,
            server_round=server_round,
            importance="magnitude",
        )
        assert out.encoded_bytes <= 1200
        edge = apply_downlink(
            edge,
            out.codecs,
            out.payload,
            options=CODECS,
            layout=layout,
            max_bytes=1200,
        )
        assert np.array_equal(edge, replica.model)
        assert model_digest(edge) == model_digest(replica.model)
    # error feedback: with the target held still, the record closes in on it
    gaps = []
    for server_round in range(11, 31):
        out = compress_downlink(
            target,
            replica,
            budget=1200,
            codecs=CODECS,
            layout=layout,
            server_round=server_round,
        )
        gaps.append(out.residual_norm)
    assert gaps[-1] < 0.05 * gaps[0]


def test_digest_sees_one_bit():
    flat = np.linspace(-1, 1, 100, dtype=np.float32)
    other = flat.copy()
    other[37] = np.nextafter(other[37], np.float32(2))
    assert model_digest(flat) != model_digest(other)
    assert model_digest(flat) == model_digest(flat.copy())
    assert 0 <= model_digest(flat) < 2**48


def test_a_budget_below_every_option_changes_nothing():
    layout = _layout()
    replica = DeviceReplica.full(layout.flat(MODEL), 0, layout, history=2)
    before = replica.model.copy()
    with pytest.raises(CodecError, match="downlink budget 3 bytes"):
        compress_downlink(
            before + 1,
            replica,
            budget=3,
            codecs=(Option("full"),),
            layout=layout,
            server_round=1,
        )
    assert np.array_equal(replica.model, before) and replica.version == 0


def test_new_stale_and_known_devices():
    layout = _layout()
    replica = DeviceReplica.full(layout.flat(MODEL), 5, layout, history=2)
    assert needs_full(None, 1, max_age=4)
    assert not needs_full(replica, 9, max_age=4)  # 4 rounds old
    assert needs_full(replica, 10, max_age=4)  # 5 rounds old


# ------------------------------------------------------------------ the cloud
def _cloud(**overrides):
    options = AceSyncOptions(
        **{"importance": "magnitude", "link": "4g", **overrides}  # type: ignore[arg-type]
    )
    cloud = AceSync(FedAvg(), options=options, local_steps=5, seed=0)
    cloud.set_arrays(ArrayRecord({k: Array(v) for k, v in MODEL.items()}))
    return cloud


def _send(cloud, server_round, node=1):
    plans = cloud.prepare(server_round, [node], ConfigRecord({"local-steps": 5}))
    content = cloud.content(
        server_round,
        plans[node],
        ArrayRecord({k: Array(v) for k, v in cloud._current_arrays.items()}),
        {"server-round": server_round},
    )
    return cloud.downlink(server_round, node, content, plans[node])


def _move(cloud, delta):
    arrays = {k: v.copy() for k, v in cloud._current_arrays.items()}
    arrays["fc.weight"] = (arrays["fc.weight"] + delta).astype(np.float32)
    cloud.set_arrays(ArrayRecord({k: Array(v) for k, v in arrays.items()}))


def test_cloud_sends_full_to_new_then_deltas_then_full_when_stale_or_forgotten():
    # (the kept-share floor off: this checks the version rules alone)
    cloud = _cloud(**{"down_max_age": 2, "max_interval": 2, "down_min_kept": 0.0})
    content, digest = _send(cloud, 1)
    assert KEY_DOWNLINK not in content  # new device: the whole model
    assert DownlinkHeader.from_config(content["config"]).full
    assert sorted(content["arrays"].keys()) == sorted(MODEL)
    assert digest == model_digest(cloud.current)
    _move(cloud, 0.25)
    content, digest = _send(cloud, 2)
    header = DownlinkHeader.from_config(content["config"])
    assert (header.version, header.base) == (2, 1) and KEY_DOWNLINK in content
    # a delta carries only the tensors outside the groups
    assert list(content["arrays"].keys()) == ["bn.count"]
    assert digest == model_digest(cloud.replicas[1].model)
    # three rounds later (older than down_max_age): the whole model
    _move(cloud, 0.25)
    content, _ = _send(cloud, 5)
    assert KEY_DOWNLINK not in content and cloud.replicas[1].version == 5
    # a forgotten device (error, missing reply, digest mismatch): whole model
    cloud.forget(1)
    content, _ = _send(cloud, 6)
    assert KEY_DOWNLINK not in content
    assert cloud.stats.full_sends == 3 and cloud.stats.delta_sends == 1


def test_a_delta_below_the_kept_share_floor_becomes_the_full_model():
    rng = np.random.default_rng(5)
    for floor, delta_sends in ((0.0, 1), (1.0, 0)):
        cloud = _cloud(down_min_kept=floor)
        _send(cloud, 1)
        _move(cloud, rng.normal(size=MODEL["fc.weight"].shape).astype(np.float32))
        content, digest = _send(cloud, 2)
        # floor 1.0: no lossy delta is enough, so the whole model goes
        assert (KEY_DOWNLINK in content) == (delta_sends == 1)
        assert cloud.stats.delta_sends == delta_sends
        assert cloud.stats.kept_fallbacks == 1 - delta_sends
        if not delta_sends:
            assert digest == model_digest(cloud.current)
            assert cloud.replicas[1].version == 2


def test_full_downlink_option_always_sends_the_model():
    cloud = _cloud(downlink="full")
    for server_round in (1, 2, 3):
        content, _ = _send(cloud, server_round)
        assert KEY_DOWNLINK not in content
        assert "acesync-down-version" not in content["config"]


# ------------------------------------------------------------------ the edge
PLAN = EdgePlan(
    budget=10**6,
    codecs=CODECS,
    chunk=4,
    gamma=1.0,
    importance="magnitude",
    fill_decay=0.5,
    history=2,
    local_steps=1,
    server_round=2,
)


def _context():
    return Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )


def _message(content):
    return Message(content, dst_node_id=1, message_type="train")


def _edge_with_model(version=1):
    context = _context()
    full = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in MODEL.items()}),
            "config": ConfigRecord(DownlinkHeader(version).to_config()),
        }
    )
    receive_model(_message(full), context, PLAN)
    return context


def _delta_content(base=1, version=2, budget=None, codes=None, payload=None):
    layout = _layout()
    replica = DeviceReplica.full(layout.flat(MODEL), base, layout, history=2)
    target = layout.flat(MODEL) + np.linspace(-1, 1, layout.total, dtype=np.float32)
    out = compress_downlink(
        target, replica, budget=40, codecs=CODECS, layout=layout, server_round=version
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({"bn.count": Array(np.array(7, np.int64))}),
            "config": ConfigRecord(
                DownlinkHeader(
                    version, base, 40 if budget is None else budget
                ).to_config()
            ),
            KEY_DOWNLINK: downlink_record(
                out.codecs if codes is None else codes,
                out.payload if payload is None else payload,
            ),
        }
    )
    return content, replica


def test_edge_applies_a_delta_and_holds_the_clouds_record():
    context = _edge_with_model()
    content, replica = _delta_content()
    msg = receive_model(_message(content), context, PLAN)
    held, version = held_model(context)
    layout = _layout()
    assert version == 2
    assert np.array_equal(layout.flat(held), replica.model)
    assert held["bn.count"].dtype == np.int64 and int(held["bn.count"]) == 7
    # the training handler sees the whole model, no downlink record
    assert sorted(msg.content["arrays"].keys()) == sorted(MODEL)
    assert KEY_DOWNLINK not in msg.content


def _garbage_payload():
    content, _ = _delta_content()
    payload = content[KEY_DOWNLINK]["payload"].numpy()
    return payload


HOSTILE = {
    "no model held": (
        lambda: _context(),
        lambda: _delta_content()[0],
        "this node holds no model",
    ),
    "wrong base version": (
        lambda: _edge_with_model(version=3),
        lambda: _delta_content(base=1, version=4)[0],
        "applies to version 1; this node holds version 3",
    ),
    "truncated payload": (
        _edge_with_model,
        lambda: _delta_content(payload=_garbage_payload()[:-3])[0],
        "downlink:",
    ),
    "payload over the budget": (
        _edge_with_model,
        lambda: _delta_content(budget=8)[0],
        "payload",
    ),
    "codec index out of range": (
        _edge_with_model,
        lambda: _delta_content(codes=np.full(3, 200, np.uint8))[0],
        "downlink:",
    ),
    "float codec table": (
        _edge_with_model,
        lambda: _delta_content(codes=np.zeros(3, np.float32))[0],
        "array 'codecs' of 12 bytes exceeds the 3 limit",
    ),
    "NaN in a full group": (
        _edge_with_model,
        lambda: _delta_content(
            codes=np.array([0, 5, 5], np.uint8),
            payload=np.frombuffer(np.full(4, np.nan, np.float32).tobytes(), np.uint8),
        )[0],
        "downlink:",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_downlink_is_refused_and_changes_nothing(case):
    make_context, make_content, reason = HOSTILE[case]
    context = make_context()
    before, version = held_model(context)
    with pytest.raises(PayloadError, match=reason):
        receive_model(_message(make_content()), context, PLAN)
    after, after_version = held_model(context)
    assert after_version == version
    if before is None:
        assert after is None
    else:
        assert all(np.array_equal(before[k], after[k]) for k in before)


def test_pickled_downlink_array_is_refused():
    context = _edge_with_model()
    content, _ = _delta_content()
    record = content[KEY_DOWNLINK]
    bad = Array(np.zeros(3, np.uint8))
    bad.data = b"\x80\x04\x95" + bad.data[3:]  # a pickle's opening bytes
    content[KEY_DOWNLINK] = ArrayRecord({"codecs": bad, "payload": record["payload"]})
    with pytest.raises(PayloadError):
        receive_model(_message(content), context, PLAN)
    assert held_model(context)[1] == 1


def test_delta_arrays_record_must_hold_only_the_other_tensors():
    context = _edge_with_model()
    content, _ = _delta_content()
    content["arrays"] = ArrayRecord({k: Array(v) for k, v in MODEL.items()})
    with pytest.raises(PayloadError, match="of a delta has arrays"):
        receive_model(_message(content), context, PLAN)


def test_header_and_record_must_agree():
    context = _edge_with_model()
    content, _ = _delta_content()
    del content[KEY_DOWNLINK]
    with pytest.raises(PayloadError, match="has no record 'downlink'"):
        receive_model(_message(content), context, PLAN)
    content, _ = _delta_content()
    content["config"] = ConfigRecord(DownlinkHeader(2).to_config())
    with pytest.raises(PayloadError, match="full-model message"):
        receive_model(_message(content), context, PLAN)
    with pytest.raises(PayloadError, match="acesync-down-base"):
        DownlinkHeader.from_config(
            {
                "acesync-down-version": 2,
                "acesync-down-base": 5,
                "acesync-down-budget": 0,
            }
        )


# ------------------------------------------------------------------ eq. 9 intervals
def test_interval_policy_on_a_hand_made_trace():
    """Four devices over four rounds; divergences chosen by hand.

    Device 4 drifts in round 1 (4 > 1.5 × median 1), device 1 is stable
    (0.5 <= 0.75 × 1). Per round: ρ = D / r.
    """
    policy = IntervalPolicy(threshold=1.5, stable=0.75, min_interval=1, max_interval=3)
    r = np.array([1, 1, 1, 1])
    # round 1: ρ = [0.5, 1, 1, 4], median 1
    d1 = adjust_intervals(np.array([0.5, 1.0, 1.0, 4.0]), r, policy)
    assert d1.intervals.tolist() == [2, 1, 1, 1]
    assert d1.triggered.tolist() == [False, False, False, True]
    assert d1.stable.tolist() == [True, False, False, False]
    assert d1.threshold == 1.5
    # round 2: device 1 drifted twice as far over its 2 rounds: ρ = 0.5 again
    d2 = adjust_intervals(np.array([1.0, 1.0, 1.0, 1.0]), d1.intervals, policy)
    assert d2.intervals.tolist() == [3, 1, 1, 1]
    # round 3: the cap holds; device 1 still stable
    d3 = adjust_intervals(np.array([1.5, 1.0, 1.0, 1.0]), d2.intervals, policy)
    assert d3.intervals.tolist() == [3, 1, 1, 1]
    # round 4: device 1 drifts (ρ = 6 / 3 = 2 > 1.5): interval 3 halves to 1
    d4 = adjust_intervals(np.array([6.0, 1.0, 1.0, 1.0]), d3.intervals, policy)
    assert d4.intervals.tolist() == [1, 1, 1, 1]
    assert d4.triggered.tolist() == [True, False, False, False]


def test_interval_policy_bounds_and_checks():
    policy = IntervalPolicy(threshold=2.0, stable=0.5, min_interval=2, max_interval=4)
    # all equal: nobody drifts, nobody is stable (ρ = median > 0.5 median);
    # intervals outside the bounds are brought inside
    out = adjust_intervals(np.ones(3), np.array([1, 3, 9]), policy)
    assert out.intervals.tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="intervals must be integers >= 1"):
        adjust_intervals(np.ones(2), np.array([0, 1]), policy)
    with pytest.raises(ValueError, match="one entry per device"):
        adjust_intervals(np.ones(2), np.array([1, 1, 1]), policy)
    with pytest.raises(ValueError, match="stable <= threshold"):
        IntervalPolicy(threshold=1.0, stable=2.0)
    with pytest.raises(ValueError, match="min_interval <= max_interval"):
        IntervalPolicy(min_interval=3, max_interval=2)


def test_due_devices():
    last = {1: 4, 2: 3, 3: 4}
    intervals = {1: 1, 2: 2, 3: 2}
    # round 5: 1 (4 + 1) and 2 (3 + 2) are due, 3 waits until 6; 4 is new
    assert due_devices(5, [1, 2, 3, 4], last, intervals) == [1, 2, 4]
    # nobody due: the soonest are
    assert due_devices(5, [3], last, intervals) == [3]
    assert due_devices(5, [], last, intervals) == []


def test_downlink_budget_is_eq5_on_the_downlink_less_the_broadcast():
    """4g: 50 Mbit/s down; c = 0.70 + 0.25·exp(−0.02·50) = 0.791970; 1,000
    float32 parameters: ⌊(1 − c)·4000⌋ = 832 bytes, less the broadcast."""
    options = AceSyncOptions(importance="magnitude", link="4g")
    cloud = AceSync(FedAvg(), options=options, local_steps=5, seed=0)
    cloud.set_arrays(ArrayRecord({"w": Array(np.zeros(1000, np.float32))}))
    cloud.prepare(1, [1], ConfigRecord({"local-steps": 5}))  # assigns the link
    assert cloud.downlink_budget(1, 0) == 832
    assert cloud.downlink_budget(1, 100) == 732
    assert cloud.downlink_budget(1, 10**6) == 0


def test_read_downlink_refuses_other_arrays():
    from tandem.protocol.acesync import read_downlink

    content = RecordDict(
        {
            KEY_DOWNLINK: ArrayRecord(
                {
                    "codecs": Array(np.zeros(3, np.uint8)),
                    "payload": Array(np.zeros(4, np.uint8)),
                    "extra": Array(np.zeros(1, np.uint8)),
                }
            )
        }
    )
    with pytest.raises(PayloadError, match="expected \\['codecs', 'payload'\\]"):
        read_downlink(content)
    assert read_downlink(RecordDict()) is None
    # a plain message (no header) carries a full model of its round
    assert DownlinkHeader.from_config({"server-round": 3}) == DownlinkHeader(3)
