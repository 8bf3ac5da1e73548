"""Groups of equal size as the rows of a matrix, without a loop over groups.

Pure numpy; no Flower imports. The packed stream (:mod:`.packing`) and the
flat update hold groups back to back at irregular offsets. All groups of one
codec and one size have the same byte width on the wire and the same element
count in the update, so they can be cut out (and written back) as one
``(k, width)`` matrix: a view when they are consecutive, else one fancy-index
copy of a sliding-window view (a ``memcpy`` per row, no index array per
element). This is what lets encoding and decoding run once per (codec, size)
instead of once per group.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view

__all__ = [
    "Piece",
    "exclusive_cumsum",
    "get_rows",
    "put_rows",
    "row_view",
    "split_pieces",
]


def exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    """Offsets ``[0, c_0, c_0 + c_1, …]`` of ``counts`` laid back to back, int64."""
    out = np.zeros(np.size(counts), dtype=np.int64)
    if out.size > 1:
        np.cumsum(counts[:-1], out=out[1:])
    return out


def row_view(flat: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray | None:
    """``flat[starts[r] : starts[r] + width]`` as rows of a view, if the rows are
    consecutive (``starts[r] = starts[0] + r·width``); else None."""
    k = starts.size
    if k == 0:
        return flat[:0].reshape(0, width)
    first = int(starts[0])
    if k > 1 and not (
        int(starts[-1]) == first + (k - 1) * width
        and np.array_equal(starts, first + width * np.arange(k, dtype=np.int64))
    ):
        return None
    return flat[first : first + k * width].reshape(k, width)


def get_rows(flat: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """``(k, width)``: row ``r`` is ``flat[starts[r] : starts[r] + width]``.

    A view when the rows are consecutive, else a copy. ``flat`` is 1-D and
    C-contiguous; every row lies inside it.
    """
    view = row_view(flat, starts, width)
    if view is not None:
        return view
    if width == 0:
        return np.zeros((starts.size, 0), dtype=flat.dtype)
    return sliding_window_view(flat, width)[starts]


def put_rows(flat: np.ndarray, starts: np.ndarray, rows: np.ndarray) -> None:
    """Write row ``r`` of ``rows`` ``(k, width)`` to ``flat[starts[r] :
    starts[r] + width]`` (the rows must not overlap)."""
    k, width = rows.shape
    if k == 0 or width == 0:
        return
    view = row_view(flat, starts, width)
    if view is not None:
        view[...] = rows
        return
    step = flat.strides[0]
    windows = as_strided(
        flat, shape=(flat.size - width + 1, width), strides=(step, step)
    )
    windows[starts] = rows


@dataclass(frozen=True)
class Piece:
    """Groups ``g0:g1``, all of ``size`` elements, back to back over
    elements ``lo:hi`` of the flat vector (rows of a ``(g1 − g0, size)``
    view)."""

    g0: int
    g1: int
    lo: int
    hi: int
    size: int

    def rows(self, vector: np.ndarray) -> np.ndarray:
        """The piece of a flat vector as ``(g1 − g0, size)`` rows (a view)."""
        return vector[self.lo : self.hi].reshape(self.g1 - self.g0, self.size)


def split_pieces(
    sizes: np.ndarray, starts: np.ndarray, limit: int
) -> tuple[Piece, ...]:
    """Groups ``sizes`` at ``starts`` in order as :class:`Piece` s: runs of
    groups of one size, cut every ``limit`` elements (or every group, if
    larger), so that a pass over a piece works on rows in the CPU cache."""
    n = sizes.size
    if not n:
        return ()
    edges = [0, *(np.flatnonzero(np.diff(sizes)) + 1).tolist(), n]
    out: list[Piece] = []
    for a, b in itertools.pairwise(edges):
        size = int(sizes[a])
        per = max(1, limit // max(size, 1))
        for g0 in range(a, b, per):
            g1 = min(g0 + per, b)
            lo = int(starts[g0])
            out.append(Piece(g0, g1, lo, lo + (g1 - g0) * size, size))
    return tuple(out)
