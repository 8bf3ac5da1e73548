"""``CompressedUpdates`` with the ``full`` codec as a drop-in for Flower's FedAvg.

The scenarios of Flower's own Message-API strategy tests (FedAvgM and FedOpt:
two clients with 1 and 2 examples, near-one server learning rate, momentum
over two rounds, 0-d weights), plus float64 and integer arrays, custom record
keys, fractional example weights and a plain Flower reply, run against the
wrapper. Each node's reply is made by the real edge pipeline
(:func:`~tandem.compression.pipeline.compress_update` on ``θ_k − θ``), so
what is tested is the round trip edge -> wire -> cloud -> inner strategy.

Intended differences from Flower's FedAvg (listed in the README):

- a reply must be the compressed reply (record ``update`` and the edge's
  metric set); a plain Flower reply (``arrays`` + ``num-examples``) is refused
  with the reason;
- ``num-examples`` must be a whole number (a fractional weight is refused
  with a message that says so);
- the update travels in float32 (the ``full`` codec): a float64 model keeps
  its own float64 values, and each round adds the float32 update to them;
- tensors that are not floating point (integer counters) are not part of the
  update: they keep the value the cloud sent, in their dtype;
- whatever keys the inner strategy uses, the train messages carry the
  protocol's records ``arrays`` and ``config`` (the edge reads those).
"""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM
from flwr.supercore.task_identity import TaskIdentity

from tandem.compression.codecs import Option
from tandem.compression.downlink import model_digest
from tandem.compression.pipeline import EdgeMemory, compress_update
from tandem.protocol.acesync import EDGE_METRICS, KEY_UPDATE, update_record
from tandem.strategies.compressed import CompressedUpdates

FULL = (Option("full"),)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _wrapper(inner, initial, nodes=(1, 2), server_round=1, rejected=None):
    """The wrapper after sending ``server_round`` to ``nodes`` (no byte limit)."""
    strategy = CompressedUpdates(
        inner,
        codecs=FULL,
        gamma=0.0,
        on_reject=None
        if rejected is None
        else (lambda r, n, why: rejected.append((n, why))),
    )
    _send(strategy, initial, nodes, server_round)
    return strategy


def _send(strategy, arrays, nodes=(1, 2), server_round=1):
    strategy.set_arrays(_record(arrays))
    strategy.prepare(server_round, list(nodes), ConfigRecord({"local-steps": 1}))


def _reply(strategy, node, client, examples, memory=None):
    """Node ``node``'s compressed reply for the local model ``client``."""
    layout = strategy.layout
    plan = strategy._plans[node]
    update = layout.flat(client) - strategy.current
    memory = memory or EdgeMemory.fresh(layout, plan.history)
    out = compress_update(update, strategy.current, memory, plan, layout)
    metrics = {
        **dict.fromkeys(sorted(EDGE_METRICS), 0.0),
        "num-examples": examples,
        "steps": plan.local_steps,
        "bytes-budget": plan.budget,
        "bytes-encoded": out.encoded_bytes,
        # an honest edge: the digest of the model it was sent
        "model-digest": model_digest(strategy.current),
    }
    content = RecordDict(
        {
            KEY_UPDATE: update_record(out.codecs, out.payload),
            "metrics": MetricRecord(metrics),
        }
    )
    return _as_reply(node, content)


def _plain(arrays, examples):
    """A plain Flower reply's content: the local model and its weight."""
    return RecordDict(
        {"arrays": _record(arrays), "metrics": MetricRecord({"num-examples": examples})}
    )


def _as_reply(node, content):
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    sent.metadata.__dict__["_message_id"] = f"m{node}"
    return Message(content, reply_to=sent)


# Flower's FedAvgM test data: two clients, 1 and 2 examples, zeros to start.
W0 = {
    "0": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32),
    "1": np.array([7, 8, 9, 10], dtype=np.float32),
}
W1 = {
    "0": np.array([[29, 23, 19], [17, 13, 11]], dtype=np.float32),
    "1": np.array([7, 5, 3, 2], dtype=np.float32),
}
ZEROS = {k: np.zeros_like(v) for k, v in W0.items()}
EXPECTED = {k: (W0[k] * 1 + W1[k] * 2) / 3 for k in W0}


