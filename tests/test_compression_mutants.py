"""Compression: the corners that mutation testing found unpinned (docs/mutation.md).

Hand-computed values, exact messages and dtypes of the pure compression
modules (pipeline, downlink, layout, codecs, knapsack, groups, int8, feedback,
budget, packing, rows): each test names what it pins down.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest

import tandem.compression.downlink as downlink_module
import tandem.compression.knapsack as knapsack
import tandem.compression.pipeline as pipeline_module
from tandem.compression import byte_budget, compensate, compression_ratio
from tandem.compression.codecs import (
    REGISTRY,
    Codec,
    CodecError,
    Option,
    RowError,
    decode,
    encode,
    option_table,
    register,
    unregister,
)
from tandem.compression.downlink import (
    DeviceReplica,
    apply_downlink,
    compress_downlink,
    model_digest,
)
from tandem.compression.groups import ParamGroup, make_groups, unflatten
from tandem.compression.int8 import quantize_rows
from tandem.compression.layout import GroupLayout, Piece
from tandem.compression.packing import (
    encode_packed,
    pack_groups,
    split_groups,
    unpack_flat,
    unpack_groups,
)
from tandem.compression.pipeline import (
    EdgeMemory,
    compress_update,
    fill_deferred,
    fill_unsent,
)
from tandem.compression.rows import get_rows, put_rows
from tandem.importance import (
    STRUCTURAL_FEATURES,
    GroupMeta,
    ImportancePredictor,
    predict_importance,
    structural_features,
    temporal_features,
)

FULL_OR_DEFER = (Option("full"), Option("defer"))


def exactly(message: str) -> str:
    """A ``match`` pattern for exactly ``message``."""
    return f"^{re.escape(message)}$"


def plan(**changes):
    """A round plan (``RoundPlan``) with full-or-defer options."""
    fields = dict(
        budget=8,
        codecs=FULL_OR_DEFER,
        gamma=1.0,
        importance="uniform",
        fill_decay=1.0,
        server_round=1,
    )
    return SimpleNamespace(**{**fields, **changes})


# ---------------------------------------------------------------- pipeline fills


def test_fill_unsent_ages_by_hand():
    """``decay^a · u_i``: a group received in round 0 is known (only ``-1`` is
    "never"), one received this very round has age 0 (factor 1, no error),
    a never-received group is zeros whatever the cache holds."""
    cache = np.array([1, 2, 3, 4, 5, 6], np.float32)
    sizes = np.array([2, 1, 2, 1])
    rounds = np.array([3, 0, -1, 5])
    out = fill_unsent(cache, rounds, sizes, server_round=5, decay=0.5)
    assert out.dtype == np.float32
    # ages 2, 5, never, 0: factors 0.25, 1/32, 0, 1
    assert out.tolist() == [0.25, 0.5, 3 / 32, 0.0, 0.0, 6.0]


@pytest.mark.parametrize("oldest", [-1, 150])
@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0, 0.7, 0.25, 1e-30])
def test_fill_unsent_is_the_float64_product_rounded_once(decay, oldest):
    """Every stand-in is ``decay^a · u`` taken in float64 and rounded once to
    float32 (whatever route is taken), bit for bit: tiny (subnormal) and
    huge values, ``-0``, ages up to where a float32 factor underflows (or
    only recent rounds, where every factor is a float32 number)."""
    rng = np.random.default_rng(7)
    sizes = rng.integers(0, 40, size=200)
    cache = (
        rng.standard_normal(int(sizes.sum()))
        * 10.0 ** rng.integers(-45, 38, size=int(sizes.sum()))
    ).astype(np.float32)
    cache[::11] = -0.0
    rounds = rng.integers(oldest, 200, size=200)
    out = fill_unsent(cache, rounds, sizes, 200, decay)
    age = 200 - rounds
    factor = np.where(rounds >= 0, decay ** np.maximum(age, 0), 0.0)
    want = (np.repeat(factor, sizes) * cache.astype(np.float64)).astype(np.float32)
    assert out.dtype == np.float32
    assert out.tobytes() == want.tobytes()


def test_fill_unsent_messages():
    with pytest.raises(
        ValueError, match=exactly("cache (5,), rounds (2,) and sizes (2,) disagree")
    ):
        fill_unsent(np.zeros(5, np.float32), [0, 0], [2, 2], 1, 1.0)
    # the newest entry is named, not the first one
    with pytest.raises(
        ValueError,
        match=exactly(
            "cache entry for group 1 is from round 7, after the current round 4"
        ),
    ):
        fill_unsent(np.zeros(3, np.float32), [1, 7, 2], [1, 1, 1], 4, 1.0)


def test_fill_deferred_by_hand_and_its_checks():
    """Stand-ins in the unsent groups, the cache refreshed with the sent ones;
    with every group sent the cache is a plain copy of the update."""
    update = np.array([1, 2, 0, 0, 9], np.float32)
    cache = np.array([5, 5, 6, 8, 7], np.float32)
    cache_round = np.array([1, 2, 0])
    fill_deferred(update, [True, False, True], cache, cache_round, [2, 2, 1], 3, 0.5)
    assert update.tolist() == [1, 2, 3, 4, 9]  # group 1: 0.5^1 · (6, 8)
    assert cache.tolist() == [1, 2, 6, 8, 9] and cache_round.tolist() == [3, 2, 3]

    # everything sent: the cache takes the update as is
    update = np.array([1, 2, 3], np.float32)
    cache = np.zeros(3, np.float32)
    cache_round = np.array([-1, 2])
    fill_deferred(update, [True, True], cache, cache_round, [2, 1], 4, 0.5)
    assert cache.tolist() == [1, 2, 3] and cache_round.tolist() == [4, 4]
    assert update.tolist() == [1, 2, 3]

    # a 0/1 integer mask reads as the boolean mask it spells
    update = np.array([1, 2, 0], np.float32)
    cache = np.array([0, 0, 4], np.float32)
    cache_round = np.array([0, 0])
    fill_deferred(update, np.array([1, 0]), cache, cache_round, [2, 1], 1, 1.0)
    assert update.tolist() == [1, 2, 4] and cache_round.tolist() == [1, 0]

    with pytest.raises(ValueError, match=exactly("decay must be in [0, 1], got 1.5")):
        # refused even with nothing to fill
        fill_deferred(update, [1, 1], cache, cache_round, [2, 1], 1, 1.5)
    # the update alone has the wrong shape
    with pytest.raises(
        ValueError,
        match=exactly("update (4,), sent (2,) and cache (3,) disagree with sizes (2,)"),
    ):
        fill_deferred(np.zeros(4, np.float32), [1, 0], cache, cache_round, [2, 1], 1, 1)


def test_edge_memory_fresh_dtypes():
    layout = GroupLayout.from_arrays({"w": np.zeros(5, np.float32)}, 3)
    memory = EdgeMemory.fresh(layout, history=3)
    assert memory.residual.dtype == np.float32 and memory.residual.shape == (5,)
    assert memory.cache.dtype == np.float32 and memory.cache.shape == (5,)
    assert memory.history.dtype == np.float64 and memory.history.shape == (3, 2)
    assert memory.cache_round.tolist() == [-1, -1]


def test_stage_clock_adds_cpu_seconds_since_the_last_lap():
    """Each lap adds ``now − last`` to what the stage already holds (starting
    from 0); nothing is counted from before the clock was made."""
    before = time.thread_time()
    stages = {"feedback": 5.0}
    clock = pipeline_module._StageClock(stages)
    clock.lap("feedback")
    clock.lap("importance")
    elapsed = time.thread_time() - before
    assert 5.0 <= stages["feedback"] <= 5.0 + elapsed
    assert 0.0 <= stages["importance"] <= elapsed
    quiet = pipeline_module._StageClock(None)
    quiet.lap("feedback")  # no stages: nothing to do
    assert quiet.stages is None


# ------------------------------------------------------------- importance (both)

# groups of 3 and 1 elements: energies 9 and 9, RMS √3 and 3
IMPORTANCE_MODEL = {"a.w": np.zeros(3, np.float32), "b.w": np.zeros(1, np.float32)}
IMPORTANCE_VECTOR = np.array([1, 2, 2, 3], np.float32)
IMPORTANCE_WEIGHTS = np.array([0, 1, 1, 1], np.float32)  # density 2/3 and 1


def _pipeline_importance(importance, predictor=None):
    layout = GroupLayout.from_arrays(IMPORTANCE_MODEL, 4)
    state = EdgeMemory.fresh(layout, history=2)
    state.history = np.array([[0.0, 0.0], [7.0, 8.0]])
    value, energy = pipeline_module._importance(
        IMPORTANCE_VECTOR,
        IMPORTANCE_WEIGHTS,
        state,
        plan(importance=importance),
        layout,
        predictor,
    )
    assert energy.tolist() == [9.0, 9.0]
    return value, state.history, layout


def _downlink_importance(importance, predictor=None):
    layout = GroupLayout.from_arrays(IMPORTANCE_MODEL, 4)
    replica = DeviceReplica.full(np.zeros(4, np.float32), 0, layout, history=2)
    replica.history = np.array([[0.0, 0.0], [7.0, 8.0]])
    value = downlink_module._importance(
        IMPORTANCE_VECTOR, IMPORTANCE_WEIGHTS, replica, layout, importance, predictor
    )
    return value, replica.history, layout


@pytest.mark.parametrize("run", [_pipeline_importance, _downlink_importance])
def test_importance_by_hand(run):
    """``I_i = s_i·‖v_i‖²`` with ``s`` = 1 (uniform), RMS / max RMS
    (magnitude) or the predictor's scores on the updated history and the
    weights' structure; this round's RMS is appended to the history."""
    value, history, layout = run("uniform")
    assert value.tolist() == [9.0, 9.0]
    np.testing.assert_allclose(history, [[7.0, 8.0], [np.sqrt(3.0), 3.0]])
    assert history.shape == (2, 2)
    value, _, _ = run("magnitude")
    np.testing.assert_allclose(value, [9 * np.sqrt(3.0) / 3, 9.0])
    predictor = ImportancePredictor(seed=3)
    value, history, layout = run("predictor", predictor)
    score = predict_importance(
        predictor, temporal_features(history), layout.structural(IMPORTANCE_WEIGHTS)
    )
    assert score.min() > 0 and score.max() < 1
    np.testing.assert_array_equal(value, score * 9.0)


def test_importance_without_a_predictor_is_refused():
    with pytest.raises(
        CodecError, match=exactly("the plan asks for the predictor; none was given")
    ):
        _pipeline_importance("predictor")
    with pytest.raises(
        CodecError, match=exactly("importance 'predictor' needs a predictor")
    ):
        _downlink_importance("predictor")


class _SpyScores:
    """Stands in for ``predict_importance``: fixed scores, records its inputs."""

    def __init__(self, scores):
        self.scores = np.asarray(scores, dtype=np.float64)
        self.calls = []

    def __call__(self, predictor, temporal, structural):
        self.calls.append((predictor, temporal, structural))
        return self.scores

    def check_one_call(self, predictor, history, structural):
        """Called once, with ``predictor`` and the features of ``history``
        and of ``structural``."""
        [(given, temporal, seen)] = self.calls
        assert given is predictor
        np.testing.assert_array_equal(temporal, temporal_features(history))
        np.testing.assert_array_equal(seen, structural)


def test_compress_update_scores_with_the_predictor(monkeypatch):
    """The predictor gets the updated history and the *global weights'*
    structure, and its scores decide: group 1 (less energy, score 1) is
    sent in full, group 0 (score 0) deferred."""
    spy = _SpyScores([0.0, 1.0])
    monkeypatch.setattr(pipeline_module, "predict_importance", spy)
    layout = GroupLayout.from_arrays({"w": np.zeros(4, np.float32)}, 2)
    state = EdgeMemory.fresh(layout, history=2)
    weights = np.array([0, 0, 1, 1], np.float32)  # densities 0 and 1
    predictor = ImportancePredictor(seed=0)
    out = compress_update(
        np.array([3, 3, 1, 1], np.float32),
        weights,
        state,
        plan(importance="predictor"),
        layout,
        predictor,
    )
    assert out.codecs.tolist() == [1, 0]
    spy.check_one_call(predictor, state.history, layout.structural(weights))


def test_compress_update_kept_fraction_and_groups_sent_by_hand():
    """``kept = 1 − ‖g̃ − sent‖² / ‖g̃‖²`` (total energy below 1 here) and the
    share of groups not deferred; a zero update keeps 1.0, an update with no
    groups at all has sent all of them."""
    layout = GroupLayout.from_arrays({"w": np.zeros(6, np.float32)}, 2)
    update = np.array([0.3, 0.4, 0.1, 0.0, 0.0, 0.2], np.float32)
    out = compress_update(update, update, EdgeMemory.fresh(layout, 2), plan(), layout)
    # energies 0.25, 0.01, 0.04: group 0 in full, 1 and 2 deferred (zeros)
    assert out.codecs.tolist() == [0, 1, 1] and out.encoded_bytes == 8
    assert out.kept_fraction == pytest.approx(1 - 0.05 / 0.30, rel=1e-6)
    assert out.groups_sent == pytest.approx(1 / 3)

    zero = np.zeros(6, np.float32)
    out = compress_update(zero, zero, EdgeMemory.fresh(layout, 2), plan(), layout)
    assert out.kept_fraction == 1.0

    empty = GroupLayout.from_arrays({}, 2)
    nothing = np.zeros(0, np.float32)
    out = compress_update(nothing, nothing, EdgeMemory.fresh(empty, 2), plan(), empty)
    assert (out.kept_fraction, out.groups_sent, out.encoded_bytes) == (1.0, 1.0, 0)


# -------------------------------------------------------------------- downlink


def test_model_digest_is_the_first_48_bits_of_sha256_over_float32():
    flat = np.array([1.5, -2.0, 0.25], np.float64)  # hashed as float32
    data = np.array([1.5, -2.0, 0.25], "<f4").tobytes()
    expected = int.from_bytes(hashlib.sha256(data).digest()[:6], "big")
    assert model_digest(flat) == expected == model_digest(flat.astype(np.float32))


def test_device_replica_full_holds_a_float32_copy():
    layout = GroupLayout.from_arrays({"w": np.zeros(3, np.float32)}, 2)
    model = np.array([1, 2, 3], np.float32)
    replica = DeviceReplica.full(model, 4, layout, history=2)
    model[0] = 99.0  # the caller's array is not the record
    assert replica.model.tolist() == [1, 2, 3] and replica.version == 4
    assert replica.history.shape == (2, 2) and replica.history.dtype == np.float64
    wide = DeviceReplica.full(np.array([1, 2, 3], np.float64), 0, layout, 1)
    assert wide.model.dtype == np.float32


def test_compress_downlink_round_checks_and_float32_target():
    """A send in the device's own version round is fine; an earlier one is
    refused. A float64 target is rounded to float32 first: its sub-float32
    part is neither sent nor counted as missing."""
    layout = GroupLayout.from_arrays({"w": np.zeros(2, np.float32)}, 2)
    replica = DeviceReplica.full(np.ones(2, np.float32), 2, layout, history=1)
    with pytest.raises(
        CodecError, match=exactly("round 1 is before the device's version 2")
    ):
        compress_downlink(
            np.ones(2),
            replica,
            budget=8,
            codecs=FULL_OR_DEFER,
            layout=layout,
            server_round=1,
        )
    target = np.full(2, 1.0 + 2.0**-30)  # float32: exactly 1.0, the held model
    out = compress_downlink(
        target,
        replica,
        budget=8,
        codecs=(Option("full"),),
        layout=layout,
        server_round=2,
    )
    assert out.payload.tolist() == [0] * 8  # two float32 zeros
    assert (out.kept_fraction, out.residual_norm) == (1.0, 0.0)
    assert replica.model.tolist() == [1.0, 1.0] and replica.version == 2


def test_compress_downlink_failure_keeps_the_history():
    layout = GroupLayout.from_arrays({"w": np.zeros(2, np.float32)}, 2)
    replica = DeviceReplica.full(np.zeros(2, np.float32), 0, layout, history=2)
    replica.history = np.array([[1.0], [2.0]])
    with pytest.raises(CodecError, match="downlink budget 3 bytes"):
        compress_downlink(
            np.ones(2, np.float32),
            replica,
            budget=3,
            codecs=(Option("full"),),
            layout=layout,
            server_round=1,
        )
    assert replica.history.tolist() == [[1.0], [2.0]]


def test_compress_downlink_importance_choices_and_kept_fraction():
    """Room for one group: uniform importance sends the 4-element group
    (energy 2.56 > 2.25), magnitude scores (RMS 0.8 vs 1.5) the single
    element; the kept share is of a total energy below 1 or 1 for no delta."""
    layout = GroupLayout.from_arrays(
        {"a.w": np.zeros(4, np.float32), "b.w": np.zeros(1, np.float32)}, 4
    )
    target = np.array([0.8, 0.8, 0.8, 0.8, 1.5], np.float32)
    chosen = {}
    for importance in ("uniform", "magnitude"):
        replica = DeviceReplica.full(np.zeros(5, np.float32), 0, layout, history=1)
        out = compress_downlink(
            target,
            replica,
            budget=16,
            codecs=FULL_OR_DEFER,
            layout=layout,
            server_round=1,
            importance=importance,
        )
        chosen[importance] = out.codecs.tolist()
    assert chosen == {"uniform": [0, 1], "magnitude": [1, 0]}

    small = GroupLayout.from_arrays({"w": np.zeros(4, np.float32)}, 2)
    replica = DeviceReplica.full(np.zeros(4, np.float32), 0, small, history=1)
    delta = np.array([0.3, 0.4, 0.1, 0.0], np.float32)
    out = compress_downlink(
        delta, replica, budget=8, codecs=FULL_OR_DEFER, layout=small, server_round=1
    )
    assert out.codecs.tolist() == [0, 1]
    assert out.kept_fraction == pytest.approx(0.25 / 0.26, rel=1e-6)
    out = compress_downlink(
        replica.model,
        replica,
        budget=8,
        codecs=FULL_OR_DEFER,
        layout=small,
        server_round=2,
    )
    assert out.kept_fraction == 1.0


def test_compress_downlink_scores_with_the_predictor(monkeypatch):
    """The predictor gets the replica's updated history and the *target's*
    structure; its scores pick the group sent."""
    spy = _SpyScores([1.0, 0.0])
    monkeypatch.setattr(downlink_module, "predict_importance", spy)
    layout = GroupLayout.from_arrays({"w": np.zeros(4, np.float32)}, 2)
    replica = DeviceReplica.full(np.zeros(4, np.float32), 0, layout, history=2)
    target = np.array([0, 1, 3, 3], np.float32)  # densities 0.5 and 1
    predictor = ImportancePredictor(seed=0)
    out = compress_downlink(
        target,
        replica,
        budget=8,
        codecs=FULL_OR_DEFER,
        layout=layout,
        server_round=1,
        importance="predictor",
        predictor=predictor,
    )
    assert out.codecs.tolist() == [0, 1]
    spy.check_one_call(predictor, replica.history, layout.structural(target))


def test_apply_downlink_checks_held_model_budget_and_names_groups():
    layout = GroupLayout.from_arrays({"w": np.zeros(4, np.float32)}, 2)
    codes, payload, _ = encode_packed(
        np.arange(4, dtype=np.float32), layout.sizes, np.array([0, 0]), FULL_OR_DEFER
    )
    kwargs = dict(options=FULL_OR_DEFER, layout=layout, max_bytes=16)
    with pytest.raises(
        CodecError, match=exactly("held model float64(4,), expected float32 (4,)")
    ):
        apply_downlink(np.zeros(4), codes, payload, **kwargs)
    with pytest.raises(
        CodecError,
        match=exactly(
            "the codec table asks for 16 payload bytes, more than the budget of 8 bytes"
        ),
    ):
        apply_downlink(
            np.zeros(4, np.float32), codes, payload, **{**kwargs, "max_bytes": 8}
        )
    bad = payload.copy()
    bad[8:12] = np.array([np.nan], "<f4").view(np.uint8)
    with pytest.raises(
        CodecError, match=exactly("group w[2:4]: full 'values' holds NaN or Inf")
    ):
        apply_downlink(np.zeros(4, np.float32), codes, bad, **kwargs)


# ---------------------------------------------------------------------- layout


def test_pieces_tile_the_groups_and_norms_match_float64_sums():
    """Past one piece (2**17 elements): runs of one size are cut into pieces
    of whole groups, an empty group and a group larger than a piece get
    their own; the squared norms equal float64 sums to float32 rounding
    (an empty group's is 0)."""
    rng = np.random.default_rng(5)
    sizes = np.array([1] + [256] * 600 + [0, 10, 200_000, 3], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    layout = GroupLayout.from_arrays({"w": np.zeros(int(sizes.sum()), np.float32)}, 1)
    layout = dataclasses.replace(layout, sizes=sizes, starts=starts)
    assert layout.pieces == (
        Piece(0, 1, 0, 1, 1),
        Piece(1, 513, 1, 1 + 512 * 256, 256),
        Piece(513, 601, 1 + 512 * 256, 1 + 600 * 256, 256),
        Piece(601, 602, 1 + 600 * 256, 1 + 600 * 256, 0),
        Piece(602, 603, 1 + 600 * 256, 11 + 600 * 256, 10),
        Piece(603, 604, 11 + 600 * 256, 200_011 + 600 * 256, 200_000),
        Piece(604, 605, 200_011 + 600 * 256, 200_014 + 600 * 256, 3),
    )
    vector = rng.normal(size=int(sizes.sum())).astype(np.float32)
    squares = np.square(vector, dtype=np.float64)
    expected = np.array(
        [squares[a : a + k].sum() for a, k in zip(starts, sizes, strict=True)]
    )
    got = layout.group_sq_norms(vector)
    assert got.dtype == np.float64 and got[601] == 0.0
    np.testing.assert_allclose(got, expected, rtol=2e-6)


def test_layout_metas_and_layers_by_hand():
    arrays = {
        "conv.weight": np.zeros((2, 1, 3), np.float32),
        "conv.bias": np.zeros(2, np.float32),
        "scale": np.zeros((), np.float32),  # a scalar: layer size 1
        "fc.weight": np.zeros((2, 2), np.float32),
    }
    layout = GroupLayout.from_arrays(arrays, 4)
    assert layout.metas == (
        GroupMeta("conv.weight", 0, 4, 6, "conv"),
        GroupMeta("conv.weight", 0, 2, 6, "conv"),
        GroupMeta("conv.bias", 0, 2, 2, "bias"),
        GroupMeta("scale", 1, 1, 1, "other"),
        GroupMeta("fc.weight", 2, 4, 4, "linear"),
    )
    assert layout.num_layers == 3
    np.testing.assert_array_equal(
        layout.dense_structural, structural_features(layout.metas, 3)
    )
    one = GroupLayout.from_arrays({"fc.weight": np.zeros((2, 2), np.float32)}, 4)
    assert one.num_layers == 1


def test_layout_of_no_float_tensors_and_float32_outputs():
    empty = GroupLayout.from_arrays({"steps": np.array([3], np.int64)}, 4)
    flat = empty.flat({"steps": np.array([3], np.int64)})
    assert flat.dtype == np.float32 and flat.shape == (0,)
    norms = empty.group_sq_norms(flat)
    assert norms.dtype == np.float64 and norms.shape == (0,)
    layout = GroupLayout.from_arrays({"w": np.zeros(3, np.float32)}, 4)
    back = layout.unflat(np.array([1.0, 2.0, 3.0]))  # float64 in
    assert back["w"].dtype == np.float32


def test_group_rms_sums_in_float64_and_divides_by_the_size():
    layout = GroupLayout.from_arrays(
        {"a": np.zeros(1000, np.float32), "b": np.zeros(1, np.float32)}, 1000
    )
    vector = np.random.default_rng(2).normal(size=1001).astype(np.float32)
    squares = np.square(vector.astype(np.float64))
    expected = np.sqrt(np.add.reduceat(squares, [0, 1000]) / [1000, 1])
    np.testing.assert_array_equal(layout.group_rms(vector), expected)


def test_structural_density_with_an_empty_group():
    """Density per group with an empty group between two others: the empty
    group is dense (1, as ``dense_structural``), its neighbours count their
    own zeros."""
    layout = GroupLayout.from_arrays(
        {
            "a": np.zeros(2, np.float32),
            "e": np.zeros(0, np.float32),
            "b": np.zeros(2, np.float32),
        },
        4,
    )
    assert layout.sizes.tolist() == [2, 0, 2]
    features = layout.structural(np.array([0, 1, 3, 0], np.float32))
    density = features[:, STRUCTURAL_FEATURES.index("density")]
    assert density.tolist() == [0.5, 1.0, 0.5]
    features = layout.structural(np.array([0, 1, 0, 0], np.float32))
    density = features[:, STRUCTURAL_FEATURES.index("density")]
    assert density.tolist() == [0.5, 1.0, 0.0]


# ---------------------------------------------------------------------- groups


def test_make_groups_chunk_rules():
    assert make_groups({"w": (3,)}, 1) == [
        ParamGroup("w", 0, 1, (3,)),
        ParamGroup("w", 1, 2, (3,)),
        ParamGroup("w", 2, 3, (3,)),
    ]
    for chunk in (True, 2.0, 0):
        with pytest.raises(
            ValueError,
            match=exactly(f"chunk must be a positive integer, got {chunk!r}"),
        ):
            make_groups({"w": (3,)}, chunk)


def test_unflatten_float32_and_tiling_errors():
    groups = make_groups({"w": (3,)}, 2)
    out = unflatten([np.array([1.0, 2.0]), np.array([3.0])], groups)  # float64 in
    assert out["w"].dtype == np.float32 and out["w"].tolist() == [1, 2, 3]
    not_tiling = exactly("groups of 'w' do not tile shape (3,)")
    overrun = [ParamGroup("w", 0, 2, (3,)), ParamGroup("w", 2, 4, (3,))]
    with pytest.raises(ValueError, match=not_tiling):
        unflatten([np.zeros(2), np.zeros(2)], overrun)
    gap = [ParamGroup("w", 0, 1, (3,)), ParamGroup("w", 2, 3, (3,))]
    with pytest.raises(ValueError, match=not_tiling):
        unflatten([np.zeros(1), np.zeros(1)], gap)


# ---------------------------------------------------------- int8, feedback, budget


def test_quantize_rows_rounds_in_float32_like_the_int8_codec():
    """A level that sits on a float32 rounding tie: 127·x/a is 64.5 in
    float32 arithmetic (rint: 64) but just above it in float64 (65)."""
    row = np.array([0.7391814589500427, 1.4554425477981567], np.float32)
    levels, scale = quantize_rows(row[None, :])
    assert levels.tolist() == [[64, 127]] and scale.tolist() == [row[1]]
    np.testing.assert_array_equal(levels[0], encode("int8", row)["levels"])


def test_compensate_gamma_zero_and_float32_result():
    g = np.array([1.0, 2.0], np.float32)
    e = np.array([0.5, 0.25])  # float64 residual
    assert compensate(g, e, 0.0).tolist() == [1.0, 2.0]
    for gamma in (0.5, 1.0):
        out = compensate(g, e, gamma)
        assert out.dtype == np.float32
    assert compensate(g, e, 0.5).tolist() == [1.25, 2.125]


def test_compression_ratio_exact_values_and_types():
    # β = 0.02 per Mbit/s at 50 Mbit/s: exactly exp(-1)
    c = compression_ratio(50e6, c_min=0.1, c_max=0.9, beta=0.02)
    assert isinstance(c, float)
    assert c == 0.1 + 0.8 * float(np.exp(-0.02 * (50e6 / 1e6)))
    # 0.15 + (0.45 − 0.15) rounds above 0.45: clipped to c_max
    assert compression_ratio(0.0, c_min=0.15, c_max=0.45, beta=1.0) == 0.45
    with pytest.raises(
        ValueError, match=exactly("c_min must satisfy 0 <= c_min <= 1, got 1.5")
    ):
        compression_ratio(0.0, c_min=1.5, c_max=1.0, beta=1.0)
    with pytest.raises(
        ValueError,
        match=exactly("bandwidth_bps must be a scalar, got array([1., 2.])"),
    ):
        byte_budget(100, np.array([1.0, 2.0]), c_min=0.0, c_max=1.0, beta=1.0)


# ---------------------------------------------------------------------- codecs


def test_codec_messages_name_the_codec():
    assert str(RowError(3, "bad")) == "row 3: bad"
    negative = np.array([-1.0], np.float32)
    for kind, size in (("int8", 2), ("sign", 2)):
        payload = {**encode(kind, np.ones(size, np.float32)), "scale": negative}
        with pytest.raises(
            CodecError, match=exactly(f"{kind} 'scale' is negative (-1.0)")
        ):
            decode(kind, payload, size)
    twice = {"indices": np.array([1, 1], np.uint32), "values": np.ones(2, np.float32)}
    with pytest.raises(
        CodecError, match=exactly("topk 'indices' has duplicated indices")
    ):
        decode("topk", twice, 4)
    with pytest.raises(
        CodecError, match=exactly("a payload must be a mapping, got list")
    ):
        decode("full", [1.0], 1)
    with pytest.raises(
        CodecError, match=exactly("full 'values' is a list, not an ndarray")
    ):
        decode("full", {"values": [1.0]}, 1)
    with pytest.raises(
        CodecError, match=exactly("full payload has unexpected array(s) ['x']")
    ):
        decode("full", {"values": np.ones(1, np.float32), "x": np.ones(1)}, 1)


@pytest.mark.parametrize("kind", ["full", "half", "int8", "sign", "topk", "defer"])
def test_every_codec_decodes_and_encodes_rows_in_float32(kind):
    """Per group and per row block, decoded values are float32 and wire bytes
    uint8, whatever the codec's own wire dtype."""
    ratio = 0.5 if kind == "topk" else None
    x = np.array([0.5, -1.25, 2.0, 0.0], np.float32)
    option = Option(kind, ratio)
    payload = encode(kind, x, ratio=ratio)
    assert decode(kind, payload, 4).dtype == np.float32
    wire, decoded = option.codec.encode_rows(np.stack([x, -x]), ratio)
    assert wire.dtype == np.uint8 and decoded.dtype == np.float32
    assert decoded.shape == (2, 4)


def test_int8_rows_of_zeros_raise_no_floating_point_error():
    rows = np.array([[0.0, 0.0], [1.0, -1.0]], np.float32)
    with np.errstate(all="raise"):
        wire, decoded = REGISTRY["int8"].encode_rows(rows, None)
    assert wire[0, :2].view(np.int8).tolist() == [0, 0]
    assert decoded.tolist() == [[0.0, 0.0], [1.0, -1.0]]


class _ShiftedHalf(Codec):
    """A test codec of three arrays on the default (per-row) paths:
    ``x ≈ shift + scale · values`` with float16 values."""

    name = "shifted-half-test"
    layout: ClassVar[dict[str, np.dtype]] = {
        "shift": np.dtype(np.float32),
        "values": np.dtype(np.float16),
        "scale": np.dtype(np.float32),
    }

    def lengths(self, sizes, ratio):
        return {
            "shift": np.ones_like(sizes),
            "values": sizes,
            "scale": np.ones_like(sizes),
        }

    def fidelity(self, ratio):
        return 0.9

    def encode(self, x, ratio):
        shift = float(x.mean())
        scale = float(np.abs(x - shift).max()) or 1.0
        return {  # shift and scale in float64: the wire makes them float32
            "shift": np.array([shift]),
            "values": ((x - shift) / scale).astype(np.float16),
            "scale": np.array([scale]),
        }

    def expand(self, arrays, size):
        values = arrays["values"].astype(np.float32)
        return arrays["shift"][0] + arrays["scale"][0] * values


@pytest.fixture
def shifted_half():
    codec = register(_ShiftedHalf())
    yield codec
    REGISTRY.pop(codec.name, None)  # whatever the test left


def test_default_row_paths_cut_every_array_of_a_three_array_codec(shifted_half):
    """The generic ``encode_rows``/``decode_rows``: each array in its wire
    dtype at its own offset, float32 values, the bad row named."""
    option = Option(shifted_half.name)
    x = np.array([1.0, 3.0, 2.0, 5.0, 3.0, 4.0], np.float32)  # 2 groups of 3
    codes, payload, decoded = encode_packed(
        x, np.array([3, 3]), np.array([0, 0]), (option,)
    )
    assert payload.size == 2 * (4 + 6 + 4) and payload.dtype == np.uint8
    # group 0: shift 2, scale 1, values (-1, 1, 0)
    assert payload[:14].tobytes() == (
        np.array([2.0], "<f4").tobytes()
        + np.array([-1.0, 1.0, 0.0], "<f2").tobytes()
        + np.array([1.0], "<f4").tobytes()
    )
    assert decoded.tolist() == x.tolist()
    back, sent = unpack_flat(codes, payload, np.array([3, 3]), (option,))
    assert back.dtype == np.float32 and back.tolist() == x.tolist()
    assert sent.tolist() == [True, True]
    rows = payload.reshape(2, 14)
    wire, values = shifted_half.encode_rows(x.reshape(2, 3), None)
    assert wire.dtype == np.uint8 and values.dtype == np.float32
    assert wire.tobytes() == payload.tobytes()
    values = shifted_half.decode_rows(rows, 3, None)
    assert values.dtype == np.float32 and values.tolist() == [[1, 3, 2], [5, 3, 4]]
    bad = rows.copy()
    bad[1, 10:14] = np.array([np.inf], "<f4").view(np.uint8)
    with pytest.raises(RowError) as caught:
        shifted_half.decode_rows(bad, 3, None)
    assert caught.value.row == 1
    assert caught.value.reason == "shifted-half-test 'scale' holds NaN or Inf"
    assert unregister(shifted_half.name) is shifted_half


# --------------------------------------------------------------------- knapsack


def test_knapsack_input_messages_and_float_costs():
    one = np.array([1.0])
    fid = np.array([0.0, 1.0])
    for costs, message in (
        (np.array([[0.0, np.inf]]), "costs must be whole numbers of bytes"),
        (np.array([[0.0, 0.5]]), "costs must be whole numbers of bytes"),
        (np.array([[False, True]]), "costs must be integers (bytes), got dtype bool"),
        (np.array([[0, -1]]), "costs must be >= 0"),
    ):
        with pytest.raises(ValueError, match=exactly(message)):
            knapsack.select_options(one, costs, fid, budget=5)
    with pytest.raises(ValueError, match=exactly("importance must be finite and >= 0")):
        knapsack.select_options(np.array([np.nan]), np.array([[0, 1]]), fid, budget=5)
    with pytest.raises(ValueError, match=exactly("fidelity must be finite")):
        knapsack.select_options(one, np.array([[0, 1]]), [0.0, np.inf], budget=5)
    with pytest.raises(
        ValueError,
        match=exactly(
            "budget 3 is below the cheapest choice (4 bytes); offer a zero-cost option"
        ),
    ):
        knapsack.select_options(one, np.array([[4, 5]]), fid, budget=3)
    # whole float costs (float64 and float32) are bytes like integers
    for dtype in (np.float64, np.float32):
        sel = knapsack.select_options(one, np.array([[0, 4]], dtype), fid, budget=4)
        assert (sel.choice.tolist(), sel.cost, sel.budget) == ([1], 4, 4)
    # costs stay exact integers past float64's 2**53
    big = 2**53 + 1
    sel = knapsack.select_options(one, np.array([[0, big]]), fid, budget=big)
    assert (sel.choice.tolist(), sel.cost) == ([1], big)


def test_upper_hulls_by_hand():
    """Rows sorted by cost: a point under the chord is popped; one pop can
    uncover another; a point no higher than the hull's last is skipped."""
    cost = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [0, 2, 2, 4], [0, 1, 2, 3]])
    value = np.array(
        [
            [0.0, 10.0, 11.0, 12.5],  # (2, 11) falls under (1, 10)-(3, 12.5)
            [0.0, 5.0, 9.0, 20.0],  # (3, 20) pops (2, 9), then (1, 5)
            [0.0, 3.0, 1.0, 5.0],  # (2, 1) is dominated by (2, 3)
            [0.0, 4.0, 7.0, 9.0],  # concave already: nothing popped
        ]
    )
    hull, length = knapsack._upper_hulls(cost, value)
    assert length.tolist() == [3, 2, 3, 4]
    assert [hull[i, : length[i]].tolist() for i in range(4)] == [
        [0, 1, 3],
        [0, 3],
        [0, 1, 3],
        [0, 1, 2, 3],
    ]


