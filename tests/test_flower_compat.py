"""CheckedFedAvg / CheckedFedAvgM as drop-ins for Flower's FedAvg / FedAvgM.

The scenarios of Flower's own Message-API strategy tests (``fedavgm_test.py``,
``fedopt_test.py`` and the reply helpers of ``strategy_utils_test.py`` in
``flwr/serverapp/strategy``), written again here and run against tandem's
checked strategies, each beside the plain Flower strategy as the reference:
scalars, float64, integer arrays, custom record keys, fractional weights and
plain Flower replies (only ``num-examples``, or an extra ``accuracy``).

Intended differences (README, "Reliability"): replies are checked against the
arrays sent by ``configure_train`` (same keys, shapes and dtypes, finite), a
reply whose metrics differ from the round's other replies is dropped instead of
stopping the run, and a weight must be a finite number in ``(0, max_examples]``.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg, FedAvgM
from flwr.supercore.task_identity import TaskIdentity

from tandem.strategies.fedavg import CheckedFedAvg, CheckedFedAvgM


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class NodesOnly:
    """Enough of a Grid for ``configure_train``: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _send(strategy, arrays: ArrayRecord, nodes: list[int], rnd: int = 1) -> list:
    """``configure_train`` for round ``rnd``: the messages the nodes get."""
    return list(strategy.configure_train(rnd, arrays, ConfigRecord(), NodesOnly(nodes)))


def _reply(
    sent: Message,
    arrays: list[np.ndarray] | ArrayRecord,
    metrics: dict,
    arrays_key: str = "arrays",
    metrics_key: str = "metrics",
) -> Message:
    """A plain Flower client's reply: one ArrayRecord, one MetricRecord."""
    sent.metadata.__dict__["_message_id"] = f"m{sent.metadata.dst_node_id}"
    record = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    content = RecordDict({arrays_key: record, metrics_key: MetricRecord(metrics)})
    return Message(content, reply_to=sent)


def _pair(checked_cls, flower_cls, **kwargs):
    rejected: list = []
    checked = checked_cls(
        on_reject=lambda r, n, why: rejected.append((n, why)),
        min_available_nodes=1,
        **kwargs,
    )
    return checked, flower_cls(min_available_nodes=1, **kwargs), rejected


def _both(checked, flower, initial: ArrayRecord, replies_for, rnd: int = 1):
    """Run one round on both strategies with the same replies."""
    out = []
    for strategy in (checked, flower):
        sent = sorted(
            _send(strategy, initial, [1, 2], rnd), key=lambda m: m.metadata.dst_node_id
        )
        out.append(strategy.aggregate_train(rnd, replies_for(sent)))
    return out


# fedavgm_test.py's two clients: weights 1 and 2
W0 = [np.array([[1, 2, 3], [4, 5, 6]], np.float32), np.array([7, 8, 9, 10], np.float32)]
W1 = [
    np.array([[29, 23, 19], [17, 13, 11]], np.float32),
    np.array([7, 5, 3, 2], np.float32),
]
ZERO = ArrayRecord([np.zeros((2, 3), np.float32), np.zeros(4, np.float32)])
EXPECTED = [(a * 1 + b * 2) / 3 for a, b in zip(W0, W1, strict=True)]


def _fedavgm_replies(sent: list[Message]) -> list[Message]:
    return [
        _reply(sent[0], W0, {"num-examples": 1}),
        _reply(sent[1], W1, {"num-examples": 2}),
    ]


def test_fedavgm_near_one_server_lr_and_no_momentum():
    checked, flower, rejected = _pair(
        CheckedFedAvgM, FedAvgM, server_learning_rate=1.0 + 1e-9
    )
    (ours, _), (theirs, _) = _both(checked, flower, ZERO, _fedavgm_replies)
    assert rejected == []
    for got, ref, want in zip(
        ours.to_numpy_ndarrays(), theirs.to_numpy_ndarrays(), EXPECTED, strict=True
    ):
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_almost_equal(got, want, decimal=5)


