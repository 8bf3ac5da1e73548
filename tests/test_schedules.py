"""Exchange records: one to/from-record pair, steadied compute, typed fields."""

from __future__ import annotations

import json

import pytest

from tandem.schedules import (
    Exchange,
    NodeRound,
    exchanges_from_records,
    steady_exchanges,
    steady_seconds,
    sync_rounds_from_records,
)


def test_an_exchange_survives_the_metrics_file():
    ex = Exchange(3, 4, 1200, 0.0123456789, 900, 1e-7, grads_from=2, micro_batches=4)
    rec = json.loads(json.dumps({"event": "exchange", **ex.to_record()}))
    assert Exchange.from_record(rec) == ex


def test_an_old_record_without_micro_batches_reads_as_zero():
    rec = {k: v for k, v in Exchange(1, 0, 1, 0.5, 2, 0.25).to_record().items()}
    del rec["micro-batches"]
    assert Exchange.from_record(rec).micro_batches == 0


@pytest.mark.parametrize(
    ("field", "value"), [("bytes-up", None), ("seq", "3"), ("edge-seconds", True)]
)
def test_a_field_that_is_not_a_number_is_named(field, value):
    rec = Exchange(1, 0, 1, 0.5, 2, 0.25).to_record()
    if value is None:
        del rec[field]
    else:
        rec[field] = value
    with pytest.raises(ValueError, match=f"'{field}'"):
        Exchange.from_record(rec)


def test_steadied_compute_is_the_lower_quartile_of_its_kind():
    # node 1, 2 micro-batches, with gradients: edge seconds 1, 2, 3, 4, 100
    # -> lower quartile (inclusive) 2; the cloud's kind is 2 micro-batches:
    # 0.1 .. 0.5 -> 0.2. Node 2's single exchange keeps its own figures.
    ones = [
        Exchange(1, i, 10, s, 20, c, grads_from=0, micro_batches=2)
        for i, (s, c) in enumerate([(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4), (100, 0.5)])
    ]
    other = Exchange(2, 0, 10, 7.0, 20, 9.0, grads_from=-1, micro_batches=1)
    steady = steady_exchanges([*ones, other])
    assert [ex.edge_seconds for ex in steady] == [2.0] * 5 + [7.0]
    assert [ex.cloud_seconds for ex in steady] == pytest.approx([0.2] * 5 + [9.0])
    assert [ex.bytes_up for ex in steady] == [20] * 6  # nothing else changes
    assert steady_exchanges([]) == []


def test_records_give_the_same_exchanges_as_memory():
    kept = [
        Exchange(1, 0, 10, 0.5, 20, 0.0, -1, 2),
        Exchange(2, 0, 11, 0.25, 21, 0.125, -1, 2),
        Exchange(1, 1, 12, 0.75, 22, 0.25, 0, 2),
    ]
    records = [
        {"event": "round", "round": 0, "exchanges": 0},
        *({"event": "exchange", **ex.to_record()} for ex in kept),
        {"event": "round", "round": 1, "exchanges": 3},
    ]
    exchanges, marks = exchanges_from_records(records)
    assert exchanges == steady_exchanges(kept) and marks == [3]
    assert exchanges_from_records(records, steady=False)[0] == kept


def test_sync_rounds_read_typed_fields():
    records = [
        {"event": "bytes", "round": 1, "node-id": 5, "bytes-down": 8, "bytes-up": 4},
        {"event": "round", "round": 1, "cloud-seconds": 0.5},
    ]
    (rnd,) = sync_rounds_from_records(records)
    assert rnd.round == 1 and rnd.cloud_seconds == 0.5
    assert rnd.nodes[5].bytes_down == 8 and rnd.nodes[5].edge_seconds == 0.0
    with pytest.raises(ValueError, match="'bytes-up'"):
        sync_rounds_from_records([{**records[0], "bytes-up": "4"}])


def test_gradients_from_chunk_zero_count_as_applied_when_steadied():
    # node 1, 1 micro-batch: messages carrying gradients (of chunk 0 or of
    # chunk 3) are one kind; the first message (none, -1) is its own kind
    exchanges = [
        Exchange(1, 0, 0, 9.0, 20, 0.1, grads_from=-1),
        Exchange(1, 1, 10, 1.0, 20, 0.1, grads_from=0),
        Exchange(1, 2, 10, 1.0, 20, 0.1, grads_from=0),
        Exchange(1, 3, 10, 5.0, 20, 0.1, grads_from=3),
        Exchange(1, 4, 10, 5.0, 20, 0.1, grads_from=3),
    ]
    steady = steady_exchanges(exchanges)
    # kind "applied": the lower quartile of 1, 1, 5, 5 is 1.0
    assert [ex.edge_seconds for ex in steady] == [9.0, 1.0, 1.0, 1.0, 1.0]