def test_scan_loop_skips_a_stopped_group_and_goes_on():
    """A group stops at its first miss (its cheaper later item is not
    taken), and later items of other groups are still taken."""
    group = np.array([0, 0, 1])
    taken, room = knapsack._scan(group, np.array([5, 1, 1]), 4, 2)
    assert taken.tolist() == [False, False, True] and room == 3


def test_stable_argsort_breaks_every_tie_by_position():
    key = np.concatenate([[-1.0], np.random.default_rng(0).integers(0, 5, 1000)])
    order = knapsack._stable_argsort(key)
    np.testing.assert_array_equal(order, np.argsort(key, kind="stable"))


@pytest.mark.parametrize(
    ("importance", "costs", "fidelity", "budget", "choice", "value"),
    [
        # by efficiency, not value: two groups of 0.6/byte beat one of 0.5/byte
        ([5.0, 3.0, 3.0], [[0, 10], [0, 5], [0, 5]], [0.0, 1.0], 10, [0, 1, 1], 6.0),
        # fill: the upgrade with the largest gain goes first
        (
            [1.0, 2.0, 4.0],
            [[0, 2, 5], [0, 4, 4], [0, 2, 5]],
            [0.0, 0.2, 0.8],
            3,
            [0, 0, 1],
            0.8,
        ),
        # fill: gains and extra costs are measured from the current choice
        (
            [4.0, 5.0, 4.0, 3.0],
            [[0, 3, 4, 7, 5], [0, 6, 0, 4, 7], [0, 3, 4, 5, 0], [0, 8, 4, 5, 5]],
            [0.0, 0.0, 0.6, 0.8, 1.0],
            4,
            [2, 2, 4, 0],
            9.4,
        ),
        (
            [3.0, 5.0, 3.0],
            [[0, 5, 3], [0, 6, 8], [0, 7, 4]],
            [0.0, 0.6, 0.8],
            12,
            [2, 2, 0],
            6.4,
        ),
    ],
)
def test_hand_checked_instances_reach_the_optimum(
    importance, costs, fidelity, budget, choice, value
):
    """Small instances whose optimum (checked by enumeration) the greedy
    reaches only with each step as specified."""
    sel = knapsack.select_options(
        np.array(importance), np.array(costs), np.array(fidelity), budget=budget
    )
    assert sel.choice.tolist() == choice
    assert sel.value == pytest.approx(value)
    assert sel.cost <= budget == sel.budget


