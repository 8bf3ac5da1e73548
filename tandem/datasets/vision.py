"""MNIST and CIFAR-10 through torchvision, read from a local root.

The files are read by :class:`torchvision.datasets.MNIST` and
:class:`torchvision.datasets.CIFAR10` from ``root`` (``<root>/MNIST/raw/`` and
``<root>/cifar-10-batches-py/``, torchvision's own layout). They are downloaded
only when the caller asks (``data-download=true``); otherwise missing files are a
:class:`DataError`. We take the datasets' ``.data`` and ``.targets`` directly
(no per-item PIL transforms) and normalize with the usual per-channel statistics.

The converted arrays are not cached on disk: both datasets load from their own
files in about a second, and a float32 copy (about 740 MB for CIFAR-10) would
cost more disk and reading time than it saves. ``load_dataset`` keeps them in
memory per process.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from tandem.datasets.base import ArraySplit, DataBundle, DataError

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "MNIST_MEAN", "MNIST_STD", "load_torchvision"]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = (
    *(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
)


def _expected(name: str, root: Path) -> tuple[Path, tuple[str, ...]]:
    """The folder torchvision reads ``name`` from, and the files it needs there."""
    if name == "mnist":
        return root / "MNIST" / "raw", _MNIST_FILES
    return root / "cifar-10-batches-py", _CIFAR10_FILES


def _normalize(
    images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """``uint8`` images ``(N, C, H, W)`` to float32, ``(x / 255 - mean) / std``."""
    x = np.empty(images.shape, dtype=np.float32)
    x[...] = images
    x /= np.float32(255.0)
    x -= np.asarray(mean, dtype=np.float32)[:, None, None]
    x /= np.asarray(std, dtype=np.float32)[:, None, None]
    return x


def _load_mnist(root: str, download: bool) -> DataBundle:
    from torchvision.datasets import MNIST

    def split(train: bool) -> ArraySplit:
        ds = MNIST(root, train=train, download=download)
        images = ds.data.numpy()[:, None, :, :]  # (N, 1, 28, 28) uint8
        labels = ds.targets.numpy().astype(np.int64)
        return ArraySplit(_normalize(images, MNIST_MEAN, MNIST_STD), labels)

    return DataBundle(
        name="mnist",
        train=split(True),
        test=split(False),
        class_names=tuple(str(d) for d in range(10)),
    )


def _load_cifar10(root: str, download: bool, verify_checksums: bool) -> DataBundle:
    from torchvision.datasets import CIFAR10

    class _UncheckedCIFAR10(CIFAR10):
        """CIFAR-10 that checks its files exist but not their md5 sums.

        ``check_integrity(path, None)`` only tests that the file exists.
        """

        train_list: ClassVar[list[list]] = [[f, None] for f, _ in CIFAR10.train_list]
        test_list: ClassVar[list[list]] = [[f, None] for f, _ in CIFAR10.test_list]
        meta: ClassVar[dict] = {**CIFAR10.meta, "md5": None}

    cls = CIFAR10 if verify_checksums else _UncheckedCIFAR10
    classes: tuple[str, ...] = ()

    def split(train: bool) -> ArraySplit:
        nonlocal classes
        ds = cls(root, train=train, download=download)
        classes = tuple(str(c) for c in ds.classes)
        images = np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2)  # NCHW
        labels = np.asarray(ds.targets, dtype=np.int64)
        return ArraySplit(_normalize(images, CIFAR10_MEAN, CIFAR10_STD), labels)

    train, test = split(True), split(False)
    return DataBundle(name="cifar10", train=train, test=test, class_names=classes)


def load_torchvision(
    name: str, root: str, download: bool = False, *, verify_checksums: bool = True
) -> DataBundle:
    """Load MNIST or CIFAR-10 from a local torchvision root.

    Parameters
    ----------
    name : str
        ``mnist`` or ``cifar10``.
    root : str
        The folder holding ``MNIST/raw/`` or ``cifar-10-batches-py/``.
    download : bool (default: False)
        Let torchvision download missing files into ``root``. Nothing is fetched
        unless this is true.
    verify_checksums : bool (default: True)
        CIFAR-10 only: check the files' md5 sums (torchvision's default). False
        checks only that they exist (for small synthetic test files). MNIST's
        raw files are never checksummed by torchvision.

    Returns
    -------
    DataBundle
        MNIST: ``x`` float32 ``(N, 1, 28, 28)``, scaled to [0, 1] and normalized
        with mean 0.1307 and std 0.3081; class names ``"0"`` to ``"9"``.
        CIFAR-10: ``x`` float32 ``(N, 3, 32, 32)``, scaled to [0, 1] and
        normalized per channel with :data:`CIFAR10_MEAN` and
        :data:`CIFAR10_STD`; the dataset's class names. ``y`` is int64.

    Raises
    ------
    DataError
        On an unknown name, files missing with ``download`` false, or files
        torchvision cannot read (or, with ``download``, fetch).
    """
    if name not in ("mnist", "cifar10"):
        raise DataError(f"unknown torchvision dataset {name!r} (mnist or cifar10)")
    folder, files = _expected(name, Path(root).expanduser())
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and not download:
        raise DataError(
            f"{name} not found under root {root!r}: expected {', '.join(files)} in "
            f"{folder} (missing: {', '.join(missing)}). Set data-download=true to "
            "fetch them, or point data-path at a folder that holds them."
        )
    try:
        if name == "mnist":
            return _load_mnist(root, download)
        return _load_cifar10(root, download, verify_checksums)
    except (RuntimeError, OSError) as exc:
        action = "download or read" if download else "read"
        raise DataError(
            f"could not {action} {name} under root {root!r} "
            f"(expected {', '.join(files)} in {folder}): {exc}"
        ) from exc
