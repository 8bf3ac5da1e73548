"""Fuzzing the strategies' reply checks with hypothesis (hostile input).

Random replies (shapes, dtypes, NaN/Inf, huge sizes, missing and unknown
keys, replayed or future versions) go through each strategy's real checks:
FedAvg's aggregation, SimulTrain's activation check, and the compressed-update
wrapper under ACE-Sync and its baselines (codec tables, packed payloads,
metrics, records).
Arrays are also forged at the byte level (:func:`forged`): an ``Array`` is a
declaration plus the bytes of an ``.npy`` file, and a hostile sender controls
both. Random bytes, truncated or corrupted headers, a declaration the bytes
disagree with, object (pickle) dtypes and headers that claim a huge shape all
go through each receive path.
Properties: nothing but the domain error (``PayloadError``) ever escapes, a
bad reply never reaches the global model, every rejection is counted with a
reason, and a reply that passes is averaged in exactly. Each generator mixes
honest replies in, and each test checks that both outcomes occurred.
Nothing in a message is ever unpickled or evaluated.
"""

from __future__ import annotations

import io
import math
from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.compression.codecs import Option, option_table
from tandem.protocol.acesync import EDGE_METRICS
from tandem.protocol.simultrain import read_activations
from tandem.split import encode_cut
from tandem.strategies.compressed import CompressedUpdates
from tandem.strategies.fedavg import CheckedFedAvg
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


def _npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=values.dtype.hasobject)
    return buffer.getvalue()


def _header(descr: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


@st.composite
def forged(draw, honest: np.ndarray):
    """An ``Array`` that claims to be ``honest``'s dtype and shape; its bytes
    are ``honest``'s own (sometimes) or hostile."""
    dtype, shape = str(honest.dtype), tuple(honest.shape)
    data = _npy(honest)
    kind = draw(
        st.sampled_from(
            [
                "honest",
                "random",
                "truncated",
                "corrupted",
                "mismatch",
                "object",
                "bomb",
                "padded",
            ]
        )
    )
    if kind == "random":
        data = draw(st.binary(max_size=200))
    elif kind == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "corrupted":  # a byte of the magic string or header changed
        at = draw(st.integers(0, min(len(data), 128) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    elif kind == "mismatch":  # e.g. declares float32 (3,), carries float64 (7,)
        data = _npy(draw(arrays()))
    elif kind == "object":
        data = _npy(np.array([None, "x", 1.5][: draw(st.integers(1, 3))], object))
    elif kind == "bomb":  # a header claiming a huge array, few bytes after it
        side = draw(st.integers(2**31, 2**62))
        descr = np.lib.format.dtype_to_descr(honest.dtype)
        bomb_shape = (side, *shape[1:])
        data = _header(descr, bomb_shape) + draw(st.binary(max_size=64))
        if draw(st.booleans()):  # declared consistently with its header
            shape = bomb_shape
    elif kind == "padded":
        data = data + draw(st.binary(min_size=1, max_size=8))
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


SCALARS = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.booleans()
)
NUMBERS = st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=True))
METRIC_KEYS = st.sampled_from(
    ["train-loss", "num-examples", "train-seconds", "compute-seconds", "steps", "x"]
)


@st.composite
def fedavg_replies(draw):
    if draw(st.booleans()):
        return draw(tampered_fedavg_replies())
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


@st.composite
def tampered_fedavg_replies(draw):
    """The honest reply with its arrays forged, its values or its example
    count changed: about a third pass every check."""
    content = _good()
    values = {
        k: np.full(v.shape, draw(st.sampled_from([-2.0, 0.5, 3.0])), v.dtype)
        for k, v in GLOBAL.items()
    }
    content["arrays"] = ArrayRecord(
        {
            k: draw(forged(v)) if draw(st.integers(0, 2)) == 0 else Array(v)
            for k, v in values.items()
        }
    )
    if draw(st.integers(0, 3)) == 0:
        metrics = dict(content["metrics"])
        metrics["num-examples"] = draw(st.one_of(st.integers(-3, 200), st.floats()))
        content["metrics"] = MetricRecord(metrics)
    return content


