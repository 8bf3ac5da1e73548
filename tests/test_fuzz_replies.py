"""Fuzzing the strategies' reply checks with hypothesis (hostile input).

Random replies (shapes, dtypes, NaN/Inf, huge sizes, missing and unknown
keys, replayed or future versions) go through each strategy's real checks.
Properties: nothing but the domain error (``PayloadError``) ever escapes, a
bad reply never reaches the global model, and every rejection is counted with
a reason. Nothing in a message is ever unpickled or evaluated: records hold
only arrays and scalars, and the checks read dtypes and shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.strategies.fedavg import CheckedFedAvg
from tandem.strategies.simultrain import check_activations
from tandem.wire import PayloadError

GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


DTYPES = st.sampled_from(
    [np.float32, np.float64, np.float16, np.int64, np.int8, np.uint8, np.bool_]
)
SPECIALS = st.sampled_from([0.0, 1.0, np.nan, np.inf, -np.inf, 1e38, -1e38])


@st.composite
def arrays(draw, max_side=6):
    shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=0, max_size=3)))
    dtype = draw(DTYPES)
    values = np.full(shape, draw(SPECIALS))
    with np.errstate(all="ignore"):
        return values.astype(dtype)


KEYS = st.sampled_from(["w", "b", "a", "y", "sizes", "a-scale", "x", ""])


@st.composite
def array_records(draw):
    return ArrayRecord(
        {
            k: Array(v)
            for k, v in draw(st.dictionaries(KEYS, arrays(), max_size=5)).items()
        }
    )


SCALARS = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.booleans()
)
METRIC_KEYS = st.sampled_from(
    ["train-loss", "num-examples", "train-seconds", "compute-seconds", "steps", "x"]
)


@st.composite
def fedavg_replies(draw):
    content = RecordDict()
    if draw(st.booleans()):
        content["arrays"] = draw(array_records())
    if draw(st.booleans()):
        content["metrics"] = MetricRecord(
            {
                k: v
                for k, v in draw(
                    st.dictionaries(
                        METRIC_KEYS, st.one_of(st.integers(-5, 10**9), st.floats())
                    )
                ).items()
            }
        )
    if draw(st.booleans()):
        content[draw(st.sampled_from(["node", "extra", "config"]))] = ConfigRecord(
            {"k": 1}
        )
    return content


def _reply(node_id: int, content: RecordDict) -> Message:
    sent = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    sent.metadata.__dict__["_message_id"] = f"m{node_id}"
    return Message(content, reply_to=sent)


def _good() -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(
                {k: Array(np.ones_like(v)) for k, v in GLOBAL.items()}
            ),
            "metrics": MetricRecord(
                {
                    "train-loss": 0.5,
                    "num-examples": 10,
                    "train-seconds": 0.1,
                    "compute-seconds": 0.1,
                    "steps": 5,
                }
            ),
        }
    )


@FUZZ
@given(hostile=fedavg_replies())
def test_fedavg_aggregation_ignores_any_hostile_reply(hostile):
    rejected: list = []
    strategy = CheckedFedAvg(
        on_reject=lambda r, n, why: rejected.append((r, n, why)),
        max_examples=100,
        min_available_nodes=1,
    )
    strategy.expect(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _good()), _reply(2, hostile)])
    assert arrays is not None
    if rejected:  # the hostile reply was dropped: the result is the good one's
        assert len(rejected) == 1 and rejected[0][1] == 2 and rejected[0][2]
        for k, v in GLOBAL.items():
            np.testing.assert_array_equal(arrays[k].numpy(), np.ones_like(v))
    else:  # it passed every check, so it is a well-formed, finite update
        for k in GLOBAL:
            assert np.isfinite(arrays[k].numpy()).all()


@st.composite
def activation_replies(draw):
    content = RecordDict()
    if draw(st.booleans()):
        content["meta"] = ConfigRecord({"v-e": draw(SCALARS)})
    if draw(st.integers(0, 3)):
        content["acts"] = draw(array_records())
    return content


@FUZZ
@given(content=activation_replies(), precision=st.sampled_from(["float32", "int8"]))
def test_simultrain_activation_check_raises_only_payload_errors(content, precision):
    try:
        acts, labels, sizes = check_activations(
            content, 3, 2, (4, 5), precision, 10, max_rows=8
        )
    except PayloadError as err:
        assert str(err)  # a reason
    else:  # whatever passed is exactly what the cloud can train on
        assert acts.dtype == np.float32 and np.isfinite(acts).all()
        assert acts.shape[1:] == (4, 5) and len(acts) == len(labels) <= 8
        assert labels.min() >= 0 and labels.max() < 10 and sizes.sum() == len(acts)