# ---------------------------------------------------------------------- packing


def test_encode_packed_checks_its_inputs_exactly():
    sizes = np.array([2, 2])
    x = np.zeros(4, np.float32)
    for bad_x, message in (
        (np.zeros(4), "x must be float32 of shape (4,)"),  # float64, right shape
        (np.zeros(3, np.float32), "x must be float32 of shape (4,)"),
        (np.array([0, np.nan, 0, 0], np.float32), "x holds NaN or Inf"),
    ):
        with pytest.raises(CodecError, match=exactly(message)):
            encode_packed(bad_x, sizes, np.array([0, 0]), FULL_OR_DEFER)
    with pytest.raises(
        CodecError, match=exactly("choice has shape (3,), expected (2,)")
    ):
        encode_packed(x, sizes, np.array([0, 0, 0]), FULL_OR_DEFER)
    for choice in ([0, 2], [-1, 0]):
        with pytest.raises(
            CodecError, match=exactly("choice out of range for 2 options")
        ):
            encode_packed(x, sizes, np.array(choice), FULL_OR_DEFER)
    # 256 options fit the uint8 table, 257 do not
    many = (*(Option("topk", (i + 1) / 256) for i in range(255)), Option("full"))
    codes, payload, _ = encode_packed(x, sizes, np.array([255, 0]), many)
    assert codes.tolist() == [255, 0] and payload.size == 8 + 8  # full, one topk
    with pytest.raises(
        CodecError, match=exactly("choice out of range for 257 options")
    ):
        encode_packed(x, sizes, np.array([0, 0]), (*many, Option("defer")))


