"""MNIST and CIFAR-10 loading through torchvision, on small synthetic files."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from tandem.datasets.base import DataError
from tandem.datasets.vision import load_torchvision

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))


def _write_idx_images(path, images: np.ndarray) -> None:
    """idx3-ubyte: big-endian magic 2051 (uint8, 3 dims), then N, rows, cols."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">iiii", 2051, n, rows, cols) + images.tobytes())


def _write_idx_labels(path, labels: np.ndarray) -> None:
    """idx1-ubyte: big-endian magic 2049 (uint8, 1 dim), then N."""
    path.write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.tobytes())


def _mnist_arrays(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = 255  # normalizes to (1 - 0.1307) / 0.3081
    images[:, 5, 7] = np.arange(n, dtype=np.uint8) + offset  # a row marker
    labels = ((np.arange(n) + offset) % 10).astype(np.uint8)
    return images, labels


@pytest.fixture
def mnist_root(tmp_path):
    # torchvision reads the uncompressed files (it unpacks the .gz on download).
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, offset in (("train", 12, 0), ("t10k", 5, 100)):
        images, labels = _mnist_arrays(n, offset)
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return tmp_path / "data"


def _cifar_batch(n: int, offset: int) -> dict:
    # Rows are the flattened (3, 32, 32) image: 1024 red, 1024 green, 1024 blue.
    data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    data[:, 0, 0, 0] = 255  # red, top-left
    data[:, 1, 0, 1] = 255  # green, one to the right
    data[:, 2, 31, 31] = np.arange(n) + offset  # blue, bottom-right: a row marker
    # torchvision unpickles with encoding="latin1" and reads the str keys
    # "data" and "labels" (Python 2 str keys in the real files decode to str).
    labels = [(i + offset) % 10 for i in range(n)]
    return {"batch_label": "synthetic", "data": data.reshape(n, 3072), "labels": labels}


@pytest.fixture
def cifar_root(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [(f"data_batch_{i}", 3, 10 * i) for i in range(1, 6)]
    for name, n, offset in [*batches, ("test_batch", 4, 200)]:
        with open(folder / name, "wb") as fh:
            pickle.dump(_cifar_batch(n, offset), fh)
    with open(folder / "batches.meta", "wb") as fh:
        meta = {"label_names": CIFAR_CLASSES, "num_cases_per_batch": 3}
        pickle.dump(meta, fh)
    return tmp_path / "data"


def test_mnist_shapes_labels_and_normalization(mnist_root):
    bundle = load_torchvision("mnist", str(mnist_root), False)
    assert bundle.name == "mnist"
    assert bundle.class_names == tuple(str(d) for d in range(10))
    assert bundle.input_shape == (1, 28, 28)
    train, test = bundle.train, bundle.test
    assert train.x.shape == (12, 1, 28, 28)
    assert test.x.shape == (5, 1, 28, 28)
    assert train.x.dtype == test.x.dtype == np.float32
    assert train.y.dtype == test.y.dtype == np.int64
    assert train.groups is None
    np.testing.assert_array_equal(train.y, np.arange(12) % 10)
    np.testing.assert_array_equal(test.y, (np.arange(5) + 100) % 10)
    np.testing.assert_allclose(train.x[:, 0, 0, 0], (1 - 0.1307) / 0.3081, rtol=1e-6)
    np.testing.assert_allclose(train.x[:, 0, 1, 1], -0.1307 / 0.3081, rtol=1e-6)
    marker = np.round((test.x[:, 0, 5, 7] * 0.3081 + 0.1307) * 255)
    np.testing.assert_array_equal(marker, np.arange(5) + 100)


def test_cifar10_shapes_labels_and_normalization(cifar_root):
    # Synthetic batch files cannot match the real CIFAR-10 md5 sums, which
    # torchvision checks by default; skip only that check.
    bundle = load_torchvision("cifar10", str(cifar_root), False, verify_checksums=False)
    assert bundle.name == "cifar10"
    assert bundle.class_names == tuple(CIFAR_CLASSES)
    assert bundle.input_shape == (3, 32, 32)
    train, test = bundle.train, bundle.test
    assert train.x.shape == (15, 3, 32, 32)
    assert test.x.shape == (4, 3, 32, 32)
    assert train.x.dtype == test.x.dtype == np.float32
    assert train.y.dtype == test.y.dtype == np.int64
    assert train.x.flags.c_contiguous
    expected_y = [(i + 10 * b) % 10 for b in range(1, 6) for i in range(3)]
    np.testing.assert_array_equal(train.y, expected_y)
    np.testing.assert_array_equal(test.y, [(i + 200) % 10 for i in range(4)])
    mean = np.array([0.4914, 0.4822, 0.4465])
    std = np.array([0.2470, 0.2435, 0.2616])
    # Channels stay in place (CHW), each normalized with its own statistics.
    np.testing.assert_allclose(train.x[:, 0, 0, 0], (1 - mean[0]) / std[0], rtol=1e-6)
    np.testing.assert_allclose(train.x[:, 1, 0, 1], (1 - mean[1]) / std[1], rtol=1e-6)
    np.testing.assert_allclose(train.x[:, 0, 0, 1], -mean[0] / std[0], rtol=1e-6)
    np.testing.assert_allclose(train.x[:, 2, 5, 5], -mean[2] / std[2], rtol=1e-6)
    marker = np.round((test.x[:, 2, 31, 31] * std[2] + mean[2]) * 255)
    np.testing.assert_array_equal(marker, np.arange(4) + 200)


def test_cifar10_checksums_checked_by_default(cifar_root):
    with pytest.raises(DataError, match="cifar10"):
        load_torchvision("cifar10", str(cifar_root), False)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_root_raises_without_downloading(tmp_path, name):
    root = tmp_path / "empty"
    with pytest.raises(DataError) as info:
        load_torchvision(name, str(root), False)
    message = str(info.value)
    assert str(root) in message
    assert "data-download=true" in message
    expected = "train-images-idx3-ubyte" if name == "mnist" else "data_batch_1"
    assert expected in message
    assert not root.exists()  # nothing was created, let alone downloaded


def test_unknown_name_raises(tmp_path):
    with pytest.raises(DataError, match="unknown"):
        load_torchvision("imagenet", str(tmp_path), False)
