"""Parameter groups: the unit ACE-Sync selects and compresses.

Pure numpy; no Flower imports. The seed (004, eq. 1) writes the model as
``θ = {θ_1, …, θ_n}``; here a group ``θ_i`` is one tensor, or one fixed-size
chunk of a large tensor's flattened (C-order) elements, so that one big layer
can be split between full precision and cheaper codecs.

Groups are listed tensor by tensor in the order of the mapping they are made
from (a ``state_dict``'s order), then by offset: the same shapes always give
the same groups, so an edge and the cloud that build them from the same model
agree on what group ``i`` is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ParamGroup", "flatten", "group_sizes", "make_groups", "unflatten"]


@dataclass(frozen=True)
class ParamGroup:
    """A contiguous run of one tensor's flattened elements.

    Attributes
    ----------
    name : str
        The tensor's name (its key in the parameter mapping).
    start : int
        First flattened element of the group (inclusive).
    stop : int
        One past the last flattened element (exclusive).
    shape : tuple[int, ...]
        The whole tensor's shape, so that groups alone can rebuild it.
    """

    name: str
    start: int
    stop: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of elements in the group, ``stop − start``."""
        return self.stop - self.start

    @property
    def key(self) -> str:
        """A stable text id, ``name[start:stop]``, for records and residuals."""
        return f"{self.name}[{self.start}:{self.stop}]"


def make_groups(shapes: Mapping[str, tuple[int, ...]], chunk: int) -> list[ParamGroup]:
    """Split each tensor into chunks of at most ``chunk`` flattened elements.

    Parameters
    ----------
    shapes : Mapping[str, tuple[int, ...]]
        Tensor name to shape, in the order the groups should follow.
    chunk : int
        Elements per group; the last chunk of a tensor holds the remainder.
        A tensor of at most ``chunk`` elements (an empty one included) is one
        group.

    Returns
    -------
    list[ParamGroup]
        Tensor by tensor in ``shapes`` order, then by offset.

    Raises
    ------
    ValueError
        If ``chunk`` is not a positive integer or a shape has a negative
        dimension.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    groups: list[ParamGroup] = []
    for name, raw_shape in shapes.items():
        shape = tuple(int(d) for d in raw_shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"shapes['{name}'] has a negative dimension: {shape}")
        size = math.prod(shape)
        starts = range(0, size, int(chunk)) if size else range(1)
        groups.extend(
            ParamGroup(name, start, min(start + int(chunk), size), shape)
            for start in starts
        )
    return groups


def group_sizes(groups: Sequence[ParamGroup]) -> np.ndarray:
    """Elements per group, shape ``(n,)``, int64."""
    return np.fromiter((g.size for g in groups), dtype=np.int64, count=len(groups))


def flatten(
    arrays: Mapping[str, np.ndarray], groups: Sequence[ParamGroup]
) -> list[np.ndarray]:
    """Cut ``arrays`` into the groups' 1-D float32 chunks (fresh copies).

    Raises
    ------
    ValueError
        If a group's tensor is missing or its shape differs from the group's.
    """
    chunks = []
    for g in groups:
        if g.name not in arrays:
            raise ValueError(f"arrays has no tensor '{g.name}' for group {g.key}")
        array = np.asarray(arrays[g.name])
        if array.shape != g.shape:
            raise ValueError(
                f"arrays['{g.name}'] has shape {array.shape}, the groups say {g.shape}"
            )
        chunks.append(np.array(array.reshape(-1)[g.start : g.stop], dtype=np.float32))
    return chunks


def unflatten(
    chunks: Sequence[np.ndarray], groups: Sequence[ParamGroup]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`: float32 tensors rebuilt from their chunks.

    Raises
    ------
    ValueError
        If there is not one chunk per group, a chunk's length differs from its
        group's size, or a tensor's groups do not tile it exactly once.
    """
    if len(chunks) != len(groups):
        raise ValueError(f"got {len(chunks)} chunks for {len(groups)} groups")
    by_name: dict[str, list[tuple[ParamGroup, np.ndarray]]] = {}
    for g, c in zip(groups, chunks, strict=True):
        c = np.asarray(c)
        if c.shape != (g.size,):
            raise ValueError(
                f"chunk for {g.key} has shape {c.shape}, expected ({g.size},)"
            )
        by_name.setdefault(g.name, []).append((g, c))
    out: dict[str, np.ndarray] = {}
    for name, parts in by_name.items():
        shape = parts[0][0].shape
        size = math.prod(shape)
        flat = np.empty(size, dtype=np.float32)
        covered = 0
        for g, c in sorted(parts, key=lambda p: p[0].start):
            if g.shape != shape or g.start != covered or g.stop > size:
                raise ValueError(f"groups of '{name}' do not tile shape {shape}")
            flat[g.start : g.stop] = c
            covered = g.stop
        if covered != size:
            raise ValueError(f"groups of '{name}' do not tile shape {shape}")
        out[name] = flat.reshape(shape)
    return out
