"""Device → cluster → global aggregation during training: by hand and planted."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from tandem.hierarchy import ClusterTracker, hierarchical_round


def test_hierarchical_round_by_hand():
    # device models b + u: [1, 2], [3, 4], [2, 1]
    bases = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    updates = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 0.0]])
    weights = np.array([1.0, 3.0, 2.0])
    labels = np.array([0, 0, 1])
    done = hierarchical_round(bases, updates, weights, labels)
    # cluster 0: (1·[1, 2] + 3·[3, 4]) / 4 = [2.5, 3.5], W = 4; cluster 1: [2, 1]
    np.testing.assert_array_equal(done.cluster_models, [[2.5, 3.5], [2.0, 1.0]])
    np.testing.assert_array_equal(done.cluster_weights, [4.0, 2.0])
    # global: (4·[2.5, 3.5] + 2·[2, 1]) / 6 = [14, 16] / 6
    np.testing.assert_allclose(done.global_model, [7 / 3, 8 / 3], rtol=0, atol=1e-15)
    # ... which is the flat eq. 8 mean of the device models
    flat = (weights[:, None] * (bases + updates)).sum(0) / weights.sum()
    np.testing.assert_allclose(done.global_model, flat, rtol=0, atol=1e-15)


def test_hierarchical_round_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="bases"):
        hierarchical_round(np.zeros((2, 3)), np.zeros((2, 4)), np.ones(2), [0, 1])


def _grouped(seed: int, groups: int, per_group: int = 5, d: int = 64):
    """Updates of devices in ``groups`` groups: a shared step, a group
    direction, noise; ``groups = 1`` is IID (the shared step and noise)."""
    rng = np.random.default_rng(seed)
    shared = 3.0 * rng.normal(size=d)
    directions = rng.normal(size=(groups, d))
    truth = np.repeat(np.arange(groups), per_group)
    noise = 0.4 * rng.normal(size=(truth.size, d))
    group_part = directions[truth] if groups > 1 else 0.0
    return shared + group_part + noise, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("groups", [2, 3])
def test_tracker_finds_planted_groups(seed, groups):
    updates, truth = _grouped(seed, groups)
    nodes = list(range(10, 10 + truth.size))
    tracker = ClusterTracker(max_clusters=4, every=5, seed=0)
    figures = tracker.step(
        1, nodes, np.zeros_like(updates), updates, np.ones(truth.size)
    )
    assert figures["clusters"] == groups and figures["reclustered"]
    labels = np.array([tracker.labels[n] for n in nodes])
    assert adjusted_rand_score(truth, labels) == 1.0
    # each device now trains from its cluster's model: the group's mean update
    for n, g in zip(nodes, truth, strict=True):
        np.testing.assert_allclose(tracker.base(n), updates[truth == g].mean(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tracker_keeps_one_cluster_on_iid_devices(seed):
    # every device shares one large step: raw directions all agree, and what
    # is left after the mean is noise, so the silhouette criterion says k = 1
    updates, _ = _grouped(seed, 1, per_group=10)
    tracker = ClusterTracker(max_clusters=4, every=5, seed=0)
    figures = tracker.step(
        1, list(range(10)), np.zeros_like(updates), updates, [1] * 10
    )
    assert figures["clusters"] == 1
    assert all(tracker.base(n) is None for n in range(10))  # the global model


def test_tracker_rounds_between_estimates_by_hand():
    tracker = ClusterTracker(max_clusters=4, clusters=2, every=2, seed=0)
    d = np.array([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.0], [-1.0, 0.2]])
    # round 1 (an estimate): bases are the global model 0
    tracker.step(1, [1, 2, 3, 4], np.zeros((4, 2)), d, np.array([1.0, 1.0, 1.0, 3.0]))
    assert tracker.labels == {1: 0, 2: 0, 3: 1, 4: 1}
    np.testing.assert_allclose(tracker.models[0], [1.0, 0.1])
    np.testing.assert_allclose(tracker.models[1], [-1.0, 0.15])  # (0 + 3·0.2) / 4
    # round 2 (no estimate): nodes 1 and 3 reply from their clusters' models,
    # node 5 (new) from the global model; it has no cluster until round 3
    bases = np.stack([tracker.base(1), tracker.base(3), np.zeros(2)])
    assert tracker.base(5) is None
    updates = np.array([[0.5, 0.0], [0.0, -1.0], [9.0, 9.0]])
    figures = tracker.step(2, [1, 3, 5], bases, updates, np.array([1.0, 1.0, 1.0]))
    assert not figures["reclustered"] and figures["cluster-sizes"] == [1, 1]
    np.testing.assert_allclose(tracker.models[0], [1.5, 0.1])
    np.testing.assert_allclose(tracker.models[1], [-1.0, -0.85])
    # the global model of the round: the mean of the three device models
    np.testing.assert_allclose(figures["global"], [9.5 / 3, 8.25 / 3])
    assert tracker.due(3) and not tracker.due(4) and tracker.estimates == 1


def test_a_device_that_skips_a_clustering_round_keeps_a_cluster():
    # dynamic synchronization: a device on a two-round interval may not reply
    # in the round that re-estimates the clusters
    tracker = ClusterTracker(max_clusters=4, clusters=2, every=1, seed=0)
    d = np.array([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.0], [-1.0, 0.2]])
    tracker.step(1, [1, 2, 3, 4], np.zeros((4, 2)), d, np.array([1.0, 1.0, 1.0, 3.0]))
    # round 2 re-estimates without node 4, which is placed by its last model
    # (-1, 0.2) against the round's global model (0.4, 0.1833)
    bases = np.stack([tracker.base(n) for n in (1, 2, 3)])
    updates = np.array([[0.1, 0.0], [0.1, 0.1], [0.0, 0.1]])
    figures = tracker.step(2, [1, 2, 3], bases, updates, np.ones(3))
    assert figures["reclustered"] and figures["cluster-sizes"] in ([2, 1], [1, 2])
    labels = tracker.labels
    assert set(labels) == {1, 2, 3, 4}
    assert labels[1] == labels[2] != labels[3] == labels[4]
    # each cluster model is this round's: (1.1, 0.1) and (1.1, 0.2); node 3
    # alone, (-1, 0.15) + (0, 0.1)
    np.testing.assert_allclose(tracker.base(1), [1.1, 0.15])
    np.testing.assert_allclose(tracker.base(4), [-1.0, 0.25])
    # round 3: only nodes 1 and 2 reply; the other cluster, none of whose
    # devices replied, starts from the mean of their last models
    tracker._estimate = lambda signatures: np.array([0, 0, 1, 1])  # 1, 2, 3, 4
    bases = np.stack([tracker.base(1), tracker.base(2)])
    updates = np.array([[0.1, 0.0], [0.3, 0.0]])
    tracker.step(3, [1, 2], bases, updates, np.ones(2))
    np.testing.assert_allclose(tracker.models[0], [1.3, 0.15])
    np.testing.assert_allclose(tracker.models[1], [-1.0, 0.225])  # (0.25 + 0.2) / 2
    np.testing.assert_allclose(tracker.base(4), [-1.0, 0.225])


def test_tracker_refuses_bad_settings():
    with pytest.raises(ValueError, match="every"):
        ClusterTracker(max_clusters=4, every=0)
