"""Coordination maths: weights, divergence and sync control by hand; filling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tandem.compression.pipeline import fill_unsent
from tandem.coordination import (
    CachedUpdate,
    SyncPolicy,
    adjust_sync,
    aggregation_weights,
    cache_arrays,
    divergence,
    refresh_cache,
)


def test_aggregation_weights_by_hand():
    # latencies 0, 2, 4 s: median 2 → discounts 1, 1/2, 1/3
    w = aggregation_weights(
        np.array([100, 200, 300]), np.array([1.0, 0.5, 1.0]), np.array([0.0, 2.0, 4.0])
    )
    raw = np.array([100 * 1.0 * 1.0, 200 * 0.5 * 0.5, 300 * 1.0 / 3])  # 100, 50, 100
    np.testing.assert_allclose(w, raw / raw.sum())
    np.testing.assert_allclose(w, [0.4, 0.2, 0.4])
    assert w.sum() == pytest.approx(1.0)
    # an explicit reference latency: discounts 1, 1/3, 1/5
    w = aggregation_weights(
        np.array([1, 1, 1]),
        np.ones(3),
        np.array([0.0, 2.0, 4.0]),
        reference_latency_s=1,
    )
    np.testing.assert_allclose(w, np.array([1, 1 / 3, 1 / 5]) / (1 + 1 / 3 + 1 / 5))
    # a skewed case where the median (1 s) and the mean (3 s) differ:
    # discounts 1, 1/2, 1/9 → weights 18/29, 9/29, 2/29
    w = aggregation_weights(np.ones(3), np.ones(3), np.array([0.0, 1.0, 8.0]))
    np.testing.assert_allclose(w, np.array([18, 9, 2]) / 29)
    # no latency at all: plain data-size weights, as in FedAvg
    w = aggregation_weights(np.array([1, 3]), np.ones(2), np.zeros(2))
    np.testing.assert_allclose(w, [0.25, 0.75])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1, 2], [1.0], [0.1, 0.1]), "one entry per device"),
        (([1, -2], [1.0, 1.0], [0.1, 0.1]), "num_examples"),
        (([1, 2], [1.0, 1.5], [0.1, 0.1]), "reliability"),
        (([1, 2], [1.0, 1.0], [0.1, np.nan]), "latency_s"),
        (([], [], []), "num_examples"),
        (([0, 5], [1.0, 0.0], [0.1, 0.1]), "zero weight"),
    ],
)
def test_aggregation_weights_reject_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        aggregation_weights(*(np.array(a, dtype=float) for a in args))


def test_divergence_by_hand():
    assert divergence(np.array([3.0, 0.0]), np.array([0.0, 4.0])) == 5.0
    local = {"w": np.array([[1.0, 2.0]]), "b": np.array([2.0])}
    glob = {"w": np.array([[1.0, 0.0]]), "b": np.array([1.0])}
    assert divergence(local, glob) == pytest.approx(np.sqrt(4 + 1))
    assert divergence(glob, glob) == 0.0
    with pytest.raises(ValueError, match="keys"):
        divergence(local, {"w": glob["w"]})
    with pytest.raises(ValueError, match="'b'"):
        divergence(local, {"w": glob["w"], "b": np.zeros(2)})
    with pytest.raises(ValueError, match="both"):
        divergence(local, np.zeros(3))


def test_sync_control_triggers_past_relative_threshold():
    policy = SyncPolicy(
        threshold=1.5, default_steps=40, min_steps=4, default_budget=1.0, max_budget=3.0
    )
    # median divergence 2 → threshold 3: devices 4 and 5 are past it
    decision = adjust_sync(
        divergences=np.array([1.0, 2.0, 2.0, 3.0, 3.1, 10.0, 2.0]),
        local_steps=np.array([40, 10, 80, 40, 40, 5, 40]),
        budget_scale=np.array([1.0, 2.0, 0.25, 1.0, 2.0, 2.5, 1.0]),
        policy=policy,
    )
    assert decision.threshold == pytest.approx(3.0)
    np.testing.assert_array_equal(
        decision.triggered, [False, False, False, False, True, True, False]
    )
    # below (exactly at τ counts as below): 40 stays at the default, 10 doubles
    # and 80 halves toward it; past: 40 halves, 5 halves to 2 but the floor is 4
    np.testing.assert_array_equal(decision.local_steps, [40, 20, 40, 40, 20, 4, 40])
    # budgets relax one factor toward the default (from above or below) and
    # tighten ×2 up to the cap
    np.testing.assert_allclose(
        decision.budget_scale, [1.0, 1.0, 0.5, 1.0, 3.0, 3.0, 1.0]
    )
    assert decision.local_steps.dtype == np.int64


def test_sync_control_absolute_threshold_and_return_to_defaults():
    policy = SyncPolicy(threshold=0.5, relative=False, default_steps=50, max_budget=4.0)
    steps, budget = np.array([50, 50]), np.array([1.0, 1.0])
    history = []
    for d in ([0.9, 0.1], [0.8, 0.1], [0.7, 0.1], [0.1, 0.1], [0.1, 0.1], [0.1, 0.1]):
        decision = adjust_sync(np.array(d), steps, budget, policy)
        steps, budget = decision.local_steps, decision.budget_scale
        history.append((steps[0], budget[0], bool(decision.triggered[0])))
    assert history == [
        (25, 2.0, True),
        (12, 4.0, True),
        (6, 4.0, True),  # budget capped
        (12, 2.0, False),
        (24, 1.0, False),
        (48, 1.0, False),
    ]
    # the absolute rule can flag every device at once; the calm one never moved
    assert adjust_sync(np.array([1.0, 1.0]), steps, budget, policy).triggered.all()
    assert (steps[1], budget[1]) == (50, 1.0)
    # one more calm round reaches the default exactly, not past it
    calm = adjust_sync(np.array([0.1, 0.1]), steps, budget, policy)
    assert calm.local_steps[0] == 50


def test_sync_control_rejects_bad_inputs():
    policy = SyncPolicy()
    with pytest.raises(ValueError, match="one entry per device"):
        adjust_sync(np.ones(2), np.array([1]), np.ones(2), policy)
    with pytest.raises(ValueError, match="local_steps"):
        adjust_sync(np.ones(2), np.array([1.5, 2.0]), np.ones(2), policy)
    with pytest.raises(ValueError, match="budget_scale"):
        adjust_sync(np.ones(2), np.array([1, 2]), np.array([1.0, 0.0]), policy)
    with pytest.raises(ValueError, match="min_steps"):
        SyncPolicy(min_steps=60, default_steps=50)
    with pytest.raises(ValueError, match="factor"):
        SyncPolicy(factor=1.0)
    with pytest.raises(ValueError, match="threshold"):
        SyncPolicy(threshold=0.0)


SIZES = np.array([2, 1, 1, 3])


def test_fill_decays_with_age():
    cache = refresh_cache({}, {0: np.array([1.0, 2.0]), 1: np.array([4.0])}, 3)
    cache = refresh_cache(cache, {2: np.array([-8.0])}, 5)
    assert cache[0].round == 3 and cache[2].round == 5
    values, rounds = cache_arrays(cache, SIZES)
    assert rounds.tolist() == [3, 3, 5, -1]
    assert values.tolist() == [1.0, 2.0, 4.0, -8.0, 0.0, 0.0, 0.0]
    filled = fill_unsent(values, rounds, SIZES, server_round=6, decay=0.5)
    # group 0: age 3 → 0.5³; group 1: age 3; group 2: age 1; group 3 never seen
    assert filled.dtype == np.float32
    assert filled.tolist() == [0.125, 0.25, 0.5, -4.0, 0.0, 0.0, 0.0]
    same = fill_unsent(values, rounds, SIZES, server_round=6, decay=1.0)
    np.testing.assert_array_equal(same, values)
    zero = fill_unsent(values, rounds, SIZES, server_round=6, decay=0.0)
    assert not zero.any()
    # the cache holds copies: changing what was received does not change it
    update = np.array([1.0])
    cached = refresh_cache({}, {0: update}, 1)
    update[0] = 9.0
    assert cached[0].update[0] == 1.0


def test_fill_rejects_bad_inputs():
    values, rounds = cache_arrays({0: CachedUpdate(np.zeros(2), round=4)}, SIZES)
    with pytest.raises(ValueError, match="decay"):
        fill_unsent(values, rounds, SIZES, 5, decay=1.5)
    with pytest.raises(ValueError, match="after the current round"):
        fill_unsent(values, rounds, SIZES, 3, decay=0.5)
    with pytest.raises(ValueError, match="disagree"):
        fill_unsent(values[:-1], rounds, SIZES, 5, decay=0.5)
    with pytest.raises(ValueError, match="outside"):
        cache_arrays({7: CachedUpdate(np.zeros(1), round=1)}, SIZES)
    with pytest.raises(ValueError, match="values, the group"):
        cache_arrays({1: CachedUpdate(np.zeros(2), round=1)}, SIZES)


def test_divergence_names_what_is_wrong_and_sums_in_float64():
    with pytest.raises(ValueError, match=r"^local and global_ must both be mappings"):
        divergence(np.zeros(2), {"w": np.zeros(2)})
    with pytest.raises(ValueError, match=r"keys differ: \['b', 'c'\]$"):
        divergence({"w": np.zeros(1), "b": np.zeros(1)}, {"w": np.zeros(1), "c": 0})
    with pytest.raises(ValueError, match=r"^'vector': shapes"):
        divergence(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match=r"^'vector': non-finite values$"):
        divergence(np.array([np.inf]), np.zeros(1))
    # float32 inputs, float64 sums: 3e-4 in each of 10^6 entries, ‖·‖ = 0.3
    # exactly (float32 accumulation drifts in the 7th digit)
    x = np.full(10**6, 3e-4, np.float32)
    expected = math.sqrt(10**6 * float(np.float32(3e-4)) ** 2)
    assert divergence(x, np.zeros_like(x)) == pytest.approx(expected, rel=1e-12)


def test_refresh_cache_copies_what_it_keeps():
    update = np.array([1.0, 2.0])
    cache = refresh_cache({}, {0: update}, server_round=3)
    update[0] = 99.0  # the caller reuses its buffer
    assert cache[0].update.tolist() == [1.0, 2.0] and cache[0].round == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([], [1.0], [0.0]), "num_examples must be a non-empty 1-D array, got (0,)"),
        (([1], [-0.5], [0.0]), "reliability must be finite and non-negative"),
        (([1], [1.5], [0.0]), "reliability must lie in [0, 1]"),
        (([1], [1.0], [np.inf]), "latency_s must be finite and non-negative"),
        (
            ([0], [1.0], [0.0]),
            "every device has zero weight (no examples or zero reliability): "
            "nothing to aggregate",
        ),
    ],
)
def test_aggregation_weights_messages(args, message):
    with pytest.raises(ValueError) as info:
        aggregation_weights(*(np.array(a, dtype=float) for a in args))
    assert str(info.value) == message


def test_aggregation_weights_reference_and_small_totals():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^reference_latency_s must be > 0, got"):
            aggregation_weights(
                np.ones(1), np.ones(1), np.ones(1), reference_latency_s=bad
            )
    # a total below 1 is still a total: one device at half reliability
    assert aggregation_weights(np.ones(1), np.array([0.5]), np.zeros(1)).tolist() == [
        1.0
    ]


def test_sync_policy_limits_are_inclusive_and_named():
    SyncPolicy(default_steps=4, min_steps=4, default_budget=2.0, max_budget=2.0)
    for kwargs, message in [
        (
            {"default_steps": 4, "min_steps": 5},
            "need 1 <= min_steps <= default_steps, got 5 and 4",
        ),
        (
            {"default_budget": 0.0},
            "need 0 < default_budget <= max_budget, got 0.0 and 4.0",
        ),
        (
            {"default_budget": 5.0},
            "need 0 < default_budget <= max_budget, got 5.0 and 4.0",
        ),
    ]:
        with pytest.raises(ValueError) as info:
            SyncPolicy(**kwargs)
        assert str(info.value) == message


def test_adjust_sync_checks_and_types():
    policy = SyncPolicy(threshold=1.5, default_steps=8)
    for args, message in [
        (([], [], []), "divergences must be a non-empty 1-D array, got (0,)"),
        (([1.0], [0], [1.0]), "local_steps must be integers >= 1"),
        (([1.0], [1], [0.0]), "budget_scale must be finite and > 0"),
    ]:
        with pytest.raises(ValueError) as info:
            adjust_sync(*(np.array(a) for a in args), policy)
        assert str(info.value) == message
    decision = adjust_sync(
        np.array([1.0, 1.0]), np.array([8, 2]), np.array([1.0, 2.0], np.float32), policy
    )
    assert decision.budget_scale.dtype == np.float64
    assert decision.budget_scale.tolist() == [1.0, 1.0]
    assert decision.local_steps.tolist() == [8, 4]


def test_sync_intervals_at_their_boundaries_by_hand():
    from tandem.coordination import IntervalPolicy, adjust_intervals, due_devices

    policy = IntervalPolicy(threshold=1.5, stable=0.75, min_interval=1, max_interval=8)
    # rho = D / r = [0, 1.5, 3, 3, 4.5, 12 / 6]: median 2.5 -> tau = 3.75,
    # stable at rho <= 1.875
    d = np.array([0.0, 1.5, 3.0, 6.0, 4.5, 12.0])
    r = np.array([1, 1, 1, 2, 1, 6])
    out = adjust_intervals(d, r, policy)
    assert out.threshold == pytest.approx(3.75)
    assert out.triggered.tolist() == [False, False, False, False, True, False]
    assert out.stable.tolist() == [True, True, False, False, False, False]
    assert out.intervals.tolist() == [2, 2, 1, 2, 1, 6]
    # exactly at tau: not drifting; exactly at stable * median: stable; a
    # drifting interval of 6 halves to 3
    edge = adjust_intervals(
        np.array([3.0, 2.0, 2.0, 1.5, 36.0]), np.array([1, 1, 1, 1, 6]), policy
    )
    assert edge.threshold == pytest.approx(3.0)
    assert edge.triggered.tolist() == [False, False, False, False, True]
    assert edge.stable.tolist() == [False, False, False, True, False]
    assert edge.intervals.tolist() == [1, 1, 1, 2, 3]
    # intervals outside the bounds are brought back within them
    tight = IntervalPolicy(threshold=10.0, stable=0.0, min_interval=2, max_interval=3)
    kept = adjust_intervals(np.ones(3), np.array([1, 3, 9]), tight)
    assert kept.intervals.tolist() == [2, 3, 3]
    with pytest.raises(ValueError, match=r"^intervals must be integers >= 1$"):
        adjust_intervals(np.ones(2), np.array([1.0, 2.0]), policy)
    with pytest.raises(
        ValueError, match=r"^divergences must be finite and non-negative$"
    ):
        adjust_intervals(np.array([1.0, -0.5]), np.array([1, 1]), policy)
    with pytest.raises(
        ValueError, match=r"^divergences must be finite and non-negative$"
    ):
        adjust_intervals(np.array([1.0, np.nan]), np.array([1, 1]), policy)
    with pytest.raises(ValueError, match=r"^divergences and intervals must have one"):
        adjust_intervals(np.ones(2), np.array([1, 1, 1]), policy)
    # an interval not given is 1: synced in round 4, due again in round 5
    assert due_devices(5, [7, 8], {7: 4, 8: 4}, {8: 2}) == [7]


def test_interval_policy_limits_are_inclusive_and_named():
    from tandem.coordination import IntervalPolicy

    # stable == threshold and min_interval == max_interval are allowed
    IntervalPolicy(threshold=1.0, stable=1.0, min_interval=3, max_interval=3)
    IntervalPolicy(threshold=1.0, stable=0.0)
    for kwargs, message in [
        ({"threshold": 0.0, "stable": 0.0}, "threshold must be > 0, got 0.0"),
        ({"threshold": math.inf}, "threshold must be > 0, got inf"),
        ({"threshold": math.nan}, "threshold must be > 0, got nan"),
        ({"stable": 2.0}, "need 0 <= stable <= threshold, got 2.0 and 1.5"),
        ({"stable": -0.5}, "need 0 <= stable <= threshold, got -0.5 and 1.5"),
        (
            {"min_interval": 3, "max_interval": 2},
            "need 1 <= min_interval <= max_interval, got 3 and 2",
        ),
        (
            {"min_interval": 0},
            "need 1 <= min_interval <= max_interval, got 0 and 2",
        ),
    ]:
        with pytest.raises(ValueError) as info:
            IntervalPolicy(**kwargs)
        assert str(info.value) == message


def test_cache_arrays_types_shapes_and_last_index():
    # values are float32 and rounds int64 whatever the cached dtypes; a cached
    # update of any shape is flattened into its group's slot
    cache = {
        0: CachedUpdate(np.array([[1.0, 2.0], [3.0, 4.0]]), round=2),
        2: CachedUpdate(np.array([[5.0], [6.0]], np.float16), round=7),
    }
    values, rounds = cache_arrays(cache, [4, 1, 2])
    assert values.dtype == np.float32 and rounds.dtype == np.int64
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 5.0, 6.0]
    assert rounds.tolist() == [2, -1, 7]
    # the first index past the end is outside too
    with pytest.raises(ValueError) as info:
        cache_arrays({4: CachedUpdate(np.zeros(3), round=1)}, SIZES)
    assert str(info.value) == "cache has group index 4 outside [0, 4)"


def test_aggregation_weights_are_float64_for_float32_inputs():
    # the inputs are read as float64: float32 inputs give the float64 weights
    w = aggregation_weights(
        np.array([1, 1, 1], np.float32),
        np.array([1.0, 1.0, 1.0], np.float32),
        np.array([0.0, 0.0, 0.0], np.float32),
    )
    assert w.dtype == np.float64
    assert w.tolist() == [1 / 3, 1 / 3, 1 / 3]