def _round(strategy, server_round=1):
    replies = [_reply(strategy, 1, W0, 1), _reply(strategy, 2, W1, 2)]
    return strategy.aggregate_train(server_round, replies)


def test_near_one_server_lr_and_no_momentum():
    inner = FedAvgM(server_learning_rate=1.0 + 1e-9)
    strategy = _wrapper(inner, ZEROS)
    inner.current_arrays = _record(ZEROS)
    arrays, _ = _round(strategy)
    assert arrays is not None
    for key, expected in EXPECTED.items():
        np.testing.assert_almost_equal(arrays[key].numpy(), expected, decimal=5)


def test_server_learning_rate_and_momentum_over_two_rounds():
    inner = FedAvgM(server_learning_rate=1.0 + 1e-9, server_momentum=1e-9)
    strategy = _wrapper(inner, ZEROS)
    inner.current_arrays = _record(ZEROS)
    arrays, _ = _round(strategy, 1)
    # round 2 starts from round 1's model; the clients send the same models
    _send(strategy, {k: a.numpy() for k, a in arrays.items()}, server_round=2)
    arrays, _ = _round(strategy, 2)
    assert arrays is not None
    for key, expected in EXPECTED.items():
        np.testing.assert_almost_equal(arrays[key].numpy(), expected, decimal=5)


