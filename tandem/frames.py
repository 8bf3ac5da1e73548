"""A binary frame for the streaming data plane: fixed header, then npy arrays.

Nothing is pickled or evaluated. A frame is, little-endian throughout::

    offset  size  field
    0       4     magic  b"TDMF"
    4       1     format version (1)
    5       1     kind (a small integer the protocol assigns)
    6       2     number of arrays n (uint16)
    8       8     seq     (int64: the frame's place in its direction, 0, 1, ...)
    16      24    ints    (3 x int64: the protocol's counters, e.g. versions)
    40      8     real    (float64: e.g. measured compute seconds)
    48      ...   n arrays, each: name length (uint16), name (UTF-8),
                  npy length (uint64), an ``.npy`` file (format 1.0)

Bytes per frame: 48 + Σ (2 + len(name) + 8 + npy header + data); the npy
header is 128 bytes for format 1.0 as numpy writes it, so a frame of one
array of ``d`` float32 values is about ``48 + 138 + len(name) + 4·d`` bytes.

:func:`decode_frame` trusts nothing it reads: every length is checked against
the bytes left and against ``max_bytes``, every array's npy header is parsed
without pickle (``allow_pickle=False``), its dtype must be a plain numeric one
of :data:`DTYPES`, its shape must fit :data:`MAX_NDIM` dimensions, and its data
must be exactly ``prod(shape)·itemsize`` bytes. Any violation raises
:class:`FrameError`; values (NaN/Inf, ranges) are the protocol's to check.
"""

from __future__ import annotations

import io
import math
import re
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "Frame",
    "FrameError",
    "decode_frame",
    "encode_frame",
]

MAGIC = b"TDMF"
FORMAT_VERSION = 1
#: magic, version, kind, array count, seq, 3 ints, real
HEADER = struct.Struct("<4sBBHqqqqd")
_NAME = struct.Struct("<H")
_LEN = struct.Struct("<Q")
#: dtypes a frame may carry (numpy ``str`` form); never object or structured ones.
DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "uint8", "int32", "int64", "bool"}
)
#: The same, as dtypes (a set lookup, without formatting each dtype's name).
_DTYPES = frozenset(np.dtype(name) for name in DTYPES)
MAX_NDIM = 8
MAX_ARRAYS = 1024
MAX_NAME = 256


class FrameError(ValueError):
    """Bytes that are not a well-formed frame (or one over the size bound)."""


@dataclass(frozen=True)
class Frame:
    """One frame: its kind, place, three counters, one real and named arrays."""

    kind: int
    seq: int = 0
    ints: tuple[int, int, int] = (0, 0, 0)
    real: float = 0.0
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)


#: npy 1.0 headers by ``(dtype, shape)``, as numpy writes them: a stream's
#: frames carry the same few shapes over and over, and numpy's header writer
#: (the ``repr`` of a dict, padded) took about as long as a small model's
#: forward pass per frame.
_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_HEADERS_MAX = 4096


def _npy_header_bytes(array: np.ndarray) -> bytes:
    """The npy 1.0 header numpy writes for the C-contiguous ``array``."""
    key = (array.dtype.str, array.shape)
    header = _HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, np.lib.format.header_data_from_array_1_0(array)
        )
        header = buf.getvalue()
        if len(_HEADERS) < _HEADERS_MAX:
            _HEADERS[key] = header
    return header


def _npy(array: np.ndarray) -> tuple[bytes, bytes]:
    """``array`` as an ``.npy`` file (format 1.0, as ``np.save`` writes it):
    ``(header, data)``."""
    array = np.ascontiguousarray(array)
    return _npy_header_bytes(array), array.tobytes()


def encode_frame(frame: Frame) -> bytes:
    """The frame's bytes (see the module docstring for the layout).

    Raises
    ------
    FrameError
        If an array's dtype is not in :data:`DTYPES` or a name is too long.
    """
    if len(frame.arrays) > MAX_ARRAYS:
        raise FrameError(f"{len(frame.arrays)} arrays, at most {MAX_ARRAYS}")
    parts = [
        HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            frame.kind,
            len(frame.arrays),
            frame.seq,
            *frame.ints,
            frame.real,
        )
    ]
    for name, array in frame.arrays.items():
        if array.dtype not in _DTYPES:
            raise FrameError(f"array '{name}' has dtype {array.dtype}")
        raw = name.encode()
        if len(raw) > MAX_NAME:
            raise FrameError(f"array name of {len(raw)} bytes, at most {MAX_NAME}")
        header, data = _npy(array)
        size = _LEN.pack(len(header) + len(data))
        parts += [_NAME.pack(len(raw)), raw, size, header, data]
    return b"".join(parts)


#: Held while numpy parses an npy header. The cloud checks frames and records
#: of many edges at once, one thread per stream, and a header parse raced with
#: another thread's was seen to fail with a SystemError on honest bytes; the
#: parse takes microseconds, so it is serialized (here and in tandem.wire).
NPY_HEADER_LOCK = threading.Lock()


