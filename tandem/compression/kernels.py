"""Compiled loops for the codec's hot passes (numba).

Pure numerics; no Flower imports. Each loop does, group by group while the
group is in the CPU cache, what the numpy formulas of :mod:`.codecs` and
:mod:`.int8` do in several passes over a whole block, with the same IEEE
operations in the same order, so the bytes and values are the same bit for
bit (the tests compare them with the codecs' per-group ``encode`` and with
:func:`~tandem.compression.int8.int8_levels` /
:func:`~tandem.compression.int8.int8_values`). No fast-math: no reordering,
no contraction into fused multiply-adds.

Importing this module imports numba (about a quarter of a second), so the
codecs and the knapsack import it when first used; each loop is compiled
when first called, or loaded from numba's cache beside this file.

A group ``g`` is ``x[starts[g] : starts[g] + sizes[g]]`` of a flat float32
update; its bytes go to ``stream[offsets[g]:]`` (the packed stream of
:mod:`.packing`), its decoded values to the same place in ``decoded``, and
``x − decoded`` to the same place in ``residual`` (error feedback's
``e = g̃ − sent``, eq. 7), which may be ``x`` itself.
"""

from __future__ import annotations

import time

import numba
import numpy as np

__all__ = ["int8_groups", "scan", "sign_groups", "warm_up", "zero_counts"]

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)
_MAGNITUDE = np.uint32(0x7FFFFFFF)  # float32 bits without the sign


@_jit
def _put_scale(
    stream: np.ndarray, at: int, bits: np.ndarray, scale: np.float32
) -> None:
    """``scale`` (float32) as 4 little-endian bytes at ``stream[at:]``;
    ``bits`` is a 1-element float32 scratch with a uint32 view beside it."""
    bits[0] = scale
    word = bits.view(np.uint32)[0]
    for t in range(4):
        stream[at + t] = (word >> np.uint32(8 * t)) & np.uint32(255)


@_jit
def _max_magnitude(words: np.ndarray, scratch: np.ndarray) -> np.float32:
    """``max|x|`` of a group given as its float32 bits (+0 for zeros): for
    finite floats without their sign bit, the order of the bit patterns as
    integers is the order of the values, and an integer max vectorizes.
    ``scratch``: a 1-element float32 array to turn the bits back."""
    top = np.uint32(0)
    for j in range(words.size):
        top = max(top, words[j] & _MAGNITUDE)
    scratch.view(np.uint32)[0] = top
    return scratch[0]


@_jit
def _int8_groups(
    x: np.ndarray,
    words: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    stream: np.ndarray,
    offsets: np.ndarray,
    decoded: np.ndarray,
    residual: np.ndarray | None,
    scratch: np.ndarray,
) -> None:
    levels = stream.view(np.int8)
    for g in range(starts.size):
        s, n, at = starts[g], sizes[g], offsets[g]
        a = _max_magnitude(words[s : s + n], scratch)
        safe = a if a > 0 else np.float32(1.0)
        step = a / np.float32(127.0)
        # slices, not stream[at + j]: the compiler vectorizes stores to them
        xs, ds, q = x[s : s + n], decoded[s : s + n], levels[at : at + n]
        for j in range(n):
            value = xs[j]
            # int8_levels: rint(x / a · 127) (ties to even); |x| <= a keeps
            # it in [-127, 127], so the cast is exact
            level = np.rint((value / safe) * np.float32(127.0))
            q[j] = np.int8(level)
            # int8_values: level · (a / 127); + 0 turns the −0 of a level
            # rounded from below zero into the +0 level 0 decodes to
            out = level * step + np.float32(0.0)
            ds[j] = out
            if residual is not None:  # pruned when compiled for None
                residual[s + j] = value - out
        _put_scale(stream, at + n, scratch, a)


@_jit
def _int8_groups_in_place(
    x: np.ndarray,
    words: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    stream: np.ndarray,
    offsets: np.ndarray,
    decoded: np.ndarray,
    scratch: np.ndarray,
) -> None:
    """:func:`_int8_groups` with the residual written over ``x``: one array
    read and written, which the compiler vectorizes (two that might overlap
    would run element by element)."""
    levels = stream.view(np.int8)
    for g in range(starts.size):
        s, n, at = starts[g], sizes[g], offsets[g]
        a = _max_magnitude(words[s : s + n], scratch)
        safe = a if a > 0 else np.float32(1.0)
        step = a / np.float32(127.0)
        xs, ds, q = x[s : s + n], decoded[s : s + n], levels[at : at + n]
        for j in range(n):
            value = xs[j]
            level = np.rint((value / safe) * np.float32(127.0))
            q[j] = np.int8(level)
            out = level * step + np.float32(0.0)
            ds[j] = out
            xs[j] = value - out
        _put_scale(stream, at + n, scratch, a)


