"""Per-group codecs: what one parameter group costs on the wire and keeps.

Pure numpy; no Flower imports. ACE-Sync (seed 004) sends each parameter group
in one of six forms, picked per group by the knapsack (:mod:`.knapsack`):

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

:func:`realized_fidelity` measures the same quantity on a real group, for
callers who prefer measured values to the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

__all__ = [
    "CODECS",
    "DEFAULT_OPTIONS",
    "FIDELITY_HALF",
    "FIDELITY_INT8",
    "FIDELITY_SIGN",
    "Codec",
    "CodecError",
    "Option",
    "decode",
    "encode",
    "encoded_nbytes",
    "fidelity",
    "int8_levels",
    "int8_values",
    "option_table",
    "payload_keys",
    "payload_lengths",
    "realized_fidelity",
    "topk_count",
]

Codec = Literal["full", "half", "int8", "sign", "topk", "defer"]
CODECS: tuple[Codec, ...] = get_args(Codec)

#: Expected fidelity of float16 (conservative; see the module docstring).
FIDELITY_HALF = 0.999
#: Expected fidelity of int8 levels with the max-|g| scale (conservative).
FIDELITY_INT8 = 0.998
#: Expected fidelity of sign·scale with the mean-|g| scale, Laplace entries.
FIDELITY_SIGN = 0.5

_F16_MAX = float(np.finfo(np.float16).max)
_MAX_SIZE = 2**32  # indices travel as uint32

# Wire layout: codec -> {key: dtype}.
_LAYOUT: dict[str, dict[str, np.dtype]] = {
    "full": {"values": np.dtype(np.float32)},
    "half": {"values": np.dtype(np.float16)},
    "int8": {"levels": np.dtype(np.int8), "scale": np.dtype(np.float32)},
    "sign": {"signs": np.dtype(np.uint8), "scale": np.dtype(np.float32)},
    "topk": {"indices": np.dtype(np.uint32), "values": np.dtype(np.float32)},
    "defer": {},
}


class CodecError(ValueError):
    """A payload (or codec request) that cannot be encoded or decoded as asked."""


def _check_kind(kind: str) -> None:
    if kind not in _LAYOUT:
        raise CodecError(f"unknown codec {kind!r}; expected one of {CODECS}")


def _check_ratio(kind: str, ratio: float | None) -> None:
    if kind == "topk":
        if ratio is None or not (0.0 < float(ratio) <= 1.0):
            raise CodecError(f"topk needs a ratio with 0 < ratio <= 1, got {ratio!r}")
    elif ratio is not None:
        raise CodecError(f"codec {kind!r} takes no ratio, got {ratio!r}")


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise CodecError(f"size must be an integer, got {size!r}")
    if not 0 <= size < _MAX_SIZE:
        raise CodecError(f"size must satisfy 0 <= size < 2**32, got {size}")
    return int(size)


def payload_keys(kind: Codec) -> tuple[str, ...]:
    """The array keys a ``kind`` payload holds (empty for ``defer``)."""
    _check_kind(kind)
    return tuple(_LAYOUT[kind])


def payload_lengths(
    kind: Codec, size: int, *, ratio: float | None = None
) -> dict[str, int]:
    """Element count of each array of a ``kind`` payload for ``size`` elements,
    in :func:`payload_keys` order (``topk``: ``k = topk_count(size, ratio)``).
    """
    _check_kind(kind)
    _check_ratio(kind, ratio)
    size = _check_size(size)
    if kind in ("full", "half"):
        return {"values": size}
    if kind == "int8":
        return {"levels": size, "scale": 1}
    if kind == "sign":
        return {"signs": (size + 7) // 8, "scale": 1}
    if kind == "topk":
        k = topk_count(size, ratio)  # type: ignore[arg-type]
        return {"indices": k, "values": k}
    return {}


def topk_count(size: int, ratio: float) -> int:
    """Elements kept by topk: ``k = clip(round(ratio·size), 1, size)``.

    Round half to even; at least one element of a non-empty group, none of an
    empty one.
    """
    _check_ratio("topk", ratio)
    return int(_topk_counts(np.asarray(_check_size(size)), float(ratio)))


def _topk_counts(sizes: np.ndarray, ratio: float) -> np.ndarray:
    k = np.maximum(np.rint(ratio * sizes.astype(np.float64)), 1).astype(np.int64)
    return np.minimum(k, sizes.astype(np.int64))


def _nbytes(kind: str, sizes: np.ndarray, ratio: float | None) -> np.ndarray:
    """Vectorized :func:`encoded_nbytes` over an int64 array of sizes."""
    if kind == "full":
        return 4 * sizes
    if kind == "half":
        return 2 * sizes
    if kind == "int8":
        return sizes + 4  # one level per element; scale
    if kind == "sign":
        return (sizes + 7) // 8 + 4  # 1 bit per element, padded to bytes; scale
    if kind == "topk":
        return 8 * _topk_counts(sizes, float(ratio))  # uint32 index + float32
    return np.zeros_like(sizes)


def encoded_nbytes(kind: Codec, size: int, *, ratio: float | None = None) -> int:
    """Exact payload size in bytes (sum of ``.nbytes``) of ``encode(kind, x)``.

    Parameters
    ----------
    kind : Codec
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
    _check_kind(kind)
    _check_ratio(kind, ratio)
    size = _check_size(size)
    return int(_nbytes(kind, np.asarray(size, dtype=np.int64), ratio))


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
    kind: Codec, x: np.ndarray, *, ratio: float | None = None
) -> dict[str, np.ndarray]:
    """Encode one group's 1-D update ``x`` as plain numpy arrays.

    Parameters
    ----------
    kind : Codec
        ``"full"``, ``"half"``, ``"int8"``, ``"sign"``, ``"topk"`` or
        ``"defer"``.
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
    _check_kind(kind)
    _check_ratio(kind, ratio)
    x = _as_vector(x)
    if kind == "full":
        return {"values": x.copy()}
    if kind == "half":
        return {"values": np.clip(x, -_F16_MAX, _F16_MAX).astype(np.float16)}
    if kind == "int8":
        scale = np.float32(np.abs(x).max()) if x.size else np.float32(0.0)
        return {
            "levels": int8_levels(x, np.full(x.size, scale, dtype=np.float32)),
            "scale": np.array([scale], dtype=np.float32),
        }
    if kind == "sign":
        scale = np.abs(x, dtype=np.float64).mean() if x.size else 0.0
        return {
            "signs": np.packbits(x < 0),
            "scale": np.array([scale], dtype=np.float32),
        }
    if kind == "topk":
        idx = _topk_indices(np.abs(x), topk_count(x.size, ratio))
        return {"indices": idx.astype(np.uint32), "values": x[idx]}
    return {}


def int8_levels(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Int8 levels ``rint(127·x_j / a_j)`` of float32 ``x`` under per-element
    scales ``a_j ≥ |x_j|`` (0 where ``a_j = 0``)."""
    safe = np.where(scale > 0, scale, np.float32(1.0))
    levels = np.rint(x / safe * np.float32(127.0))
    return np.clip(levels, -127, 127).astype(np.int8)


