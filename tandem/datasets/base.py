"""Arrays in memory: the one data shape every source produces."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ArraySplit", "DataBundle", "DataError"]


class DataError(ValueError):
    """A data source that is missing, malformed or inconsistent."""


@dataclass(frozen=True, eq=False)
class ArraySplit:
    """Features and labels of one split.

    Attributes
    ----------
    x : np.ndarray
        ``float32`` features, shape ``(N, *feature_shape)`` (channels first),
        or ``int64`` token ids, shape ``(N, T)`` (next-token data).
    y : np.ndarray
        ``int64`` class ids, shape ``(N,)``; for token ids, the next token of
        every position, shape ``(N, T)``.
    groups : np.ndarray | None
        ``int64`` natural ids (e.g. the WISDM user of each window, the module
        of each text window), shape ``(N,)``, or ``None`` when the source has
        none.
    """

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.x.dtype == np.int64:  # token ids: one target per position
            if self.x.ndim != 2 or self.y.shape != self.x.shape:
                raise DataError(
                    f"token ids x {self.x.shape} need targets y of the same "
                    f"(N, T) shape, got {self.y.shape}"
                )
        elif self.x.dtype != np.float32:
            raise DataError(f"x must be float32 (or int64 tokens), got {self.x.dtype}")
        elif self.y.ndim != 1:
            raise DataError(f"y must be 1-D int64, got {self.y.dtype} {self.y.shape}")
        if self.y.dtype != np.int64:
            raise DataError(f"y must be int64, got {self.y.dtype}")
        if len(self.x) != len(self.y):
            raise DataError(f"x has {len(self.x)} rows but y has {len(self.y)}")
        if self.groups is not None and self.groups.shape != (len(self.y),):
            raise DataError(
                f"groups shape {self.groups.shape} != ({len(self.y)},) rows"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def tokens(self) -> bool:
        """Whether ``x`` holds token ids (next-token data)."""
        return self.x.dtype == np.int64

    @property
    def partition_labels(self) -> np.ndarray:
        """One ``int64`` label per row for label-aware partitioners.

        The class ids; for token sequences, the natural id of each row (its
        module or role), so a Dirichlet split skews nodes over those units,
        or zeros for a source without natural ids.
        """
        if not self.tokens:
            return self.y
        if self.groups is not None:
            return self.groups
        return np.zeros(len(self.y), dtype=np.int64)

    def subset(self, indices: np.ndarray) -> ArraySplit:
        """The rows at ``indices`` (a copy)."""
        idx = np.asarray(indices, dtype=np.int64)
        groups = None if self.groups is None else self.groups[idx]
        return ArraySplit(self.x[idx], self.y[idx], groups)


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A dataset: train split (to partition), test split (server-side eval).

    ``report`` holds what the source says about loading it (e.g. WISDM's
    records skipped and why, users without a full window); empty if nothing.
    """

    name: str
    train: ArraySplit
    test: ArraySplit
    class_names: tuple[str, ...]
    report: Mapping[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def tokens(self) -> bool:
        """Whether examples are token ids with a next-token target per position."""
        return self.train.tokens

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, channels first."""
        return tuple(self.train.x.shape[1:])
