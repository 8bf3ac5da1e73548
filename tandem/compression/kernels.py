"""Compiled loops for the codec's hot passes (numba, compiled when first called).

Pure numerics; no Flower imports. Each loop does, in one pass over a row
while it is in the CPU cache, what the numpy formulas of :mod:`.int8` do in
several passes over the whole block, with the same IEEE float32 operations in
the same order, so the bytes and values are the same bit for bit (tested
against :func:`~tandem.compression.int8.int8_levels` and
:func:`~tandem.compression.int8.int8_values`). No fast-math: no reordering,
no contraction into fused multiply-adds.

numba is imported, and a loop compiled (or loaded from numba's cache beside
this file), the first time a loop is asked for: importing tandem stays as
quick as before, and a process that never encodes int8 never compiles.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

__all__ = ["int8_rows"]

_MAGNITUDE = 0x7FFFFFFF  # float32 bits without the sign


def _int8_scales(bits, scale_bits):  # noqa: ANN001, ANN202
    """``a = max|x|`` per row: for finite floats without their sign bit, the
    order of the bit patterns as integers is the order of the values, and an
    integer max vectorizes (+0 for a row of zeros)."""
    k, size = bits.shape
    for i in range(k):
        row = bits[i]
        top = np.uint32(0)
        for j in range(size):
            top = max(top, row[j] & np.uint32(_MAGNITUDE))
        scale_bits[i] = top


def _int8_rows_source(rows, scale, levels, decoded, residual):  # noqa: ANN001, ANN202
    for i in range(rows.shape[0]):
        a = scale[i]
        safe = a if a > 0 else np.float32(1.0)
        step = a / np.float32(127.0)
        x, q, d = rows[i], levels[i], decoded[i]
        for j in range(rows.shape[1]):
            value = x[j]
            # int8_levels: rint(x / a · 127) (ties to even); |x| <= a keeps
            # it in [-127, 127], so the cast is exact
            level = np.rint((value / safe) * np.float32(127.0))
            q[j] = np.int8(level)
            # int8_values: level · (a / 127); + 0 turns the −0 of a level
            # rounded from below zero into the +0 level 0 decodes to
            out = level * step + np.float32(0.0)
            d[j] = out
            if residual is not None:  # pruned when compiled for None
                residual[i, j] = value - out


def _int8_rows_in_place_source(rows, scale, levels, decoded):  # noqa: ANN001, ANN202
    """:func:`_int8_rows_source` with the residual written over ``rows``: one
    array read and written, which the compiler vectorizes (two that might
    overlap it would run element by element)."""
    for i in range(rows.shape[0]):
        a = scale[i]
        safe = a if a > 0 else np.float32(1.0)
        step = a / np.float32(127.0)
        x, q, d = rows[i], levels[i], decoded[i]
        for j in range(rows.shape[1]):
            value = x[j]
            level = np.rint((value / safe) * np.float32(127.0))
            q[j] = np.int8(level)
            out = level * step + np.float32(0.0)
            d[j] = out
            x[j] = value - out


@cache
def _compiled(name: str) -> Callable[..., Any]:
    import numba  # a quarter second to import: only when a loop is first used

    sources = {
        "int8_scales": _int8_scales,
        "int8_rows": _int8_rows_source,
        "int8_rows_in_place": _int8_rows_in_place_source,
    }
    return numba.njit(cache=True, nogil=True, boundscheck=False)(sources[name])


def int8_rows(
    rows: np.ndarray,
    levels: np.ndarray,
    scales: np.ndarray,
    decoded: np.ndarray,
    residual: np.ndarray | None,
) -> None:
    """The int8 codec on ``k`` rows of one size, with the residual, in one pass.

    For each row ``x`` of ``rows`` (float32 ``(k, n)``, finite): the scale
    ``a = max|x|`` into ``scales[i]`` (float32 ``(k,)``, +0 for a row of
    zeros), the levels ``rint(127·x/a)`` into ``levels`` (int8 ``(k, n)``),
    what they decode to, ``level·(a/127)`` (+0, never −0, for level 0), into
    ``decoded`` (float32 ``(k, n)``) and ``x − decoded`` into ``residual``
    (float32 ``(k, n)``; ``rows`` itself to write it in place; None: not
    wanted). The outputs
    other than ``residual`` must not overlap ``rows`` or each other.
    """
    _compiled("int8_scales")(rows.view(np.uint32), scales.view(np.uint32))
    if residual is not None and _same_view(residual, rows):
        _compiled("int8_rows_in_place")(rows, scales, levels, decoded)
    else:
        _compiled("int8_rows")(rows, scales, levels, decoded, residual)


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` and ``b`` view the same elements the same way (``b`` itself, or
    another view object of it)."""
    return a is b or (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
    )
