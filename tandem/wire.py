"""The wire contract: record keys and checks on what arrives in a message.

Everything that crosses the network is an ``ArrayRecord`` (numpy arrays),
``ConfigRecord`` or ``MetricRecord``; nothing is ever unpickled or evaluated.
Before a payload touches a model it is checked against the model it is meant
for: the same keys, shapes and dtypes, and only finite values. A bad payload
raises :class:`PayloadError`, which names the key and what was wrong.

An :class:`~flwr.app.Array` carries a declaration (``dtype``, ``shape``) and
the bytes of an ``.npy`` file (``data``); nothing makes them agree. Every
array that arrives is therefore read by :func:`read_array`, which parses the
``.npy`` header itself (no pickle), refuses object and other non-numeric
dtypes, checks that the header's dtype and shape equal the declaration (and
what the receiver expects), and that the bytes after the header are exactly
``prod(shape) · itemsize`` long, before it builds the array. A header that
claims a huge shape is refused by that arithmetic, without allocating.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import nn

from tandem.frames import NPY_HEADER_LOCK

__all__ = [
    "KEY_ARRAYS",
    "KEY_CONFIG",
    "KEY_METRICS",
    "KEY_NODE",
    "PayloadError",
    "arrays_to_state_dict",
    "check_arrays",
    "check_values",
    "get_record",
    "layout_of",
    "read_array",
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


R = TypeVar("R")

#: The dtype kinds an array on the wire may have: bool, signed and unsigned
#: integers, floats and complex numbers (never objects, strings or records).
NUMERIC_KINDS = frozenset("biufc")
#: ``Array.stype`` of numpy-serialized arrays (the only kind accepted).
NUMPY_STYPE = "numpy.ndarray"
#: Largest ``.npy`` header read (numpy's own default limit).
MAX_HEADER_BYTES = 10_000


def get_record(content: RecordDict, key: str, kind: type[R]) -> R:
    """``content[key]``, checked to be a record of type ``kind``."""
    if key not in content:
        raise PayloadError(f"missing record '{key}' (have: {sorted(content.keys())})")
    record = content[key]
    if not isinstance(record, kind):
        raise PayloadError(
            f"record '{key}' is a {type(record).__name__}, expected {kind.__name__}"
        )
    return record


def _wire_dtype(value: object, what: str) -> np.dtype:
    """``np.dtype(value)`` for a numeric dtype; else :class:`PayloadError`."""
    try:
        dtype = np.dtype(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, SyntaxError):
        raise PayloadError(f"{what} dtype {value!r} is not a dtype") from None
    if dtype.hasobject or dtype.kind not in NUMERIC_KINDS or dtype.fields:
        raise PayloadError(f"{what} dtype {dtype} is not a numeric dtype")
    return dtype


def _wire_shape(value: object, what: str) -> tuple[int, ...]:
    """``value`` as a shape of non-negative ints; else :class:`PayloadError`."""
    if not isinstance(value, tuple | list) or not all(
        isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 0
        for d in value
    ):
        raise PayloadError(f"{what} shape {value!r} is not a shape")
    return tuple(int(d) for d in value)


def read_array(
    array: Array,
    key: str,
    *,
    shape: tuple[int | None, ...] | None = None,
    dtype: str | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """The ndarray an incoming ``Array`` holds, checked byte by byte.

    Steps: (1) the declaration is a numeric dtype and a shape, and matches
    ``dtype`` and ``shape`` if given (``None`` in ``shape`` matches any
    length); (2) ``data`` starts with an ``.npy`` magic string and a header of
    version 1.0 or 2.0, parsed without pickle; (3) the header's dtype and
    shape equal the declaration; (4) the ``prod(shape) · itemsize`` bytes it
    implies are at most ``max_bytes`` and exactly the bytes that follow the
    header. Only then is the array built (a copy, so it is writable).

    Parameters
    ----------
    array : Array
        As it came out of a message.
    key : str
        Its name, for the error message.
    shape : tuple of int or None, optional
        The shape the receiver expects (``None`` for any length on an axis).
    dtype : str, optional
        The dtype the receiver expects.
    max_bytes : int, optional
        The most data bytes the receiver accepts.

    Raises
    ------
    PayloadError
        On any disagreement between declaration, header, bytes and
        expectation; on object or other non-numeric dtypes; on a header that
        cannot be parsed; on a size over ``max_bytes``.
    """
    what = f"array '{key}'"
    if array.stype != NUMPY_STYPE:
        raise PayloadError(f"{what} has stype {array.stype!r}")
    declared_dtype = _wire_dtype(array.dtype, f"{what} declared")
    declared_shape = _wire_shape(array.shape, f"{what} declared")
    if shape is not None and (
        len(declared_shape) != len(shape)
        or any(
            e is not None and e != d for d, e in zip(declared_shape, shape, strict=True)
        )
    ):
        raise PayloadError(
            f"{what} has shape {declared_shape}, expected {tuple(shape)}"
        )
    if dtype is not None and declared_dtype != np.dtype(dtype):
        raise PayloadError(f"{what} has dtype {declared_dtype}, expected {dtype}")
    data = array.data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadError(f"{what} data is a {type(data).__name__}, not bytes")
    stream = io.BytesIO(data)
    try:
        with NPY_HEADER_LOCK:  # numpy's header parse is not safe across threads
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(stream, MAX_HEADER_BYTES)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(stream, MAX_HEADER_BYTES)
            else:
                raise PayloadError(f"{what} has npy version {version}")
    except PayloadError:
        raise
    except Exception as err:  # numpy raises ValueError, SyntaxError, ...
        raise PayloadError(f"{what}: bad npy header ({type(err).__name__})") from None
    header_shape, fortran_order, header_dtype = header
    header_shape = _wire_shape(header_shape, f"{what} npy header")
    header_dtype = _wire_dtype(header_dtype, f"{what} npy header")
    if header_dtype != declared_dtype or header_shape != declared_shape:
        raise PayloadError(
            f"{what} declares {declared_dtype} {declared_shape} but its bytes "
            f"hold {header_dtype} {header_shape}"
        )
    count = math.prod(header_shape)  # Python ints: no overflow
    nbytes = count * header_dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise PayloadError(f"{what} of {nbytes} bytes exceeds the {max_bytes} limit")
    offset = stream.tell()
    if len(data) - offset != nbytes:
        raise PayloadError(
            f"{what} holds {len(data) - offset} data bytes, its header implies {nbytes}"
        )
    flat = np.frombuffer(data, dtype=header_dtype, count=count, offset=offset)
    order = "F" if fortran_order else "C"
    return flat.reshape(header_shape, order=order).copy(order="C")


def _same_keys(have: Iterable[str], expected: Mapping[str, object]) -> None:
    have = set(have)
    missing = sorted(set(expected) - have)
    unknown = sorted(have - set(expected))
    if missing or unknown:
        raise PayloadError(f"array keys differ: missing {missing}, unknown {unknown}")


def check_values(
    arrays: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[tuple[int, ...], str]],
) -> dict[str, np.ndarray]:
    """Check arrays already read against ``{key: (shape, dtype)}``.

    For arrays whose bytes were checked when they were read (by
    :func:`read_array`, or by :func:`tandem.frames.decode_frame` on a
    stream frame): the same keys, each array's shape and dtype, and only
    finite values. Returns them in ``expected``'s order.

    Raises
    ------
    PayloadError
        On missing or unknown keys, a shape or dtype mismatch, or NaN/Inf.
    """
    _same_keys(arrays, expected)
    out: dict[str, np.ndarray] = {}
    for key, (shape, dtype) in expected.items():
        values = arrays[key]
        if values.shape != tuple(shape):
            raise PayloadError(
                f"array '{key}' has shape {values.shape}, expected {tuple(shape)}"
            )
        if values.dtype != np.dtype(dtype):
            raise PayloadError(
                f"array '{key}' has dtype {values.dtype}, expected {dtype}"
            )
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            raise PayloadError(f"array '{key}' holds NaN or Inf")
        out[key] = values
    return out


def check_arrays(
    record: ArrayRecord, expected: Mapping[str, tuple[tuple[int, ...], str]]
) -> dict[str, np.ndarray]:
    """Check ``record`` against ``{key: (shape, dtype)}``; return its arrays.

    Every array is read by :func:`read_array`: its bytes must agree with
    its declaration and with ``expected``; then :func:`check_values`.

    Raises
    ------
    PayloadError
        On missing or unknown keys, a shape or dtype mismatch (declared or in
        the bytes), a malformed or object-dtype npy, or NaN/Inf.
    """
    _same_keys(record, expected)
    read = {
        key: read_array(record[key], key, shape=tuple(shape), dtype=dtype)
        for key, (shape, dtype) in expected.items()
    }
    return check_values(read, expected)


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