@_jit
def _abs_block(xs: np.ndarray, lo: int, n: int) -> float:
    """``Σ |x_j|`` over ``xs[lo : lo + n]``, ``n <= 128``, in float64 as numpy
    sums a block: one by one under 8, else in 8 lanes, the lanes added
    pairwise, then the tail one by one."""
    if n < 8:
        total = 0.0
        for j in range(n):
            total += abs(np.float64(xs[lo + j]))
        return total
    r0 = abs(np.float64(xs[lo]))
    r1 = abs(np.float64(xs[lo + 1]))
    r2 = abs(np.float64(xs[lo + 2]))
    r3 = abs(np.float64(xs[lo + 3]))
    r4 = abs(np.float64(xs[lo + 4]))
    r5 = abs(np.float64(xs[lo + 5]))
    r6 = abs(np.float64(xs[lo + 6]))
    r7 = abs(np.float64(xs[lo + 7]))
    i = 8
    while i < n - n % 8:
        r0 += abs(np.float64(xs[lo + i]))
        r1 += abs(np.float64(xs[lo + i + 1]))
        r2 += abs(np.float64(xs[lo + i + 2]))
        r3 += abs(np.float64(xs[lo + i + 3]))
        r4 += abs(np.float64(xs[lo + i + 4]))
        r5 += abs(np.float64(xs[lo + i + 5]))
        r6 += abs(np.float64(xs[lo + i + 6]))
        r7 += abs(np.float64(xs[lo + i + 7]))
        i += 8
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        total += abs(np.float64(xs[lo + i]))
        i += 1
    return total


@_jit
def _abs_sum(xs: np.ndarray, n: int, frames: np.ndarray, partial: np.ndarray) -> float:
    """``Σ |x_j|`` over ``xs[:n]`` in float64, in numpy's pairwise order
    (``np.abs(x, dtype=np.float64).sum()``): blocks of up to 128
    (:func:`_abs_block`), longer spans cut in two at a multiple of 8 below
    the middle and the halves' sums added. The recursion runs on an
    explicit stack (``frames`` int64 ``(64, 3)``: start, length, phase;
    ``partial`` float64 ``(64,)``), as numba cannot cache a recursive loop."""
    if n <= 128:
        return _abs_block(xs, 0, n)
    depth, total = 0, 0.0
    frames[0, 0], frames[0, 1], frames[0, 2] = 0, n, 0
    while depth >= 0:
        lo, m, phase = frames[depth, 0], frames[depth, 1], frames[depth, 2]
        if m <= 128:  # a block: its sum goes to the frame below
            total = _abs_block(xs, lo, m)
            depth -= 1
            continue
        half = m // 2
        half -= half % 8
        if phase == 0:  # the first half
            frames[depth, 2] = 1
            depth += 1
            frames[depth, 0], frames[depth, 1], frames[depth, 2] = lo, half, 0
        elif phase == 1:  # the first half's sum kept; the second half
            partial[depth] = total
            frames[depth, 2] = 2
            depth += 1
            frames[depth, 0], frames[depth, 1], frames[depth, 2] = (
                lo + half,
                m - half,
                0,
            )
        else:  # both halves: their sum goes to the frame below
            total = partial[depth] + total
            depth -= 1
    return total


@_jit
def _sign_groups(
    x: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    stream: np.ndarray,
    offsets: np.ndarray,
    decoded: np.ndarray,
    residual: np.ndarray | None,
    scratch: np.ndarray,
    frames: np.ndarray,
    partial: np.ndarray,
) -> None:
    for g in range(starts.size):
        s, n, at = starts[g], sizes[g], offsets[g]
        xs, ds = x[s : s + n], decoded[s : s + n]
        # sign bits, first element in the high bit (np.packbits), zero padding
        width = (n + 7) // 8
        for k in range(width):
            byte = np.uint8(0)
            for t in range(8):
                j = 8 * k + t
                negative = j < n and xs[j] < 0
                byte = (byte << np.uint8(1)) | np.uint8(negative)
            stream[at + k] = byte
        # a = mean|x| (float64, numpy's order), then float32 (Sign.encode)
        a = np.float32(_abs_sum(xs, n, frames, partial) / n) if n else np.float32(0.0)
        _put_scale(stream, at + width, scratch, a)
        for j in range(n):
            value = xs[j]
            out = -a if value < 0 else a  # (1 − 2·bit)·a: −0 for a = 0
            ds[j] = out
            if residual is not None:  # pruned when compiled for None
                residual[s + j] = value - out


@_jit
def _scan(
    group: np.ndarray, cost: np.ndarray, room: int, groups: int, taken: np.ndarray
) -> int:
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


