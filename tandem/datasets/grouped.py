"""A split with real group structure: devices in groups that disagree on labels.

``partitioner="grouped"`` with ``partition-groups = G`` (pure numpy):

- every row of the train and test splits is dealt to one of ``G`` groups,
  balanced (a seeded permutation of the rows, then ``row rank mod G``); the
  group is stored as the row's natural id (:attr:`ArraySplit.groups`);
- group ``g`` sees every label through the cyclic shift
  ``π_g(y) = (y + g·⌊C/G⌋) mod C`` for ``C`` classes: group 0 keeps the
  source's labels, and for ``G <= C`` no two groups agree on the label of
  any signal;
- device (partition) ``p`` belongs to group ``p mod G`` and holds an IID
  share of that group's rows, in the train and in the test split
  (:mod:`.partition`), so its test data follows its group.

This is concept shift, as in the label-swap experiments of clustered
federated learning (Sattler et al. 2020, CFL; Ghosh et al. 2020, IFCA):
the signals of all groups come from one distribution, so a single global
model can fit at best one group's labelling of a signal, while a model per
group faces an ordinary ``C``-class problem. The server's central test split
is the mixture of the groups (each row under its group's labels).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tandem.datasets.base import ArraySplit, DataBundle, DataError

__all__ = ["assign_groups", "group_labels", "grouped_bundle", "label_shift"]


def label_shift(group: int, num_groups: int, num_classes: int) -> int:
    """``g·⌊C/G⌋``: how far group ``g`` shifts every label (mod ``C``)."""
    if not 1 <= num_groups <= num_classes:
        raise DataError(
            f"partition-groups = {num_groups} must lie in [1, {num_classes}] "
            f"(the number of classes)"
        )
    if not 0 <= group < num_groups:
        raise DataError(f"group {group} outside [0, {num_groups})")
    return group * (num_classes // num_groups)


def group_labels(
    y: np.ndarray, groups: np.ndarray, num_groups: int, num_classes: int
) -> np.ndarray:
    """``π_{g_i}(y_i) = (y_i + g_i·⌊C/G⌋) mod C`` for every row ``i``.

    Parameters
    ----------
    y : np.ndarray
        ``int64`` labels in ``[0, C)``, shape ``(N,)``.
    groups : np.ndarray
        ``int64`` group of each row in ``[0, G)``, shape ``(N,)``.
    num_groups, num_classes : int
        ``G`` and ``C``.
    """
    if y.shape != groups.shape:
        raise DataError(f"labels {y.shape} and groups {groups.shape} differ")
    shifts = np.array(
        [label_shift(g, num_groups, num_classes) for g in range(num_groups)],
        dtype=np.int64,
    )
    if groups.size and (groups.min() < 0 or groups.max() >= num_groups):
        raise DataError(f"groups must lie in [0, {num_groups})")
    return ((y + shifts[groups]) % num_classes).astype(np.int64)


def assign_groups(num_rows: int, num_groups: int, seed: int) -> np.ndarray:
    """Balanced groups: row ``i`` gets ``rank_i mod G``, ranks a seeded permutation."""
    if num_groups < 1:
        raise DataError(f"partition-groups must be >= 1, got {num_groups}")
    ranks = np.random.default_rng(seed).permutation(num_rows)
    return (ranks % num_groups).astype(np.int64)


def _grouped(
    split: ArraySplit, num_groups: int, num_classes: int, seed: int
) -> ArraySplit:
    groups = assign_groups(len(split), num_groups, seed)
    y = group_labels(split.y, groups, num_groups, num_classes)
    return ArraySplit(split.x, y, groups)


def grouped_bundle(bundle: DataBundle, num_groups: int, seed: int) -> DataBundle:
    """``bundle`` with both splits dealt to groups and relabelled (see module).

    Raises
    ------
    DataError
        For token data (no class labels to shift), a source that already has
        natural ids, or ``G`` outside ``[1, C]``.
    """
    if bundle.tokens:
        raise DataError("the grouped split needs class labels, not token data")
    if bundle.train.groups is not None:
        raise DataError(
            f"the grouped split replaces natural ids; '{bundle.name}' has its own "
            "(use partitioner natural)"
        )
    c = bundle.num_classes
    label_shift(0, num_groups, c)  # checks G against C
    return dataclasses.replace(
        bundle,
        train=_grouped(bundle.train, num_groups, c, seed),
        test=_grouped(bundle.test, num_groups, c, seed + 1),
        report={**bundle.report, "partition-groups": num_groups},
    )
