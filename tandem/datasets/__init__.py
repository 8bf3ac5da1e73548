"""Data sources and partitioning.

``load_dataset(cfg)`` returns a :class:`DataBundle` for the configured source,
built by the entry of :data:`DATASETS` named by ``dataset``:

- ``mnist1d`` (default): generated locally, no download (:mod:`.mnist1d`).
- ``wisdm``: WISDM v1.1 activity windows from a user-supplied raw file
  (:mod:`.wisdm`), with users as natural ids.
- ``mnist`` / ``cifar10``: torchvision datasets from a local root, downloaded
  only when ``data-download=true`` (:mod:`.vision`).
- ``pysource``: next-byte windows of the running interpreter's standard
  library, its top-level modules and packages as natural ids
  (:mod:`.pysource`); no download.
- ``text``: next-byte windows of ``data-path``, a plain-text file or LEAF
  Shakespeare's JSON with speaking roles as natural ids (:mod:`.text`).

Adding a source is one builder function ``(DataConfig) -> DataBundle`` and one
line in :data:`DATASETS`; the run config's ``dataset`` choices are its keys.
:func:`partition_indices` cuts a split into one node's share (:mod:`.partition`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

from tandem.datasets.base import ArraySplit, DataBundle, DataError
from tandem.datasets.partition import partition_indices
from tandem.options import registered

if TYPE_CHECKING:
    from tandem.config import DataConfig

__all__ = [
    "DATASETS",
    "ArraySplit",
    "DataBundle",
    "DataError",
    "dataset_builder",
    "load_dataset",
    "partition_indices",
]


def _mnist1d(cfg: DataConfig) -> DataBundle:
    from tandem.datasets.mnist1d import load_mnist1d

    return load_mnist1d(cfg.mnist1d_samples, cfg.test_fraction)


def _wisdm(cfg: DataConfig) -> DataBundle:
    from tandem.datasets.wisdm import load_wisdm

    return load_wisdm(
        cfg.path,
        window=cfg.wisdm_window,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
    )


def _mnist(cfg: DataConfig) -> DataBundle:
    from tandem.datasets.vision import load_torchvision

    return load_torchvision("mnist", cfg.path or "data", cfg.download)


def _cifar10(cfg: DataConfig) -> DataBundle:
    from tandem.datasets.vision import load_torchvision

    return load_torchvision("cifar10", cfg.path or "data", cfg.download)


def _pysource(cfg: DataConfig) -> DataBundle:
    from tandem.datasets.pysource import load_pysource

    return load_pysource(
        cfg.text_context, cfg.test_fraction, cfg.text_max_bytes, cfg.text_test_windows
    )


def _text(cfg: DataConfig) -> DataBundle:
    from tandem.datasets.text import load_text

    return load_text(
        cfg.path,
        cfg.text_context,
        cfg.test_fraction,
        cfg.text_max_bytes,
        cfg.text_test_windows,
    )


#: Dataset name -> builder. The builders import their source only when called.
DATASETS: dict[str, Callable[[DataConfig], DataBundle]] = {
    "mnist1d": _mnist1d,
    "wisdm": _wisdm,
    "mnist": _mnist,
    "cifar10": _cifar10,
    "pysource": _pysource,
    "text": _text,
}


def dataset_builder(name: str) -> Callable[[DataConfig], DataBundle]:
    """The builder registered as ``name``.

    Raises
    ------
    ConfigError
        Naming ``dataset`` and the registered names, if ``name`` is not one.
    """
    return registered(DATASETS, "dataset", name)


@lru_cache(maxsize=4)
def load_dataset(cfg: DataConfig) -> DataBundle:
    """Load the configured source (cached per process).

    With ``partitioner="grouped"`` the rows are dealt to groups and
    relabelled per group (:func:`~tandem.datasets.grouped.grouped_bundle`).
    """
    bundle = dataset_builder(cfg.dataset)(cfg)
    if cfg.partitioner == "grouped":
        from tandem.datasets.grouped import grouped_bundle

        bundle = grouped_bundle(bundle, cfg.partition_groups, cfg.seed)
    return bundle
