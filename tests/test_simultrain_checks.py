"""SimulTrain's cloud-side check of activation replies (hostile input)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from tandem.strategies.simultrain import check_activations
from tandem.wire import PayloadError

CUT = (4, 5)


def _reply(version=3, rows=(2, 2), dtype=np.float32, labels=None, acts=None, **meta):
    n = sum(rows)
    a = acts if acts is not None else np.zeros((n, *CUT), dtype)
    y = labels if labels is not None else np.arange(n, dtype=np.int64) % 10
    return RecordDict(
        {
            "meta": ConfigRecord({"v-e": version, "base-v-c": 0, **meta}),
            "acts": ArrayRecord(
                {
                    "a": Array(a),
                    "y": Array(y),
                    "sizes": Array(np.array(rows, dtype=np.int64)),
                }
            ),
        }
    )


def _check(content):
    # expecting chunk 3 of 2 micro-batches, at most 8 rows, 10 classes
    return check_activations(content, 3, 2, CUT, "float32", 10, max_rows=8)


def test_a_valid_reply_passes():
    acts, labels, sizes = _check(_reply())
    assert acts.shape == (4, *CUT) and labels.tolist() == [0, 1, 2, 3]
    assert sizes.tolist() == [2, 2]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (_reply(version=2), "chunk version 2, expected 3"),  # replayed
        (_reply(version=9), "chunk version 9, expected 3"),  # from the future
        (_reply(dtype=np.float16), "dtypes a=float16"),
        (
            _reply(acts=np.zeros((4, 4, 6), np.float32)),
            "activations of shape (4, 4, 6)",
        ),
        (_reply(rows=(5, 5)), "activations of shape (10, 4, 5)"),  # oversized
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
