"""ACE-Sync's aggregation weights (seed eq. 8) as the strategy applies them.

Replies are built by hand and pass through the strategy's own
``aggregate_train``: what is checked is the weight each reply got.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from tandem.coordination import aggregation_weights
from tandem.protocol.acesync import EDGE_METRICS, AceSyncOptions
from tandem.strategies.acesync import AceSync

GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _strategy() -> AceSync:
    """No compression (c = 0: every budget is the full model), one preset link."""
    options = AceSyncOptions(
        codecs="full,defer",
        c_min=0.0,
        c_max=0.0,
        importance="magnitude",
        link="4g",
        divergence_threshold=0.0,
        predictor_steps=0,
    )
    return AceSync(
        FedAvg(min_available_nodes=1),
        options=options,
        local_steps=5,
        on_reject=lambda *reject: pytest.fail(f"rejected {reject}"),
    )


def _reply(node: int, budget: int, value: float) -> Message:
    """Node ``node``'s honest reply: every group in full, the update ``value``."""
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    sent.metadata.__dict__["_message_id"] = f"m{node}"
    payload = np.full(9, value, np.float32).view(np.uint8)
    content = RecordDict(
        {
            "update": ArrayRecord(
                {"codecs": Array(np.zeros(2, np.uint8)), "payload": Array(payload)}
            ),
            "metrics": MetricRecord(
                {
                    **dict.fromkeys(sorted(EDGE_METRICS), 0.0),
                    "train-seconds": 1.0,
                    "compute-seconds": 1.0,
                    "num-examples": 10,
                    "steps": 5,
                    "bytes-budget": budget,
                    "bytes-encoded": payload.size,
                }
            ),
        }
    )
    return Message(content, reply_to=sent)


def _round(strategy: AceSync, server_round: int, repliers: list[int]):
    plans = strategy.prepare(server_round, [1, 2], ConfigRecord({"local-steps": 5}))
    replies = [_reply(n, plans[n].budget, float(n)) for n in repliers]
    return strategy.aggregate_train(server_round, replies)


def test_reliability_scales_the_weights():
    """Node 2 missed round 1: reliability 1/2 against node 1's 2/2 (eq. 8)."""
    strategy = _strategy()
    strategy.set_arrays(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    _round(strategy, 1, [1])
    _round(strategy, 2, [1, 2])
    latency = np.array([strategy.latency[1], strategy.latency[2]])
    expected = aggregation_weights(np.full(2, 10.0), np.array([1.0, 0.5]), latency)
    got = np.array([strategy.last_weights[1], strategy.last_weights[2]])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # the reliability term moves them: without it node 2 would weigh more
    unreliable = aggregation_weights(np.full(2, 10.0), np.ones(2), latency)
    assert got[1] < unreliable[1] - 0.05


def test_undefined_rank_correlations_average_to_nan_without_a_warning():
    import math
    import warnings

    from tandem.strategies.acesync import _mean_defined

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(_mean_defined([float("nan"), float("nan")]))
        assert math.isnan(_mean_defined([]))
        assert _mean_defined([float("nan"), 0.5, 1.0]) == 0.75
