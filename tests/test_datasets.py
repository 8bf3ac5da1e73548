"""MNIST-1D generation and Flower Datasets partitioning."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tandem.clients.node import NodeConfig, load_node_split
from tandem.config import ConfigError, RunConfig
from tandem.datasets import load_dataset, partition_indices
from tandem.datasets.mnist1d import load_mnist1d


def test_mnist1d_shapes_split_and_classes():
    data = load_mnist1d(num_samples=1000, test_fraction=0.2)
    assert data.train.x.shape == (800, 1, 40)
    assert data.test.x.shape == (200, 1, 40)
    assert data.train.x.dtype == np.float32 and data.train.y.dtype == np.int64
    assert data.num_classes == 10 and data.input_shape == (1, 40)
    # 100 samples per class in total, all ten classes present in both splits
    counts = np.bincount(np.concatenate([data.train.y, data.test.y]), minlength=10)
    assert counts.tolist() == [100] * 10
    assert set(data.test.y.tolist()) == set(range(10))


def test_mnist1d_is_deterministic_and_leaves_global_rngs_alone():
    np.random.seed(123)
    random.seed(123)
    expected_np = np.random.get_state()[1].copy()
    expected_py = random.getstate()
    a = load_mnist1d(num_samples=500, test_fraction=0.2, seed=7)
    assert (np.random.get_state()[1] == expected_np).all()
    assert random.getstate() == expected_py
    b = load_mnist1d(num_samples=500, test_fraction=0.2, seed=7)  # from cache
    np.testing.assert_array_equal(a.train.x, b.train.x)
    c = load_mnist1d(num_samples=500, test_fraction=0.2, seed=8)
    assert not np.array_equal(a.train.x, c.train.x)


def test_mnist1d_matches_the_reference_generator():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 500
    args.train_split = 0.8
    ref = make_dataset(args)
    ours = load_mnist1d(num_samples=500, test_fraction=0.2, seed=42)
    np.testing.assert_allclose(ours.train.x[:, 0, :], ref["x"], rtol=1e-6)
    np.testing.assert_array_equal(ours.test.y, ref["y_test"])


def _labels(n: int = 1000, classes: int = 10) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % classes


def test_iid_partitions_cover_the_data_exactly_once():
    labels = _labels()
    parts = [partition_indices(labels, None, "iid", 7, i, seed=3) for i in range(7)]
    merged = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(merged, np.arange(len(labels)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # shuffled: a partition is not one contiguous block
    assert not np.array_equal(parts[0], np.arange(parts[0][0], parts[0][0] + sizes[0]))


def test_dirichlet_is_seeded_and_skewed():
    labels = _labels(2000)
    p1 = partition_indices(labels, None, "dirichlet", 5, 0, alpha=0.1, seed=1)
    p2 = partition_indices(labels, None, "dirichlet", 5, 0, alpha=0.1, seed=1)
    np.testing.assert_array_equal(p1, p2)
    parts = [
        partition_indices(labels, None, "dirichlet", 5, i, alpha=0.1, seed=1)
        for i in range(5)
    ]
    assert sum(len(p) for p in parts) == len(labels)
    # with alpha=0.1 a node's labels are far from uniform: its top class
    # holds much more than the 10% an IID split would give it
    top_share = max(np.bincount(labels[p]).max() / len(p) for p in parts if len(p))
    assert top_share > 0.3


def test_natural_partition_keeps_whole_users():
    users = np.repeat(np.arange(6, dtype=np.int64), 10)
    labels = _labels(60, 3)
    parts = [partition_indices(labels, users, "natural", 3, i) for i in range(3)]
    seen = set()
    for p in parts:
        owners = set(users[p].tolist())
        assert len(owners) == 2  # 6 users dealt to 3 nodes
        assert not owners & seen
        seen |= owners
        # every window of an owned user is in this partition
        assert len(p) == 20
    with pytest.raises(ConfigError, match="6 natural ids"):
        partition_indices(labels, users, "natural", 7, 0)


def test_more_partitions_than_samples_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        partition_indices(_labels(5), None, "iid", 6, 0)
    assert info.value.key == "num-partitions"
    assert "5 training samples" in str(info.value)


def test_load_node_split_through_config():
    cfg = RunConfig.from_flat({"mnist1d-samples": 1000})
    bundle = load_dataset(cfg.data)
    part = load_node_split(cfg, NodeConfig(partition_id=2, num_partitions=4))
    assert len(part) == len(bundle.train) // 4
    assert part.x.shape[1:] == (1, 40)
    idx = partition_indices(bundle.train.y, None, "iid", 4, 2, seed=cfg.data.seed)
    np.testing.assert_array_equal(part.y, bundle.train.y[idx])
