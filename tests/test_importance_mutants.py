"""Importance: the corners that mutation testing found unpinned (docs/mutation.md).

Hand-computed features and scores, exact messages, dtypes and the edges of
every check in ``tandem/importance.py``: the temporal and structural
features, the predictor's forward pass, the labels, and training (defaults,
mini-batches, threads, the returned loss).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from tandem.importance import (
    STRUCTURAL_FEATURES,
    GroupMeta,
    ImportancePredictor,
    importance_labels,
    magnitude_scores,
    predict_importance,
    predictor_from_arrays,
    predictor_to_arrays,
    structural_features,
    temporal_features,
    train_predictor,
)


def exactly(message: str) -> str:
    """A ``match`` pattern for exactly ``message``."""
    return f"^{re.escape(message)}$"


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def task(n: int = 12, seed: int = 0):
    """Small random features and labels in [0, 1] (float64, as computed)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.normal(size=(n, 8)), rng.random(n)


class Spy(ImportancePredictor):
    """A predictor that notes the rows and torch threads of every call."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[int, int]] = []

    def forward(self, temporal, structural):
        self.calls.append((temporal.shape[0], torch.get_num_threads()))
        return super().forward(temporal, structural)


def same_weights(a: ImportancePredictor, b: ImportancePredictor) -> bool:
    wa, wb = predictor_to_arrays(a), predictor_to_arrays(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


# --- features ---------------------------------------------------------------


def test_temporal_features_with_an_empty_round_and_groups_known_once():
    # rounds oldest first, 0 = unknown; round 1 sent nothing at all
    history = np.array(
        [
            [2.0, 0.0, 4.0],  # known mean 3
            [0.0, 0.0, 0.0],  # no known group: the round counts for nobody
            [0.0, 1.0, 3.0],  # known mean 2
            [0.0, 0.0, 6.0],  # known mean 6
        ]
    )
    a = np.log1p(2 / 3)  # group 0: known in round 0 only
    b = np.log1p(1 / 2)  # group 1: known in round 2 only
    c = np.log1p([4 / 3, 3 / 2, 1.0])  # group 2: rounds 0, 2, 3
    expected = np.array(
        [[a, a, 0.0], [b, b, 0.0], [c[-1], c.mean(), c.var()]], dtype=np.float32
    )
    features = temporal_features(history)
    assert features.dtype == np.float32 and features.shape == (3, 3)
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-7)
    assert np.isfinite(temporal_features(np.zeros((2, 3)))).all()
    np.testing.assert_array_equal(temporal_features(np.zeros((2, 3))), 0.0)


def test_temporal_features_messages_name_the_history():
    with pytest.raises(
        ValueError, match=exactly("history must be 2-D, got shape (2,)")
    ):
        temporal_features(np.array([1.0, 2.0]))
    with pytest.raises(
        ValueError, match=exactly("history must be finite and non-negative")
    ):
        temporal_features(np.array([[1.0, -1.0]]))


def test_structural_features_float32_and_two_layers():
    groups = [
        GroupMeta("a.weight", depth=0, size=10, layer_size=10, kind="linear"),
        GroupMeta("b.weight", depth=1, size=10, layer_size=100, kind="conv"),
    ]
    features = structural_features(groups)
    assert features.dtype == np.float32
    # two layers: depth 0 → 0, depth 1 → 1 (span num_layers − 1 = 1)
    np.testing.assert_array_equal(features[:, 0], [0.0, 1.0])
    np.testing.assert_allclose(features[:, 1:3], [[1.0, 1.0], [2.0, 0.1]], rtol=1e-6)
    one_layer = structural_features([groups[0]])
    np.testing.assert_array_equal(one_layer[:, 0], [0.0])
    empty = structural_features([])
    assert empty.dtype == np.float32 and empty.shape == (0, len(STRUCTURAL_FEATURES))


def test_group_meta_bounds_and_messages():
    with pytest.raises(ValueError, match=exactly("GroupMeta 'w': depth must be >= 0")):
        GroupMeta("w", depth=-1, size=1, layer_size=1, kind="linear")
    with pytest.raises(
        ValueError,
        match=exactly(
            "GroupMeta 'w': need 0 < size <= layer_size, got size=0, layer_size=4"
        ),
    ):
        GroupMeta("w", depth=0, size=0, layer_size=4, kind="linear")
    # density 0 (a group all zeros) and 1 are both inside [0, 1]
    assert GroupMeta("w", depth=0, size=1, layer_size=1, kind="x", density=0.0)
    assert GroupMeta("w", depth=0, size=4, layer_size=4, kind="x", density=1.0)


# --- labels and the magnitude ablation ----------------------------------------


def test_magnitude_scores_in_float64_below_one_and_when_empty():
    # float32 input is scored in float64: exactly 1/3, not float32's 1/3
    scores = magnitude_scores(np.array([3.0, 1.0], dtype=np.float32))
    assert scores.dtype == np.float64
    np.testing.assert_array_equal(scores, [1.0, 1 / 3])
    # magnitudes below 1 are still divided by their maximum
    np.testing.assert_allclose(magnitude_scores(np.array([0.5, 0.25])), [1.0, 0.5])
    # nothing known: ones of the input's shape
    ones = magnitude_scores(np.zeros(3))
    assert ones.shape == (3,) and ones.dtype == np.float64
    np.testing.assert_array_equal(ones, 1.0)
    assert magnitude_scores(np.array([])).shape == (0,)
    with pytest.raises(
        ValueError, match=exactly("latest must be 1-D, got shape (1, 2)")
    ):
        magnitude_scores(np.ones((1, 2)))
    with pytest.raises(
        ValueError, match=exactly("latest must be finite and non-negative")
    ):
        magnitude_scores(np.array([1.0, np.inf]))


def test_importance_labels_two_groups_small_magnitudes_and_empty():
    np.testing.assert_array_equal(importance_labels(np.array([1.0, 2.0])), [0.0, 1.0])
    np.testing.assert_array_equal(importance_labels(np.array([5.0, 5.0])), [0.5, 0.5])
    np.testing.assert_allclose(
        importance_labels(np.array([0.2, 0.1]), method="max"), [1.0, 0.5]
    )
    zeros = importance_labels(np.zeros(3), method="max")
    assert zeros.shape == (3,) and zeros.dtype == np.float64
    assert importance_labels(np.array([]), method="max").shape == (0,)
    assert importance_labels(np.array([])).shape == (0,)
    with pytest.raises(
        ValueError, match=exactly("magnitudes must be finite and non-negative")
    ):
        importance_labels(np.array([1.0, -1.0]))


# --- the predictor --------------------------------------------------------------


def test_predictor_default_seed_and_hidden_width_one():
    assert same_weights(ImportancePredictor(), ImportancePredictor(seed=0))
    assert not same_weights(ImportancePredictor(), ImportancePredictor(seed=1))
    narrow = ImportancePredictor(hidden=1)
    assert sum(p.numel() for p in narrow.parameters()) == 4 + (8 + 1) + (1 + 1)
    with pytest.raises(ValueError, match=exactly("hidden must be >= 1, got 0")):
        ImportancePredictor(hidden=0)


def test_forward_by_hand():
    # hidden width 1, weights set by hand
    arrays = {
        "alpha": np.array([0.25], dtype=np.float32),
        "temporal_magnitude.weight": np.array([[0.5, -1.0]], dtype=np.float32),
        "temporal_magnitude.bias": np.array([0.25], dtype=np.float32),
        "temporal_variance.weight": np.array([[2.0]], dtype=np.float32),
        "structural.0.weight": np.array([[0.5, 0, 0, -1.0, 0, 0, 0, 0]], np.float32),
        "structural.0.bias": np.array([0.0], dtype=np.float32),
        "structural.2.weight": np.array([[2.0]], dtype=np.float32),
        "structural.2.bias": np.array([-1.0], dtype=np.float32),
    }
    predictor = predictor_from_arrays(arrays, hidden=1)
    temporal = np.array([[1.0, 0.5, 0.25], [0.0, 1.0, 1.0]])
    structural = np.zeros((2, 8))
    structural[:, 0] = [1.0, 0.0]
    structural[:, 3] = [1.0, 0.5]
    # temporal: 0.5·latest − 1·mean + 0.25 + 2·variance
    t = [0.5 - 0.5 + 0.25 + 0.5, 0.0 - 1.0 + 0.25 + 2.0]
    # structural: 2·tanh(0.5·depth − 1·density) − 1
    s = [2 * math.tanh(0.5 - 1.0) - 1, 2 * math.tanh(-0.5) - 1]
    expected = [0.25 * sigmoid(t[i]) + 0.75 * sigmoid(s[i]) for i in range(2)]
    scores = predict_importance(predictor, temporal, structural)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


@pytest.mark.parametrize("runs", [1, 3, 40])
def test_predict_importance_over_runs_of_equal_rows_equals_the_module(runs):
    """Consecutive groups sharing their structural features (one tensor's)
    are scored by the MLP once per run: the same scores as the module on
    every row, whether runs are few (the shortcut) or most rows differ."""
    rng = np.random.default_rng(runs)
    n = 48
    temporal = rng.random((n, 3))
    distinct = rng.random((runs, 8))
    structural = distinct[np.sort(rng.integers(0, runs, size=n))]
    structural[5, 3] = 0.5  # a group with zeros: a run of its own
    predictor = ImportancePredictor(seed=runs)
    scores = predict_importance(predictor, temporal, structural)
    with torch.no_grad():
        expected = predictor(
            torch.as_tensor(temporal, dtype=torch.float32),
            torch.as_tensor(structural, dtype=torch.float32),
        )
    np.testing.assert_allclose(scores, expected.double().numpy(), rtol=1e-6)
    assert not np.allclose(scores, scores[0])  # the rows are scored apart
    # empty: no rows, no scores
    assert predict_importance(predictor, temporal[:0], structural[:0]).shape == (0,)


def test_predict_importance_messages():
    predictor = ImportancePredictor()
    t, s, _ = task(4)
    with pytest.raises(
        ValueError, match=exactly("structural must have shape (n, 8), got (4, 7)")
    ):
        predict_importance(predictor, t, s[:, :7])
    with pytest.raises(
        ValueError,
        match=exactly("temporal and structural must have as many rows, got 4 and 2"),
    ):
        predict_importance(predictor, t, s[:2])


# --- training -------------------------------------------------------------------


def test_train_predictor_defaults():
    t, s, y = task()
    implicit, explicit = ImportancePredictor(seed=1), ImportancePredictor(seed=1)
    loss = train_predictor(implicit, t, s, y)
    assert loss == train_predictor(
        explicit, t, s, y, steps=200, lr=0.02, batch_size=None, seed=0, threads=1
    )
    assert same_weights(implicit, explicit)
    one_more = ImportancePredictor(seed=1)
    assert train_predictor(one_more, t, s, y, steps=201) != loss
    # the default seed of the mini-batch draws is 0
    runs = []
    for seed in (None, 0, 1):
        predictor = ImportancePredictor(seed=1)
        extra = {} if seed is None else {"seed": seed}
        runs.append(train_predictor(predictor, t, s, y, steps=5, batch_size=4, **extra))
    assert runs[0] == runs[1] != runs[2]


def test_train_predictor_returns_the_mean_squared_error_after_training():
    t, s, y = task()
    predictor = ImportancePredictor(seed=2)
    loss = train_predictor(predictor, t, s, y, steps=10)
    scores = predict_importance(predictor, t, s)
    assert loss == pytest.approx(np.mean((scores - y) ** 2), rel=1e-5)
    # no steps: the untrained predictor's error, weights untouched
    untouched = ImportancePredictor(seed=2)
    before = predictor_to_arrays(untouched)
    loss0 = train_predictor(untouched, t, s, y, steps=0)
    scores0 = predict_importance(untouched, t, s)
    assert loss0 == pytest.approx(np.mean((scores0 - y) ** 2), rel=1e-5)
    for key, value in predictor_to_arrays(untouched).items():
        np.testing.assert_array_equal(value, before[key])


def test_train_predictor_mini_batch_rows():
    t, s, y = task(10)
    for batch_size, rows in [(3, 3), (1, 1), (9, 9), (10, 10), (11, 10), (None, 10)]:
        predictor = Spy(seed=0)
        train_predictor(predictor, t, s, y, steps=4, batch_size=batch_size)
        # four steps of `rows` rows each, then the loss over all ten
        assert [n for n, _ in predictor.calls] == [rows] * 4 + [10], batch_size
    # a batch of every row is the full batch, to the last bit
    full = ImportancePredictor(seed=1)
    loss = train_predictor(full, t, s, y, steps=20)
    for batch_size in (10, 11):
        predictor = ImportancePredictor(seed=1)
        assert (
            train_predictor(predictor, t, s, y, steps=20, batch_size=batch_size) == loss
        )
        assert same_weights(predictor, full)


def test_train_predictor_labels_as_float32():
    # labels are taken as float32 whatever dtype they come in
    t, s, y = task()
    a, b = ImportancePredictor(seed=3), ImportancePredictor(seed=3)
    loss64 = train_predictor(a, t, s, y, steps=20)
    loss32 = train_predictor(b, t, s, y.astype(np.float32), steps=20)
    assert loss64 == loss32
    assert same_weights(a, b)


def test_train_predictor_threads():
    t, s, y = task()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for threads, seen in [("default", 1), (1, 1), (3, 3), (None, 2)]:
            predictor = Spy()
            extra = {} if threads == "default" else {"threads": threads}
            train_predictor(predictor, t, s, y, steps=2, **extra)
            assert {n for _, n in predictor.calls} == {seen}, threads
            assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(old)


def test_train_predictor_checks_and_messages():
    t, s, y = task(5)
    p = ImportancePredictor()
    cases = [
        ({"temporal": t[:, :2]}, "temporal must have shape (n, 3), got (5, 2)"),
        ({"structural": s[:, :7]}, "structural must have shape (n, 8), got (5, 7)"),
        (
            {"structural": s[:4]},
            "temporal, structural and labels must have n rows, got 5, 4 and (5,)",
        ),
        (
            {"temporal": t[:0], "structural": s[:0], "labels": y[:0]},
            "need at least one labelled group to train on",
        ),
        ({"labels": np.array([0.5, 1.5, 0.0, 1.0, 0.2])}, "labels must lie in [0, 1]"),
        ({"steps": -1}, "need steps >= 0 and lr > 0, got steps=-1, lr=0.02"),
        ({"lr": 0.0}, "need steps >= 0 and lr > 0, got steps=200, lr=0.0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"threads": 0}, "threads must be >= 1, got 0"),
    ]
    for change, message in cases:
        args = {"temporal": t, "structural": s, "labels": y} | change
        with pytest.raises(ValueError, match=exactly(message)):
            train_predictor(p, **args)
    # one group is enough
    assert train_predictor(ImportancePredictor(), t[:1], s[:1], y[:1], steps=2) >= 0
