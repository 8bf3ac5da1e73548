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

__all__ = ["int8_rows", "scan"]

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


def _int8_rows_source(rows, scale, bits, stream, offsets, take, decoded, residual):  # noqa: ANN001, ANN202
    size = rows.shape[1]
    for i in range(rows.shape[0]):
        if take is not None and not take[i]:  # pruned when compiled for None
            continue
        a = scale[i]
        safe = a if a > 0 else np.float32(1.0)
        step = a / np.float32(127.0)
        at = offsets[i]
        # a slice per row: the compiler vectorizes stores to it, not to
        # stream[at + j]
        x, d, q = rows[i], decoded[i], stream[at : at + size]
        for j in range(size):
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
        # the scale's float32 bytes, little-endian whatever the machine
        top = bits[i]
        for t in range(4):
            stream[at + size + t] = (top >> np.uint32(8 * t)) & np.uint32(255)


def _int8_rows_in_place_source(rows, scale, bits, stream, offsets, take, decoded):  # noqa: ANN001, ANN202
    """:func:`_int8_rows_source` with the residual written over ``rows``: one
    array read and written, which the compiler vectorizes (two that might
    overlap it would run element by element)."""
    size = rows.shape[1]
    for i in range(rows.shape[0]):
        if take is not None and not take[i]:
            continue
        a = scale[i]
        safe = a if a > 0 else np.float32(1.0)
        step = a / np.float32(127.0)
        at = offsets[i]
        x, d, q = rows[i], decoded[i], stream[at : at + size]
        for j in range(size):
            value = x[j]
            level = np.rint((value / safe) * np.float32(127.0))
            q[j] = np.int8(level)
            out = level * step + np.float32(0.0)
            d[j] = out
            x[j] = value - out
        # the scale's float32 bytes, little-endian whatever the machine
        top = bits[i]
        for t in range(4):
            stream[at + size + t] = (top >> np.uint32(8 * t)) & np.uint32(255)


def _scan_source(group, cost, room, groups, taken):  # noqa: ANN001, ANN202
    stopped = np.zeros(groups, np.bool_)
    for i in range(group.size):
        g = group[i]
        if stopped[g]:
            continue
        if cost[i] <= room:
            taken[i] = True
            room -= cost[i]
        else:
            stopped[g] = True
    return room


@cache
def _compiled(name: str) -> Callable[..., Any]:
    import numba  # a quarter second to import: only when a loop is first used

    sources = {
        "int8_scales": _int8_scales,
        "int8_rows": _int8_rows_source,
        "int8_rows_in_place": _int8_rows_in_place_source,
        "scan": _scan_source,
    }
    return numba.njit(cache=True, nogil=True, boundscheck=False)(sources[name])


def int8_rows(
    rows: np.ndarray,
    stream: np.ndarray,
    offsets: np.ndarray,
    decoded: np.ndarray,
    residual: np.ndarray | None,
    take: np.ndarray | None = None,
) -> None:
    """The int8 codec on ``k`` rows of one size, with the residual, in one pass.

    For each row ``x`` of ``rows`` (float32 ``(k, n)``, finite) with
    ``take[i]`` (every row when None), with ``a = max|x|`` (+0 for a row of
    zeros):

    - the levels ``rint(127·x/a)`` as int8 bytes, then ``a`` as 4
      little-endian float32 bytes, into ``stream`` (uint8, 1-D) from
      ``offsets[i]`` (int64 ``(k,)``);
    - what they decode to, ``level·(a/127)`` (+0, never −0, for level 0), into
      ``decoded[i]`` (float32 ``(k, n)``);
    - ``x − decoded`` into ``residual[i]`` (float32 ``(k, n)``: ``rows``
      itself, or a view of it, to write it in place; None: not wanted).

    The rows not taken are left as they are in every output. ``stream`` and
    ``decoded`` must not overlap ``rows`` or each other.
    """
    k = rows.shape[0]
    scales = np.empty(k, dtype=np.float32)
    bits = scales.view(np.uint32)
    _compiled("int8_scales")(rows.view(np.uint32), bits)
    offsets = np.asarray(offsets, dtype=np.int64)
    stream = stream.view(np.int8)  # the levels' bytes, stored as they are
    if residual is not None and _same_view(residual, rows):
        loop = _compiled("int8_rows_in_place")
        loop(rows, scales, bits, stream, offsets, take, decoded)
    else:
        loop = _compiled("int8_rows")
        loop(rows, scales, bits, stream, offsets, take, decoded, residual)


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` and ``b`` view the same elements the same way (``b`` itself, or
    another view object of it)."""
    return a is b or (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
    )


def scan(
    group: np.ndarray, cost: np.ndarray, room: int, groups: int
) -> tuple[np.ndarray, int]:
    """Take items in list order while they fit; a group stops at its first miss.

    Item ``i`` belongs to group ``group[i]`` (int64 in ``[0, groups)``) and costs
    ``cost[i]`` (int64); it is taken if no earlier item of its group was
    missed and its cost fits in what is left of ``room``. Returns the taken
    mask and the room left (the knapsack's scan, :mod:`.knapsack`).
    """
    group = np.ascontiguousarray(group, dtype=np.int64)
    cost = np.ascontiguousarray(cost, dtype=np.int64)
    taken = np.zeros(group.size, dtype=bool)
    if group.size and not 0 <= group.min() <= group.max() < groups:
        raise ValueError(f"group indices must lie in [0, {groups})")
    left = _compiled("scan")(group, cost, np.int64(room), groups, taken)
    return taken, int(left)
