"""The wire contract: record keys and checks on what arrives in a message.

Everything that crosses the network is an ``ArrayRecord`` (numpy arrays),
``ConfigRecord`` or ``MetricRecord``; nothing is ever unpickled or evaluated.
Before a payload touches a model it is checked against the model it is meant
for: the same keys, shapes and dtypes, and only finite values. A bad payload
raises :class:`PayloadError`, which names the key and what was wrong.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

__all__ = [
    "KEY_ARRAYS",
    "KEY_CONFIG",
    "KEY_METRICS",
    "KEY_NODE",
    "PayloadError",
    "arrays_to_state_dict",
    "check_arrays",
    "get_record",
    "layout_of",
]

KEY_ARRAYS = "arrays"
KEY_CONFIG = "config"
KEY_METRICS = "metrics"
#: A reply's ConfigRecord describing the node (partition id, declared link).
#: Train-config key: SGD steps this round (FedAvg family).
KEY_LOCAL_STEPS = "local-steps"
KEY_NODE = "node"


class PayloadError(ValueError):
    """A message payload that does not match what the receiver expects."""


def get_record(content: RecordDict, key: str, kind: type) -> object:
    """``content[key]``, checked to be a record of type ``kind``."""
    if key not in content:
        raise PayloadError(f"missing record '{key}' (have: {sorted(content.keys())})")
    record = content[key]
    if not isinstance(record, kind):
        raise PayloadError(
            f"record '{key}' is a {type(record).__name__}, expected {kind.__name__}"
        )
    return record


def check_arrays(
    record: ArrayRecord, expected: Mapping[str, tuple[tuple[int, ...], str]]
) -> dict[str, np.ndarray]:
    """Check ``record`` against ``{key: (shape, dtype)}``; return its arrays.

    Raises
    ------
    PayloadError
        On missing or unknown keys, a shape or dtype mismatch, or NaN/Inf.
    """
    missing = sorted(set(expected) - set(record))
    unknown = sorted(set(record) - set(expected))
    if missing or unknown:
        raise PayloadError(f"array keys differ: missing {missing}, unknown {unknown}")
    out: dict[str, np.ndarray] = {}
    for key, (shape, dtype) in expected.items():
        array = record[key]
        if tuple(array.shape) != tuple(shape):
            raise PayloadError(
                f"array '{key}' has shape {tuple(array.shape)}, expected {tuple(shape)}"
            )
        if array.dtype != dtype:
            raise PayloadError(
                f"array '{key}' has dtype {array.dtype}, expected {dtype}"
            )
        values = array.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise PayloadError(f"array '{key}' holds NaN or Inf")
        out[key] = values
    return out


def layout_of(record: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` of a trusted record (e.g. the global model)."""
    return {key: (tuple(a.shape), a.dtype) for key, a in record.items()}


def arrays_to_state_dict(
    record: ArrayRecord, model: nn.Module
) -> dict[str, torch.Tensor]:
    """Turn an ArrayRecord into a state dict for ``model``, checking every entry.

    Raises
    ------
    PayloadError
        On missing or unknown keys, a shape or dtype mismatch, or NaN/Inf.
    """
    expected = {
        key: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for key, t in model.state_dict().items()
    }
    return {
        key: torch.from_numpy(np.ascontiguousarray(values))
        for key, values in check_arrays(record, expected).items()
    }