def test_unpack_names_the_group_and_the_rule():
    """Row-block decoding reports the group (by label) and the array."""
    sizes = np.array([3, 3])
    labels = ["a[0:3]", "a[3:6]"]
    x = np.array([1, -2, 3, 4, -5, 6], np.float32)

    def packed(kind, ratio=None):
        option = Option(kind, ratio)
        codes, payload, _ = encode_packed(x, sizes, np.array([0, 0]), (option,))
        return codes, payload.copy(), (option,)

    def refused(codes, payload, options, message):
        with pytest.raises(CodecError, match=exactly(message)):
            unpack_groups(codes, payload, sizes, options, labels=labels)

    codes, payload, options = packed("int8")  # rows of 3 levels + scale
    payload[10:14] = np.array([np.nan], "<f4").view(np.uint8)
    refused(codes, payload, options, "group a[3:6]: int8 'scale' holds NaN or Inf")
    codes, payload, options = packed("sign")  # rows of 1 sign byte + scale
    payload[6:10] = np.array([-1.0], "<f4").view(np.uint8)
    refused(codes, payload, options, "group a[3:6]: sign 'scale' is negative (-1.0)")
    # topk@1.0: rows of 3 indices then 3 values
    codes, payload, options = packed("topk", 1.0)
    good = payload.copy()
    payload[20:24] = np.array([np.inf], "<f4").view(np.uint8)
    refused(codes, payload, options, "group a[0:3]: topk 'values' holds NaN or Inf")
    payload = good.copy()
    payload[24:36] = np.array([0, 2, 2], "<u4").view(np.uint8)  # not the first
    refused(
        codes, payload, options, "group a[3:6]: topk 'indices' has duplicated indices"
    )
    assert (
        unpack_groups(
            np.zeros(0, np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.int64), options
        )
        == []
    )


