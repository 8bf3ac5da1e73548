"""Importance maths: features by hand, the predictor learns, arrays are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from tandem.importance import (
    KINDS,
    STRUCTURAL_FEATURES,
    GroupMeta,
    ImportancePredictor,
    PredictorError,
    importance_labels,
    layer_kind,
    magnitude_scores,
    predict_importance,
    predictor_from_arrays,
    predictor_to_arrays,
    structural_features,
    temporal_features,
    train_predictor,
)


def test_temporal_features_by_hand():
    # rounds oldest first; 0 = unknown. Row means over known groups: 2, 2, 4.
    history = np.array([[1.0, 3.0], [2.0, 2.0], [4.0, 0.0]])
    r0 = np.log1p([0.5, 1.0, 1.0])  # group 0 relative: 1/2, 2/2, 4/4
    r1 = np.log1p([1.5, 1.0])  # group 1 relative: 3/2, 2/2 (unknown last round)
    expected = np.array(
        [[r0[-1], r0.mean(), r0.var()], [r1[-1], r1.mean(), r1.var()]],
        dtype=np.float32,
    )
    np.testing.assert_allclose(temporal_features(history), expected, rtol=1e-6)
    # the overall scale does not matter; a group never known gets zeros
    np.testing.assert_allclose(
        temporal_features(1e-4 * history), temporal_features(history), rtol=1e-5
    )
    never = np.column_stack([history, np.zeros(3)])
    np.testing.assert_array_equal(temporal_features(never)[2], np.zeros(3))
    assert temporal_features(never).dtype == np.float32


@pytest.mark.parametrize(
    "bad", [np.array([1.0, 2.0]), np.array([[1.0, -1.0]]), np.array([[np.nan, 1.0]])]
)
def test_temporal_features_rejects_bad_history(bad):
    with pytest.raises(ValueError, match="history"):
        temporal_features(bad)


def test_structural_features_by_hand():
    groups = [
        GroupMeta("conv1.weight", depth=0, size=160, layer_size=160, kind="conv"),
        GroupMeta("fc.weight", depth=3, size=800, layer_size=3200, kind="linear"),
        GroupMeta("fc.bias", depth=3, size=10, layer_size=10, kind="bias", density=0.5),
        GroupMeta("scale", depth=2, size=1, layer_size=1, kind="other"),
    ]
    expected = np.array(
        [
            [0.0, np.log10(160), 1.0, 1.0, 1, 0, 0, 0],
            [1.0, np.log10(3200), 0.25, 1.0, 0, 1, 0, 0],
            [1.0, 1.0, 1.0, 0.5, 0, 0, 0, 1],
            [2 / 3, 0.0, 1.0, 1.0, 0, 0, 0, 0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_allclose(structural_features(groups), expected, rtol=1e-6)
    # with more layers than the groups show, depth is a fraction of those
    assert structural_features(groups, num_layers=7)[1, 0] == pytest.approx(0.5)
    assert structural_features([]).shape == (0, len(STRUCTURAL_FEATURES))
    with pytest.raises(ValueError, match="num_layers"):
        structural_features(groups, num_layers=3)
    with pytest.raises(ValueError, match="size"):
        GroupMeta("w", depth=0, size=20, layer_size=10, kind="linear")
    with pytest.raises(ValueError, match="density"):
        GroupMeta("w", depth=0, size=1, layer_size=1, kind="linear", density=1.5)


def test_layer_kind_on_model_names():
    assert layer_kind("conv1.weight", (32, 1, 5)) == "conv"
    assert layer_kind("conv1.bias", (32,)) == "bias"
    assert layer_kind("fc.weight", (10, 320)) == "linear"
    assert layer_kind("bn.weight", (32,)) == "norm"
    assert layer_kind("temperature", ()) == "other"


def test_predictor_size_range_and_branches():
    predictor = ImportancePredictor(seed=3)
    assert sum(p.numel() for p in predictor.parameters()) == 4 + 161
    assert not any(p is predictor.alpha for p in predictor.parameters())
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(50, 3)) * 5, rng.normal(size=(50, 8)) * 5
    scores = predict_importance(predictor, t, s)
    assert scores.shape == (50,) and np.all((scores >= 0) & (scores <= 1))
    # α = 1 is the temporal branch alone, α = 0 the structural branch alone
    temporal_only = ImportancePredictor(alpha=1.0, seed=3)
    structural_only = ImportancePredictor(alpha=0.0, seed=3)
    s2 = rng.normal(size=(50, 8))
    np.testing.assert_array_equal(
        predict_importance(temporal_only, t, s),
        predict_importance(temporal_only, t, s2),
    )
    np.testing.assert_array_equal(
        predict_importance(structural_only, t, s),
        predict_importance(structural_only, 0 * t, s),
    )
    with pytest.raises(ValueError, match="alpha"):
        ImportancePredictor(alpha=1.5)
    with pytest.raises(ValueError, match="structural"):
        predict_importance(predictor, t, s[:, :7])
    with pytest.raises(ValueError, match="temporal must be finite"):
        predict_importance(predictor, np.full((50, 3), np.nan), s)


def test_labels_and_magnitude_scores_by_hand():
    m = np.array([3.0, 1.0, 2.0, 2.0])
    # average ranks 4, 1, 2.5, 2.5 → (rank − 1) / 3
    np.testing.assert_allclose(importance_labels(m), [1.0, 0.0, 0.5, 0.5])
    np.testing.assert_allclose(
        importance_labels(m, method="max"), [1, 1 / 3, 2 / 3, 2 / 3]
    )
    np.testing.assert_array_equal(importance_labels(np.array([0.2])), [1.0])
    np.testing.assert_array_equal(
        importance_labels(np.zeros(3), method="max"), np.zeros(3)
    )
    with pytest.raises(ValueError, match="method"):
        importance_labels(m, method="softmax")
    with pytest.raises(ValueError, match="magnitudes"):
        importance_labels(np.array([1.0, -1.0]))
    np.testing.assert_allclose(magnitude_scores(np.array([2.0, 1.0, 0.0])), [1, 0.5, 0])
    np.testing.assert_array_equal(magnitude_scores(np.zeros(3)), np.ones(3))


def _synthetic_task(seed: int, n: int = 400, rounds: int = 5, layers: int = 10):
    """Groups whose realized importance falls with depth and grows with magnitude."""
    rng = np.random.default_rng(seed)
    depth = rng.integers(0, layers, n)
    layer_size = rng.integers(10, 100_000, n)
    size = np.minimum(layer_size, rng.integers(10, 5_000, n))
    kind = rng.choice(KINDS, n)
    groups = [
        GroupMeta(
            f"t{i}", int(depth[i]), int(size[i]), int(layer_size[i]), str(kind[i])
        )
        for i in range(n)
    ]
    base = rng.lognormal(0.0, 1.0, n)  # each group's typical update size
    history = base * rng.lognormal(0.0, 0.3, (rounds, n))
    history[rng.random((rounds, n)) < 0.2] = 0.0  # rounds the group was not sent
    realized = base * np.exp(-2.0 * depth / (layers - 1)) * rng.lognormal(0.0, 0.3, n)
    return (
        temporal_features(history),
        structural_features(groups, num_layers=layers),
        importance_labels(realized),
    )


def test_predictor_learns_importance_on_held_out_groups():
    train_t, train_s, train_y = _synthetic_task(seed=1)
    test_t, test_s, test_y = _synthetic_task(seed=2)
    predictor = ImportancePredictor(seed=2)
    before = spearmanr(predict_importance(predictor, test_t, test_s), test_y).statistic
    loss = train_predictor(predictor, train_t, train_s, train_y, steps=200, seed=0)
    after = spearmanr(predict_importance(predictor, test_t, test_s), test_y).statistic
    # the magnitude ablation sees only the latest magnitude, not depth
    ablation = spearmanr(magnitude_scores(np.expm1(test_t[:, 0])), test_y).statistic
    assert abs(before) < 0.2  # measured 0.12
    assert after > 0.85  # measured 0.907
    assert after > ablation + 0.1  # ablation measured 0.77
    assert (
        loss < 0.03
    )  # measured 0.019 (labels uniform on [0, 1]: 1/12 at best constant)


def test_training_is_deterministic_and_leaves_global_rng_alone():
    t, s, y = _synthetic_task(seed=3, n=100)
    state = torch.get_rng_state()
    losses, weights = [], []
    for _ in range(2):
        predictor = ImportancePredictor(seed=5)
        losses.append(
            train_predictor(predictor, t, s, y, steps=30, batch_size=32, seed=7)
        )
        weights.append(predictor_to_arrays(predictor))
    assert torch.equal(torch.get_rng_state(), state)
    assert losses[0] == losses[1]
    for key in weights[0]:
        np.testing.assert_array_equal(weights[0][key], weights[1][key])
    with pytest.raises(ValueError, match="labels"):
        train_predictor(ImportancePredictor(), t, s, y + 1.5, steps=1)
    with pytest.raises(ValueError, match="rows"):
        train_predictor(ImportancePredictor(), t, s, y[:-1], steps=1)


def test_arrays_round_trip_exactly():
    t, s, y = _synthetic_task(seed=4, n=100)
    predictor = ImportancePredictor(alpha=0.3, seed=1)
    train_predictor(predictor, t, s, y, steps=20)
    arrays = predictor_to_arrays(predictor)
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert arrays["alpha"].tolist() == [np.float32(0.3)]
    rebuilt = predictor_from_arrays(arrays)
    again = predictor_to_arrays(rebuilt)
    assert arrays.keys() == again.keys()
    for key in arrays:
        np.testing.assert_array_equal(arrays[key], again[key])
    np.testing.assert_array_equal(
        predict_importance(predictor, t, s), predict_importance(rebuilt, t, s)
    )
    # the arrays are copies: changing them does not touch either module
    arrays["alpha"][0] = 1.0
    assert float(rebuilt.alpha) == pytest.approx(0.3)


def _hostile(kind: str) -> tuple[dict[str, np.ndarray], str]:
    arrays = predictor_to_arrays(ImportancePredictor())
    key = "structural.0.weight"
    if kind == "shape":
        arrays[key] = arrays[key][:, :7].copy()
    elif kind == "nan":
        arrays[key][0, 0] = np.nan
    elif kind == "inf":
        arrays["temporal_variance.weight"][0, 0] = np.inf
        key = "temporal_variance.weight"
    elif kind == "unknown":
        arrays["extra.weight"] = np.zeros(1, dtype=np.float32)
        key = "extra.weight"
    elif kind == "missing":
        del arrays[key]
    elif kind == "float64":
        arrays[key] = arrays[key].astype(np.float64)
    elif kind == "list":
        arrays[key] = arrays[key].tolist()
    elif kind == "alpha":
        arrays["alpha"] = np.array([2.0], dtype=np.float32)
        key = "alpha"
    return arrays, key


@pytest.mark.parametrize(
    "kind", ["shape", "nan", "inf", "unknown", "missing", "float64", "list", "alpha"]
)
def test_hostile_arrays_are_rejected_naming_the_key(kind):
    arrays, key = _hostile(kind)
    with pytest.raises(PredictorError) as info:
        predictor_from_arrays(arrays)
    assert info.value.key == key
    assert key in str(info.value)
    assert isinstance(info.value, ValueError)


def test_arrays_for_another_hidden_width_are_rejected():
    arrays = predictor_to_arrays(ImportancePredictor(hidden=8))
    with pytest.raises(PredictorError, match="shape"):
        predictor_from_arrays(arrays)
    assert predictor_from_arrays(arrays, hidden=8) is not None


def test_hostile_arrays_rules_are_exact():
    # the rule each refusal states, word for word, and kept on the error
    keys = sorted(predictor_to_arrays(ImportancePredictor()))
    for kind, rule in [
        ("unknown", f"unknown key (expected: {keys})"),
        ("missing", "missing"),
        ("list", "is a list, not an ndarray"),
        ("float64", "dtype float64, expected float32"),
        ("shape", "shape (16, 7), expected (16, 8)"),
        ("nan", "has non-finite values"),
        ("alpha", "must be in [0, 1], got 2.0"),
    ]:
        arrays, key = _hostile(kind)
        with pytest.raises(PredictorError) as info:
            predictor_from_arrays(arrays)
        assert info.value.rule == rule
        assert str(info.value) == f"predictor array '{key}': {rule}"


def test_alpha_bounds_are_inclusive_and_arrays_are_copies():
    # α = 0 and α = 1 (the two single-branch ablations) load
    for alpha in (0.0, 1.0):
        arrays = predictor_to_arrays(ImportancePredictor(alpha=alpha))
        assert float(predictor_from_arrays(arrays).alpha) == alpha
    # the exported arrays do not share memory with the module they came from
    predictor = ImportancePredictor(alpha=0.3, seed=1)
    arrays = predictor_to_arrays(predictor)
    arrays["alpha"][0] = 1.0
    arrays["temporal_variance.weight"][0, 0] = 42.0
    assert float(predictor.alpha) == pytest.approx(0.3)
    assert predictor.temporal_variance.weight.item() != 42.0
