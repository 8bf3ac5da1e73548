"""Device clustering: planted groups recovered, k chosen, averages by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from tandem.clustering import (
    choose_n_clusters,
    cluster_average,
    cluster_devices,
    hierarchical_aggregate,
)


def _planted(
    seed: int, per_group: int = 6, d: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """3 groups × 6 devices: directions a, −a and b, random step sizes, noise."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=d), rng.normal(size=d)
    truth = np.repeat(np.arange(3), per_group)
    scale = rng.uniform(0.5, 2.0, (truth.size, 1))  # step size must not matter
    updates = np.stack([a, -a, b])[truth] * scale + 0.3 * rng.normal(
        size=(truth.size, d)
    )
    return updates, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_groups_are_recovered_and_counted(seed):
    updates, truth = _planted(seed)
    labels = cluster_devices(updates, 3, seed=0)
    assert adjusted_rand_score(truth, labels) == 1.0
    assert labels.dtype == np.int64 and labels[0] == 0  # numbered by first appearance
    assert choose_n_clusters(updates, 6, seed=0) == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_noise_is_one_cluster(seed):
    noise = np.random.default_rng(100 + seed).normal(size=(18, 64))
    assert choose_n_clusters(noise, 6, seed=0) == 1  # best silhouette measured < 0.07


def test_few_devices_and_duplicates_give_fewer_clusters():
    updates, _ = _planted(0)
    two = updates[[0, 6]]
    np.testing.assert_array_equal(cluster_devices(two, 5, seed=0), [0, 1])
    # four devices but only two distinct directions: two clusters, none empty
    same = np.stack([updates[0], 2 * updates[0], updates[6], updates[6]])
    np.testing.assert_array_equal(cluster_devices(same, 3, seed=0), [0, 0, 1, 1])
    np.testing.assert_array_equal(cluster_devices(updates, 1, seed=0), np.zeros(18))
    assert choose_n_clusters(two, 4, seed=0) == 1
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_devices(updates, 0, seed=0)
    with pytest.raises(ValueError, match="updates"):
        cluster_devices(np.zeros(5), 2, seed=0)


def test_profiles_split_devices_the_updates_cannot():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=32)
    updates = direction + 0.05 * rng.normal(size=(8, 32))  # one direction for all
    bandwidth_mbit = np.array([5, 6, 5, 4, 200, 210, 190, 205], dtype=float)
    assert choose_n_clusters(updates, 4, seed=0) == 1
    labels = cluster_devices(updates, 2, seed=0, profiles=bandwidth_mbit)
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="profiles"):
        cluster_devices(updates, 2, seed=0, profiles=bandwidth_mbit[:5])


def test_cluster_average_and_hierarchical_aggregate_by_hand():
    updates = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
    weights = np.array([1.0, 3.0, 2.0, 0.0])
    labels = np.array([0, 0, 1, 3])  # cluster 2 empty, cluster 3 without weight
    out = cluster_average(updates, weights, labels)
    np.testing.assert_allclose(out.means, [[2.5, 0.0], [0.0, 2.0], [0, 0], [0, 0]])
    np.testing.assert_allclose(out.weights, [4.0, 2.0, 0.0, 0.0])
    np.testing.assert_array_equal(out.sizes, [2, 1, 0, 1])
    # with the clusters' total weights, two levels equal the flat weighted mean
    flat = weights @ updates / weights.sum()
    np.testing.assert_allclose(hierarchical_aggregate(out.means, out.weights), flat)
    # with equal cluster weights each non-empty cluster has the same say
    np.testing.assert_allclose(
        hierarchical_aggregate(out.means[:2], np.ones(2)), [1.25, 1.0]
    )
    with pytest.raises(ValueError, match="cluster_weights"):
        hierarchical_aggregate(out.means, np.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        cluster_average(updates, weights, np.array([0, 1, -1, 0]))
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_average(updates, weights, labels, n_clusters=2)


def test_two_level_equals_flat_on_random_clusters():
    updates, _ = _planted(5)
    weights = np.random.default_rng(5).uniform(0.1, 2.0, 18)
    labels = cluster_devices(updates, 3, seed=1)
    out = cluster_average(updates, weights, labels)
    np.testing.assert_allclose(
        hierarchical_aggregate(out.means, out.weights),
        weights @ updates / weights.sum(),
    )