@pytest.mark.parametrize("kind", ["full", "half", "int8", "sign", "topk"])
def test_every_codec_decodes_row_blocks_in_float32(kind):
    ratio = 0.5 if kind == "topk" else None
    rows = np.array([[0.5, -1.25, 2.0, 0.0], [1.0, 1.0, -3.0, 0.25]], np.float32)
    codec = Option(kind, ratio).codec
    wire, decoded = codec.encode_rows(rows, ratio)
    back = codec.decode_rows(wire, 4, ratio)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, decoded)


def test_split_groups_checks_the_budget_and_describes_non_arrays():
    sizes = np.array([2])
    codes, payload, _ = encode_packed(
        np.ones(2, np.float32), sizes, np.array([0]), FULL_OR_DEFER
    )
    with pytest.raises(
        CodecError,
        match=exactly(
            "the codec table asks for 8 payload bytes, more than the budget of 4 bytes"
        ),
    ):
        split_groups(codes, payload, sizes, FULL_OR_DEFER, max_bytes=4)
    with pytest.raises(
        CodecError, match=exactly("codec table must be a uint8 array, got list")
    ):
        split_groups([0], payload, sizes, FULL_OR_DEFER)
    with pytest.raises(
        CodecError, match=exactly("payload must be a uint8 array, got int64 array")
    ):
        split_groups(codes, payload.astype(np.int64), sizes, FULL_OR_DEFER)


