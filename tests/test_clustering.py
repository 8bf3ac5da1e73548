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


def test_cluster_average_checks_name_what_is_wrong():
    updates = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
    weights = np.array([1.0, 3.0, 2.0, 0.0])
    labels = np.array([0, 0, 1, 3])
    for args, message in [
        (
            (weights, labels[:3]),
            "weights and labels must have shape (4,), got (4,) and (3,)",
        ),
        (
            (weights[:3], labels),
            "weights and labels must have shape (4,), got (3,) and (4,)",
        ),
        (
            (np.array([1.0, -1.0, 2.0, 0.0]), labels),
            "weights must be finite and non-negative",
        ),
        (
            (np.array([1.0, np.nan, 2.0, 0.0]), labels),
            "weights must be finite and non-negative",
        ),
        ((weights, np.array([0, 1, -1, 0])), "labels must be non-negative integers"),
        (
            (weights, np.array([0.0, 1.0, 1.0, 0.0])),
            "labels must be non-negative integers",
        ),
        # labels up to 3 need 4 clusters: 3 is one short
        ((weights, labels, 3), "n_clusters = 3 but labels go up to 3"),
    ]:
        with pytest.raises(ValueError) as info:
            cluster_average(updates, *args)
        assert str(info.value) == message


def test_cluster_average_pads_to_n_clusters():
    # n_clusters beyond the largest label: trailing empty clusters, all arrays
    # of length C, sizes as int64
    updates = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    out = cluster_average(updates, np.array([1.0, 1.0, 2.0]), np.array([0, 0, 1]), 4)
    assert out.means.tolist() == [[2.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]
    assert out.weights.tolist() == [2.0, 2.0, 0.0, 0.0]
    assert out.sizes.tolist() == [2, 1, 0, 0] and out.sizes.dtype == np.int64


def test_hierarchical_aggregate_checks_and_float64_weights():
    means = np.array([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0]])
    for w, message in [
        (np.ones(3), "cluster_weights must have shape (2,), got (3,)"),
        (
            np.array([-1.0, 2.0]),
            "cluster_weights must be finite, non-negative, not all zero",
        ),
        (
            np.array([np.inf, 1.0]),
            "cluster_weights must be finite, non-negative, not all zero",
        ),
        (np.zeros(2), "cluster_weights must be finite, non-negative, not all zero"),
    ]:
        with pytest.raises(ValueError) as info:
            hierarchical_aggregate(means, w)
        assert str(info.value) == message
    # weights summing to less than 1 are fine: only the ratios count
    assert hierarchical_aggregate(means, np.array([0.25, 0.25])).tolist() == [
        2.0,
        2.0,
        1.0,
    ]
    # float32 weights are normalised in float64: three thirds make exactly 1
    # (in float32, 1/3 rounds up and the sum is 1 + 3e-8)
    out = hierarchical_aggregate(np.ones((3, 1)), np.ones(3, np.float32))
    assert out.dtype == np.float64 and out.tolist() == [1.0]


def test_embed_by_hand():
    from tandem.clustering import _embed

    # updates scaled to unit norm, whatever their norm (a zero update stays 0)
    updates = np.array([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4], [0.0, -2.0]])
    unit = [[0.6, 0.8], [0.0, 0.0], [0.6, 0.8], [0.0, -1.0]]
    np.testing.assert_allclose(_embed(updates, None, 1.0), unit, rtol=1e-15)
    # zero rows are written as zeros, not left as whatever memory held (a
    # size at which numpy reuses a freed, dirty buffer for the result)
    for shape in [(8, 32), (4, 64), (3, 200)]:
        many = np.random.default_rng(0).normal(size=shape)
        many[[0, -1]] = 0.0
        out = _embed(many, None, 1.0)
        assert not out[[0, -1]].any()
        np.testing.assert_allclose(np.linalg.norm(out[1:-1], axis=1), 1.0)
    # profile columns standardized each on its own (mean, population std); a
    # constant column gives zeros; the block is scaled by weight / sqrt(p) = 3/2
    profiles = np.array(
        [[1, 10, 0.5, 4], [3, 10, 0.0, 4], [1, 10, 0.5, 8], [3, 10, 0.0, 8]]
    )
    z = np.array([[-1, 0, 1, -1], [1, 0, -1, -1], [-1, 0, 1, 1], [1, 0, -1, 1]])
    np.testing.assert_allclose(
        _embed(updates, profiles, 3.0), np.hstack([unit, 1.5 * z]), rtol=1e-15
    )
    # integer profiles are read as floats; weight 0 drops the profile block
    np.testing.assert_array_equal(
        _embed(updates, profiles[:, :2].astype(int), 1.0),
        _embed(updates, profiles[:, :2], 1.0),
    )
    np.testing.assert_array_equal(_embed(updates, profiles, 0.0)[:, 2:], 0.0)
    np.testing.assert_array_equal(
        _embed(updates, profiles, 0.5),
        _embed(updates, profiles, 1.0) * [1, 1, *[0.5] * 4],
    )


