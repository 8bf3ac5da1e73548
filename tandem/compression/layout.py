"""The parameter groups of a model, as edge and cloud both cut them (eq. 1).

Pure numpy (and the structural features of :mod:`tandem.importance`); no
Flower imports.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from tandem.compression.groups import ParamGroup, group_sizes, make_groups
from tandem.compression.rows import Piece, split_pieces
from tandem.importance import (
    STRUCTURAL_FEATURES,
    GroupMeta,
    layer_kind,
    structural_features,
)

__all__ = ["GroupLayout", "Piece", "row_sq_norms"]

#: Column of the density feature in :func:`structural_features`.
_DENSITY = STRUCTURAL_FEATURES.index("density")


#: Most elements of one piece of :meth:`GroupLayout.pieces` (beyond a single
#: group): a piece's rows and temporaries stay in the CPU cache.
_PIECE = 1 << 17


def row_sq_norms(rows: np.ndarray) -> np.ndarray:
    """``Σ_j rows[i, j]²`` per row, in the rows' own precision (SIMD lanes,
    no temporary): for float32 a relative error of a few ``1e-7`` on
    256-element rows, far below what importance or the kept fraction
    resolve."""
    return np.einsum("ij,ij->i", rows, rows)


class _GroupKeys(Sequence[str]):
    """``groups[i].key``, computed when read."""

    def __init__(self, groups: Sequence[ParamGroup]) -> None:
        self._groups = groups

    def __len__(self) -> int:
        return len(self._groups)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [g.key for g in self._groups[index]]
        return self._groups[index].key


@dataclass(frozen=True)
class GroupLayout:
    """The parameter groups of a model, agreed on by edge and cloud (eq. 1).

    Every floating-point tensor of the state dict, in its order, is cut into
    groups of at most ``chunk`` elements (:func:`make_groups`); other tensors
    (e.g. batch-norm counters) are not part of the update and keep the global
    value. Group ``i`` covers ``[starts[i], starts[i] + sizes[i])`` of the
    flat vector that concatenates those tensors.

    Attributes
    ----------
    keys : tuple[str, ...]
        The float tensors, in state-dict order.
    shapes : tuple[tuple[int, ...], ...]
        Their shapes.
    groups : tuple[ParamGroup, ...]
        The ``n`` groups.
    sizes, starts : np.ndarray
        ``(n,)`` int64 elements and flat offsets per group.
    metas : tuple[GroupMeta, ...]
        Structural description of each group (depth, sizes, layer kind).
    num_layers : int
        Distinct layers (module paths) among the tensors.
    dense_structural : np.ndarray
        ``(n, 8)`` structural features with density 1 (see :meth:`structural`).
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[ParamGroup, ...]
    sizes: np.ndarray
    starts: np.ndarray
    metas: tuple[GroupMeta, ...]
    num_layers: int
    dense_structural: np.ndarray

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], chunk: int) -> GroupLayout:
        """The layout of a state dict given as numpy arrays."""
        shapes = {
            key: tuple(int(d) for d in np.shape(a))
            for key, a in arrays.items()
            if np.asarray(a).dtype.kind == "f"
        }
        groups = tuple(make_groups(shapes, chunk))
        sizes = group_sizes(groups)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        layers: dict[str, int] = {}
        for key in shapes:
            layers.setdefault(key.rpartition(".")[0], len(layers))
        metas = tuple(
            GroupMeta(
                name=g.name,
                depth=layers[g.name.rpartition(".")[0]],
                size=max(g.size, 1),
                layer_size=max(math.prod(g.shape), 1),
                kind=layer_kind(g.name, g.shape),
            )
            for g in groups
        )
        num_layers = max(len(layers), 1)
        return cls(
            tuple(shapes),
            tuple(shapes.values()),
            groups,
            sizes,
            starts,
            metas,
            num_layers,
            structural_features(metas, num_layers),
        )

    @property
    def total(self) -> int:
        """Elements in the flat vector, ``N``."""
        return int(self.sizes.sum())

    @property
    def full_bytes(self) -> int:
        """Bytes of the whole update in float32, ``4N``."""
        return 4 * self.total

    @property
    def labels(self) -> Sequence[str]:
        """``ParamGroup.key`` of each group, for messages (made when read:
        building all of them costs more than decoding an update)."""
        return _GroupKeys(self.groups)

    def flat(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float tensors of ``arrays`` as one float32 vector ``(N,)``.

        Raises
        ------
        ValueError
            If a tensor is missing or has another shape.
        """
        parts = []
        for key, shape in zip(self.keys, self.shapes, strict=True):
            if key not in arrays:
                raise ValueError(f"arrays has no tensor '{key}'")
            a = np.asarray(arrays[key])
            if a.shape != shape:
                raise ValueError(f"arrays['{key}'] has shape {a.shape}, not {shape}")
            parts.append(a.astype(np.float32, copy=False).reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def unflat(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Inverse of :meth:`flat`: float32 tensors by name (fresh arrays).

        The groups tile each tensor in order (:func:`make_groups`), so each
        tensor is one slice of the vector: no pass over the groups.

        Raises
        ------
        ValueError
            If ``vector`` is not of shape ``(N,)``.
        """
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.total,):
            raise ValueError(
                f"vector has shape {vector.shape}, expected ({self.total},)"
            )
        out: dict[str, np.ndarray] = {}
        offset = 0
        for key, shape in zip(self.keys, self.shapes, strict=True):
            size = math.prod(shape)
            out[key] = vector[offset : offset + size].reshape(shape).copy()
            offset += size
        return out

    def group_rms(self, vector: np.ndarray) -> np.ndarray:
        """Root mean square of each group of a flat vector, ``(n,)`` float64."""
        squares = np.square(vector, dtype=np.float64)
        sums = np.add.reduceat(squares, self.starts) if self.total else squares
        return np.sqrt(sums / np.maximum(self.sizes, 1))

    @functools.cached_property
    def pieces(self) -> tuple[Piece, ...]:
        """The groups in order as :class:`Piece` s: runs of groups of one
        size, cut every ``2**17`` elements (or every group, if larger), so
        that a pass over a piece works on ``(groups, size)`` rows in the
        CPU cache."""
        return split_pieces(self.sizes, self.starts, _PIECE)

    def group_sq_norms(self, vector: np.ndarray) -> np.ndarray:
        """``‖v_i‖²`` of each group of a flat vector, ``(n,)`` float64.

        Summed in the vector's precision (:func:`row_sq_norms`, piece by
        piece), then widened; an empty group's is 0.
        """
        out = np.empty(self.sizes.size, dtype=np.float64)
        for piece in self.pieces:
            out[piece.g0 : piece.g1] = row_sq_norms(piece.rows(vector))
        return out

    def _zero_counts(self, flat: np.ndarray) -> np.ndarray:
        """Zeros of ``flat`` (``(total,)``) in each group, ``(n,)`` int64: one
        compiled pass over the groups
        (:func:`~tandem.compression.kernels.zero_counts`)."""
        from tandem.compression.kernels import zero_counts  # numba: when used

        if flat.shape != (self.total,):
            raise ValueError(
                f"vector has shape {flat.shape}, the layout ({self.total},)"
            )
        return zero_counts(flat, self.starts, self.sizes)

    def structural(self, weights: np.ndarray) -> np.ndarray:
        """Structural features ``(n, 8)`` (:func:`structural_features`).

        ``density`` is the fraction of nonzero global weights in each group
        (1 for an empty group, as in ``dense_structural``).
        """
        flat = np.asarray(weights).reshape(-1)
        features = self.dense_structural.copy()
        counts = self._zero_counts(flat)
        nonzero = (self.sizes - counts).astype(np.float64)
        density = np.clip(nonzero / np.maximum(self.sizes, 1), 0, 1)
        features[:, _DENSITY] = np.where(self.sizes > 0, density, 1.0)
        return features
