"""Malformed FedAvg replies are rejected, counted, and never reach the global model."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity
from inprocess import run_inprocess

from tandem.strategies.fedavg import CheckedFedAvg, missing_replies

GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _metrics(**over) -> MetricRecord:
    values = {
        "train-loss": 0.5,
        "num-examples": 10,
        "train-seconds": 0.1,
        "compute-seconds": 0.1,
        "steps": 5,
    }
    values.update(over)
    return MetricRecord({k: v for k, v in values.items() if v is not None})


def _reply(node_id: int, arrays: dict, metrics: MetricRecord | None = None, **records):
    sent = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    sent.metadata.__dict__["_message_id"] = f"m{node_id}"
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": metrics or _metrics(),
            **records,
        }
    )
    return Message(content, reply_to=sent)


def _strategy(rejected: list):
    strategy = CheckedFedAvg(
        on_reject=lambda r, n, why: rejected.append((r, n, why)),
        max_examples=100,
        min_available_nodes=1,
    )
    strategy.expect(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    return strategy


def _ones(scale: float) -> dict:
    return {k: np.full_like(v, scale) for k, v in GLOBAL.items()}


BAD = [
    (
        "nan",
        lambda: _reply(9, {**_ones(1), "b": np.array([1, np.nan, 1], np.float32)}),
        "'b' holds NaN or Inf",
    ),
    (
        "inf",
        lambda: _reply(9, {**_ones(1), "w": np.full((2, 3), np.inf, np.float32)}),
        "'w' holds NaN or Inf",
    ),
    (
        "shape",
        lambda: _reply(9, {**_ones(1), "b": np.ones(4, np.float32)}),
        "'b' has shape (4,)",
    ),
    (
        "dtype",
        lambda: _reply(9, {**_ones(1), "b": np.ones(3, np.float64)}),
        "'b' has dtype float64",
    ),
    (
        "unknown array",
        lambda: _reply(9, {**_ones(1), "x": np.ones(1, np.float32)}),
        "unknown ['x']",
    ),
    (
        "missing metric",
        lambda: _reply(9, _ones(1), _metrics(steps=None)),
        "differ from the round's other replies: missing ['steps']",
    ),
    (
        "extra metric",
        lambda: _reply(9, _ones(1), _metrics(accuracy=0.5)),
        "unknown ['accuracy']",
    ),
    (
        "other list length",
        lambda: _reply(9, _ones(1), _metrics(steps=[1.0, 2.0])),
        "other list lengths ['steps']",
    ),
    (
        "inflated examples",
        lambda: _reply(9, _ones(1), _metrics(**{"num-examples": 10**9})),
        "(the weight) outside (0, 100]",
    ),
    (
        "zero weight",
        lambda: _reply(9, _ones(1), _metrics(**{"num-examples": 0})),
        "(the weight) outside (0, 100]",
    ),
    (
        "negative weight",
        lambda: _reply(9, _ones(1), _metrics(**{"num-examples": -2.5})),
        "(the weight) outside (0, 100]",
    ),
    (
        "no weight",
        lambda: _reply(9, _ones(1), _metrics(**{"num-examples": None})),
        "'num-examples' (the weight) is missing",
    ),
    (
        "nan in a list metric",
        lambda: _reply(9, _ones(1), _metrics(steps=[float("nan")])),
        "'steps' is not a list of at most",
    ),
    (
        "nan metric",
        lambda: _reply(9, _ones(1), _metrics(**{"train-loss": float("nan")})),
        "'train-loss' = nan",
    ),
    (
        "second ArrayRecord",
        lambda: _reply(9, _ones(1), extra=ArrayRecord({"a": Array(np.ones(1))})),
        "exactly one ArrayRecord, got 2 (['arrays', 'extra'])",
    ),
    (
        "second MetricRecord",
        lambda: _reply(9, _ones(1), more=MetricRecord({"a": 1.0})),
        "exactly one MetricRecord, got 2 (['metrics', 'more'])",
    ),
    (
        "oversized",
        lambda: _reply(9, _ones(1), node=ConfigRecord({"link": "x" * 200_000})),
        "bytes exceeds the",
    ),
]


@pytest.mark.parametrize(("name", "make", "reason"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_reply_is_rejected_and_the_rest_aggregated(name, make, reason):
    rejected: list = []
    strategy = _strategy(rejected)
    good = [_reply(1, _ones(1.0)), _reply(2, _ones(3.0))]
    arrays, _ = strategy.aggregate_train(4, [good[0], make(), good[1]])
    # the mean of the two good replies, untouched by the bad one
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 2.0))
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(3, 2.0))
    assert len(rejected) == 1
    round_, node, why = rejected[0]
    assert (round_, node) == (4, 9)
    assert reason in why


def test_all_good_replies_pass():
    rejected: list = []
    arrays, _ = _strategy(rejected).aggregate_train(
        1,
        [
            _reply(1, _ones(2.0), node=ConfigRecord({"link": "4g"})),
            _reply(2, _ones(2.0), other=ConfigRecord({"a": 1})),  # any ConfigRecord
        ],
    )
    assert rejected == []
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(3, 2.0))


def test_aggregating_before_anything_was_sent_is_an_error():
    strategy = CheckedFedAvg(min_available_nodes=1)
    with pytest.raises(RuntimeError, match="before configure_train"):
        strategy.aggregate_train(1, [_reply(1, _ones(1.0))])


def _error_reply(node_id: int, src: int, reason: str) -> Message:
    sent = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    sent.metadata.__dict__["_message_id"] = f"m{node_id}"
    error = Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason)
    reply = Message(error, reply_to=sent)
    reply.metadata.__dict__["_src_node_id"] = src
    return reply


def test_missing_replies_names_each_node_and_why():
    good = _reply(1, GLOBAL)
    own = _error_reply(2, 2, "ClientApp raised")
    relayed = _error_reply(3, 0, "Node Unavailable")  # made by the SuperLink
    missing = missing_replies([1, 2, 3, 4], [good, own, relayed])
    assert missing == {
        2: "error reply: ClientApp raised",
        3: "error reply: Node Unavailable",
        4: "error reply: Node Unavailable",
    }
    assert missing_replies([1, 4], [good]) == {4: "no reply within the round's timeout"}


@pytest.mark.parametrize("method", ["fedavg", "syncsgd"])
def test_a_silent_node_is_a_dropout_and_the_rounds_go_on(tmp_path, method):
    config = {
        "method": method,
        "mnist1d-samples": 1000,
        "local-steps": 5,
        "num-server-rounds": 3,
        "reply-timeout": 1.0,
    }
    records, _ = run_inprocess(config, nodes=3, out=tmp_path, silent_after={3: 1})
    dropouts = [r for r in records if r["event"] == "dropout"]
    assert [(d["round"], d["node-id"]) for d in dropouts] == [(2, 3), (3, 3)]
    assert all("no reply within" in d["reason"] for d in dropouts)
    summary = records[-1]
    assert summary["dropouts"] == 2 and summary["rejected-replies"] == 0
    # the two answering nodes' updates were aggregated every round
    initial, *rounds = [r for r in records if r["event"] == "round"]
    assert [r["messages-up"] for r in rounds] == [3, 2, 2]
    assert rounds[-1]["eval-loss"] < initial["eval-loss"]  # and it trained