def test_input_checks_name_what_is_wrong():
    updates = np.ones((8, 32))
    for call, message in [
        (
            lambda: cluster_devices(np.zeros((0, 2)), 2, seed=0),
            "updates must have shape (K, d) with K >= 1, got (0, 2)",
        ),
        (
            lambda: cluster_devices(np.array([[1.0, np.nan]]), 2, seed=0),
            "updates must be finite",
        ),
        (
            lambda: cluster_devices(updates, 2, seed=0, profiles=np.ones(5)),
            "profiles must have shape (K, p) with K = 8, got (5, 1)",
        ),
        (
            lambda: cluster_devices(updates, 2, seed=0, profiles=np.full(8, np.inf)),
            "profiles must be finite",
        ),
        (
            lambda: cluster_devices(
                updates, 2, seed=0, profiles=np.ones(8), profile_weight=-1.0
            ),
            "profile_weight must be >= 0, got -1.0",
        ),
        (
            lambda: choose_n_clusters(updates, 0, seed=0),
            "max_clusters must be >= 1, got 0",
        ),
        (
            lambda: choose_n_clusters(updates, 2, seed=0, min_silhouette=1.5),
            "min_silhouette must be in [-1, 1], got 1.5",
        ),
        (
            lambda: choose_n_clusters(updates, 2, seed=0, min_silhouette=-1.5),
            "min_silhouette must be in [-1, 1], got -1.5",
        ),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message
    # an update of zero length has no direction but is allowed
    assert cluster_devices(np.zeros((3, 0)), 2, seed=0).tolist() == [0, 0, 0]


def test_cluster_devices_matches_kmeans_on_the_embedding():
    # an independent k-means on the unit-norm updates (10 restarts, the seed)
    # gives the same partition, on noise where other seeds and restart counts
    # do not; the same seed twice gives the same labels
    from sklearn.cluster import KMeans

    noise = np.random.default_rng(8).normal(size=(18, 16))
    unit = noise / np.linalg.norm(noise, axis=1, keepdims=True)
    reference = KMeans(n_clusters=4, n_init=10, random_state=0).fit_predict(unit)
    labels = cluster_devices(noise, 4, seed=0)
    assert adjusted_rand_score(reference, labels) == 1.0
    np.testing.assert_array_equal(cluster_devices(noise, 4, seed=0), labels)
    # integer updates are read as floats
    np.testing.assert_array_equal(
        cluster_devices(np.round(10 * noise).astype(int), 4, seed=0),
        cluster_devices(np.round(10 * noise), 4, seed=0),
    )
    # k = 1 returns int64 zeros without running k-means
    ones = cluster_devices(noise, 1, seed=0)
    assert ones.dtype == np.int64 and ones.tolist() == [0] * 18
    # two distinct rows whose two columns are equal: two clusters, not one
    diagonal = np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    assert cluster_devices(diagonal, 3, seed=0).tolist() == [0, 1, 0, 1]


def _profile_tradeoff():
    """8 devices: updates split 4/4 along ±a, profiles split them the other way.

    Two informative profile columns and one constant one (p = 3): k-means on
    2 clusters follows the updates at profile_weight 1 (within-cluster sum
    16/3 against 8) and the profiles at weight 2 (64/3 against 8).
    """
    a = np.random.default_rng(0).normal(size=8)
    updates = np.stack([a] * 4 + [-a] * 4)
    side = np.array([0, 0, 1, 1, 0, 0, 1, 1], float)
    profiles = np.column_stack([side, side, np.full(8, 5.0)])
    return updates, profiles


def test_profile_weight_defaults_to_one_and_reaches_the_silhouette():
    updates, profiles = _profile_tradeoff()
    by_updates, by_profiles = [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1]
    assert cluster_devices(updates, 2, seed=0, profiles=profiles).tolist() == by_updates
    assert (
        cluster_devices(
            updates, 2, seed=0, profiles=profiles, profile_weight=2.0
        ).tolist()
        == by_profiles
    )
    # k = 2 only: silhouette 0.52 at weight 1 (the default), 0.62 at weight 2;
    # both are scored on the embedding with the profiles
    kwargs = {"seed": 0, "profiles": profiles, "min_silhouette": 0.6}
    assert choose_n_clusters(updates, 2, **kwargs) == 1
    assert choose_n_clusters(updates, 2, profile_weight=2.0, **kwargs) == 2
    assert choose_n_clusters(updates, 2, profile_weight=1.0, **kwargs) == 1


def test_choose_n_clusters_bounds_by_hand():
    # [a, a, -a, -a]: two clusters of identical points, silhouette exactly 1,
    # which meets a threshold of 1; -1 and 1 are valid thresholds; max 1 is 1
    four = np.array([[1.0, 2.0], [1.0, 2.0], [-1.0, -2.0], [-1.0, -2.0]])
    assert choose_n_clusters(four, 3, seed=0, min_silhouette=1.0) == 2
    assert choose_n_clusters(four, 3, seed=0, min_silhouette=-1.0) == 2
    assert choose_n_clusters(four, 1, seed=0) == 1
    # three devices in two dimensions: k = 2 is tried (K − 1 = 2 clusters),
    # silhouette (1 + 1 + 0) / 3
    three = np.array([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    assert choose_n_clusters(three, 5, seed=0) == 2
    assert choose_n_clusters(three, 5, seed=0, min_silhouette=0.67) == 1
    # never more clusters than max_clusters, even when three are planted
    updates, _ = _planted(0)
    assert choose_n_clusters(updates, 2, seed=0) == 2


def test_choose_n_clusters_tries_each_k_as_cluster_devices(monkeypatch):
    # every k from 2 to K − 1 (capped by max_clusters) is clustered by
    # cluster_devices with the caller's seed, profiles and weight
    import tandem.clustering as clustering

    calls = []
    real = clustering.cluster_devices

    def spy(updates, k, **kwargs):
        calls.append((k, kwargs))
        return real(updates, k, **kwargs)

    monkeypatch.setattr(clustering, "cluster_devices", spy)
    updates, profiles = _profile_tradeoff()
    choose_n_clusters(updates, 10, seed=3, profiles=profiles, profile_weight=2.0)
    assert [k for k, _ in calls] == [2, 3, 4, 5, 6, 7]
    for _, kwargs in calls:
        assert kwargs["seed"] == 3 and kwargs["profile_weight"] == 2.0
        assert kwargs["profiles"] is profiles
    calls.clear()
    choose_n_clusters(updates, 4, seed=3)
    assert [k for k, _ in calls] == [2, 3, 4]


def test_kmeans_runs_on_one_thread(monkeypatch):
    # the documented single-thread limit around k-means (speed on busy cores)
    import tandem.clustering as clustering

    limits = []
    real = clustering.threadpool_limits

    def spy(**kwargs):
        limits.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(clustering, "threadpool_limits", spy)
    updates, _ = _planted(0)
    cluster_devices(updates, 3, seed=0)
    assert limits == [{"limits": 1}]