#: An npy 1.0 header exactly as numpy writes it, e.g. ``{'descr': '<f4',
#: 'fortran_order': False, 'shape': (128, 32, 40), }`` padded with spaces to a
#: newline: read without numpy's parser (which evaluates the text with
#: ``ast.literal_eval``, a third of an edge's time per chunk on small models).
_NPY_V1 = b"\x93NUMPY\x01\x00"
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=]?[a-z][0-9]{1,2})', 'fortran_order': (False|True), "
    rb"'shape': \(((?:[0-9]{1,19}, )*[0-9]{0,19},?)\), \} *\n"
)
_NPY_HEADER_MAX = 1024
#: Headers parsed by the pattern above, by their exact bytes (a stream's
#: frames repeat a few of them); at most ``_HEADERS_MAX``.
_PARSED: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}


def _npy_header(data: memoryview) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of an npy 1.0 file.

    Numpy's own header layout is matched directly; anything else (another
    writer's spacing, a hostile header) goes through numpy's parser, which
    accepts or refuses it as before.

    Raises
    ------
    ValueError
        If the bytes are not an npy 1.0 header (numpy may raise other kinds).
    """
    head = bytes(data[:10])
    if len(head) == 10 and head[:8] == _NPY_V1:
        size = int.from_bytes(head[8:10], "little")
        text = bytes(data[10 : 10 + size])
        known = _PARSED.get(text)  # the same bytes parse the same way
        if known is not None:
            return known
        match = _NPY_HEADER.fullmatch(text)
        if size <= _NPY_HEADER_MAX and match is not None:
            descr, fortran, dims = match.groups()
            shape = tuple(int(d) for d in dims.split(b",") if d.strip())
            parsed = shape, fortran == b"True", np.dtype(descr.decode()), 10 + size
            if len(_PARSED) < _HEADERS_MAX:
                _PARSED[text] = parsed
            return parsed
    stream = io.BytesIO(data)
    with NPY_HEADER_LOCK:
        version = np.lib.format.read_magic(stream)
        if version != (1, 0):
            raise ValueError(f"npy format {version}, expected (1, 0)")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(
            stream, max_header_size=_NPY_HEADER_MAX
        )
    return shape, fortran, dtype, stream.tell()


def _read_npy(name: str, data: memoryview) -> np.ndarray:
    """One array from its ``.npy`` bytes, checked; a read-only view of ``data``."""
    try:
        shape, fortran, dtype, start = _npy_header(data)
    except Exception as err:  # numpy's parser raises many kinds on hostile bytes
        raise FrameError(f"array '{name}': bad npy header ({err})") from None
    if fortran or dtype not in _DTYPES or dtype.byteorder == ">":
        raise FrameError(f"array '{name}' has dtype {dtype} (fortran={fortran})")
    if len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise FrameError(f"array '{name}' has shape {shape}")
    count = math.prod(shape)
    if len(data) - start != count * dtype.itemsize:
        raise FrameError(
            f"array '{name}' of shape {shape} {dtype} holds {len(data) - start} "
            f"bytes, expected {count * dtype.itemsize}"
        )
    return np.frombuffer(data[start:], dtype=dtype, count=count).reshape(shape)


def decode_frame(data: bytes, max_bytes: int) -> Frame:
    """Parse and check a frame (see the module docstring).

    Parameters
    ----------
    data : bytes
        The frame as received.
    max_bytes : int
        The largest frame accepted (bytes).

    Raises
    ------
    FrameError
        Naming what is wrong: size, magic, version, a length that runs past
        the end, a duplicate or non-UTF-8 name, an npy header, dtype or shape.
    """
    if len(data) > max_bytes:
        raise FrameError(f"frame of {len(data)} bytes, at most {max_bytes}")
    if len(data) < HEADER.size:
        raise FrameError(f"frame of {len(data)} bytes, shorter than its header")
    magic, version, kind, count, seq, a, b, c, real = HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise FrameError(f"magic {magic!r} version {version}, expected {MAGIC!r} 1")
    if count > MAX_ARRAYS:
        raise FrameError(f"{count} arrays, at most {MAX_ARRAYS}")
    view = memoryview(data)
    pos = HEADER.size
    arrays: dict[str, np.ndarray] = {}
    for _ in range(count):
        if pos + _NAME.size > len(data):
            raise FrameError("frame ends inside an array name length")
        (size,) = _NAME.unpack_from(data, pos)
        pos += _NAME.size
        if size > MAX_NAME or pos + size + _LEN.size > len(data):
            raise FrameError("array name runs past the end of the frame")
        try:
            name = bytes(view[pos : pos + size]).decode()
        except UnicodeDecodeError:
            raise FrameError("array name is not UTF-8") from None
        if name in arrays:
            raise FrameError(f"array '{name}' appears twice")
        pos += size
        (length,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        if length > len(data) - pos:
            raise FrameError(f"array '{name}' runs past the end of the frame")
        arrays[name] = _read_npy(name, view[pos : pos + length])
        pos += length
    if pos != len(data):
        raise FrameError(f"{len(data) - pos} bytes after the last array")
    return Frame(kind, seq, (a, b, c), real, arrays)