def test_pack_groups_checks_its_inputs_exactly():
    one = {"values": np.array([1.0], np.float32)}
    # 256 options fit the uint8 table, 257 do not
    many = (Option("full"),) * 256
    codes, payload = pack_groups([one], [255], many)
    assert codes.dtype == np.uint8 and codes.tolist() == [255]
    assert payload.tobytes() == np.array([1.0], "<f4").tobytes()
    with pytest.raises(
        CodecError, match=exactly("at most 256 options fit a uint8 table, got 257")
    ):
        pack_groups([one], [0], (*many, Option("full")))
    with pytest.raises(
        CodecError, match=exactly("choice has shape (1,), expected (2,)")
    ):
        pack_groups([one, one], [0], FULL_OR_DEFER)
    for choice in ([-1], [2]):
        with pytest.raises(
            CodecError, match=exactly("choice out of range for 2 options")
        ):
            pack_groups([one], choice, FULL_OR_DEFER)
    with pytest.raises(
        CodecError,
        match=exactly(
            "group 1: int8 payload has keys ['levels'], expected ['levels', 'scale']"
        ),
    ):
        pack_groups(
            [one, {"levels": np.zeros(1, np.int8)}],
            [0, 1],
            (Option("full"), Option("int8")),
        )


def test_unpack_flat_checks_the_payload_shape_and_the_out_buffer():
    sizes = np.array([1, 2])
    codes, payload, _ = encode_packed(
        np.array([1, 2, 3], np.float32), sizes, np.array([0, 1]), FULL_OR_DEFER
    )
    with pytest.raises(
        CodecError, match=exactly("payload has shape (2, 2), expected 1-D")
    ):
        unpack_flat(codes, payload.reshape(2, 2), sizes, FULL_OR_DEFER)
    for out in (np.zeros(3), np.zeros(4, np.float32)):  # wrong dtype, wrong shape
        with pytest.raises(
            ValueError, match=exactly("out must be float32 of shape (3,)")
        ):
            unpack_flat(codes, payload, sizes, FULL_OR_DEFER, out=out)
    out = np.full(3, 7.0, np.float32)
    decoded, sent = unpack_flat(codes, payload, sizes, FULL_OR_DEFER, out=out)
    assert decoded is out and decoded.tolist() == [1.0, 0.0, 0.0]
    assert sent.tolist() == [True, False]


