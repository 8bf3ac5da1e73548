"""The stream's frame format: round trips, and hostile bytes are only refused."""

from __future__ import annotations

import contextlib
import io
import struct

import numpy as np
import pytest

from tandem.frames import HEADER, Frame, FrameError, decode_frame, encode_frame

LIMIT = 1 << 20


def _frame() -> Frame:
    return Frame(
        kind=2,
        seq=7,
        ints=(3, -1, 2**40),
        real=0.125,
        arrays={
            "a": np.arange(12, dtype=np.float32).reshape(3, 4),
            "a-scale": np.array([1.0, 2.0, 3.0], np.float32),
            "y": np.array([0, 9, 4], np.int64),
            "h": np.array([[1, -2]], np.float16),
            "q": np.array([-127, 0, 127], np.int8),
            "empty": np.zeros((0, 5), np.float32),
            "scalar": np.array(3.5),
            "delta/conv.weight": np.ones((2, 1, 3), np.float32),
        },
    )


def test_round_trip_keeps_every_field_and_array():
    frame = _frame()
    back = decode_frame(encode_frame(frame), LIMIT)
    assert (back.kind, back.seq, back.ints, back.real) == (2, 7, (3, -1, 2**40), 0.125)
    assert list(back.arrays) == list(frame.arrays)
    for name, array in frame.arrays.items():
        assert back.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(back.arrays[name], array)


def test_layout_is_the_documented_one():
    data = encode_frame(Frame(kind=3, seq=1, ints=(4, 5, 6), real=1.5))
    assert len(data) == HEADER.size == 48
    assert data[:4] == b"TDMF" and data[4] == 1 and data[5] == 3
    assert struct.unpack_from("<H4qd", data, 6) == (0, 1, 4, 5, 6, 1.5)


def test_an_object_array_is_neither_sent_nor_unpickled():
    with pytest.raises(FrameError, match="dtype object"):
        encode_frame(Frame(1, arrays={"x": np.array([{}], dtype=object)}))
    # a hand-made frame whose npy holds a pickled object array
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([1, "x"], dtype=object), allow_pickle=True)
    npy = buf.getvalue()
    data = (
        HEADER.pack(b"TDMF", 1, 2, 1, 0, 0, 0, 0, 0.0)
        + struct.pack("<H", 1)
        + b"x"
        + struct.pack("<Q", len(npy))
        + npy
    )
    with pytest.raises(FrameError, match="dtype object"):
        decode_frame(data, LIMIT)


def test_big_endian_and_fortran_arrays_are_refused():
    good = encode_frame(Frame(1, arrays={"x": np.ones(3, np.float32)}))
    assert b"'<f4'" in good
    with pytest.raises(FrameError, match="dtype"):
        decode_frame(good.replace(b"'<f4'", b"'>f4'"), LIMIT)
    good2 = encode_frame(Frame(1, arrays={"x": np.ones((2, 2), np.float32)}))
    with pytest.raises(FrameError, match="fortran=True"):
        decode_frame(
            good2.replace(b"'fortran_order': False", b"'fortran_order': True "), LIMIT
        )


def test_every_truncation_is_refused():
    data = encode_frame(_frame())
    for end in range(len(data)):
        with pytest.raises(FrameError):
            decode_frame(data[:end], LIMIT)


def test_trailing_bytes_and_oversize_are_refused():
    data = encode_frame(_frame())
    with pytest.raises(FrameError, match="after the last array"):
        decode_frame(data + b"\0", LIMIT)
    with pytest.raises(FrameError, match=f"at most {len(data) - 1}"):
        decode_frame(data, len(data) - 1)


def test_wrong_lengths_are_refused():
    x = np.ones(4, np.float32)
    data = bytearray(encode_frame(Frame(1, arrays={"x": x})))
    at = HEADER.size + 2 + 1  # the npy length of the only array
    (npy_len,) = struct.unpack_from("<Q", data, at)
    for wrong in (npy_len + 1, npy_len + 10**12, 2**64 - 1):
        bad = bytearray(data)
        struct.pack_into("<Q", bad, at, wrong)
        with pytest.raises(FrameError, match="runs past the end"):
            decode_frame(bytes(bad), LIMIT)
    # shorter npy length: the data no longer matches the header's shape
    bad = bytearray(data)
    struct.pack_into("<Q", bad, at, npy_len - 4)
    with pytest.raises(FrameError):
        decode_frame(bytes(bad), LIMIT)
    # a shape that claims more data than there is
    with pytest.raises(FrameError, match="holds 16 bytes, expected 20"):
        decode_frame(bytes(data).replace(b"(4,)", b"(5,)"), LIMIT)
    # more arrays announced than present
    bad = bytearray(data)
    struct.pack_into("<H", bad, 6, 2)
    with pytest.raises(FrameError):
        decode_frame(bytes(bad), LIMIT)


def test_bad_magic_version_and_duplicate_names_are_refused():
    data = encode_frame(Frame(1, arrays={"x": np.ones(1, np.int64)}))
    with pytest.raises(FrameError, match="magic"):
        decode_frame(b"XXXX" + data[4:], LIMIT)
    with pytest.raises(FrameError, match="version 9"):
        decode_frame(data[:4] + b"\x09" + data[5:], LIMIT)
    one = data[HEADER.size :]
    twice = HEADER.pack(b"TDMF", 1, 1, 2, 0, 0, 0, 0, 0.0) + one + one
    with pytest.raises(FrameError, match="appears twice"):
        decode_frame(twice, LIMIT)