def test_fedavgm_server_learning_rate_and_momentum_over_two_rounds():
    kwargs = {"server_learning_rate": 1.0 + 1e-9, "server_momentum": 1e-9}
    checked, flower, rejected = _pair(CheckedFedAvgM, FedAvgM, **kwargs)
    _both(checked, flower, ZERO, _fedavgm_replies, rnd=1)
    # round 2 is sent the round-1 result; the same replies come back
    (ours, _), (theirs, _) = _both(
        checked, flower, checked.current_arrays, _fedavgm_replies, rnd=2
    )
    assert rejected == []
    for got, ref, want in zip(
        ours.to_numpy_ndarrays(), theirs.to_numpy_ndarrays(), EXPECTED, strict=True
    ):
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_almost_equal(got, want, decimal=5)


@pytest.mark.parametrize(("checked_cls", "flower_cls"), [(CheckedFedAvgM, FedAvgM)])
def test_scalar_weights_keep_their_shape(checked_cls, flower_cls):
    checked, flower, rejected = _pair(
        checked_cls, flower_cls, server_learning_rate=1.0 + 1e-9
    )
    initial = ArrayRecord([np.array(0.0)])
    (ours, _), (theirs, _) = _both(
        checked,
        flower,
        initial,
        lambda sent: [
            _reply(sent[0], [np.array(1.0)], {"num-examples": 1}),
            _reply(sent[1], [np.array(3.0)], {"num-examples": 2}),
        ],
    )
    assert rejected == []
    got = ours.to_numpy_ndarrays()[0]
    assert got.shape == () and got.shape == theirs.to_numpy_ndarrays()[0].shape
    np.testing.assert_allclose(got, 7.0 / 3.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "a", "b", "want"),
    [
        (
            np.float64,
            1.0 + 1e-12,
            4.0,
            (1.0 + 1e-12) / 3 + 8 / 3,
        ),  # no float32 rounding
        (np.int64, 1, 4, 3.0),  # Flower averages integers into float64
    ],
)
def test_float64_and_integer_arrays_average_as_flower_does(dtype, a, b, want):
    checked, flower, rejected = _pair(CheckedFedAvg, FedAvg)
    initial = ArrayRecord([np.zeros(3, dtype)])
    (ours, _), (theirs, _) = _both(
        checked,
        flower,
        initial,
        lambda sent: [
            _reply(sent[0], [np.full(3, a, dtype)], {"num-examples": 1}),
            _reply(sent[1], [np.full(3, b, dtype)], {"num-examples": 2}),
        ],
    )
    assert rejected == []
    got, ref = ours.to_numpy_ndarrays()[0], theirs.to_numpy_ndarrays()[0]
    assert got.dtype == ref.dtype == np.float64
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(got, want, rtol=1e-15)


def test_custom_record_keys_and_fractional_weights():
    # strategy_utils_test.py: records under "global-model", weights 0.25/0.4/0.35
    kwargs = {"arrayrecord_key": "global-model", "weighted_by_key": "weight"}
    checked, flower, rejected = _pair(CheckedFedAvg, FedAvg, **kwargs)
    rng = np.random.default_rng(0)
    weights = [0.25, 0.4, 0.35]
    arrays = [[rng.standard_normal((7, 3)) for _ in range(4)] for _ in weights]
    initial = ArrayRecord([np.zeros((7, 3)) for _ in range(4)])
    results = []
    for strategy in (checked, flower):
        sent = _send(strategy, initial, [1, 2, 3])
        assert all("global-model" in m.content for m in sent)
        sent.sort(key=lambda m: m.metadata.dst_node_id)
        replies = [
            _reply(
                m, arrays[i], {"weight": weights[i], "loss": float(i)}, "global-model"
            )
            for i, m in enumerate(sent)
        ]
        results.append(strategy.aggregate_train(1, replies))
    assert rejected == []
    (ours, our_metrics), (theirs, their_metrics) = results
    for i, (got, ref) in enumerate(
        zip(ours.to_numpy_ndarrays(), theirs.to_numpy_ndarrays(), strict=True)
    ):
        np.testing.assert_array_equal(got, ref)
        want = np.average([a[i] for a in arrays], axis=0, weights=weights)
        np.testing.assert_allclose(got, want)
    assert our_metrics["loss"] == pytest.approx(0.4 * 1 + 0.35 * 2)
    assert dict(our_metrics) == dict(their_metrics)


