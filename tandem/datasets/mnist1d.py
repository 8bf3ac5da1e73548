"""MNIST-1D, generated locally: the embedded default that needs no download.

MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML
2024, https://arxiv.org/abs/2011.14439) turns the ten digit templates into
40-sample 1-D signals with random padding, translation, shear, scaling and
correlated noise. We build it with the package's own ``make_dataset`` (never its
download path). ``make_dataset`` seeds Python's and NumPy's *global* RNGs, so the
call runs inside :func:`isolated_global_rng`, which restores both afterwards.
Generation takes about 2 s per 10,000 samples; the arrays are cached on disk
(see :func:`tandem.datasets.cache.cached_arrays`) so every ClientApp process
after the first reads them in milliseconds.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np

from tandem.datasets.base import ArraySplit, DataBundle
from tandem.datasets.cache import cached_arrays

__all__ = ["isolated_global_rng", "load_mnist1d"]

CLASS_NAMES = tuple(str(d) for d in range(10))


@contextlib.contextmanager
def isolated_global_rng() -> Iterator[None]:
    """Restore Python's and NumPy's global RNG states on exit."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _generate(num_samples: int, train_fraction: float, seed: int) -> dict:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.train_split = train_fraction
    args.seed = seed
    with isolated_global_rng():
        data = make_dataset(args)
    return {
        "x": data["x"].astype(np.float32)[:, None, :],
        "y": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32)[:, None, :],
        "y_test": data["y_test"].astype(np.int64),
    }


def load_mnist1d(
    num_samples: int = 10000, test_fraction: float = 0.2, seed: int = 42
) -> DataBundle:
    """Generate (or read from cache) MNIST-1D.

    Parameters
    ----------
    num_samples : int (default: 10000)
        Total samples, split into train and test; 10 balanced classes.
    test_fraction : float (default: 0.2)
        Share of samples in the test split.
    seed : int (default: 42)
        The generator's seed (42 is the published dataset's).

    Returns
    -------
    DataBundle
        ``x`` of shape ``(N, 1, 40)`` float32, standardized over the dataset.
    """
    key = f"mnist1d-n{num_samples}-t{test_fraction:g}-s{seed}"
    arrays = cached_arrays(key, lambda: _generate(num_samples, 1 - test_fraction, seed))
    return DataBundle(
        name="mnist1d",
        train=ArraySplit(arrays["x"], arrays["y"]),
        test=ArraySplit(arrays["x_test"], arrays["y_test"]),
        class_names=CLASS_NAMES,
    )
