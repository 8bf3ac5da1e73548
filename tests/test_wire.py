"""Incoming arrays are checked before they touch a model."""

from __future__ import annotations

import io
import re
import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from tandem.models import build_model
from tandem.wire import (
    PayloadError,
    arrays_to_state_dict,
    check_arrays,
    check_values,
    get_record,
    layout_of,
    read_array,
)


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


# ----------------------------------------------------------------- bytes on the wire
# An Array is a declaration (dtype, shape) plus the bytes of an .npy file; a
# hostile or broken sender can make them disagree. These arrays are forged the
# way a raw message would carry them.


def _npy(values: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _forged(dtype: str, shape: tuple, data: bytes, stype: str = "numpy.ndarray"):
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def _header(descr: str, shape: tuple, version: tuple[int, int] = (1, 0)) -> bytes:
    """An .npy header alone (no data bytes after it)."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buffer, header)
    else:
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "values",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array([True, False]),
        np.array([-3, 7], np.int8),
        np.array([1.5, -2.25], np.float16),
        np.array([1 + 2j], np.complex64),
        np.zeros((0, 4), np.int64),
        np.array(3.5, np.float64),  # 0-d
        np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
    ],
)
def test_read_array_returns_exactly_what_was_sent(values):
    out = read_array(Array(values), "k", shape=values.shape, dtype=str(values.dtype))
    assert out.dtype == values.dtype and out.shape == values.shape
    np.testing.assert_array_equal(out, values)
    out[...] = 0  # a writable copy of its own
    assert out.flags.c_contiguous


def test_version_2_headers_are_read():
    data = _header("<f4", (2,), (2, 0)) + np.array([1, 2], "<f4").tobytes()
    out = read_array(_forged("float32", (2,), data), "k")
    np.testing.assert_array_equal(out, [1.0, 2.0])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        # the case: declares float32 (3,), carries float64 (7,)
        (
            _forged("float32", (3,), _npy(np.zeros(7))),
            "declares float32 (3,) but its bytes hold float64 (7,)",
        ),
        (_forged("float32", (2,), _npy(np.zeros(3, np.float32))), "hold float32 (3,)"),
        (_forged("float32", (3,), _npy(np.zeros(3, ">f4"))), "hold >f4 (3,)"),
        (
            _forged("float64", (2,), _npy(np.array([1, "a"], object), True)),
            "npy header dtype object is not a numeric dtype",
        ),
        (
            _forged("object", (2,), _npy(np.array([1, "a"], object), True)),
            "declared dtype object is not a numeric dtype",
        ),
        (_forged("<U3", (1,), _npy(np.array(["abc"]))), "is not a numeric dtype"),
        (_forged("f4,f4", (1,), b""), "is not a numeric dtype"),
        (_forged("floaty", (1,), b""), "declared dtype 'floaty' is not a dtype"),
        (_forged("float32", (-1,), b""), "declared shape (-1,) is not a shape"),
        (_forged("float32", (True,), b""), "is not a shape"),
        (
            _forged("float32", (1,), b"", stype="torch.Tensor"),
            "has stype 'torch.Tensor'",
        ),
        # truncated or padded data
        (_forged("float32", (3,), _npy(np.zeros(3, np.float32))[:-1]), "holds 11 data"),
        (
            _forged("float32", (3,), _npy(np.zeros(3, np.float32)) + b"\0"),
            "holds 13 data",
        ),
        # broken headers
        (_forged("float32", (3,), b""), "bad npy header"),
        (_forged("float32", (3,), _npy(np.zeros(3, np.float32))[:9]), "bad npy header"),
        (_forged("float32", (3,), b"\x93NUMPY\x01\x00\xff\xff{junk"), "bad npy header"),
        (_forged("float32", (3,), bytes(range(64))), "bad npy header"),
        (_forged("float32", (3,), b"\x93NUMPY\x03\x00" + b"\0" * 16), "version (3, 0)"),
    ],
)
def test_bytes_that_disagree_are_refused(array, message):
    with pytest.raises(PayloadError) as info:
        read_array(array, "k")
    assert message in str(info.value)
    assert str(info.value).startswith("array 'k'")


def test_a_size_bomb_is_refused_without_allocating():
    """A header claiming 8 TB is refused by arithmetic, not by running out of memory."""
    side = 10**12
    bomb = _forged("float64", (side,), _header("<f8", (side,)) + b"\0" * 16)
    tracemalloc.start()
    with pytest.raises(
        PayloadError, match="16 data bytes, its header implies 8000000000000"
    ):
        read_array(bomb, "k")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


def test_expectations_and_byte_limit():
    values = np.zeros((5, 3), np.float32)  # 60 bytes
    assert read_array(Array(values), "k", shape=(None, 3)).shape == (5, 3)
    assert read_array(Array(values), "k", max_bytes=60).shape == (5, 3)
    for kwargs, message in [
        ({"shape": (None, 4)}, "has shape (5, 3), expected (None, 4)"),
        ({"shape": (5, 3, 1)}, "has shape (5, 3), expected (5, 3, 1)"),
        ({"shape": (None,)}, "expected (None,)"),
        ({"dtype": "float64"}, "has dtype float32, expected float64"),
        ({"max_bytes": 59}, "of 60 bytes exceeds the 59 limit"),
    ]:
        with pytest.raises(PayloadError, match=re.escape(message)):
            read_array(Array(values), "k", **kwargs)


def test_check_arrays_reads_the_bytes_not_the_declaration():
    model = _model()
    record = _record(model)
    record["fc.bias"] = _forged("float32", (10,), _npy(np.zeros(20, np.float32)))
    with pytest.raises(
        PayloadError, match=re.escape("'fc.bias' declares float32 (10,)")
    ):
        arrays_to_state_dict(record, model)
    record["fc.bias"] = _forged("float32", (10,), _npy(np.zeros(10, object), True))
    with pytest.raises(
        PayloadError, match=re.escape("'fc.bias' npy header dtype object")
    ):
        arrays_to_state_dict(record, model)


def test_complex_nan_is_refused():
    with pytest.raises(PayloadError, match="'z' holds NaN or Inf"):
        check_arrays(
            ArrayRecord({"z": Array(np.array([np.nan + 0j], np.complex64))}),
            {"z": ((1,), "complex64")},
        )


def test_check_values_checks_arrays_already_read():
    layout = {"w": ((2, 3), "float32"), "n": ((4,), "int64")}
    good = {"n": np.arange(4), "w": np.ones((2, 3), np.float32)}
    out = check_values(good, layout)
    assert list(out) == ["w", "n"] and out["w"] is good["w"]  # no copy
    for arrays, message in [
        ({"w": good["w"]}, "missing ['n'], unknown []"),
        ({**good, "x": good["n"]}, "missing [], unknown ['x']"),
        ({**good, "w": np.ones((3, 2), np.float32)}, "'w' has shape (3, 2)"),
        ({**good, "w": np.ones((2, 3))}, "'w' has dtype float64, expected float32"),
        ({**good, "n": np.arange(4, dtype=np.int32)}, "'n' has dtype int32"),
        ({**good, "w": np.full((2, 3), np.inf, np.float32)}, "'w' holds NaN"),
    ]:
        with pytest.raises(PayloadError, match=re.escape(message)):
            check_values(arrays, layout)


def test_get_record_returns_the_record():
    record = ConfigRecord({"a": 1})
    assert get_record(RecordDict({"config": record}), "config", ConfigRecord) is record


def test_layout_of_a_trusted_record():
    record = ArrayRecord(
        {"w": Array(np.zeros((2, 3), np.float32)), "n": Array(np.zeros(4, np.int64))}
    )
    assert layout_of(record) == {"w": ((2, 3), "float32"), "n": ((4,), "int64")}


def test_read_array_messages_name_the_type_and_the_header():
    # data that is not bytes is named by its type; numpy's own header error is
    # named by its class; a header shape numpy accepts but is negative is refused
    # by our own shape check, which says it came from the npy header
    not_bytes = Array(np.zeros(2, np.float32))
    not_bytes.data = "abcd"
    with pytest.raises(PayloadError, match=r"^array 'k' data is a str, not bytes$"):
        read_array(not_bytes, "k")
    with pytest.raises(
        PayloadError, match=r"^array 'k': bad npy header \(ValueError\)$"
    ):
        read_array(_forged("float32", (3,), b""), "k")
    negative = _forged("float32", (1,), _header("<f4", (-1,)) + b"\0" * 4)
    message = "array 'k' npy header shape (-1,) is not a shape"
    with pytest.raises(PayloadError, match=f"^{re.escape(message)}$"):
        read_array(negative, "k")
