"""Per-group codecs: what one parameter group costs on the wire and keeps.

Numpy, and one compiled loop for the int8 encoder's element-wise passes
(:mod:`.kernels`); no Flower imports. ACE-Sync (seed 004) sends each
parameter group in one of six forms, picked per group by the knapsack
(:mod:`.knapsack`):

========  =====================================  ==========================
codec     payload (key: dtype, shape)            bytes for ``n`` elements
========  =====================================  ==========================
full      ``values``: float32 ``(n,)``           ``4·n``
half      ``values``: float16 ``(n,)``           ``2·n``
int8      ``levels``: int8 ``(n,)``,             ``n + 4``
          ``scale``: float32 ``(1,)``
sign      ``signs``: uint8 ``(⌈n/8⌉,)``,         ``⌈n/8⌉ + 4``
          ``scale``: float32 ``(1,)``
topk      ``indices``: uint32 ``(k,)``,          ``8·k``
          ``values``: float32 ``(k,)``
defer     nothing                                ``0``
========  =====================================  ==========================

A payload is a plain ``dict[str, np.ndarray]`` (it goes into a Flower
``ArrayRecord``; nothing is pickled). :func:`decode` trusts nothing in it:
keys, dtypes, lengths, index ranges, duplicates and finiteness are checked and
a :class:`CodecError` names what was wrong.

Sign codec and seed eq. 6
-------------------------
Eq. 6 is ``Q(g) = sign(g)·‖g‖₂·q`` with ``q`` a "quantized scale factor". We
send one bit per element and one float32 scale ``a = ‖g‖₂·q`` per group, and
choose ``a`` as the least-squares best scale for the sign vector ``s``:
``argmin_a ‖g − a·s‖² = ⟨g, s⟩ / n = mean|g|``, i.e. ``q = ‖g‖₁ / (n·‖g‖₂)``.
The "norm-preserving" choice ``q = 1/√n`` (``a = ‖g‖₂/√n``, the RMS) gives
``‖Q(g)‖₂ = ‖g‖₂`` but overshoots: its relative error is ``2·(1 − ρ)`` against
``1 − ρ²`` for the mean, with ``ρ = ‖g‖₁ / (√n·‖g‖₂) ∈ (0, 1]``. The two agree
(and are exact) when all ``|g_j|`` are equal. Zero elements decode as
``+a``.

Int8 codec: eq. 6 with a quantized factor per element
------------------------------------------------------
Eq. 6 leaves open how finely ``q`` is quantized. With one ``q`` per group it
is the sign codec above; with one per element, ``Q(g)_j = sign(g_j)·a·q_j``
and ``q_j ∈ {0, 1/127, …, 1}``, it is the multi-level form of QSGD (Alistarh
et al., 2017), sent as one int8 level ``sign(g_j)·127·q_j`` per element and
one float32 scale ``a`` per group. We take ``a = ‖g‖_∞`` (not ``‖g‖₂``:
against the 2-norm almost every entry of a long group would fall into the
lowest levels) and round to the nearest level, deterministically: error
feedback (eq. 7) carries the rounding error to the next round, so the
unbiasedness of QSGD's random rounding is not needed. The receiver decodes
``level_j · (a / 127)`` in float32.

Fidelity (knapsack values)
--------------------------
:func:`fidelity` is the expected fraction of a group's energy that survives,
``1 − E‖g − dec(enc(g))‖² / E‖g‖²``, under a Laplace model of the entries of
an update (heavy-tailed, as gradient entries are):

- full: 1.
- half: 0.999. Float16 rounding alone keeps ``1 − 2⁻²²/3 ≈ 1 − 10⁻⁷`` for
  normal-range values, but entries below 6.1e-5 (common in updates) fall in
  float16's subnormal range and lose relative precision; 0.999 is a
  deliberately conservative round figure.
- int8: 0.998. Rounding to steps ``Δ = ‖g‖_∞/127`` loses ``Δ²/12`` per
  element; for ``n`` Laplace entries of scale ``b`` (``E g² = 2b²``,
  ``‖g‖_∞ ≈ b·(ln n + 0.58)``) that is a fraction ``1 − 10⁻⁴`` kept at
  ``n = 256``. A single outlier stretches the range, so we take a round
  figure ten times more pessimistic, just below half's.
- sign: ``ρ² = (E|g|)² / E[g²] = 1/2`` for Laplace entries (2/π for Gaussian).
- topk at ratio ``r``: the energy in the top ``r`` fraction of Laplace entries,
  ``r·(1 + L + L²/2)`` with ``L = ln(1/r)``; increasing and concave in ``r``,
  1 at ``r = 1`` (Gaussian entries would keep less, e.g. 0.44 vs 0.60 at
  ``r = 0.1``).
- defer: 0.

Codec registry
--------------
A codec is one :class:`Codec` subclass (its payload layout and lengths, byte
size, fidelity, encode, decode and value checks) and one entry in
:data:`REGISTRY` (:func:`register`). Everything else reads the registry: the
knapsack's cost table (:func:`option_table`), the packed wire format
(:mod:`.packing`), the codec-list parser (:func:`parse_codecs`) and the rule
text of ``acesync-codecs`` (:func:`codec_rule`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np

from tandem.compression.int8 import int8_levels, int8_values
from tandem.compression.rows import get_rows, put_rows

__all__ = [
    "DEFAULT_OPTIONS",
    "FIDELITY_HALF",
    "FIDELITY_INT8",
    "FIDELITY_SIGN",
    "REGISTRY",
    "Codec",
    "CodecError",
    "Option",
    "RowError",
    "codec_for",
    "codec_rule",
    "decode",
    "encode",
    "encoded_nbytes",
    "fidelity",
    "format_codecs",
    "int8_levels",
    "int8_values",
    "option_table",
    "parse_codecs",
    "payload_keys",
    "payload_lengths",
    "register",
    "topk_count",
    "unregister",
]

#: Expected fidelity of float16 (conservative; see the module docstring).
FIDELITY_HALF = 0.999
#: Expected fidelity of int8 levels with the max-|g| scale (conservative).
FIDELITY_INT8 = 0.998
#: Expected fidelity of sign·scale with the mean-|g| scale, Laplace entries.
FIDELITY_SIGN = 0.5

_F16_MAX = float(np.finfo(np.float16).max)
_MAX_SIZE = 2**32  # indices travel as uint32


class CodecError(ValueError):
    """A payload (or codec request) that cannot be encoded or decoded as asked."""


class RowError(CodecError):
    """A bad payload among many decoded at once (:meth:`Codec.decode_rows`).

    Attributes
    ----------
    row : int
        The row (group among those decoded together) that was bad.
    reason : str
        What was wrong, as :func:`decode` would say it.
    """

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(f"row {row}: {reason}")
        self.row = int(row)
        self.reason = reason


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise CodecError(f"size must be an integer, got {size!r}")
    if not 0 <= size < _MAX_SIZE:
        raise CodecError(f"size must satisfy 0 <= size < 2**32, got {size}")
    return int(size)


def _as_vector(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise CodecError(f"x must be 1-D, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise CodecError(f"x must hold real numbers, got dtype {x.dtype}")
    with np.errstate(over="ignore"):  # overflow is reported just below
        x = x.astype(np.float32, copy=False)
    _check_size(x.size)
    if not np.isfinite(x).all():
        raise CodecError("x holds NaN or Inf (after conversion to float32)")
    return x


def wire_dtype(dtype: np.dtype) -> np.dtype:
    """The little-endian form of ``dtype`` that travels on the wire."""
    return np.dtype(dtype).newbyteorder("<")


# --------------------------------------------------------------------------- base
class Codec:
    """One way to encode a parameter group; subclass and :func:`register` it.

    A codec states its payload layout (:attr:`layout`: array key → dtype, in
    wire order), how many elements each array holds for a group of ``n``
    (:meth:`lengths`, vectorized over ``n``), its modelled fidelity, and how
    to encode and decode one group. The byte size follows from the layout
    and the lengths (:meth:`nbytes`). The generic checks of a received payload
    (keys, dtypes, 1-D, finite floats, exact lengths unless
    :attr:`variable_length`) are done by :func:`decode`; :meth:`check` adds
    the codec's own value rules. :meth:`encode_rows` and :meth:`decode_rows`
    encode and decode many groups of one size at once (the defaults loop
    over :meth:`encode` and :func:`decode`; a codec may vectorize them,
    giving the same bytes and values).

    Attributes
    ----------
    name : str
        The codec's name in codec lists (``acesync-codecs``) and messages.
    takes_ratio : bool
        Whether an option of this codec carries a ratio (``name@ratio``).
    variable_length : bool
        Whether a payload may hold fewer elements than :meth:`lengths` says
        (:meth:`check` then bounds them).
    layout : dict[str, np.dtype]
        Payload arrays and their dtypes, in wire order.
    kernel : str or None
        The compiled loop of :mod:`.kernels` that :meth:`encode_groups` runs
        (the codec's steps group by group, the same bytes and values), or
        None to gather rows for :meth:`encode_rows`.
    """

    name: ClassVar[str]
    takes_ratio: ClassVar[bool] = False
    variable_length: ClassVar[bool] = False
    layout: ClassVar[dict[str, np.dtype]]
    kernel: ClassVar[str | None] = None

    @property
    def spelling(self) -> str:
        """How an option of this codec is written in a codec list."""
        return f"{self.name}@<ratio in (0, 1]>" if self.takes_ratio else self.name

    def check_ratio(self, ratio: float | None) -> None:
        """Raise :class:`CodecError` unless ``ratio`` fits this codec."""
        if self.takes_ratio:
            if ratio is None or not (0.0 < float(ratio) <= 1.0):
                raise CodecError(
                    f"{self.name} needs a ratio with 0 < ratio <= 1, got {ratio!r}"
                )
        elif ratio is not None:
            raise CodecError(f"codec {self.name!r} takes no ratio, got {ratio!r}")

    def lengths(self, sizes: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        """Elements of each payload array for groups of ``sizes`` (int64)."""
        raise NotImplementedError

    def nbytes(self, sizes: np.ndarray, ratio: float | None) -> np.ndarray:
        """Payload bytes for groups of ``sizes``: ``Σ_key length·itemsize``."""
        total = np.zeros_like(sizes, dtype=np.int64)
        for key, count in self.lengths(sizes, ratio).items():
            total = total + count * self.layout[key].itemsize
        return total

    def fidelity(self, ratio: float | None) -> float:
        """Expected fraction of a group's energy kept (knapsack value)."""
        raise NotImplementedError

    def max_k(self, size: int, ratio: float | None) -> int | None:
        """Most elements a variable-length payload may send (None: fixed)."""
        return None

    def encode(self, x: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        """One group's payload; ``x`` is float32, 1-D and finite."""
        raise NotImplementedError

    def expand(self, arrays: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        """Decode a payload already checked: float32 ``(size,)``."""
        raise NotImplementedError

    def check(
        self, arrays: Mapping[str, np.ndarray], size: int, max_k: int | None
    ) -> None:
        """The codec's own value rules (default: none)."""

    def decode_rows(
        self, rows: np.ndarray, size: int, ratio: float | None
    ) -> np.ndarray:
        """Check and decode ``k`` received payloads of groups of ``size``.

        ``rows`` is uint8 ``(k, L)``, row ``r`` one group's wire bytes
        (``L = nbytes(size, ratio)``, as the codec table implies). Returns
        float32 ``(k, size)``, what :func:`decode` returns for each row,
        after the same checks. The default cuts each row into its arrays
        and calls :func:`decode`; a codec may vectorize it (same values,
        same rules).

        Raises
        ------
        RowError
            Naming the bad row and the rule it broke.
        """
        lengths = {
            key: int(count)
            for key, count in self.lengths(np.asarray(size, np.int64), ratio).items()
        }
        max_k = self.max_k(size, ratio)
        out = np.empty((rows.shape[0], size), dtype=np.float32)
        for r in range(rows.shape[0]):
            raw, offset, arrays = rows[r].tobytes(), 0, {}
            for key, count in lengths.items():
                native = self.layout[key]
                wire = wire_dtype(native)
                arrays[key] = np.frombuffer(raw, wire, count, offset).astype(native)
                offset += count * wire.itemsize
            try:
                out[r] = decode(self.name, arrays, size, max_k=max_k)
            except CodecError as err:
                raise RowError(r, str(err)) from None
        return out

    def encode_rows(
        self, rows: np.ndarray, ratio: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode ``k`` groups of one size at once.

        ``rows`` is float32 ``(k, n)``, finite, one group per row. Returns
        ``(wire, decoded)``: uint8 ``(k, L)``, each row the group's payload
        arrays as little-endian bytes in :attr:`layout` order (``L =
        nbytes(n, ratio)``), and float32 ``(k, n)``, what the receiver
        decodes. The default calls :meth:`encode` and :meth:`expand` per
        row; a codec may vectorize it (the same bytes).
        """
        k, size = rows.shape
        width = int(self.nbytes(np.asarray(size, dtype=np.int64), ratio))
        wire = np.empty((k, width), dtype=np.uint8)
        decoded = np.empty((k, size), dtype=np.float32)
        for r in range(k):
            payload = self.encode(rows[r], ratio)
            wire[r] = np.concatenate(
                [
                    np.ascontiguousarray(payload[key], dtype=wire_dtype(dt)).view(
                        np.uint8
                    )
                    for key, dt in self.layout.items()
                ]
                or [np.zeros(0, np.uint8)]
            )
            decoded[r] = self.expand(payload, size)
        return wire, decoded

    def encode_rows_into(
        self,
        rows: np.ndarray,
        ratio: float | None,
        wire: np.ndarray,
        decoded: np.ndarray,
    ) -> None:
        """:meth:`encode_rows` written into ``wire`` ``(k, L)`` uint8 and
        ``decoded`` ``(k, n)`` float32 (e.g. views of the packed stream and of
        the flat update, so that consecutive groups need no copies). The
        default copies :meth:`encode_rows`' result; a codec may write in place
        (the same bytes and values). ``rows`` must not overlap either output.
        """
        values, expanded = self.encode_rows(rows, ratio)
        wire[...] = values
        decoded[...] = expanded

    def encode_groups(
        self,
        x: np.ndarray,
        starts: np.ndarray,
        sizes: np.ndarray,
        ratio: float | None,
        stream: np.ndarray,
        offsets: np.ndarray,
        decoded: np.ndarray,
        residual: np.ndarray | None,
    ) -> None:
        """Encode the groups ``x[starts[g] : starts[g] + sizes[g]]`` of a flat
        float32 update: each group's bytes into the uint8 ``stream`` from
        ``offsets[g]``, its decoded values into ``decoded`` where the group
        lies, and ``x − decoded`` there into ``residual`` (error feedback's
        ``e = g̃ − sent``, eq. 7; ``x`` itself to write it in place; None:
        not wanted). Other elements of the outputs are left as they are.

        A codec with a :attr:`kernel` runs it (group by group in place, one
        compiled pass each, straight to the stream's offsets); the others'
        groups of each size are gathered as rows
        (:func:`~tandem.compression.rows.get_rows`), encoded by
        :meth:`encode_rows` and written back.
        """
        if self.kernel is not None:
            import tandem.compression.kernels as compiled  # numba: when used

            encode = getattr(compiled, self.kernel)
            encode(x, starts, sizes, stream, offsets, decoded, residual)
            return
        for size in np.unique(sizes).tolist():
            chosen = np.flatnonzero(sizes == size)
            per = max(1, _GATHER // max(size, 1))
            for first in range(0, chosen.size, per):
                block = chosen[first : first + per]
                rows = get_rows(x, starts[block], size)
                wire, values = self.encode_rows(rows, ratio)
                put_rows(stream, offsets[block], wire)
                put_rows(decoded, starts[block], values)
                if residual is not None:
                    put_rows(residual, starts[block], rows - values)


#: Most elements :meth:`Codec.encode_groups` gathers at once (in the CPU cache).
_GATHER = 1 << 17


class _InPlace(Codec):
    """A codec that writes its rows in place (:meth:`encode_rows_into`);
    :meth:`encode_rows` gives it fresh outputs of the payload's width."""

    def encode_rows(
        self, rows: np.ndarray, ratio: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        k, size = rows.shape
        width = int(self.nbytes(np.asarray(size, dtype=np.int64), ratio))
        wire = np.empty((k, width), dtype=np.uint8)
        decoded = np.empty((k, size), dtype=np.float32)
        self.encode_rows_into(rows, ratio, wire, decoded)
        return wire, decoded


def _rows_as_groups(
    codec: Codec,
    rows: np.ndarray,
    ratio: float | None,
    wire: np.ndarray,
    decoded: np.ndarray,
) -> None:
    """:meth:`Codec.encode_rows_into` through :meth:`Codec.encode_groups`:
    the ``k`` rows as groups of a flat update, their bytes ``width`` apart in
    ``wire`` (through C-contiguous copies where an argument is not one)."""
    k, size = rows.shape
    width = wire.shape[1]
    flat = np.ascontiguousarray(rows).reshape(-1)
    stream = wire if wire.flags.c_contiguous else np.empty(wire.shape, np.uint8)
    values = decoded if decoded.flags.c_contiguous else np.empty_like(flat)
    starts = np.arange(k, dtype=np.int64) * size
    codec.encode_groups(
        flat,
        starts,
        np.full(k, size, dtype=np.int64),
        ratio,
        stream.reshape(-1),
        np.arange(k, dtype=np.int64) * width,
        values.reshape(-1),
        None,
    )
    if stream is not wire:
        wire[...] = stream
    if values is not decoded:
        decoded[...] = values.reshape(k, size)


def _first_row(bad: np.ndarray) -> int | None:
    """The first True of a row mask ``(k,)``, or None."""
    return int(np.argmax(bad)) if bad.any() else None


def _check_finite_rows(kind: str, key: str, values: np.ndarray) -> None:
    """:class:`RowError` for the first row of ``values`` ``(k, L)`` holding NaN
    or Inf (one float64 sum first: finite inputs cannot overflow it)."""
    if values.size and not np.isfinite(values.sum(dtype=np.float64)):
        row = _first_row(~np.isfinite(values).all(axis=1))
        raise RowError(row or 0, f"{kind} '{key}' holds NaN or Inf")


def _scale_rows(kind: str, rows: np.ndarray, at: int) -> np.ndarray:
    """The float32 scale in bytes ``[at, at + 4)`` of every row, checked finite
    and non-negative (as :func:`_check_payload` and :func:`_check_scale`)."""
    raw = np.ascontiguousarray(rows[:, at : at + 4])
    scale = raw.view(wire_dtype(np.float32)).reshape(rows.shape[0])
    scale = scale.astype(np.float32, copy=False)
    _check_finite_rows(kind, "scale", scale[:, None])
    row = _first_row(scale < 0)
    if row is not None:
        raise RowError(row, f"{kind} 'scale' is negative ({scale[row]})")
    return scale


# --------------------------------------------------------------------------- codecs
class _Dense(Codec):
    """Every value in the layout's one ``values`` dtype: ``itemsize·n`` bytes.

    Subclasses give :meth:`cast`, the values in that dtype.
    """

    def cast(self, x: np.ndarray) -> np.ndarray:
        """``x`` (float32) in the wire dtype; may be ``x`` itself."""
        raise NotImplementedError

    def lengths(self, sizes: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        return {"values": sizes}

    def encode(self, x: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        values = self.cast(x)
        return {"values": x.copy() if values is x else values}

    def expand(self, arrays: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        return np.array(arrays["values"], dtype=np.float32)

    def encode_rows(
        self, rows: np.ndarray, ratio: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        values = self.cast(rows)
        wire = np.ascontiguousarray(values, dtype=wire_dtype(self.layout["values"]))
        decoded = rows.copy() if values is rows else values.astype(np.float32)
        return wire.view(np.uint8), decoded

    def decode_rows(
        self, rows: np.ndarray, size: int, ratio: float | None
    ) -> np.ndarray:
        values = np.ascontiguousarray(rows).view(wire_dtype(self.layout["values"]))
        _check_finite_rows(self.name, "values", values)
        return values.astype(np.float32)


class Full(_Dense):
    """float32 values, ``4n`` bytes, exact."""

    name = "full"
    layout: ClassVar[dict[str, np.dtype]] = {"values": np.dtype(np.float32)}

    def fidelity(self, ratio: float | None) -> float:
        return 1.0

    def cast(self, x: np.ndarray) -> np.ndarray:
        return x


class Half(_Dense):
    """float16 values, ``2n`` bytes, saturating at ±65504."""

    name = "half"
    layout: ClassVar[dict[str, np.dtype]] = {"values": np.dtype(np.float16)}

    def fidelity(self, ratio: float | None) -> float:
        return FIDELITY_HALF

    def cast(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, -_F16_MAX, _F16_MAX).astype(np.float16)


_INT8_RULE = "int8 'levels' holds -128; levels lie in [-127, 127]"


class Int8(_InPlace):
    """int8 levels ``rint(127·x/a)`` and the scale ``a = max|x|``, ``n + 4`` bytes."""

    name = "int8"
    layout: ClassVar[dict[str, np.dtype]] = {
        "levels": np.dtype(np.int8),
        "scale": np.dtype(np.float32),
    }
    kernel = "int8_groups"

    def lengths(self, sizes: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        return {"levels": sizes, "scale": np.ones_like(sizes)}

    def fidelity(self, ratio: float | None) -> float:
        return FIDELITY_INT8

    def encode(self, x: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        scale = np.float32(np.abs(x).max()) if x.size else np.float32(0.0)
        return {
            "levels": int8_levels(x, np.full(x.size, scale, dtype=np.float32)),
            "scale": np.array([scale], dtype=np.float32),
        }

    def expand(self, arrays: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        scale = np.full(size, arrays["scale"][0], dtype=np.float32)
        return int8_values(arrays["levels"], scale)

    def check(
        self, arrays: Mapping[str, np.ndarray], size: int, max_k: int | None
    ) -> None:
        _check_scale(self.name, arrays)
        levels = arrays["levels"]
        if levels.size and int(levels.min()) < -127:
            raise CodecError(_INT8_RULE)

    def encode_rows_into(
        self,
        rows: np.ndarray,
        ratio: float | None,
        wire: np.ndarray,
        decoded: np.ndarray,
    ) -> None:
        _rows_as_groups(self, rows, ratio, wire, decoded)

    def decode_rows(
        self, rows: np.ndarray, size: int, ratio: float | None
    ) -> np.ndarray:
        scale = _scale_rows(self.name, rows, size)
        levels = rows[:, :size].view(np.int8)
        if levels.size and int(levels.min()) < -127:
            raise RowError(_first_row((levels == -128).any(axis=1)) or 0, _INT8_RULE)
        # int8_values, row by row: level · (a / 127) in float32
        step = (scale / np.float32(127.0))[:, None]
        return np.multiply(levels, step, dtype=np.float32)


_SIGN_RULE = "sign 'signs' has padding bits set past the last element"


class Sign(_InPlace):
    """Sign bits and the scale ``mean|x|`` (eq. 6), ``⌈n/8⌉ + 4`` bytes."""

    name = "sign"
    layout: ClassVar[dict[str, np.dtype]] = {
        "signs": np.dtype(np.uint8),
        "scale": np.dtype(np.float32),
    }
    kernel = "sign_groups"

    def lengths(self, sizes: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        return {"signs": (sizes + 7) // 8, "scale": np.ones_like(sizes)}

    def fidelity(self, ratio: float | None) -> float:
        return FIDELITY_SIGN

    def encode(self, x: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        scale = np.abs(x, dtype=np.float64).mean() if x.size else 0.0
        return {
            "signs": np.packbits(x < 0),
            "scale": np.array([scale], dtype=np.float32),
        }

    def expand(self, arrays: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        out = np.zeros(size, dtype=np.float32)
        negative = np.unpackbits(arrays["signs"], count=size).astype(bool)
        scale = arrays["scale"][0]
        out[:] = scale
        out[negative] = -scale
        return out

    def check(
        self, arrays: Mapping[str, np.ndarray], size: int, max_k: int | None
    ) -> None:
        _check_scale(self.name, arrays)
        signs = arrays["signs"]
        if size % 8 and signs[-1] & ((1 << (8 - size % 8)) - 1):
            raise CodecError(_SIGN_RULE)

    def encode_rows_into(
        self,
        rows: np.ndarray,
        ratio: float | None,
        wire: np.ndarray,
        decoded: np.ndarray,
    ) -> None:
        k, size = rows.shape
        width = (size + 7) // 8
        negative = rows < 0
        wire[:, :width] = np.packbits(negative, axis=1)
        # mean|x| per row, summed in float64 as Sign.encode does
        scale = np.zeros(k, dtype=np.float32)
        if size:
            sums = np.abs(rows, dtype=np.float64).sum(axis=1)
            scale[:] = sums / size
        wire[:, width:] = scale.astype("<f4").view(np.uint8).reshape(k, 4)
        # −a where negative, else +a: ±1 (1 − 2·bit, exact) times a is exact
        # (and −0 for a = 0)
        np.multiply(negative, np.float32(-2.0), out=decoded)
        decoded += np.float32(1.0)
        decoded *= scale[:, None]

    def decode_rows(
        self, rows: np.ndarray, size: int, ratio: float | None
    ) -> np.ndarray:
        width = (size + 7) // 8
        scale = _scale_rows(self.name, rows, width)
        bits = rows[:, :width]
        if size % 8:
            row = _first_row(bits[:, -1] & np.uint8((1 << (8 - size % 8)) - 1) != 0)
            if row is not None:
                raise RowError(row, _SIGN_RULE)
        negative = np.unpackbits(bits, axis=1, count=size)
        # −a where the bit is set, else +a: ±1 (1 − 2·bit, exact) times a
        out = np.multiply(negative, np.float32(-2.0), dtype=np.float32)
        out += np.float32(1.0)
        out *= scale[:, None]
        return out


class TopK(Codec):
    """The ``k = topk_count(n, r)`` largest ``|x_j|``: indices and values, ``8k``."""

    name = "topk"
    takes_ratio = True
    variable_length = True
    layout: ClassVar[dict[str, np.dtype]] = {
        "indices": np.dtype(np.uint32),
        "values": np.dtype(np.float32),
    }

    def lengths(self, sizes: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        k = _topk_counts(sizes, float(ratio))  # type: ignore[arg-type]
        return {"indices": k, "values": k}

    def fidelity(self, ratio: float | None) -> float:
        r = float(ratio)  # type: ignore[arg-type]
        log_inv = -math.log(r)
        return min(1.0, r * (1.0 + log_inv + 0.5 * log_inv * log_inv))

    def max_k(self, size: int, ratio: float | None) -> int | None:
        return topk_count(size, ratio)  # type: ignore[arg-type]

    def encode(self, x: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        idx = _topk_indices(np.abs(x), topk_count(x.size, ratio))  # type: ignore[arg-type]
        return {"indices": idx.astype(np.uint32), "values": x[idx]}

    def expand(self, arrays: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        out = np.zeros(size, dtype=np.float32)
        out[arrays["indices"].astype(np.int64)] = arrays["values"]
        return out

    def check(
        self, arrays: Mapping[str, np.ndarray], size: int, max_k: int | None
    ) -> None:
        indices, values = arrays["indices"], arrays["values"]
        k = indices.size
        if values.shape != indices.shape:
            raise CodecError(
                f"topk 'values' has shape {values.shape}, 'indices' {indices.shape}"
            )
        limit = size if max_k is None else min(size, max_k)
        if k > limit:
            raise CodecError(f"topk sends {k} elements, at most {limit} allowed")
        if k and int(indices.max()) >= size:
            raise CodecError(
                f"topk 'indices' has index {int(indices.max())} out of range "
                f"for size {size}"
            )
        if np.unique(indices).size != k:
            raise CodecError("topk 'indices' has duplicated indices")

    def encode_rows(
        self, rows: np.ndarray, ratio: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        k, size = rows.shape
        count = self.max_k(size, ratio) or 0
        wire = np.empty((k, 8 * count), dtype=np.uint8)
        decoded = np.zeros((k, size), dtype=np.float32)
        if not count:
            return wire, decoded
        # _topk_indices row by row: the `count` largest |x|, ties to lower
        # indices, ascending
        magnitude = np.abs(rows)
        threshold = np.partition(magnitude, size - count, axis=1)[:, size - count]
        above = magnitude > threshold[:, None]
        at = magnitude == threshold[:, None]
        room = count - above.sum(axis=1)
        keep = above | (at & (np.cumsum(at, axis=1) <= room[:, None]))
        indices = np.nonzero(keep)[1].reshape(k, count)
        values = np.take_along_axis(rows, indices, axis=1)
        wire[:, : 4 * count] = indices.astype("<u4").view(np.uint8)
        wire[:, 4 * count :] = values.astype("<f4").view(np.uint8)
        np.put_along_axis(decoded, indices, values, axis=1)
        return wire, decoded

    def decode_rows(
        self, rows: np.ndarray, size: int, ratio: float | None
    ) -> np.ndarray:
        count, k = self.max_k(size, ratio) or 0, rows.shape[0]
        rows = np.ascontiguousarray(rows)
        indices = rows[:, : 4 * count].copy().view(wire_dtype(np.uint32))
        values = rows[:, 4 * count :].copy().view(wire_dtype(np.float32))
        _check_finite_rows(self.name, "values", values)
        out = np.zeros((k, size), dtype=np.float32)
        if not count:
            return out
        top = indices.max(axis=1)
        row = _first_row(top >= size)
        if row is not None:
            raise RowError(
                row,
                f"topk 'indices' has index {int(top[row])} out of range "
                f"for size {size}",
            )
        ordered = np.sort(indices, axis=1)
        row = _first_row((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
        if row is not None:
            raise RowError(row, "topk 'indices' has duplicated indices")
        np.put_along_axis(out, indices.astype(np.int64), values, axis=1)
        return out


class Defer(Codec):
    """Nothing now: the cloud fills the group from its cache, 0 bytes."""

    name = "defer"
    layout: ClassVar[dict[str, np.dtype]] = {}

    def lengths(self, sizes: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        return {}

    def fidelity(self, ratio: float | None) -> float:
        return 0.0

    def encode(self, x: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
        return {}

    def expand(self, arrays: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        return np.zeros(size, dtype=np.float32)

    def encode_rows(
        self, rows: np.ndarray, ratio: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        k, size = rows.shape
        return np.zeros((k, 0), np.uint8), np.zeros((k, size), np.float32)


def _check_scale(kind: str, arrays: Mapping[str, np.ndarray]) -> None:
    if arrays["scale"][0] < 0:
        raise CodecError(f"{kind} 'scale' is negative ({arrays['scale'][0]})")


@lru_cache(maxsize=8)
def _option_table(
    options: tuple[Option, ...], codecs: tuple[Codec, ...], sizes: bytes
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`option_table` of checked int64 ``sizes`` (raw bytes), once per
    distinct (options, sizes): an edge and the cloud ask for the same table
    every round and every reply. ``codecs`` (the options' registered codecs)
    is part of the key, so a codec registered anew under an old name gets
    its own table."""
    group_sizes = np.frombuffer(sizes, dtype=np.int64)
    costs = np.empty((group_sizes.size, len(options)), dtype=np.int64)
    for j, opt in enumerate(options):
        costs[:, j] = opt.codec.nbytes(group_sizes, opt.ratio)
    values = np.array([fidelity(o.kind, o.ratio) for o in options], dtype=np.float64)
    return costs, values


# --------------------------------------------------------------------------- registry
#: Codec name → codec, in the order codec lists and messages name them.
REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Add ``codec`` to :data:`REGISTRY` (its name must be new and plain).

    Raises
    ------
    CodecError
        If the name is taken or holds ``@``, ``,`` or spaces.
    """
    name = codec.name
    if name in REGISTRY:
        raise CodecError(f"codec {name!r} is already registered")
    if not name or any(c in name for c in "@, "):
        raise CodecError(f"codec name {name!r} must be non-empty, without '@ ,'")
    REGISTRY[name] = codec
    _parse_codecs.cache_clear()
    return codec


def unregister(name: str) -> Codec:
    """Remove a codec from :data:`REGISTRY` (e.g. a test's); returns it."""
    codec = REGISTRY.pop(name)
    _parse_codecs.cache_clear()
    return codec


def __getattr__(name: str) -> object:
    if name == "CODECS":  # always the registry's current names
        return tuple(REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def codec_for(kind: str) -> Codec:
    """The registered codec named ``kind``.

    Raises
    ------
    CodecError
        If no codec has that name.
    """
    try:
        return REGISTRY[kind]
    except KeyError:
        raise CodecError(
            f"unknown codec {kind!r}; expected one of {tuple(REGISTRY)}"
        ) from None


def codec_rule() -> str:
    """The rule text of a codec list, from the registry."""
    return "must be a comma-separated list of " + ", ".join(
        codec.spelling for codec in REGISTRY.values()
    )


# --------------------------------------------------------------------------- by name
def payload_keys(kind: str) -> tuple[str, ...]:
    """The array keys a ``kind`` payload holds (empty for ``defer``)."""
    return tuple(codec_for(kind).layout)


def payload_lengths(
    kind: str, size: int, *, ratio: float | None = None
) -> dict[str, int]:
    """Element count of each array of a ``kind`` payload for ``size`` elements,
    in :func:`payload_keys` order (``topk``: ``k = topk_count(size, ratio)``).
    """
    codec = codec_for(kind)
    codec.check_ratio(ratio)
    size = _check_size(size)
    lengths = codec.lengths(np.asarray(size, dtype=np.int64), ratio)
    return {key: int(count) for key, count in lengths.items()}


def topk_count(size: int, ratio: float) -> int:
    """Elements kept by topk: ``k = clip(round(ratio·size), 1, size)``.

    Round half to even; at least one element of a non-empty group, none of an
    empty one.
    """
    REGISTRY["topk"].check_ratio(ratio)
    return int(_topk_counts(np.asarray(_check_size(size)), float(ratio)))


def _topk_counts(sizes: np.ndarray, ratio: float) -> np.ndarray:
    k = np.maximum(np.rint(ratio * sizes.astype(np.float64)), 1).astype(np.int64)
    return np.minimum(k, sizes.astype(np.int64))


def encoded_nbytes(kind: str, size: int, *, ratio: float | None = None) -> int:
    """Exact payload size in bytes (sum of ``.nbytes``) of ``encode(kind, x)``.

    Parameters
    ----------
    kind : str
        The codec.
    size : int
        Elements in the group.
    ratio : float or None (default: None)
        Kept fraction, for ``topk`` only.

    Returns
    -------
    int
        ``4n`` (full), ``2n`` (half), ``n + 4`` (int8), ``⌈n/8⌉ + 4``
        (sign), ``8k`` (topk), ``0`` (defer). This counts array bytes only,
        not Flower's record framing.
    """
    codec = codec_for(kind)
    codec.check_ratio(ratio)
    size = _check_size(size)
    return int(codec.nbytes(np.asarray(size, dtype=np.int64), ratio))


def _topk_indices(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the ``k`` largest entries; ties go to lower indices."""
    n = magnitude.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    threshold = np.partition(magnitude, n - k)[n - k]  # the k-th largest
    above = np.flatnonzero(magnitude > threshold)
    at = np.flatnonzero(magnitude == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, at]))


def encode(
    kind: str, x: np.ndarray, *, ratio: float | None = None
) -> dict[str, np.ndarray]:
    """Encode one group's 1-D update ``x`` as plain numpy arrays.

    Parameters
    ----------
    kind : str
        A registered codec: ``"full"``, ``"half"``, ``"int8"``, ``"sign"``,
        ``"topk"``, ``"defer"`` ...
    x : np.ndarray
        Shape ``(n,)``, converted to float32; must be finite.
    ratio : float or None (default: None)
        For ``topk``: keep ``k = topk_count(n, ratio)`` elements, the ``k``
        largest ``|x_j|``, ties broken toward lower indices; indices ascending.

    Returns
    -------
    dict[str, np.ndarray]
        The payload, laid out as in the module table. ``half`` saturates at
        ±65504 (float16's largest finite value) instead of overflowing; ``int8``
        stores ``rint(127·x/a)`` and the scale ``a = max|x|``; ``sign``
        stores bit 1 for negative elements (``np.packbits``, big-endian bit
        order) and the scale ``mean|x|`` (seed eq. 6 with ``q = ‖x‖₁/(n‖x‖₂)``).

    Raises
    ------
    CodecError
        Unknown codec, a ratio where none belongs (or a bad one), or ``x`` not
        1-D, not real or not finite.
    """
    codec = codec_for(kind)
    codec.check_ratio(ratio)
    return codec.encode(_as_vector(x), ratio)


def _check_payload(
    codec: Codec, arrays: Mapping[str, np.ndarray], size: int, max_k: int | None
) -> None:
    kind = codec.name
    if not isinstance(arrays, Mapping):
        raise CodecError(f"a payload must be a mapping, got {type(arrays).__name__}")
    layout = codec.layout
    unknown = sorted(set(arrays) - set(layout))
    if unknown:
        raise CodecError(f"{kind} payload has unexpected array(s) {unknown}")
    for key, dtype in layout.items():
        if key not in arrays:
            raise CodecError(f"{kind} payload is missing array '{key}'")
        a = arrays[key]
        if not isinstance(a, np.ndarray):
            raise CodecError(f"{kind} '{key}' is a {type(a).__name__}, not an ndarray")
        if a.dtype != dtype:
            raise CodecError(f"{kind} '{key}' has dtype {a.dtype}, expected {dtype}")
        if a.ndim != 1:
            raise CodecError(f"{kind} '{key}' has shape {a.shape}, expected 1-D")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CodecError(f"{kind} '{key}' holds NaN or Inf")
    if not codec.variable_length:
        lengths = codec.lengths(np.asarray(size, dtype=np.int64), None)
        for key, count in lengths.items():
            if arrays[key].shape != (int(count),):
                raise CodecError(
                    f"{kind} '{key}' has shape {arrays[key].shape}, "
                    f"expected ({int(count)},)"
                )
    codec.check(arrays, size, max_k)


def decode(
    kind: str,
    arrays: Mapping[str, np.ndarray],
    size: int,
    *,
    max_k: int | None = None,
) -> np.ndarray:
    """Check a received payload and decode it to a float32 ``(size,)`` update.

    Parameters
    ----------
    kind : str
        The codec the payload claims to use.
    arrays : Mapping[str, np.ndarray]
        The payload, exactly the keys of :func:`payload_keys` (``{}`` for
        ``defer``).
    size : int
        Elements in the group, from the receiver's own model.
    max_k : int or None (default: None)
        For ``topk``, the most elements the receiver accepts (e.g.
        ``topk_count(size, ratio)`` when it knows the ratio).

    Returns
    -------
    np.ndarray
        Shape ``(size,)``, float32, a fresh array; zeros where nothing was sent.

    Raises
    ------
    CodecError
        Unknown codec; missing or unexpected keys; a non-ndarray, a wrong dtype
        or a wrong length; NaN or Inf values or scale; a scale not of shape
        ``(1,)`` or negative; an int8 level of -128; sign padding bits set;
        topk indices out of range or duplicated, or more of them than
        ``size`` or ``max_k``.
    """
    codec = codec_for(kind)
    size = _check_size(size)
    _check_payload(codec, arrays, size, max_k)
    return codec.expand(arrays, size)


def fidelity(kind: str, ratio: float | None = None) -> float:
    """Expected fraction of a group's energy a codec keeps (knapsack value).

    ``1 − E‖g − dec(enc(g))‖² / E‖g‖²`` under a Laplace model of the entries:
    1 (full), :data:`FIDELITY_HALF` (half), :data:`FIDELITY_INT8` (int8),
    :data:`FIDELITY_SIGN` (sign),
    ``r·(1 + L + L²/2)`` with ``L = ln(1/r)`` (topk at ratio ``r``), 0 (defer).
    See the module docstring for how these were chosen.
    """
    codec = codec_for(kind)
    codec.check_ratio(ratio)
    return codec.fidelity(ratio)


@dataclass(frozen=True)
class Option:
    """One way to send a group: a registered codec and, if it takes one, a ratio.

    Raises
    ------
    CodecError
        Unknown codec, or a ratio that does not fit it.
    """

    kind: str
    ratio: float | None = None

    def __post_init__(self) -> None:
        codec_for(self.kind).check_ratio(self.ratio)

    @property
    def codec(self) -> Codec:
        """The registered codec."""
        return codec_for(self.kind)

    @property
    def label(self) -> str:
        """``kind`` or ``topk@ratio``, for metrics and logs."""
        return self.kind if self.ratio is None else f"{self.kind}@{self.ratio:g}"


def parse_codecs(text: str) -> tuple[Option, ...]:
    """``"full,half,topk@0.1,sign,defer"`` → the :class:`Option` s, in order.

    Parsed once per distinct text (cached); the result is immutable.

    Raises
    ------
    CodecError
        On an empty list, an unknown codec, a bad ratio, a duplicate, or more
        than 256 options.
    """
    if not isinstance(text, str) or not text.strip():
        raise CodecError(f"codec list must be a non-empty string, got {text!r}")
    return _parse_codecs(text)


@lru_cache(maxsize=64)
def _parse_codecs(text: str) -> tuple[Option, ...]:
    options = []
    for item in (part.strip() for part in text.split(",")):
        kind, at, ratio = item.partition("@")
        if at:
            try:
                value = float(ratio)
            except ValueError:
                raise CodecError(f"codec {item!r}: ratio is not a number") from None
            options.append(Option(kind, value))
        else:
            options.append(Option(kind))
    if len(set(options)) != len(options):
        raise CodecError(f"codec list {text!r} repeats an option")
    if len(options) > 256:
        raise CodecError(f"at most 256 options, got {len(options)}")
    return tuple(options)


def format_codecs(options: Sequence[Option]) -> str:
    """Inverse of :func:`parse_codecs`."""
    return ",".join(
        o.kind if o.ratio is None else f"{o.kind}@{o.ratio!r}" for o in options
    )


#: The built-in codecs, in the order codec lists name them.
for _codec in (Full(), Half(), Int8(), TopK(), Sign(), Defer()):
    register(_codec)


#: Full, half, int8, two top-k ratios, sign and defer: seven options per group.
DEFAULT_OPTIONS: tuple[Option, ...] = (
    Option("full"),
    Option("half"),
    Option("int8"),
    Option("topk", 0.1),
    Option("topk", 0.01),
    Option("sign"),
    Option("defer"),
)


def option_table(
    options: Sequence[Option], sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Costs and modelled fidelities of ``options`` for groups of ``sizes``.

    Parameters
    ----------
    options : Sequence[Option]
        ``m`` options, in the column order of the result.
    sizes : np.ndarray
        Shape ``(n,)``, elements per group.

    Returns
    -------
    costs : np.ndarray
        Shape ``(n, m)``, int64 bytes, ``costs[i, j] ==
        encoded_nbytes(options[j].kind, sizes[i], ratio=options[j].ratio)``.
    fidelities : np.ndarray
        Shape ``(m,)``, float64, :func:`fidelity` of each option.

    Computed once per distinct options and sizes (the last few are kept) and
    handed out as fresh arrays, which the caller may change.
    """
    sizes = np.asarray(sizes)
    if sizes.ndim != 1 or (sizes.size and not np.issubdtype(sizes.dtype, np.integer)):
        raise ValueError(f"sizes must be a 1-D integer array, got {sizes.dtype}")
    sizes = sizes.astype(np.int64)
    if sizes.size and (sizes.min() < 0 or sizes.max() >= _MAX_SIZE):
        raise ValueError("sizes must satisfy 0 <= size < 2**32")
    options = tuple(options)
    codecs = tuple(o.codec for o in options)
    costs, values = _option_table(options, codecs, sizes.tobytes())
    return costs.copy(), values.copy()