def int8_values(levels: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What int8 ``levels`` decode to under per-element scales ``a_j``:
    ``level_j · (a_j / 127)`` in float32 (the one formula both ends use)."""
    return levels.astype(np.float32) * (scale.astype(np.float32) / np.float32(127.0))


def _expand(kind: str, arrays: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    """Decode a payload already known to be well formed."""
    if kind in ("full", "half"):
        return np.array(arrays["values"], dtype=np.float32)
    if kind == "int8":
        scale = np.full(size, arrays["scale"][0], dtype=np.float32)
        return int8_values(arrays["levels"], scale)
    out = np.zeros(size, dtype=np.float32)
    if kind == "sign":
        negative = np.unpackbits(arrays["signs"], count=size).astype(bool)
        scale = arrays["scale"][0]
        out[:] = scale
        out[negative] = -scale
    elif kind == "topk":
        out[arrays["indices"].astype(np.int64)] = arrays["values"]
    return out


def _check_payload(
    kind: str, arrays: Mapping[str, np.ndarray], size: int, max_k: int | None
) -> None:
    if not isinstance(arrays, Mapping):
        raise CodecError(f"a payload must be a mapping, got {type(arrays).__name__}")
    layout = _LAYOUT[kind]
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
    if kind != "topk":  # top-k sends a variable k, checked below
        for key, count in payload_lengths(kind, size).items():
            if arrays[key].shape != (count,):
                raise CodecError(
                    f"{kind} '{key}' has shape {arrays[key].shape}, expected ({count},)"
                )
    if "scale" in layout and arrays["scale"][0] < 0:
        raise CodecError(f"{kind} 'scale' is negative ({arrays['scale'][0]})")
    if kind == "int8":
        levels = arrays["levels"]
        if levels.size and int(levels.min()) < -127:
            raise CodecError("int8 'levels' holds -128; levels lie in [-127, 127]")
    elif kind == "sign":
        signs = arrays["signs"]
        if size % 8 and signs[-1] & ((1 << (8 - size % 8)) - 1):
            raise CodecError("sign 'signs' has padding bits set past the last element")
    elif kind == "topk":
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


def decode(
    kind: Codec,
    arrays: Mapping[str, np.ndarray],
    size: int,
    *,
    max_k: int | None = None,
) -> np.ndarray:
    """Check a received payload and decode it to a float32 ``(size,)`` update.

    Parameters
    ----------
    kind : Codec
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
    _check_kind(kind)
    size = _check_size(size)
    _check_payload(kind, arrays, size, max_k)
    return _expand(kind, arrays, size)


def fidelity(kind: Codec, ratio: float | None = None) -> float:
    """Expected fraction of a group's energy a codec keeps (knapsack value).

    ``1 − E‖g − dec(enc(g))‖² / E‖g‖²`` under a Laplace model of the entries:
    1 (full), :data:`FIDELITY_HALF` (half), :data:`FIDELITY_INT8` (int8),
    :data:`FIDELITY_SIGN` (sign),
    ``r·(1 + L + L²/2)`` with ``L = ln(1/r)`` (topk at ratio ``r``), 0 (defer).
    See the module docstring for how these were chosen.
    """
    _check_kind(kind)
    _check_ratio(kind, ratio)
    if kind == "topk":
        r = float(ratio)
        log_inv = -math.log(r)
        return min(1.0, r * (1.0 + log_inv + 0.5 * log_inv * log_inv))
    return {
        "full": 1.0,
        "half": FIDELITY_HALF,
        "int8": FIDELITY_INT8,
        "sign": FIDELITY_SIGN,
    }.get(kind, 0.0)


def realized_fidelity(x: np.ndarray, decoded: np.ndarray) -> float:
    """Measured fidelity ``1 − ‖x − decoded‖² / ‖x‖²`` (1 when ``x`` is zero)."""
    x = np.asarray(x, dtype=np.float64)
    err = x - np.asarray(decoded, dtype=np.float64)
    energy = float(np.dot(x, x))
    return 1.0 if energy == 0.0 else 1.0 - float(np.dot(err, err)) / energy


@dataclass(frozen=True)
class Option:
    """One way to send a group: a codec and, for ``topk``, its ratio.

    Raises
    ------
    CodecError
        Unknown codec, or a ratio that does not fit it.
    """

    kind: Codec
    ratio: float | None = None

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        _check_ratio(self.kind, self.ratio)

    @property
    def label(self) -> str:
        """``kind`` or ``topk@ratio``, for metrics and logs."""
        return self.kind if self.ratio is None else f"{self.kind}@{self.ratio:g}"


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
    """
    sizes = np.asarray(sizes)
    if sizes.ndim != 1 or (sizes.size and not np.issubdtype(sizes.dtype, np.integer)):
        raise ValueError(f"sizes must be a 1-D integer array, got {sizes.dtype}")
    sizes = sizes.astype(np.int64)
    if sizes.size and (sizes.min() < 0 or sizes.max() >= _MAX_SIZE):
        raise ValueError("sizes must satisfy 0 <= size < 2**32")
    costs = np.empty((sizes.size, len(options)), dtype=np.int64)
    for j, opt in enumerate(options):
        costs[:, j] = _nbytes(opt.kind, sizes, opt.ratio)
    values = np.array([fidelity(o.kind, o.ratio) for o in options], dtype=np.float64)
    return costs, values
