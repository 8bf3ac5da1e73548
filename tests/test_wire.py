"""Incoming arrays are checked before they touch a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from tandem.models import build_model
from tandem.wire import PayloadError, arrays_to_state_dict, get_record


def _model():
    return build_model("cnn1d", (1, 40), 10)


def _record(model, **changes) -> ArrayRecord:
    arrays = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    arrays.update(changes)
    return ArrayRecord(
        {k: Array(np.asarray(v)) for k, v in arrays.items() if v is not None}
    )


def test_valid_record_round_trips():
    model = _model()
    state = arrays_to_state_dict(_record(model), model)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fc.bias": None}, "missing ['fc.bias']"),
        ({"extra": np.zeros(3, np.float32)}, "unknown ['extra']"),
        ({"fc.bias": np.zeros(11, np.float32)}, "'fc.bias' has shape (11,)"),
        ({"fc.bias": np.zeros(10, np.float64)}, "'fc.bias' has dtype float64"),
        ({"fc.bias": np.full(10, np.nan, np.float32)}, "'fc.bias' holds NaN or Inf"),
        ({"conv1.weight": np.full((32, 1, 5), np.inf, np.float32)}, "NaN or Inf"),
    ],
)
def test_bad_arrays_are_named(changes, message):
    model = _model()
    with pytest.raises(PayloadError) as info:
        arrays_to_state_dict(_record(model, **changes), model)
    assert message in str(info.value)


def test_get_record_checks_presence_and_type():
    content = RecordDict({"config": ConfigRecord({"a": 1})})
    with pytest.raises(PayloadError, match="missing record 'arrays'"):
        get_record(content, "arrays", ArrayRecord)
    with pytest.raises(PayloadError, match="is a ConfigRecord"):
        get_record(content, "config", ArrayRecord)