def test_nan_passes_the_frame_for_the_protocol_to_refuse():
    # values are the protocol's to check (tests/test_simultrain_stream.py)
    x = np.array([np.nan, np.inf], np.float32)
    back = decode_frame(encode_frame(Frame(2, arrays={"a": x})), LIMIT)
    assert np.isnan(back.arrays["a"][0]) and np.isinf(back.arrays["a"][1])


# numpy's header parser (the fallback for headers not in numpy's own layout)
# compiles a hostile header as Python, which may warn about its escapes; the
# frame is still refused
@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
def test_random_bytes_only_ever_raise_frame_error():
    rng = np.random.default_rng(0)
    good = encode_frame(_frame())
    for i in range(3000):
        if i % 2:  # pure noise, sometimes behind a valid header
            body = rng.integers(0, 256, rng.integers(0, 400), dtype=np.uint8).tobytes()
            data = (good[: HEADER.size] if i % 4 == 1 else b"") + body
        else:  # a valid frame with a few bytes flipped
            data = bytearray(good)
            for at in rng.integers(0, len(data), rng.integers(1, 6)):
                data[at] = rng.integers(0, 256)
            data = bytes(data)
        with contextlib.suppress(FrameError):  # anything else fails the test
            decode_frame(data, LIMIT)


def _npy_bytes(array: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((), "float32"),
        ((1,), "int8"),
        ((128, 32, 40), "int8"),
        ((0, 3), "float64"),
        ((7,), "bool"),
        ((2, 3, 4, 5), "uint8"),
        ((3,), ">f4"),
        ((2, 2), "complex64"),
    ],
)
def test_numpys_own_headers_are_read_without_numpys_parser(monkeypatch, shape, dtype):
    from tandem import frames

    raw = _npy_bytes(np.zeros(shape, dtype=dtype))
    buf = io.BytesIO(raw)
    np.lib.format.read_magic(buf)
    expected = np.lib.format.read_array_header_1_0(buf)
    offset = buf.tell()

    def refuse(*args, **kwargs):
        raise AssertionError("numpy's header parser was called")

    monkeypatch.setattr(np.lib.format, "read_array_header_1_0", refuse)
    got = frames._npy_header(memoryview(raw))
    assert got[:3] == expected and got[3] == offset


def test_other_npy_headers_go_through_numpys_parser_and_its_checks():
    from tandem import frames

    raw = _npy_bytes(np.arange(6, dtype=np.int32).reshape(2, 3))
    size = struct.unpack("<H", raw[8:10])[0]
    header = raw[10 : 10 + size]
    # another writer's spacing: still an npy 1.0 header, read by numpy
    spaced = header.replace(b"'shape': (2, 3)", b"'shape':(2,3)")
    spaced = spaced[:-1].ljust(size - 1) + b"\n"
    assert frames._npy_header(memoryview(raw[:10] + spaced + raw[10 + size :]))[:3] == (
        (2, 3),
        False,
        np.dtype("int32"),
    )
    # a text dtype is not numpy's numeric layout: numpy reads it, the frame
    # refuses it
    text = _npy_bytes(np.array(["ab"]))
    assert frames._npy_header(memoryview(text))[2] == np.dtype("<U2")
    # format 2.0 and a header longer than its limit are refused
    with pytest.raises(ValueError, match="npy format"):
        frames._npy_header(memoryview(_npy_bytes(np.zeros(2), version=(2, 0))))
    long = raw[:8] + struct.pack("<H", 2000) + header.ljust(1999) + b"\n"
    with pytest.raises(ValueError):
        frames._npy_header(memoryview(long))
    # a header that claims more bytes than there are cannot hide a short one
    frame = Frame(kind=1, seq=0, arrays={"a": np.zeros(4, np.float32)})
    data = bytearray(encode_frame(frame))
    at = data.index(b"\x93NUMPY")
    data[at + 8 : at + 10] = struct.pack("<H", size + 64)
    with pytest.raises(FrameError, match="array 'a'"):
        decode_frame(bytes(data), 1 << 20)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.arange(6, dtype=np.float16).reshape(2, 3)[:, ::2],  # not contiguous
        np.array(3.0),  # 0-d: sent as (1,), as before
        np.zeros((0, 3), np.int64),
        np.array([True, False]),
        np.full((128, 32), -7, np.int8),
    ],
)
def test_arrays_are_written_as_numpy_writes_them(array):
    expected = io.BytesIO()
    np.lib.format.write_array(
        expected, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False
    )
    for _ in range(2):  # the header's second use comes from the cache
        frame = encode_frame(Frame(kind=1, arrays={"x": array}))
        assert frame[HEADER.size + 2 + 1 + 8 :] == expected.getvalue()
        (back,) = decode_frame(frame, 1 << 20).arrays.values()
        assert np.array_equal(back, np.ascontiguousarray(array))


def test_a_header_read_twice_reads_the_same_and_others_their_own():
    # headers are remembered by their bytes: (2, 3) and (3, 2) have headers
    # of the same length, which a cache keyed by anything less would confuse
    for _ in range(2):
        for shape in ((2, 3), (3, 2), (6,)):
            array = np.arange(6, dtype=np.float32).reshape(shape)
            frame = encode_frame(Frame(kind=1, arrays={"x": array}))
            (back,) = decode_frame(frame, 1 << 20).arrays.values()
            assert back.shape == shape and np.array_equal(back, array)
