"""The centralized baseline's upload check: raw data arrives checked."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from tandem.strategies.centralized import check_upload
from tandem.wire import PayloadError


def _upload(x, y) -> RecordDict:
    return RecordDict({"data": ArrayRecord({"x": x, "y": y})})


def _x(rows: int = 3) -> np.ndarray:
    return np.linspace(-1, 1, rows * 40, dtype=np.float32).reshape(rows, 1, 40)


def test_an_honest_upload_is_returned_as_sent():
    x, y = _x(), np.array([0, 9, 4], np.int64)
    split = check_upload(_upload(Array(x), Array(y)), (1, 40), 10, max_rows=5)
    np.testing.assert_array_equal(split.x, x)
    np.testing.assert_array_equal(split.y, y)


def test_bytes_that_disagree_with_the_declaration_are_refused():
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(7))  # float64 (7,), declared int64 (3,)
    forged = Array(
        dtype="int64", shape=(3,), stype="numpy.ndarray", data=buffer.getvalue()
    )
    with pytest.raises(PayloadError, match="'y' declares int64 \\(3,\\) but its bytes"):
        check_upload(_upload(Array(_x()), forged), (1, 40), 10, max_rows=5)