def test_option_table_checks_sizes_and_its_dtypes():
    options = (Option("full"), Option("int8"), Option("defer"))
    # any integer dtype; costs are int64 bytes, fidelities float64
    costs, values = option_table(options, np.array([3, 0], dtype=np.uint8))
    assert costs.dtype == np.int64 and values.dtype == np.float64
    np.testing.assert_array_equal(costs, [[12, 7, 0], [0, 4, 0]])
    np.testing.assert_array_equal(values, [1.0, 0.998, 0.0])
    costs, _ = option_table(options, np.array([2**32 - 1]))  # the largest size
    np.testing.assert_array_equal(costs, [[4 * (2**32 - 1), 2**32 + 3, 0]])
    assert option_table(options, np.array([]))[0].shape == (0, 3)
    for sizes, dtype in (
        (np.array([1.0, 2.0]), "float64"),
        (np.ones((1, 2), int), "int64"),
    ):
        with pytest.raises(
            ValueError, match=exactly(f"sizes must be a 1-D integer array, got {dtype}")
        ):
            option_table(options, sizes)
    for size in (-1, 2**32):
        with pytest.raises(
            ValueError, match=exactly("sizes must satisfy 0 <= size < 2**32")
        ):
            option_table(options, np.array([size]))


# ------------------------------------------------------------------------- rows