def test_scalar_weights_keep_shape_and_dtype():
    """0-d float64 weights: 1·1 + 3·2 over 3 examples = 7/3, shape ()."""
    inner = FedAvgM(server_learning_rate=1.0 + 1e-9)
    initial = {"0": np.array(0.0)}
    strategy = _wrapper(inner, initial)
    inner.current_arrays = _record(initial)
    replies = [
        _reply(strategy, 1, {"0": np.array(1.0)}, 1),
        _reply(strategy, 2, {"0": np.array(3.0)}, 2),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    scalar = arrays["0"].numpy()
    assert scalar.shape == () and scalar.dtype == np.float64
    np.testing.assert_allclose(scalar, 7.0 / 3.0, rtol=1e-6)


def test_fedadam_round_keeps_the_sent_shapes_and_dtypes():
    """FedOpt's mismatch check (keys and shapes of the aggregate against the
    global arrays) passes: the rebuilt replies have the global layout."""
    rng = np.random.default_rng(0)
    initial = {str(i): rng.normal(size=(7, 3)).astype(np.float32) for i in range(4)}
    inner = FedAdam()
    strategy = _wrapper(inner, initial)
    inner.current_arrays = dict(initial)  # as configure_train would set it
    clients = [
        {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in initial.items()}
        for _ in range(2)
    ]
    arrays, _ = strategy.aggregate_train(
        1, [_reply(strategy, n, c, 3) for n, c in zip((1, 2), clients, strict=True)]
    )
    # the reference: Flower's FedAdam on the clients' plain replies
    reference = FedAdam()
    reference.current_arrays = dict(initial)
    plain = [_as_reply(n, _plain(c, 3)) for n, c in zip((1, 2), clients, strict=True)]
    expected, _ = reference.aggregate_train(1, plain)
    for key, value in initial.items():
        out = arrays[key].numpy()
        assert out.shape == value.shape and out.dtype == value.dtype
        assert not np.allclose(out, value)  # it moved
        np.testing.assert_allclose(out, expected[key].numpy(), atol=1e-5)


def test_full_codec_matches_flower_fedavg():
    rng = np.random.default_rng(1)
    initial = {
        "w": rng.normal(size=(5, 4)).astype(np.float32),
        "b": rng.normal(size=4).astype(np.float32),
    }
    clients = [
        {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in initial.items()}
        for _ in range(3)
    ]
    examples = [5, 1, 7]
    strategy = _wrapper(FedAvg(), initial, nodes=(1, 2, 3))
    ours, _ = strategy.aggregate_train(
        1,
        [
            _reply(strategy, n, c, e)
            for n, c, e in zip((1, 2, 3), clients, examples, strict=True)
        ],
    )
    plain = [
        _as_reply(
            n,
            RecordDict(
                {"arrays": _record(c), "metrics": MetricRecord({"num-examples": e})}
            ),
        )
        for n, c, e in zip((1, 2, 3), clients, examples, strict=True)
    ]
    flower, _ = FedAvg().aggregate_train(1, plain)
    for key in initial:
        # equal up to the float32 rounding of θ + (θ_k − θ)
        np.testing.assert_allclose(ours[key].numpy(), flower[key].numpy(), atol=1e-6)


def test_float64_model_is_not_rounded_to_float32():
    # values float32 cannot hold; θ + 0.5 − θ is 0.5 even in float32
    base = np.array([1.0 + 1e-12, 0.25 + 2.0**-40, -(2.0**-40)], dtype=np.float64)
    strategy = _wrapper(FedAvg(), {"w": base})
    # both nodes send the model back unchanged: the aggregate is θ, bit for bit
    replies = [_reply(strategy, n, {"w": base}, 4) for n in (1, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    out = arrays["w"].numpy()
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, base)
    # the update (float32 on the wire) is added to the float64 values
    replies = [_reply(strategy, n, {"w": base + 0.5}, 4) for n in (1, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays["w"].numpy(), base + 0.5)


def test_integer_arrays_keep_dtype_and_the_sent_value():
    initial = {
        "w": np.zeros(3, np.float32),
        "count": np.array([7, 8], dtype=np.int64),
        "scalar": np.array(5, dtype=np.int32),
    }
    strategy = _wrapper(FedAvg(), initial)
    clients = [{**initial, "w": np.full(3, v, np.float32)} for v in (1.0, 4.0)]
    arrays, _ = strategy.aggregate_train(
        1,
        [
            _reply(strategy, n, c, e)
            for n, c, e in ((1, clients[0], 1), (2, clients[1], 2))
        ],
    )
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0, 3.0, 3.0])
    count, scalar = arrays["count"].numpy(), arrays["scalar"].numpy()
    assert count.dtype == np.int64 and count.tolist() == [7, 8]
    assert scalar.dtype == np.int32 and scalar.shape == () and int(scalar) == 5


def test_custom_record_keys():
    inner = FedAvg(
        arrayrecord_key="global-model",
        configrecord_key="my-config",
        weighted_by_key="weight",
    )
    strategy = CompressedUpdates(inner, codecs=FULL, gamma=0.0)
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [1, 2]
    messages = list(
        strategy.configure_train(1, _record(W0), ConfigRecord({"lr": 0.1}), grid)
    )
    assert len(messages) == 2
    for msg in messages:
        # the protocol's records, whatever the inner strategy calls them
        assert set(msg.content.keys()) == {"arrays", "config"}
        assert msg.content["config"]["lr"] == 0.1
        assert msg.content["config"]["acesync-codecs"] == "full"
    replies = [_reply(strategy, 1, W0, 1), _reply(strategy, 2, W1, 2)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    for key, expected in EXPECTED.items():
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)


def test_fractional_example_weight_is_refused_with_an_accurate_reason():
    rejected: list = []
    strategy = _wrapper(FedAvg(), W0, rejected=rejected)
    replies = [_reply(strategy, 1, W0, 2.5), _reply(strategy, 2, W1, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert [n for n, _ in rejected] == [1]
    assert "not a whole number" in rejected[0][1] and "2.5" in rejected[0][1]
    for key, value in W1.items():  # the other reply alone
        np.testing.assert_allclose(arrays[key].numpy(), value, rtol=1e-6)


def test_plain_flower_reply_is_refused_with_the_reason():
    rejected: list = []
    strategy = _wrapper(FedAvg(), W0, rejected=rejected)
    plain = RecordDict(
        {"arrays": _record(W1), "metrics": MetricRecord({"num-examples": 2})}
    )
    arrays, _ = strategy.aggregate_train(
        1, [_reply(strategy, 1, W0, 1), _as_reply(2, plain)]
    )
    assert [n for n, _ in rejected] == [2]
    assert "unknown records ['arrays']" in rejected[0][1]
    for key, value in W0.items():
        np.testing.assert_allclose(arrays[key].numpy(), value, rtol=1e-6)