@_jit
def _zero_counts(
    x: np.ndarray, starts: np.ndarray, sizes: np.ndarray, out: np.ndarray
) -> None:
    for g in range(starts.size):
        xs = x[starts[g] : starts[g] + sizes[g]]
        count = 0
        for j in range(xs.size):
            count += xs[j] == 0
        out[g] = count


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` and ``b`` view the same elements the same way."""
    return a is b or (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
    )


def _index(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.int64)


def int8_groups(
    x: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    stream: np.ndarray,
    offsets: np.ndarray,
    decoded: np.ndarray,
    residual: np.ndarray | None,
) -> None:
    """The int8 codec on the listed groups of ``x`` (float32, 1-D, finite).

    For each group, with ``a = max|x|`` (+0 for a group of zeros): the levels
    ``rint(127·x/a)`` as int8 bytes, then ``a`` as 4 little-endian float32
    bytes, into ``stream`` (uint8, 1-D) from ``offsets[g]``; what they decode
    to, ``level·(a/127)`` (+0, never −0, for level 0), into ``decoded``;
    ``x − decoded`` into ``residual`` (``x`` itself to write it in place;
    None: not wanted). Every array is 1-D and C-contiguous; ``stream`` and
    ``decoded`` overlap neither ``x`` nor each other.
    """
    starts, sizes, offsets = _index(starts), _index(sizes), _index(offsets)
    scratch = np.zeros(1, dtype=np.float32)
    words = x.view(np.uint32)
    if residual is not None and _same_array(residual, x):
        _int8_groups_in_place(
            x, words, starts, sizes, stream, offsets, decoded, scratch
        )
    else:
        _int8_groups(
            x, words, starts, sizes, stream, offsets, decoded, residual, scratch
        )


def sign_groups(
    x: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    stream: np.ndarray,
    offsets: np.ndarray,
    decoded: np.ndarray,
    residual: np.ndarray | None,
) -> None:
    """The sign codec (eq. 6) on the listed groups of ``x``, as
    :func:`int8_groups`: ``⌈n/8⌉`` bytes of sign bits (``np.packbits(x <
    0)``) and the scale ``a = mean|x|`` (summed in float64 in numpy's order),
    ``−a`` or ``+a`` decoded, ``x − decoded`` as the residual."""
    starts, sizes, offsets = _index(starts), _index(sizes), _index(offsets)
    scratch = np.zeros(1, dtype=np.float32)
    if residual is not None and _same_array(residual, x):
        residual = x  # one array: each element read before it is written
    frames = np.zeros((64, 3), dtype=np.int64)  # deep enough for 2^64 elements
    partial = np.zeros(64, dtype=np.float64)
    _sign_groups(
        x, starts, sizes, stream, offsets, decoded, residual, scratch, frames, partial
    )


def scan(
    group: np.ndarray, cost: np.ndarray, room: int, groups: int
) -> tuple[np.ndarray, int]:
    """Take items in list order while they fit; a group stops at its first miss.

    Item ``i`` belongs to group ``group[i]`` (in ``[0, groups)``) and costs
    ``cost[i]``; it is taken if no earlier item of its group was missed and
    its cost fits in what is left of ``room``. Returns the taken mask and
    the room left (the knapsack's scan, :mod:`.knapsack`).
    """
    group, cost = _index(group), _index(cost)
    if group.size and not 0 <= group.min() <= group.max() < groups:
        raise ValueError(f"group indices must lie in [0, {groups})")
    taken = np.zeros(group.size, dtype=bool)
    left = _scan(group, cost, np.int64(room), groups, taken)
    return taken, int(left)


def zero_counts(x: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Elements equal to 0 (−0 too) in each group of ``x`` (1-D), int64 ``(n,)``:
    one pass over the groups, no mask in memory."""
    starts, sizes = _index(starts), _index(sizes)
    out = np.empty(starts.size, dtype=np.int64)
    _zero_counts(np.ascontiguousarray(x), starts, sizes, out)
    return out


_WARM = False


def warm_up() -> float:
    """Compile (or load from the cache) the loops the edge's round uses
    (:func:`~tandem.compression.pipeline.compress_update`: int8 and sign
    with the residual in place, the scan, the zeros per group), on a few
    elements; the seconds it took (0.0 once done in this process). A caller
    that times its codec work calls it first, so that a one-off compilation
    is not counted as a round's work.
    """
    global _WARM
    if _WARM:
        return 0.0
    tick = time.perf_counter()
    starts, sizes, offsets = np.array([0, 8]), np.array([8, 8]), np.array([0, 16])
    x = np.linspace(-1.0, 1.0, 16, dtype=np.float32)
    for encode in (int8_groups, sign_groups):
        stream, decoded = np.zeros(32, dtype=np.uint8), np.empty_like(x)
        encode(x, starts, sizes, stream, offsets, decoded, x)
    scan(np.array([0, 1]), np.array([1, 1]), 1, 2)
    zero_counts(x, starts, sizes)
    _WARM = True
    return time.perf_counter() - tick
