"""Links, traces, the virtual clock and the estimator: hand-computable cases."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest

from tandem.network import (
    PRESETS,
    BandwidthEstimator,
    LinkPacer,
    LinkProfile,
    Trace,
    TraceError,
    VirtualClock,
    assign_links,
    load_fedscale_capacity,
    load_trace_csv,
    measure_local_gflops,
    preset,
    variable_link,
)
from tandem.schedules import (
    Exchange,
    NodeRound,
    SyncRound,
    exchanges_from_records,
    pipeline_window,
    replay_pipeline,
    replay_sync_rounds,
    steady_seconds,
    sync_rounds_from_records,
)

MB = 1_000_000


def test_one_message_on_4g_takes_exactly_rtt_half_plus_bytes_over_bandwidth():
    # 1 MB = 8 Mbit at 50 Mbit/s = 0.16 s, plus 30 ms / 2
    link = PRESETS["4g"]
    assert link.one_way_seconds("up", MB, 0.0) == pytest.approx(0.175, abs=1e-12)
    assert PRESETS["5g"].one_way_seconds("down", MB, 3.0) == pytest.approx(
        8 / 300 + 0.005, abs=1e-12
    )


def test_trace_changes_transfer_time_at_the_right_moment():
    link = LinkProfile(
        "step", Trace((0.0, 1.0), (8.0, 16.0)), Trace.constant(8), Trace.constant(0)
    )
    # 16 Mbit from t=0.5: 4 Mbit by t=1 at 8 Mbit/s, then 12 Mbit at 16 Mbit/s
    assert link.one_way_seconds("up", 2 * MB, 0.5) == pytest.approx(1.25)
    assert link.one_way_seconds("up", 2 * MB, 1.0) == pytest.approx(1.0)
    assert link.one_way_seconds("up", 2 * MB, 0.0) == pytest.approx(1.5)
    assert link.one_way_seconds("down", 2 * MB, 0.5) == pytest.approx(2.0)


def test_periodic_trace_repeats_and_zero_bandwidth_waits():
    trace = Trace((0.0, 1.0), (0.0, 10.0), period=2.0)
    assert trace.at(2.5) == 0.0 and trace.at(3.5) == 10.0
    # 10 Mbit starting at 0: wait 1 s of zero bandwidth, then 1 s at 10 Mbit/s
    assert trace.integrate_until(0.0, 10.0) == pytest.approx(2.0)
    # 15 Mbit from 0: 10 Mbit by t=2, then zero until t=3, then 0.5 s more
    assert trace.integrate_until(0.0, 15.0) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="never delivers"):
        Trace.constant(0).integrate_until(0.0, 1.0)


def _unit_link() -> LinkProfile:
    return LinkProfile.fixed("unit", 8, 8, 0)  # 1 MB takes exactly 1 s


def test_two_stage_pipeline_overlaps_exactly():
    # 3 batches: 1 s edge compute each, 1 s upload each.
    sequential = VirtualClock({0: _unit_link()})
    done = 0.0
    for _ in range(3):
        c = sequential.compute("edge:0", 1.0, [done])
        done = sequential.transfer(0, "up", MB, [c.end]).end
    assert sequential.now == pytest.approx(6.0)

    pipelined = VirtualClock({0: _unit_link()})
    for _ in range(3):
        c = pipelined.compute("edge:0", 1.0)  # next batch right after the last
        pipelined.transfer(0, "up", MB, [c.end])
    assert pipelined.now == pytest.approx(4.0)
    util = pipelined.utilization()
    assert util["edge"] == pytest.approx(0.75) and util["up"] == pytest.approx(0.75)
    assert sequential.utilization()["edge"] == pytest.approx(0.5)


def test_device_factors_scale_compute():
    clock = VirtualClock({0: _unit_link()}, edge_factor=4.0, cloud_factor=0.5)
    assert clock.compute("edge:0", 1.0).seconds == pytest.approx(4.0)
    assert clock.compute("cloud", 1.0).seconds == pytest.approx(0.5)


def test_fedavg_rounds_retime_by_hand():
    links = {1: _unit_link(), 2: LinkProfile.fixed("half", 4, 4, 0)}  # 1 MB = 2 s
    rounds = [
        SyncRound(r, {1: NodeRound(MB, 1.0, MB), 2: NodeRound(MB, 0.5, MB)}, 0.25)
        for r in (1, 2)
    ]
    report = replay_sync_rounds(rounds, links)
    # node 1: 1 + 1 + 1 = 3 s; node 2: 2 + 0.5 + 2 = 4.5 s; +0.25 aggregate
    assert report.mode == "retimed"
    assert report.round_end == pytest.approx((4.75, 9.5))
    assert report.total_seconds == pytest.approx(9.5)


def test_fedavg_replay_timeline_and_utilization_by_hand():
    links = {1: _unit_link(), 2: LinkProfile.fixed("half", 4, 4, 0)}  # 1 MB = 2 s
    rounds = [SyncRound(1, {1: NodeRound(MB, 1.0, MB), 2: NodeRound(MB, 0.5, MB)}, 1)]
    report = replay_sync_rounds(rounds, links, edge_factor=2.0, cloud_factor=0.5)
    timeline = [
        (t.name, t.resource, round(t.start, 9), round(t.end, 9)) for t in report.tasks
    ]
    # node 1: down [0, 1], train 1 s x 2 = [1, 3], up [3, 4]; node 2: down
    # [0, 2], train [2, 3], up [3, 5]; the cloud aggregates 1 s x 0.5 at 5
    assert timeline == [
        ("model", "down:1", 0, 1),
        ("train", "edge:1", 1, 3),
        ("update", "up:1", 3, 4),
        ("model", "down:2", 0, 2),
        ("train", "edge:2", 2, 3),
        ("update", "up:2", 3, 5),
        ("aggregate", "cloud", 5, 5.5),
    ]
    # busy shares of [0, 5.5], averaged over the two nodes per kind
    assert report.utilization == pytest.approx(
        {"down": 1.5 / 5.5, "edge": 1.5 / 5.5, "up": 1.5 / 5.5, "cloud": 0.5 / 5.5}
    )


def test_replays_draw_jitter_from_their_seed():
    jittery = {1: LinkProfile.fixed("jit", 8, 8, 0, jitter_ms=500)}
    rounds = [SyncRound(r, {1: NodeRound(MB, 1.0, MB)}, 0.0) for r in (1, 2, 3)]
    chain = _chain(1)

    def by_hand(seed: int) -> float:
        # the same order of transfers on a clock of that seed
        clock = VirtualClock(jittery, seed=seed)
        done = 0.0
        for _ in rounds:
            down = clock.transfer(1, "down", MB, [done])
            train = clock.compute("edge:1", 1.0, [down.end])
            done = clock.transfer(1, "up", MB, [train.end]).end
        return done

    for seed in (0, 1):
        report = replay_sync_rounds(rounds, jittery, seed=seed)
        assert report.total_seconds == pytest.approx(by_hand(seed))
    assert by_hand(0) != pytest.approx(by_hand(1))
    assert replay_sync_rounds(rounds, jittery).total_seconds == pytest.approx(
        by_hand(0)
    )
    pipe = [replay_pipeline(chain, jittery, seed=s).total_seconds for s in (0, 0, 1)]
    assert pipe[0] == pipe[1] != pipe[2]
    assert replay_pipeline(chain, jittery).total_seconds == pipe[0]


def test_pipeline_replay_timeline_and_utilization_by_hand():
    report = replay_pipeline(_chain(1), {1: _unit_link()}, cloud_factor=2.0)
    names = [(t.name, t.resource) for t in report.tasks]
    assert names[:4] == [
        ("grads", "down:1"),
        ("edge", "edge:1"),
        ("acts", "up:1"),
        ("grads", "down:1"),
    ]
    assert ("cloud", "cloud") in names and len(names) == 3 * 3 + 3
    # the cloud computed 3 x 0.5 s x 2
    cloud = sum(t.seconds for t in report.tasks if t.resource == "cloud")
    assert cloud == pytest.approx(3.0)
    assert report.utilization["cloud"] == pytest.approx(3.0 / report.total_seconds)
    assert set(report.utilization) == {"down", "edge", "up", "cloud"}


def test_sync_rounds_from_metrics_records():
    records = [
        {"event": "round", "round": 0},
        {
            "event": "bytes",
            "round": 1,
            "node-id": 5,
            "bytes-down": 10,
            "bytes-up": 20,
            "edge-seconds": 0.5,
        },
        {"event": "round", "round": 1, "cloud-seconds": 0.1},
    ]
    (rnd,) = sync_rounds_from_records(records)
    assert rnd.round == 1 and rnd.cloud_seconds == 0.1
    assert rnd.nodes[5] == NodeRound(10, 0.5, 20)


def _chain(node: int) -> list[Exchange]:
    # edge 1 s and 1 MB up per chunk, cloud 0.5 s; message 2 carries the
    # gradients of chunk 0 (1 MB down), messages 0 and 1 carry none (0 B)
    return [
        Exchange(node, 0, 0, 1.0, MB, 0.5),
        Exchange(node, 1, 0, 1.0, MB, 0.5),
        Exchange(node, 2, MB, 1.0, MB, 0.5, grads_from=0),
    ]


def test_pipeline_replay_by_hand():
    report = replay_pipeline(_chain(1), {1: _unit_link()}, marks=(1, 3))
    # reply 0 arrives at 2 (1 s edge + 1 s up); message 1 leaves at once and its
    # reply arrives at 4 while the cloud computes chunk 0 in [2, 2.5]; message
    # 2 leaves at 4 with chunk 0's gradients: down [4, 5], edge [5, 6],
    # up [6, 7], cloud [7, 7.5]
    assert report.mode == "retimed"
    assert report.round_end == pytest.approx((2.5, 7.5))
    assert report.total_seconds == pytest.approx(7.5)
    # two identical edges share the one cloud: first come, first served
    both = [ex for pair in zip(_chain(1), _chain(2), strict=True) for ex in pair]
    shared = replay_pipeline(both, {1: _unit_link(), 2: _unit_link()}, marks=(2,))
    assert shared.round_end == pytest.approx((3.0,))


def _serial_chain(node: int) -> list[Exchange]:
    # splitsync: message k carries the gradients of chunk k - 1 (1 MB down);
    # edge 1 s, 1 MB up, cloud 0.5 s per chunk, as in _chain
    return [
        Exchange(node, 0, 0, 1.0, MB, 0.5),
        Exchange(node, 1, MB, 1.0, MB, 0.5, grads_from=0),
        Exchange(node, 2, MB, 1.0, MB, 0.5, grads_from=1),
    ]


def test_one_chunk_in_flight_replays_strictly_serial_by_hand():
    report = replay_pipeline(_serial_chain(1), {1: _unit_link()}, marks=(1, 3))
    # edge [0, 1], up [1, 2], cloud [2, 2.5]; message 1 leaves with chunk 0's
    # gradients only then: down [2.5, 3.5], edge [3.5, 4.5], up [4.5, 5.5],
    # cloud [5.5, 6]; message 2: down [6, 7], edge [7, 8], up [8, 9],
    # cloud [9, 9.5]. Per chunk after the first: 1 + 1 + 1 + 0.5 = 3.5 s
    assert report.total_seconds == pytest.approx(9.5)
    assert report.round_end == pytest.approx((2.5, 9.5))
    busy = [t for t in report.tasks if t.end > t.start]  # message 0: 0 s down
    names = ["edge", "acts", "cloud"] + ["grads", "edge", "acts", "cloud"] * 2
    assert [t.name for t in busy] == names
    ends = [1.0, 2.0, 2.5, 3.5, 4.5, 5.5, 6.0, 7.0, 8.0, 9.0, 9.5]
    assert [t.end for t in busy] == pytest.approx(ends)
    timeline = [(t.start, t.end) for t in busy]
    # one chunk in flight: each task starts when the one before it ended
    assert all(b[0] == a[1] for a, b in itertools.pairwise(timeline))
    # the same work pipelined (gradients two chunks old) ends at 7.5 s
    assert replay_pipeline(_chain(1), {1: _unit_link()}).total_seconds == 7.5
    # two serial edges share the cloud first come, first served: edge 2's
    # chunk 0 arrives with edge 1's at 2 s and waits for the cloud until 2.5
    both = [
        ex
        for pair in zip(_serial_chain(1), _serial_chain(2), strict=True)
        for ex in pair
    ]
    shared = replay_pipeline(both, {1: _unit_link(), 2: _unit_link()})
    assert shared.total_seconds == pytest.approx(10.0)


def _stream_chain(node: int, chunks: int, window: int) -> list[Exchange]:
    # the stream with W credits: chunk k's frame brings the gradients of chunk
    # k - W (1 MB down; none for the first W); edge 1 s, 1 MB up, cloud 0.5 s
    return [
        Exchange(
            node,
            k,
            MB if k >= window else 0,
            1.0,
            MB,
            0.5,
            grads_from=k - window if k >= window else -1,
            window=window,
        )
        for k in range(chunks)
    ]


def test_stream_replay_keeps_w_chunks_in_flight_by_hand():
    link = {1: _unit_link()}
    # W = 1: per chunk after the first, down 1 + edge 1 + up 1 + cloud 0.5
    serial = replay_pipeline(_stream_chain(1, 8, 1), link)
    assert serial.total_seconds == pytest.approx(2.5 + 7 * 3.5)
    # W = 2: chunks 0 and 1 leave at once (edge [0, 1], [1, 2]; up [1, 2],
    # [2, 3]; cloud [2, 2.5], [3, 3.5]); chunk 2 leaves with chunk 0's
    # gradients at 2.5: down [2.5, 3.5], edge [3.5, 4.5], up [4.5, 5.5]; the
    # loop of 3.5 s carries 2 chunks: one per 1.75 s, the last cloud ends at 14
    two = replay_pipeline(_stream_chain(1, 8, 2), link, marks=(1, 8))
    assert two.total_seconds == pytest.approx(14.0)
    assert two.round_end == pytest.approx((2.5, 14.0))
    edge = [t for t in two.tasks if t.resource == "edge:1"]
    assert [t.start for t in edge[:4]] == pytest.approx([0.0, 1.0, 3.5, 4.5])
    # W = 4 >= 3.5 s / 1 s: the edge never waits ([0, 8]); the last chunk's
    # up [8, 9] and cloud [9, 9.5]
    four = replay_pipeline(_stream_chain(1, 8, 4), link)
    assert four.total_seconds == pytest.approx(9.5)
    busy = sorted(t.start for t in four.tasks if t.resource == "edge:1")
    assert busy == pytest.approx([float(k) for k in range(8)])
    assert four.utilization["edge"] == pytest.approx(8 / 9.5)
    # bound / achieved: the busiest resource (edge and uplink, 8 s each)
    assert four.efficiency == pytest.approx(8 / 9.5)
    assert two.efficiency == pytest.approx(8 / 14.0)
    assert serial.efficiency == pytest.approx(8 / 27.0)
    # the same records read back from metrics lines replay the same
    records = [{"event": "exchange", **ex.to_record()} for ex in _stream_chain(1, 8, 4)]
    again, _ = exchanges_from_records(records, steady=False)
    assert replay_pipeline(again, link).total_seconds == pytest.approx(9.5)


def test_a_stream_exchange_waiting_for_missing_gradients_is_named():
    broken = _stream_chain(1, 4, 2)
    del broken[0]  # chunk 2 waits for chunk 0's gradients, never computed
    with pytest.raises(ValueError, match="exchange 2 of node 1 never leaves"):
        replay_pipeline(broken, {1: _unit_link()})


def test_a_link_carries_one_transfer_at_a_time_while_frames_propagate_together():
    far = LinkProfile.fixed("far", 8, 8, 2000)  # 1 MB: 1 s on the wire, 1 s away
    pacer = LinkPacer(far, "up")
    assert pacer.send(MB, 0.0) == pytest.approx((0.0, 1.0, 2.0))
    # sent at once too: waits for the wire (1 s), not for the first's arrival
    assert pacer.send(MB, 0.0) == pytest.approx((1.0, 2.0, 3.0))
    assert pacer.send(MB, 5.0) == pytest.approx((5.0, 6.0, 7.0))  # an idle link
    with pytest.raises(ValueError, match="direction must be 'up' or 'down'"):
        LinkPacer(far, "sideways")
    # the clock: two frames up at once, the link held 1 s by each
    clock = VirtualClock({1: far})
    a, b = clock.transfer(1, "up", MB), clock.transfer(1, "up", MB)
    assert (a.end, b.start, b.end, b.busy) == pytest.approx((2.0, 1.0, 3.0, 1.0))
    assert clock.utilization() == pytest.approx({"up": 2.0 / 3.0})
    # a stream with W = 4 over it: the four first chunks' 0-byte messages
    # arrive together after 1 s, the edge forwards them back to back; chunk 0
    # goes up [2, 3] + 1 s, the cloud [4, 4.5], its gradients down [4.5, 5.5]
    # + 1 s: chunk 4 starts at 6.5 (a loop of 6.5 s needs W = 7 here)
    report = replay_pipeline(_stream_chain(1, 8, 4), {1: far})
    edge = sorted(t.start for t in report.tasks if t.resource == "edge:1")
    assert edge[:5] == pytest.approx([1.0, 2.0, 3.0, 4.0, 6.5])


def test_pipeline_window_fills_the_bandwidth_delay_product():
    unit = _unit_link()
    # no delay: a chunk's loop is 1 s up + 1 s down over 1 s per chunk, + 2
    assert pipeline_window(unit, MB, MB, 8) == 4
    # 4g: 50 Mbit/s, 30 ms RTT; 170 kB each way takes 15 + 27.2 ms:
    # ceil(84.4 / 27.2) + 2 = 6; 1.7 kB (0.272 ms): ceil(30.544 / 0.272) + 2 = 115
    four_g = LinkProfile.fixed("4g", 50, 50, 30)
    assert pipeline_window(four_g, 170_000, 170_000, 8) == 6
    assert pipeline_window(four_g, 1_700, 1_700, 200) == 115
    assert pipeline_window(four_g, 1_700, 1_700, 8) == 8  # the staleness bound
    # the slower direction sets the pace: 1 MB up over 1 Mbit/s is 8 s
    slow_up = LinkProfile.fixed("asym", 1, 8, 0)
    assert pipeline_window(slow_up, MB, MB, 8) == 4  # ceil(9 / 8) + 2
    assert pipeline_window(four_g, 0, 0, 3) == 3  # delay only: the cap
    assert pipeline_window(unit, MB, MB, 1) == 1
    with pytest.raises(ValueError, match="cap must be >= 1"):
        pipeline_window(unit, MB, MB, 0)


def test_pipeline_window_with_the_edges_compute_adds_no_idle_credit():
    four_g = LinkProfile.fixed("4g", 50, 50, 30)
    # 170 kB each way: L = 2 x (15 + 27.2) = 84.4 ms, b = 27.2 ms
    # an edge at 62 ms per chunk is the slowest stage: ceil(146.4 / 62) = 3
    # (the compute-blind rule gives 6: three credits of staleness, no speed)
    assert pipeline_window(four_g, 170_000, 170_000, 8, 0.062) == 3
    # at 100 ms: ceil(184.4 / 100) = 2; at 10 ms the link is the stage:
    # ceil(94.4 / 27.2) = 4
    assert pipeline_window(four_g, 170_000, 170_000, 8, 0.1) == 2
    assert pipeline_window(four_g, 170_000, 170_000, 8, 0.01) == 4
    # an edge far slower than the loop keeps one chunk in flight... plus the
    # one it computes: ceil((84.4 + 1000) / 1000) = 2
    assert pipeline_window(four_g, 170_000, 170_000, 8, 1.0) == 2
    assert pipeline_window(four_g, 170_000, 170_000, 2, 0.01) == 2  # the cap
    assert pipeline_window(four_g, 0, 0, 3, 0.0) == 3  # nothing takes time
    with pytest.raises(ValueError, match="edge_seconds must be >= 0"):
        pipeline_window(four_g, 1, 1, 3, -1.0)


def test_gradients_from_a_later_exchange_are_refused_by_name():
    ahead = [
        Exchange(1, 0, 0, 1.0, MB, 0.5),
        Exchange(1, 1, MB, 1.0, MB, 0.5, grads_from=1),
    ]
    with pytest.raises(ValueError, match="exchange 1 of node 1 carries the gradients"):
        replay_pipeline(ahead, {1: _unit_link()})


def test_pipeline_exchanges_from_records():
    records = [
        {
            "event": "exchange",
            "node-id": 7,
            "seq": 0,
            "bytes-down": 10,
            "edge-seconds": 0.25,
            "bytes-up": 30,
            "cloud-seconds": 0.125,
            "grads-from": -1,
        },
        {"event": "round", "round": 1, "exchanges": 1},
    ]
    exchanges, marks = exchanges_from_records(records)
    assert exchanges == [Exchange(7, 0, 10, 0.25, 30, 0.125, -1)] and marks == [1]


def test_estimator_converges_on_a_constant_link():
    link = PRESETS["4g"]
    clock = VirtualClock({0: link})
    est = BandwidthEstimator(smoothing=0.3, initial_mbps=5.0)
    for size in (100_000, 400_000, 50_000) * 10:
        task = clock.transfer(0, "up", size)
        est.observe(size, task.seconds, rtt=0.030)
    assert est.estimate_mbps == pytest.approx(50.0, rel=1e-3)
    with pytest.raises(ValueError, match="smoothing"):
        BandwidthEstimator(smoothing=0.0)


def test_csv_trace_parsing(tmp_path):
    good = tmp_path / "trace.csv"
    good.write_text("time_s,mbps\n0,10\n# a comment\n1,20\n2,5\n")
    trace = load_trace_csv(good)
    assert trace.values == (10.0, 20.0, 5.0) and trace.period == 3.0
    assert trace.at(1.5) == 20.0 and trace.at(3.2) == 10.0


@pytest.mark.parametrize(
    ("body", "line", "why"),
    [
        ("time_s,mbps\n0,10\n1,abc\n", 3, "not numbers"),
        ("0,10\n1,20,30\n", 2, "expected 'time_s,mbps'"),
        ("0,10\n2,5\n1,7\n", 3, "does not increase"),
        ("0,10\n1,-5\n", 2, "mbps >= 0"),
        ("1,10\n", 1, "first time must be 0"),
        ("0,10\n1,inf\n", 2, "finite"),
    ],
)
def test_malformed_csv_rows_are_rejected_with_line_number(tmp_path, body, line, why):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(TraceError) as info:
        load_trace_csv(path)
    assert f"bad.csv:{line}:" in str(info.value)
    assert why in str(info.value)


def test_fedscale_capacity_json_and_csv(tmp_path):
    js = tmp_path / "cap.json"
    js.write_text(
        json.dumps({"432802": {"computation": 162.0, "communication": 5648.0}})
    )
    assert load_fedscale_capacity(js)["432802"].at(0) == pytest.approx(5.648)
    cs = tmp_path / "cap.csv"
    cs.write_text("client_id,computation,communication\n7,10,2000\n8,12,x\n")
    with pytest.raises(TraceError, match=r"cap\.csv:3"):
        load_fedscale_capacity(cs)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"communication": -1}}))
    with pytest.raises(TraceError, match="client 1"):
        load_fedscale_capacity(bad)


def test_variable_links_stay_in_the_seed_ranges_and_are_seeded():
    link = variable_link(3)
    assert min(link.up.values) >= 5.0 and max(link.up.values) <= 200.0
    assert min(link.rtt.values) >= 0.010 and max(link.rtt.values) <= 0.300
    assert variable_link(3) == link and variable_link(4) != link


def _walk_by_hand(rng, lo, hi, n):
    # seed 004's range as a reflected random walk in log space, step by step
    x = rng.uniform(math.log(lo), math.log(hi))
    out = []
    for _ in range(n):
        x = x + rng.normal(0.0, 0.25)
        while not math.log(lo) <= x <= math.log(hi):
            x = 2 * math.log(lo) - x if x < math.log(lo) else 2 * math.log(hi) - x
        out.append(math.exp(x))
    return out


def test_variable_link_is_the_reflected_log_walk_by_hand():
    rng = np.random.default_rng(7)
    bandwidth = _walk_by_hand(rng, 5.0, 200.0, 600)
    rtt = [v / 1000 for v in _walk_by_hand(rng, 10.0, 300.0, 600)]
    link = variable_link(7)  # one step a second for 600 s, then it repeats
    assert link.name == "variable-7" and link.up == link.down
    assert link.up.times == tuple(float(i) for i in range(600))
    assert link.up.period == 600.0 and link.rtt.period == 600.0
    np.testing.assert_allclose(link.up.values, bandwidth, rtol=1e-12)
    np.testing.assert_allclose(link.rtt.values, rtt, rtol=1e-12)
    # 10 s in steps of 2 s: 5 steps, the same draws
    short = variable_link(7, duration=10.0, step=2.0)
    assert short.up.times == (0.0, 2.0, 4.0, 6.0, 8.0) and short.up.period == 10.0
    rng = np.random.default_rng(7)
    np.testing.assert_allclose(short.up.values, _walk_by_hand(rng, 5, 200, 5))
    assert len(variable_link(7, duration=0.5).up.values) == 1  # at least one step


def test_assign_links_seeds_each_node_and_refuses_an_empty_mix():
    # a mapping's spec is parsed with seed + index and its index (a trace's
    # client): variable links differ per node and follow the seed
    mapped = assign_links([5, 6], {5: "variable", 6: "variable"}, seed=2)
    assert mapped[5] == variable_link(2) and mapped[6] == variable_link(3)
    assert assign_links([5, 6], "variable")[6] == variable_link(1)  # seed 0 + 1
    with pytest.raises(ValueError, match=r"^empty link mix 'mix: ,'$"):
        assign_links([1], "mix: ,")
    with pytest.raises(ValueError, match="unknown link profile '3g'"):
        assign_links([1], "mix:4g,3g")  # a bad member fails if no node draws it


def test_assign_links_by_name_mix_and_mapping():
    nodes = [11, 22, 33, 44]
    same = assign_links(nodes, "4g")
    assert {link.name for link in same.values()} == {"4g"}
    mix1 = assign_links(nodes, "mix:4g,5g", seed=1)
    assert mix1 == assign_links(nodes, "mix:4g,5g", seed=1)
    assert {link.name for link in mix1.values()} <= {"4g", "5g"}
    mapped = assign_links(nodes, {11: "lan", 22: "wifi", 33: "5g", 44: PRESETS["4g"]})
    assert mapped[11].name == "lan" and mapped[44] is PRESETS["4g"]
    with pytest.raises(ValueError, match="unknown link profile"):
        preset("3g")
    assert not math.isnan(PRESETS["wifi"].jitter)


def test_steady_seconds_is_the_lower_quartile_of_the_same_work():
    assert steady_seconds([0.002, 0.001, 0.003, 0.5, 0.002]) == pytest.approx(0.002)
    assert steady_seconds([0.3, 0.1]) == pytest.approx(0.2)  # few: the median
    records = [
        {
            "event": "bytes",
            "round": r,
            "node-id": 1,
            "bytes-down": 1,
            "bytes-up": 1,
            "edge-seconds": s,
        }
        for r, s in enumerate([1.0, 1.0, 1.0, 9.0], start=1)
    ]
    rounds = sync_rounds_from_records(records)
    assert [rnd.nodes[1].edge_seconds for rnd in rounds] == [1.0] * 4
    raw = sync_rounds_from_records(records, steady=False)
    assert raw[-1].nodes[1].edge_seconds == 9.0


def test_link_description_by_hand():
    link = LinkProfile(
        "two-step",
        up=Trace((0.0, 5.0), (10.0, 20.0)),
        down=Trace((0.0,), (50.0,)),
        rtt=Trace((0.0, 5.0), (0.02, 0.05)),
        jitter=0.003,
    )
    assert link.describe() == {
        "name": "two-step",
        "up_mbps": [10.0, 20.0],
        "down_mbps": 50.0,
        "rtt_ms": [20.0, 50.0],
        "jitter_ms": 3.0,
    }


def test_gflops_probe_counts_2n3_flops_per_product_and_restores_threads(monkeypatch):
    import time

    import torch

    ticks = iter([10.0, 10.5])  # the timed loop takes 0.5 s of thread CPU time
    monkeypatch.setattr(time, "thread_time", lambda: next(ticks))
    monkeypatch.setattr(time, "perf_counter", lambda: 1 / 0)  # not the wall
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(torch.get_num_threads())
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    try:
        gflops = measure_local_gflops(size=8, repeats=5, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    # 5 products of 8x8 matrices: 5 * 2 * 8**3 FLOP in 0.5 s
    assert gflops == pytest.approx(5 * 2 * 8**3 / 0.5 / 1e9)
    assert seen == [1] * 6  # one warm-up product, then 5 timed, on 1 thread
    # several threads: the wall clock (their CPU seconds add up)
    walls = iter([3.0, 3.25])
    monkeypatch.setattr(time, "perf_counter", lambda: next(walls))
    monkeypatch.setattr(time, "thread_time", lambda: 1 / 0)
    gflops = measure_local_gflops(size=8, repeats=5, threads=2)
    assert gflops == pytest.approx(5 * 2 * 8**3 / 0.25 / 1e9)


def test_a_message_waits_for_the_gradients_it_carries():
    # the cloud takes 4 s per chunk (0.5 s x 8): chunk 0's gradients are ready
    # at 2 + 4 = 6, after reply 1 arrived (4), so message 2 leaves at 6
    report = replay_pipeline(_chain(1), {1: _unit_link()}, cloud_factor=8.0)
    grads = [round(t.start, 9) for t in report.tasks if t.name == "grads"]
    assert grads == [0.0, 2.0, 6.0]
    # chunk 1 on the cloud [6, 10], chunk 2 arrives at 9 and waits: [10, 14]
    assert report.total_seconds == pytest.approx(14.0)


def test_pipeline_marks_and_single_message_chains():
    only = [Exchange(1, 0, 0, 1.0, MB, 0.5)]
    report = replay_pipeline(only, {1: _unit_link()}, marks=(0, 1))
    # nothing is done at mark 0; the one exchange ends at 1 + 1 + 0.5
    assert report.round_end == pytest.approx((0.0, 2.5))
    assert [t.name for t in report.tasks] == ["grads", "edge", "acts", "cloud"]


def test_gflops_probe_defaults_and_its_private_generator(monkeypatch):
    import time

    import torch

    ticks = iter([0.0, 2.0])
    monkeypatch.setattr(time, "thread_time", lambda: next(ticks))
    shapes: list[tuple[int, ...]] = []
    firsts: list[float] = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        shapes.append((*a.shape, *b.shape, torch.get_num_threads()))
        firsts.append(float(a[0, 0]))
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    # defaults: 256 x 256 matrices, 20 timed products (+1 warm-up), 1 thread
    assert measure_local_gflops() == pytest.approx(
        20 * 2 * 256**3 / 2.0 / 1e9, rel=1e-12
    )
    assert shapes == [(256, 256, 256, 256, 1)] * 21
    # the matrices come from a private generator seeded 0, not the global one
    assert torch.equal(torch.get_rng_state(), global_state)
    expected = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    assert firsts[0] == float(expected[0, 0])


def test_trace_step_boundaries_and_exact_integration_by_hand():
    # the next boundary strictly after t: a periodic trace counts whole
    # periods, a non-periodic one from 0, a single step repeating each period
    periodic = Trace((0.0, 1.0), (0.0, 10.0), period=2.0)
    assert [periodic._next_change(t) for t in (0.0, 0.5, 2.5, 3.0)] == [
        1.0,
        1.0,
        3.0,
        4.0,
    ]
    assert Trace((0.0, 5.0), (1.0, 2.0))._next_change(2.0) == 5.0
    assert Trace((0.0, 5.0), (1.0, 2.0))._next_change(7.0) == math.inf
    assert Trace((0.0,), (5.0,), period=2.0)._next_change(3.0) == 4.0
    assert Trace.constant(5.0)._next_change(3.0) == math.inf
    # rates below 1 Mbit/s count: 1 Mbit at 0.5 Mbit/s is 2 s; 0.5 Mbit in
    # [0, 1] then 2 Mbit at 2 Mbit/s is 2 s
    assert Trace.constant(0.5).integrate_until(0.0, 1.0) == 2.0
    assert Trace((0.0, 1.0), (0.5, 2.0)).integrate_until(0.0, 2.5) == 2.0
    # nothing to send takes no time, even on a stalled link
    assert Trace.constant(0.0).integrate_until(5.0, 0.0) == 0.0
    with pytest.raises(
        ValueError, match=r"^a zero-bandwidth link never delivers the message$"
    ):
        Trace.constant(0).integrate_until(0.0, 1.0)


def test_trace_validation_messages_and_constants():
    # each malformed trace is refused with its own message
    cases = [
        (((), ()), r"^a trace needs as many times as values, at least one$"),
        (((0.0, 1.0), (1.0,)), r"^a trace needs as many times as values, at least"),
        (((1.0,), (1.0,)), r"^a trace starts at time 0, not 1\.0$"),
        (((0.0, 2.0, 2.0), (1.0,) * 3), r"^trace times must increase strictly$"),
        (((0.0, 2.0, 1.0), (1.0,) * 3), r"^trace times must increase strictly$"),
        (((0.0,), (-1.0,)), r"^trace values must be finite and >= 0$"),
        (((0.0,), (math.inf,)), r"^trace values must be finite and >= 0$"),
        (((0.0, 1.0), (1.0, 1.0), 1.0), r"^the period must exceed the last step's"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            Trace(*args)
    # a zero value, a value below 1 and a period just past the last step are fine
    assert Trace((0.0, 1.0), (0.0, 0.5), 1.5).at(1.2) == 0.5
    assert Trace((0.0, 1.0, 3.0), (1.0, 2.0, 3.0)).at(2.0) == 2.0
    assert Trace.constant(7) == Trace((0.0,), (7.0,), math.inf)
    # LinkProfile.fixed: Mbit/s as given, milliseconds to seconds, no jitter
    link = LinkProfile.fixed("f", 3, 4, 250)
    assert link == LinkProfile(
        "f", Trace.constant(3), Trace.constant(4), Trace.constant(0.25), 0.0
    )
    assert LinkProfile.fixed("j", 1, 1, 0, jitter_ms=20).jitter == 0.02


def test_jitter_is_drawn_from_the_given_generator_only():
    # no generator: no jitter, RTT/2 + 1 MB over 100 Mbit/s
    wifi = PRESETS["wifi"]
    assert wifi.one_way_seconds("up", MB, 0.0) == pytest.approx(0.0825, abs=1e-12)
    # with one: RTT/2 + max(0, N(0, jitter)), the first draw of seed 0 being
    # positive; a jitter-free link draws nothing from a shared generator
    jittery = LinkProfile.fixed("j", 8, 8, 30, jitter_ms=500)
    draw = np.random.default_rng(0).normal(0.0, 0.5)
    assert draw > 0
    rng = np.random.default_rng(0)
    assert _unit_link().delay_seconds(0.0, rng) == 0.0
    assert jittery.delay_seconds(0.0, rng) == pytest.approx(0.015 + draw, abs=1e-12)
    rng = np.random.default_rng(0)
    assert jittery.one_way_seconds("up", MB, 0.0, rng) == pytest.approx(
        1.015 + draw, abs=1e-12
    )


def test_clock_defaults_directions_and_utilization_horizons():
    asym = LinkProfile.fixed("asym", 1, 8, 0)  # 1 MB: 8 s up, 1 s down
    clock = VirtualClock({0: asym})
    up, down = clock.transfer(0, "up", MB), clock.transfer(0, "down", MB)
    assert (up.name, up.resource, up.seconds) == ("transfer", "up:0", 8.0)
    assert (down.name, down.resource, down.seconds) == ("transfer", "down:0", 1.0)
    with pytest.raises(
        ValueError, match=r"^direction must be 'up' or 'down', not 'sideways'$"
    ):
        clock.transfer(0, "sideways", MB)
    clock = VirtualClock({})
    edge = clock.compute("edge:0", 1.0)
    assert (edge.name, edge.start, edge.end) == ("compute", 0.0, 1.0)
    clock.compute("cloud", 4.0)
    # busy shares of [0, until]; until defaults to the makespan (4 s)
    assert clock.utilization() == {"edge": 0.25, "cloud": 1.0}
    assert clock.utilization(until=2.0) == {"edge": 0.5, "cloud": 1.0}
    assert clock.utilization(until=0.5) == {"edge": 1.0, "cloud": 1.0}
    assert clock.utilization(until=0.0) == {}
    assert VirtualClock({}).utilization() == {}


def test_estimator_updates_by_hand_and_ignores_empty_transfers():
    # the first observation is taken as is: 1 MB in 0.4 s (no RTT) = 20 Mbit/s
    est = BandwidthEstimator()
    assert est.observe(0, 1.0) == 0.0  # nothing yet, nothing sent: 0
    assert est.observe(MB, 0.4) == pytest.approx(20.0)
    # then estimate += 0.3 * (observed - estimate): 1 byte in 8 us = 1 Mbit/s
    assert est.observe(1, 8e-6) == pytest.approx(20.0 + 0.3 * (1.0 - 20.0))
    assert est.observations == 2
    # no bytes, or no time left once the RTT share is removed: unchanged
    assert est.observe(0, 1.0) == pytest.approx(14.3)
    assert est.observe(1000, 0.01, rtt=0.02) == pytest.approx(14.3)
    assert est.observe(1000, 0.01, rtt=0.04) == pytest.approx(14.3)
    assert est.observations == 2
    # a starting estimate is smoothed from the first observation: 5 -> 6.5
    seeded = BandwidthEstimator(smoothing=0.3, initial_mbps=5.0)
    assert seeded.observe(MB, 0.8) == pytest.approx(5.0 + 0.3 * (10.0 - 5.0))
    # smoothing 1 follows each observation; above 1 is refused
    full = BandwidthEstimator(smoothing=1.0, initial_mbps=5.0)
    assert full.observe(MB, 0.8) == pytest.approx(10.0)
    with pytest.raises(ValueError, match=r"^smoothing must lie in \(0, 1\], got 1\.5$"):
        BandwidthEstimator(smoothing=1.5)


def test_csv_trace_edge_cases(tmp_path):
    path = tmp_path / "t.csv"
    # indented comments and rows of empty cells are skipped; zero and
    # sub-1 Mbit/s rates are allowed; two rows repeat after 2 x 1 s
    path.write_text("0,0\n  # a comment\n,\n1,0.5\n")
    trace = load_trace_csv(path)
    assert trace.times == (0.0, 1.0) and trace.values == (0.0, 0.5)
    assert trace.period == 2.0
    path.write_text("0,7\n")  # one row: constant
    assert load_trace_csv(path) == Trace((0.0,), (7.0,), math.inf)
    # a first row with a number first is data, not a header
    path.write_text("0,fast\n1,5\n")
    with pytest.raises(TraceError, match=rf"^{re.escape(str(path))}:1: not numbers"):
        load_trace_csv(path)
    path.write_text("0,1\n0,2\n")  # a repeated time
    with pytest.raises(TraceError, match=r":2: time 0\.0 does not increase$"):
        load_trace_csv(path)
    path.write_text("time_s,mbps\n")
    with pytest.raises(TraceError, match=rf"^{re.escape(str(path))}: no rows$"):
        load_trace_csv(path)


def test_fedscale_capacity_entries_by_hand(tmp_path):
    js = tmp_path / "cap.json"
    where = re.escape(str(js))
    # 0.5 kbit/s is a (slow) capacity; an entry that is not an object, a
    # string, NaN, zero or negative capacity is refused naming the client
    js.write_text(json.dumps({"a": {"communication": 0.5}}))
    assert load_fedscale_capacity(js)["a"].at(0) == pytest.approx(0.0005)
    for entry, shown in [
        (5, "None"),
        ({"communication": "fast"}, "'fast'"),
        ({"communication": math.nan}, "nan"),
        ({"communication": 0}, "0"),
        ({}, "None"),
    ]:
        js.write_text(json.dumps({"a": entry}))
        message = rf"^{where}: client a: bad 'communication' {shown}$"
        with pytest.raises(TraceError, match=message):
            load_fedscale_capacity(js)
    js.write_text("[1, 2]")
    with pytest.raises(
        TraceError, match=rf"^{where}: expected an object of client id -> capacity$"
    ):
        load_fedscale_capacity(js)
    cs = tmp_path / "cap.csv"
    where = re.escape(str(cs))
    # a first row whose last cell is a number is data (its computation blank)
    cs.write_text("7,,2000\n8,1,0.5\n")
    caps = load_fedscale_capacity(cs)
    assert list(caps) == ["7", "8"]
    assert caps["7"].at(0) == 2.0 and caps["8"].at(0) == pytest.approx(0.0005)
    for row, line, why in [
        ("9,1,0", 2, "communication must be > 0 kbit/s"),
        ("9,1,-5", 2, "communication must be > 0 kbit/s"),
        ("9,1,inf", 2, "communication must be > 0 kbit/s"),
        ("9,1", 2, "expected 'client_id,computation,communication'"),
    ]:
        cs.write_text(f"client_id,computation,communication\n{row}\n")
        with pytest.raises(TraceError, match=rf"^{where}:{line}: {why}$"):
            load_fedscale_capacity(cs)
    cs.write_text("client_id,computation,communication\n")
    with pytest.raises(TraceError, match=rf"^{where}: no clients$"):
        load_fedscale_capacity(cs)
