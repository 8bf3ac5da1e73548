"""Data sources and partitioning.

``load_dataset(cfg)`` returns a :class:`DataBundle` for the configured source:

- ``mnist1d`` (default): generated locally, no download (:mod:`.mnist1d`).
- ``wisdm``: WISDM v1.1 activity windows from a user-supplied raw file
  (:mod:`.wisdm`), with users as natural ids.
- ``mnist`` / ``cifar10``: torchvision datasets from a local root, downloaded
  only when ``data-download=true`` (:mod:`.vision`).

``load_partition(cfg, num_partitions, partition_id)`` returns one node's share
of the training split (:mod:`.partition`).
"""

from __future__ import annotations

from functools import lru_cache

from tandem.config import DataConfig
from tandem.datasets.base import ArraySplit, DataBundle, DataError
from tandem.datasets.partition import partition_indices

__all__ = [
    "ArraySplit",
    "DataBundle",
    "DataError",
    "load_dataset",
    "load_partition",
    "partition_indices",
]


@lru_cache(maxsize=4)
def load_dataset(cfg: DataConfig) -> DataBundle:
    """Load the configured source (cached per process)."""
    if cfg.dataset == "mnist1d":
        from tandem.datasets.mnist1d import load_mnist1d

        return load_mnist1d(cfg.mnist1d_samples, cfg.test_fraction)
    if cfg.dataset == "wisdm":
        from tandem.datasets.wisdm import load_wisdm

        return load_wisdm(
            cfg.path,
            window=cfg.wisdm_window,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
        )
    if cfg.dataset in ("mnist", "cifar10"):
        from tandem.datasets.vision import load_torchvision

        return load_torchvision(cfg.dataset, cfg.path or "data", cfg.download)
    raise DataError(f"unknown dataset {cfg.dataset!r}")


def load_partition(
    cfg: DataConfig, num_partitions: int, partition_id: int
) -> ArraySplit:
    """One node's share of the training split."""
    train = load_dataset(cfg).train
    idx = partition_indices(
        train.y,
        train.groups,
        cfg.partitioner,
        num_partitions,
        partition_id,
        alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
    )
    return train.subset(idx)
