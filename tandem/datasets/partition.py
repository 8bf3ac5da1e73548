"""Splitting a training set across nodes with Flower Datasets partitioners.

We do not hand-write partitioners: the label/id columns go into a Hugging Face
``datasets.Dataset`` with a row-index column, Flower Datasets' partitioner splits
it, and each partition is returned as the row indices it holds.

- ``iid``: :class:`flwr_datasets.partitioner.IidPartitioner` over rows shuffled
  with the run seed (it cuts contiguous shards, so the shuffle makes it IID).
- ``dirichlet``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` by
  label with concentration ``alpha`` (Hsu et al. 2019); small alpha = skewed.
- ``natural``: :class:`~flwr_datasets.partitioner.NaturalIdPartitioner` over the
  source's natural ids (WISDM users). With fewer nodes than ids, ids are dealt
  to nodes round-robin in sorted order, so each node holds whole users.
- ``contiguous``: :class:`~flwr_datasets.partitioner.IidPartitioner` over
  rows in source order (no shuffle): node ``i`` holds the ``i``-th contiguous
  shard (e.g. of a plain-text file).
- ``grouped``: the rows carry a group id (:mod:`.grouped`); partition ``p``
  belongs to group ``p mod G`` and holds an
  :class:`~flwr_datasets.partitioner.IidPartitioner` share of that group's
  rows, shuffled with the run seed.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from tandem.datasets.cache import cached_arrays
from tandem.options import ConfigError

__all__ = ["partition_indices"]


def partition_indices(
    labels: np.ndarray,
    groups: np.ndarray | None,
    scheme: str,
    num_partitions: int,
    partition_id: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Row indices of partition ``partition_id`` out of ``num_partitions``.

    Parameters
    ----------
    labels : np.ndarray
        ``int64`` labels of the training split, shape ``(N,)``.
    groups : np.ndarray | None
        Natural ids (``natural``) or group ids in ``[0, G)`` (``grouped``),
        shape ``(N,)``.
    scheme : str
        ``iid``, ``dirichlet``, ``natural``, ``contiguous`` or ``grouped``.
    num_partitions, partition_id : int
        How many partitions, and which one to return.
    alpha : float (default: 0.5)
        Dirichlet concentration (``dirichlet`` only), > 0.
    seed : int (default: 0)
        Seed for the shuffle and the Dirichlet draws.

    Raises
    ------
    ConfigError
        On a partition count the data cannot support, or an invalid id.
    """
    n = len(labels)
    if num_partitions < 1:
        raise ConfigError("num-partitions", num_partitions, "must be >= 1")
    if num_partitions > n:
        raise ConfigError(
            "num-partitions",
            num_partitions,
            f"must not exceed the {n} training samples",
        )
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            "partition-id", partition_id, f"must lie in [0, {num_partitions})"
        )
    key = (labels.tobytes(), None if groups is None else groups.tobytes())
    parts = _cached_partitions(key, scheme, num_partitions, float(alpha), int(seed))
    return parts[partition_id]


@lru_cache(maxsize=8)
def _cached_partitions(
    key: tuple[bytes, bytes | None],
    scheme: str,
    num_partitions: int,
    alpha: float,
    seed: int,
) -> tuple[np.ndarray, ...]:
    """Partitions from this process's memory, the disk cache, or Flower Datasets.

    In deployment each message starts a fresh ClientApp process; the disk cache
    spares each of them importing and running the partitioner (~1.5 s).
    """
    digest = hashlib.sha256(key[0] + (key[1] or b"")).hexdigest()[:16]
    name = f"partition-{scheme}-n{num_partitions}-a{alpha:g}-s{seed}-{digest}"
    arrays = cached_arrays(
        name,
        lambda: {
            f"p{i}": part
            for i, part in enumerate(
                _all_partitions(key, scheme, num_partitions, alpha, seed)
            )
        },
    )
    return tuple(arrays[f"p{i}"] for i in range(num_partitions))


def _all_partitions(
    key: tuple[bytes, bytes | None],
    scheme: str,
    num_partitions: int,
    alpha: float,
    seed: int,
) -> tuple[np.ndarray, ...]:
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

    labels = np.frombuffer(key[0], dtype=np.int64)
    if scheme == "grouped":
        return _grouped_partitions(key[1], num_partitions, seed)
    if scheme == "contiguous":
        order = np.arange(len(labels))
    else:
        order = np.random.default_rng(seed).permutation(len(labels))
    columns: dict[str, np.ndarray] = {"index": order, "label": labels[order]}

    if scheme in ("iid", "contiguous"):
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=1,
            seed=seed,
        )
    elif scheme == "natural":
        if key[1] is None:
            raise ConfigError("partitioner", scheme, "needs a source with natural ids")
        groups = np.frombuffer(key[1], dtype=np.int64)
        ids = np.unique(groups)
        if num_partitions > len(ids):
            raise ConfigError(
                "num-partitions",
                num_partitions,
                f"must not exceed the {len(ids)} natural ids (users) in the data",
            )
        # Deal ids to nodes round-robin so each node holds whole users.
        node_of_id = {int(g): i % num_partitions for i, g in enumerate(ids)}
        columns["node"] = np.array([node_of_id[int(g)] for g in groups[order]])
        partitioner = NaturalIdPartitioner(partition_by="node")
    else:
        raise ConfigError(
            "partitioner",
            scheme,
            "must be iid, dirichlet, natural, contiguous or grouped",
        )

    partitioner.dataset = Dataset.from_dict(columns)
    if scheme == "natural":
        _ = partitioner.num_partitions  # builds the partition -> natural id map
        by_node = {v: k for k, v in partitioner.partition_id_to_natural_id.items()}
        ids_in_order = [by_node[i] for i in range(num_partitions)]
    else:
        ids_in_order = list(range(num_partitions))
    try:
        parts = tuple(
            np.sort(np.asarray(partitioner.load_partition(pid)["index"], np.int64))
            for pid in ids_in_order
        )
    except ValueError as err:  # Dirichlet could not satisfy its constraints
        raise ConfigError("dirichlet-alpha", alpha, f"cannot partition: {err}") from err
    return parts


def _grouped_partitions(
    groups_bytes: bytes | None, num_partitions: int, seed: int
) -> tuple[np.ndarray, ...]:
    """Partition ``p``: an IID share of group ``p mod G``'s rows."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    if groups_bytes is None:
        raise ConfigError("partitioner", "grouped", "needs rows with group ids")
    groups = np.frombuffer(groups_bytes, dtype=np.int64)
    count = int(groups.max()) + 1
    if num_partitions < count:
        raise ConfigError(
            "num-partitions",
            num_partitions,
            f"must be at least the {count} groups of the grouped split",
        )
    order = np.random.default_rng(seed).permutation(len(groups))
    parts: list[np.ndarray] = [np.zeros(0, np.int64)] * num_partitions
    for g in range(count):
        rows = order[groups[order] == g]
        members = list(range(g, num_partitions, count))
        if len(rows) < len(members):
            raise ConfigError(
                "num-partitions",
                num_partitions,
                f"group {g} has {len(rows)} rows for {len(members)} partitions",
            )
        partitioner = IidPartitioner(num_partitions=len(members))
        partitioner.dataset = Dataset.from_dict({"index": rows})
        for i, pid in enumerate(members):
            parts[pid] = np.sort(
                np.asarray(partitioner.load_partition(i)["index"], np.int64)
            )
    return tuple(parts)
