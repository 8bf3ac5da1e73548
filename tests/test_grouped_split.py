"""The grouped split: label shift per group, devices and test shares by group."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.clients.node import NodeConfig, load_node_split
from tandem.config import ConfigError, RunConfig
from tandem.datasets import DataError, load_dataset, partition_indices
from tandem.datasets.grouped import assign_groups, group_labels, label_shift


def test_group_labels_by_hand():
    y = np.array([0, 1, 9, 0, 1, 9, 5], dtype=np.int64)
    g = np.array([0, 0, 0, 1, 1, 2, 2], dtype=np.int64)
    # C = 10, G = 3: shifts 0, 3, 6
    np.testing.assert_array_equal(group_labels(y, g, 3, 10), [0, 1, 9, 3, 4, 5, 1])
    assert [label_shift(i, 2, 10) for i in range(2)] == [0, 5]
    # no two groups agree on any label (G <= C)
    for c in range(10):
        labels = group_labels(np.full(3, c), np.arange(3), 3, 10)
        assert len(set(labels.tolist())) == 3


def test_group_labels_refuses_bad_groups():
    with pytest.raises(DataError, match="must lie in"):
        label_shift(0, 11, 10)
    with pytest.raises(DataError, match="groups must lie"):
        group_labels(np.zeros(2, np.int64), np.array([0, 2]), 2, 10)


def test_assign_groups_is_balanced_and_seeded():
    a = assign_groups(10, 3, seed=4)
    assert np.bincount(a).tolist() == [4, 3, 3]
    np.testing.assert_array_equal(a, assign_groups(10, 3, seed=4))
    assert not np.array_equal(assign_groups(50, 3, 4), assign_groups(50, 3, 5))


def test_grouped_partitions_hold_their_groups_rows():
    groups = np.arange(30, dtype=np.int64) % 3
    labels = np.zeros(30, dtype=np.int64)
    parts = [partition_indices(labels, groups, "grouped", 6, p) for p in range(6)]
    for p, part in enumerate(parts):
        assert set(groups[part].tolist()) == {p % 3}  # partition p: group p mod G
        assert len(part) == 5
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(30))
    with pytest.raises(ConfigError, match="3 groups"):
        partition_indices(labels, groups, "grouped", 2, 0)
    with pytest.raises(ConfigError, match="group ids"):
        partition_indices(labels, None, "grouped", 3, 0)


def test_node_shares_follow_their_group_in_train_and_test():
    cfg = RunConfig.from_flat(
        {"mnist1d-samples": 1000, "partitioner": "grouped", "partition-groups": 2}
    )
    source = load_dataset(RunConfig.from_flat({"mnist1d-samples": 1000}).data)
    bundle = load_dataset(cfg.data)
    np.testing.assert_array_equal(bundle.train.x, source.train.x)  # same signals
    for pid in range(4):
        for split, rows in (("train", source.train), ("test", source.test)):
            part = load_node_split(cfg, NodeConfig(pid, 4), split)
            assert set(part.groups.tolist()) == {pid % 2}
            # find the rows by their signals: the labels are the source's + 5g
            index = {r.tobytes(): i for i, r in enumerate(rows.x)}
            idx = np.array([index[r.tobytes()] for r in part.x])
            np.testing.assert_array_equal(part.y, (rows.y[idx] + 5 * (pid % 2)) % 10)
    # the central test split is the mixture of both groups
    assert np.bincount(bundle.test.groups).tolist() == [100, 100]


def test_grouped_split_needs_a_dataset_without_natural_ids():
    with pytest.raises(ConfigError, match="natural"):
        RunConfig.from_flat(
            {"dataset": "wisdm", "data-path": "x.txt", "partitioner": "grouped"}
        )
    with pytest.raises(ConfigError, match="partition-groups"):
        RunConfig.from_flat({"partition-groups": 0})
