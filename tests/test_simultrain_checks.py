"""SimulTrain's cloud-side reader of activation replies (hostile input)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from tandem.protocol.simultrain import read_activations
from tandem.split import encode_cut
from tandem.wire import PayloadError

CUT = (4, 5)


def _reply(
    version=3, rows=(2, 2), dtype=np.float32, labels=None, acts=None, extra=None
):
    n = sum(rows)
    a = acts if acts is not None else np.zeros((n, *CUT), dtype)
    y = labels if labels is not None else np.arange(n, dtype=np.int64) % 10
    arrays = {
        "a": Array(a),
        "y": Array(y),
        "sizes": Array(np.array(rows, dtype=np.int64)),
    }
    arrays.update({k: Array(v) for k, v in (extra or {}).items()})
    return RecordDict(
        {
            "meta": ConfigRecord({"v-e": version, "base-v-c": 0}),
            "acts": ArrayRecord(arrays),
        }
    )


def _check(content, precision="float32"):
    # expecting chunk 3 of 2 micro-batches, at most 8 rows, 10 classes
    return read_activations(content, 3, 2, CUT, precision, 10, max_rows=8)


def test_a_valid_reply_passes():
    chunk = _check(_reply())
    assert chunk.acts.shape == (4, *CUT) and chunk.labels.tolist() == [0, 1, 2, 3]
    assert chunk.sizes.tolist() == [2, 2]


def test_int8_activations_decode_within_their_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *CUT)).astype(np.float32)
    encoded = encode_cut(x, "int8", "a")
    content = _reply(acts=encoded["a"], extra={"a-scale": encoded["a-scale"]})
    acts = _check(content, "int8").acts
    step = np.abs(x).reshape(4, -1).max(axis=1) / 127
    assert (np.abs(acts - x).reshape(4, -1) <= step[:, None] / 2 + 1e-7).all()


_SCALE = np.ones(4, np.float32)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (_reply(version=2), "chunk version 2, expected 3"),  # replayed
        (_reply(version=9), "chunk version 9, expected 3"),  # from the future
        (_reply(dtype=np.float16), "'a' is float16 (4, 4, 5), expected float32"),
        (
            _reply(acts=np.zeros((4, 4, 6), np.float32)),
            "'a' is float32 (4, 4, 6), expected float32 (4, 4, 5)",
        ),
        (_reply(rows=(5, 5)), "labels of shape (10,), expected (<= 8,)"),  # oversized
        (_reply(extra={"b": np.zeros(1)}), "activation keys ['a', 'b', 'sizes', 'y']"),
        (_reply(rows=(2, 2, 0)), "micro-batch sizes"),
        (_reply(acts=np.full((4, *CUT), np.nan, np.float32)), "NaN or Inf"),
        (_reply(labels=np.array([0, 1, 2, 10])), "labels outside [0, 10)"),
        (RecordDict({"meta": ConfigRecord({"v-e": 3})}), "missing record 'acts'"),
    ],
)
def test_hostile_replies_are_rejected_with_a_reason(content, reason):
    with pytest.raises(PayloadError) as info:
        _check(content)
    assert reason in str(info.value)


_Q = np.zeros((4, *CUT), np.int8)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({}, "expected a, a-scale, sizes, y"),
        ({"a-scale": np.ones(3, np.float32)}, "'a-scale' is float32 (3,)"),
        ({"a-scale": np.ones(4, np.float64)}, "'a-scale' is float64"),
        ({"a-scale": np.full(4, np.inf, np.float32)}, "finite and >= 0"),
        ({"a-scale": -_SCALE}, "finite and >= 0"),
    ],
)
def test_hostile_int8_scales_are_rejected(extra, reason):
    with pytest.raises(PayloadError) as info:
        _check(_reply(acts=_Q, extra=extra), "int8")
    assert reason in str(info.value)