@pytest.mark.parametrize(
    "metrics",
    [
        {"num-examples": 10},  # Flower's mock reply: nothing but the weight
        {"num-examples": 10, "accuracy": 0.75, "loss": 0.5},  # and a client's own
        {"num-examples": 2.5, "per-class": [0.25, 0.75]},  # fractional, a list
    ],
    ids=["weight only", "extra metrics", "fractional and list"],
)
def test_plain_flower_replies_are_aggregated(metrics):
    checked, flower, rejected = _pair(CheckedFedAvg, FedAvg)
    initial = ArrayRecord([np.zeros(3, np.float32)])
    (ours, our_metrics), (theirs, their_metrics) = _both(
        checked,
        flower,
        initial,
        lambda sent: [
            _reply(sent[0], [np.ones(3, np.float32)], metrics),
            _reply(sent[1], [np.full(3, 3.0, np.float32)], metrics),
        ],
    )
    assert rejected == []
    np.testing.assert_array_equal(ours.to_numpy_ndarrays()[0], np.full(3, 2.0))
    np.testing.assert_array_equal(
        ours.to_numpy_ndarrays()[0], theirs.to_numpy_ndarrays()[0]
    )
    assert dict(our_metrics) == dict(their_metrics)


def test_a_reply_with_other_metrics_is_dropped_where_flower_stops_the_run():
    """An intended difference: one odd reply does not end the run."""
    checked, flower, rejected = _pair(CheckedFedAvg, FedAvg)
    initial = ArrayRecord([np.zeros(3, np.float32)])

    def replies(sent: list[Message]) -> list[Message]:
        return [
            _reply(sent[0], [np.ones(3, np.float32)], {"num-examples": 1}),
            _reply(sent[1], [np.ones(3, np.float32)], {"num-examples": 1, "x": 1.0}),
        ]

    sent = sorted(_send(flower, initial, [1, 2]), key=lambda m: m.metadata.dst_node_id)
    with pytest.raises(InconsistentMessageReplies):
        flower.aggregate_train(1, replies(sent))
    sent = sorted(_send(checked, initial, [1, 2]), key=lambda m: m.metadata.dst_node_id)
    arrays, _ = checked.aggregate_train(1, replies(sent))
    np.testing.assert_array_equal(arrays.to_numpy_ndarrays()[0], np.ones(3))
    assert rejected == [(2, rejected[0][1])] and "unknown ['x']" in rejected[0][1]


@pytest.mark.parametrize(
    ("reply_arrays", "why"),
    [
        ([np.random.randn(7, 3) for _ in range(4)], None),  # same keys and shapes
        ([np.random.randn(7, 3) for _ in range(5)], "array keys differ"),
        ([np.random.randn(7, 5) for _ in range(4)], "has shape (7, 5)"),
    ],
    ids=["valid", "other keys", "other shapes"],
)
def test_replies_that_do_not_fit_the_model_sent_are_rejected(reply_arrays, why):
    """fedopt_test.py: arrays that do not match the global model."""
    checked, _, rejected = _pair(CheckedFedAvgM, FedAvgM, server_momentum=0.5)
    initial = ArrayRecord([np.random.randn(7, 3) for _ in range(4)])
    sent = sorted(_send(checked, initial, [1, 2]), key=lambda m: m.metadata.dst_node_id)
    good = _reply(
        sent[0], ArrayRecord(initial.to_numpy_ndarrays()), {"num-examples": 1}
    )
    odd = _reply(sent[1], reply_arrays, {"num-examples": 1})
    arrays, _ = checked.aggregate_train(1, [good, odd])
    assert arrays is not None
    if why is None:
        assert rejected == []
    else:
        assert len(rejected) == 1 and rejected[0][0] == 2 and why in rejected[0][1]
        for got, want in zip(
            arrays.to_numpy_ndarrays(), initial.to_numpy_ndarrays(), strict=True
        ):
            np.testing.assert_allclose(got, want)  # only the good reply counted


def test_rejections_default_to_flowers_log(caplog):
    strategy = CheckedFedAvg(min_available_nodes=1, min_train_nodes=1)
    initial = ArrayRecord([np.zeros(3, np.float32)])
    (sent,) = _send(strategy, initial, [1])
    bad = _reply(sent, [np.full(3, np.nan, np.float32)], {"num-examples": 1})
    with caplog.at_level("WARNING", logger="flwr"):
        assert strategy.aggregate_train(1, [bad]) == (None, None)
    assert "rejected reply from node 1" in caplog.text and "NaN" in caplog.text