def test_fedavg_aggregation_ignores_any_hostile_reply():
    outcomes: Counter = Counter()
    sent = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})

    @FUZZ
    @given(hostile=fedavg_replies())
    def check(hostile):
        rejected: list = []
        strategy = CheckedFedAvg(
            on_reject=lambda r, n, why: rejected.append((r, n, why)),
            max_examples=100,
            min_available_nodes=1,
        )
        strategy.expect(sent)
        replies = [_reply(1, _good()), _reply(2, hostile)]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        for k, v in GLOBAL.items():  # what was sent is untouched
            np.testing.assert_array_equal(sent[k].numpy(), v)
        if rejected:  # the hostile reply was dropped: the result is the good one's
            outcomes["rejected"] += 1
            assert len(rejected) == 1 and rejected[0][1] == 2 and rejected[0][2]
            for k, v in GLOBAL.items():
                np.testing.assert_array_equal(arrays[k].numpy(), np.ones_like(v))
        else:  # it passed every check: averaged in by its example count
            outcomes["accepted"] += 1
            n = hostile["metrics"]["num-examples"]
            for k in GLOBAL:
                theirs = hostile["arrays"][k].numpy()
                expected = (10 * 1.0 + n * theirs.astype(np.float64)) / (10 + n)
                np.testing.assert_allclose(arrays[k].numpy(), expected, rtol=1e-6)

    check()
    assert outcomes["accepted"] >= 20 and outcomes["rejected"] >= 20, outcomes


@st.composite
def honest_activations(draw, precision: str):
    """A reply the check accepts (version 3, 2 micro-batches), some of its
    arrays forged."""
    sizes = np.array(draw(st.lists(st.integers(1, 4), min_size=2, max_size=2)))
    rows = int(sizes.sum())
    acts = np.linspace(-1, 1, rows * 20, dtype=np.float32).reshape(rows, 4, 5)
    parts = {k: v for k, v in encode_cut(acts, precision, "a").items()}
    parts["y"] = np.arange(rows, dtype=np.int64) % 10
    parts["sizes"] = sizes.astype(np.int64)
    record = {
        k: draw(forged(v)) if draw(st.integers(0, 2)) == 0 else Array(v)
        for k, v in parts.items()
    }
    return RecordDict({"meta": ConfigRecord({"v-e": 3}), "acts": ArrayRecord(record)})


@st.composite
def activation_replies(draw, precision: str):
    if draw(st.booleans()):
        return draw(honest_activations(precision))
    content = RecordDict()
    if draw(st.booleans()):
        content["meta"] = ConfigRecord({"v-e": draw(SCALARS)})
    if draw(st.integers(0, 3)):
        content["acts"] = draw(array_records())
    return content


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_simultrain_activation_check_raises_only_payload_errors(precision):
    outcomes: Counter = Counter()

    @FUZZ
    @given(content=activation_replies(precision))
    def check(content):
        try:
            chunk = read_activations(content, 3, 2, (4, 5), precision, 10, max_rows=8)
            acts, labels, sizes = chunk.acts, chunk.labels, chunk.sizes
        except PayloadError as err:
            outcomes["rejected"] += 1
            assert str(err)  # a reason
        else:  # whatever passed is exactly what the cloud can train on
            outcomes["accepted"] += 1
            assert acts.dtype == np.float32 and np.isfinite(acts).all()
            assert acts.shape[1:] == (4, 5) and len(acts) == len(labels) <= 8
            assert labels.min() >= 0 and labels.max() < 10
            assert sizes.sum() == len(acts)
            sent = content["acts"]
            np.testing.assert_array_equal(labels, sent["y"].numpy())
            if precision == "float32":
                np.testing.assert_array_equal(acts, sent["a"].numpy())

    check()
    assert outcomes["accepted"] >= 10 and outcomes["rejected"] >= 20, outcomes


# --------------------------------------------------------------------------- ACE-Sync
# The compressed-update wrapper (ACE-Sync and its baselines) on GLOBAL's 9
# parameters in groups of at most 8: every codec's decoder is reachable.
CODECS = (
    Option("full"),
    Option("topk", 0.5),
    Option("sign"),
    Option("defer"),
    Option("int8"),
)
GROUPS = 2  # w: 6, b: 3