def test_sync_rounds_steady_each_step_count_apart():
    """A device that trains two rounds' worth of steps in some syncs (ACE-Sync's
    dynamic synchronization): its compute is steadied per step count, so a
    double round keeps its double time (steadied per node alone, the lower
    quartile of 1, 1, 1, 2, 2 would charge every round 1 s)."""
    records = []
    for rnd, (steps, seconds) in enumerate(
        [(50, 1.0), (100, 2.0), (50, 1.0), (100, 2.0), (50, 1.0)], start=1
    ):
        records += [
            {"event": "plan", "round": rnd, "node-id": 1, "local-steps": steps},
            {
                "event": "bytes",
                "round": rnd,
                "node-id": 1,
                "bytes-down": 8,
                "bytes-up": 4,
                "edge-seconds": seconds,
            },
            {"event": "round", "round": rnd, "cloud-seconds": 0.0},
        ]
    rounds = sync_rounds_from_records(records)
    assert [r.nodes[1].edge_seconds for r in rounds] == [1.0, 2.0, 1.0, 2.0, 1.0]
    # without plan events: one kind per node
    plain = [r for r in records if r["event"] != "plan"]
    assert {r.nodes[1].edge_seconds for r in sync_rounds_from_records(plain)} == {1.0}


def test_only_plan_events_give_local_steps():
    # the run's summary also has a "local-steps" field; it is not a plan
    records = [
        {"event": "round", "round": 0},
        {"event": "plan", "round": 1, "node-id": 5, "local-steps": 50},
        {
            "event": "bytes",
            "round": 1,
            "node-id": 5,
            "bytes-down": 10,
            "bytes-up": 20,
            "edge-seconds": 0.5,
        },
        {"event": "round", "round": 1, "cloud-seconds": 0.1},
        {"event": "summary", "method": "acesync", "local-steps": 50},
    ]
    (rnd,) = sync_rounds_from_records(records)
    assert rnd.nodes[5] == NodeRound(10, 0.5, 20)


def test_steady_seconds_refuses_no_samples():
    with pytest.raises(ValueError, match=r"^no samples$"):
        steady_seconds([])


def test_sync_rounds_defaults_and_steadying_by_hand():
    def part(rnd, node, seconds):
        return {
            "event": "bytes",
            "round": rnd,
            "node-id": node,
            "bytes-down": 8,
            "bytes-up": 4,
            "edge-seconds": seconds,
        }

    # two nodes with the same bytes keep their own compute (steadied per
    # node); round 1's event has no cloud-seconds (0 s), round 2 no "round"
    # event (cloud 0 s), round 3 no bytes (no nodes)
    records = [
        part(1, 1, 1.0),
        part(1, 2, 3.0),
        {"event": "round", "round": 1},
        part(2, 1, 1.0),
        part(2, 2, 3.0),
        {"event": "round", "round": 3, "cloud-seconds": 0.0},
    ]
    rounds = sync_rounds_from_records(records)
    assert [r.round for r in rounds] == [1, 2, 3]
    assert [r.cloud_seconds for r in rounds] == [0.0, 0.0, 0.0]
    assert rounds[2].nodes == {}
    assert [r.nodes[2].edge_seconds for r in rounds[:2]] == [3.0, 3.0]
    assert [r.nodes[1].edge_seconds for r in rounds[:2]] == [1.0, 1.0]
    # the cloud's seconds are steadied over rounds, and only when asked
    clouds = [
        {"event": "round", "round": r, "cloud-seconds": s}
        for r, s in enumerate([1.0, 1.0, 1.0, 9.0], start=1)
    ]
    steady = [r.cloud_seconds for r in sync_rounds_from_records(clouds)]
    assert steady == [1.0] * 4
    raw = sync_rounds_from_records(clouds, steady=False)
    assert [r.cloud_seconds for r in raw] == [1.0, 1.0, 1.0, 9.0]