def test_get_rows_empty_overlapping_and_out_of_order():
    flat = np.arange(12.0)
    empty = get_rows(flat, np.zeros(0, np.int64), 3)
    assert empty.shape == (0, 3) and empty.dtype == flat.dtype
    # not consecutive: the first two have first and last starts evenly spaced
    for starts in ([0, 1, 6], [0, 9, 6], [6, 2, 0], [3, 3, 3]):
        rows = get_rows(flat, np.array(starts, np.int64), 3)
        np.testing.assert_array_equal(rows, [flat[s : s + 3] for s in starts])


def test_put_rows_writes_scattered_rows_in_place():
    flat = np.zeros(10, np.float32)
    rows = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    put_rows(flat, np.array([8, 0, 4], np.int64), rows)  # the last window too
    np.testing.assert_array_equal(flat, [3, 4, 0, 0, 5, 6, 0, 0, 1, 2])
    put_rows(flat, np.array([2, 6], np.int64), rows[:2] + 10)
    np.testing.assert_array_equal(flat, [3, 4, 11, 12, 5, 6, 13, 14, 1, 2])
    put_rows(flat, np.zeros(0, np.int64), np.zeros((0, 2), np.float32))
    put_rows(flat, np.array([3, 5], np.int64), np.zeros((2, 0), np.float32))
    np.testing.assert_array_equal(flat, [3, 4, 11, 12, 5, 6, 13, 14, 1, 2])