def _wrapper(rejected: list) -> CompressedUpdates:
    """The wrapper after sending round 1 to nodes 1 and 2 (no byte limit)."""
    strategy = CompressedUpdates(
        FedAvg(min_available_nodes=1),
        codecs=CODECS,
        chunk=8,
        on_reject=lambda r, n, why: rejected.append((r, n, why)),
        max_examples=100,
    )
    strategy.set_arrays(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    strategy.prepare(1, [1, 2], ConfigRecord({"local-steps": 5}))
    return strategy


BUDGET = _wrapper([])._plans[1].budget


def _good_update() -> RecordDict:
    """An honest reply: every group in full, the update all ones."""
    payload = np.ones(9, np.float32).view(np.uint8)
    return RecordDict(
        {
            "update": ArrayRecord(
                {
                    "codecs": Array(np.zeros(GROUPS, np.uint8)),
                    "payload": Array(payload),
                }
            ),
            "metrics": MetricRecord(
                {
                    **dict.fromkeys(sorted(EDGE_METRICS), 0.0),
                    "num-examples": 10,
                    "steps": 5,
                    "bytes-budget": BUDGET,
                    "bytes-encoded": payload.size,
                }
            ),
        }
    )


COSTS, _ = option_table(CODECS, np.array([6, 3]))


@st.composite
def coded_payloads(draw):
    """A well-typed codec table and a payload of the length it implies, random
    bytes inside (NaN/Inf floats, out-of-range or repeated top-k indices, any
    sign bits, int8 levels and scales): what reaches the decoders themselves."""
    codes = draw(
        st.lists(st.integers(0, len(CODECS) - 1), min_size=GROUPS, max_size=GROUPS)
    )
    size = int(sum(COSTS[g, c] for g, c in enumerate(codes)))
    raw = draw(st.binary(min_size=size, max_size=size))
    return np.array(codes, np.uint8), np.frombuffer(raw, np.uint8).copy()


@st.composite
def update_records(draw):
    """The reply's update record: the honest one with parts replaced at random."""
    good = _good_update()["update"]
    parts = {"codecs": good["codecs"], "payload": good["payload"]}
    if draw(st.integers(0, 3)) == 0:  # the honest arrays, their bytes forged
        return ArrayRecord({k: draw(forged(a.numpy())) for k, a in parts.items()})
    if draw(st.integers(0, 2)) == 0:
        codes, payload = draw(coded_payloads())
        return ArrayRecord({"codecs": Array(codes), "payload": Array(payload)})
    if draw(st.booleans()):
        codes = draw(st.lists(st.integers(-1, 6), min_size=0, max_size=6))
        with np.errstate(all="ignore"):
            parts["codecs"] = Array(np.array(codes, np.int64).astype(draw(DTYPES)))
    if draw(st.booleans()):
        raw = draw(st.binary(min_size=0, max_size=160))
        parts["payload"] = Array(np.frombuffer(raw, np.uint8).copy())
    if draw(st.booleans()):
        parts[draw(KEYS)] = Array(draw(arrays()))
    if draw(st.booleans()):
        parts.pop(draw(st.sampled_from(["codecs", "payload"])))
    return ArrayRecord(parts)


@st.composite
def compressed_replies(draw):
    """An honest reply with its update, metrics or records tampered with."""
    content = _good_update()
    if draw(st.booleans()):
        content["update"] = draw(update_records())
        if "payload" in content["update"]:  # consistent, to reach the decoders
            size = math.prod(content["update"]["payload"].shape)  # as declared
            content["metrics"]["bytes-encoded"] = size
    if draw(st.booleans()):
        metrics = dict(content["metrics"])
        for key in draw(st.lists(st.sampled_from([*sorted(EDGE_METRICS), "x"]))):
            metrics[key] = draw(NUMBERS)
        if draw(st.booleans()):
            metrics.pop(draw(st.sampled_from(sorted(metrics))))
        content["metrics"] = MetricRecord(metrics)
    if draw(st.booleans()):
        content[draw(st.sampled_from(["update", "metrics", "extra"]))] = ConfigRecord(
            {"x": draw(SCALARS)}
        )
    return content


def test_compressed_aggregation_ignores_any_hostile_reply():
    outcomes: Counter = Counter()

    @FUZZ
    @given(hostile=compressed_replies())
    def check(hostile):
        rejected: list = []
        strategy = _wrapper(rejected)
        good = _reply(1, _good_update())
        arrays, _ = strategy.aggregate_train(1, [good, _reply(2, hostile)])
        assert arrays is not None
        assert strategy.stats.rejected == len(rejected)
        if rejected:  # dropped: the result is the honest reply's alone, no trace
            outcomes["rejected"] += 1
            assert len(rejected) == 1 and rejected[0][1] == 2 and rejected[0][2]
            for k, v in GLOBAL.items():
                np.testing.assert_array_equal(arrays[k].numpy(), np.ones_like(v))
            assert 2 not in strategy._caches
        else:  # it passed every check: a well-formed, finite update
            outcomes["accepted"] += 1
            for k in GLOBAL:
                assert np.isfinite(arrays[k].numpy()).all()

    check()
    assert outcomes["accepted"] >= 10 and outcomes["rejected"] >= 20, outcomes
