"""ACE-Sync's wire: packed groups, edge plans, the predictor in one array."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tandem.compression.codecs import (
    DEFAULT_OPTIONS,
    CodecError,
    Option,
    encode,
    encoded_nbytes,
    format_codecs,
    parse_codecs,
)
from tandem.compression.layout import GroupLayout
from tandem.compression.packing import (
    encode_packed,
    pack_groups,
    split_groups,
    unpack_groups,
)
from tandem.compression.pipeline import EdgeMemory, compress_update
from tandem.importance import ImportancePredictor, PredictorError
from tandem.protocol.acesync import EdgePlan, pack_predictor, unpack_predictor
from tandem.wire import PayloadError

OPTIONS = (*DEFAULT_OPTIONS[:2], *DEFAULT_OPTIONS[3:], Option("int8"))
SIZES = np.array([10, 3, 17, 8, 64, 5, 9])


def _groups(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.laplace(size=n).astype(np.float32) for n in SIZES]


def _packed(choice):
    xs = _groups()
    payloads = [
        encode(OPTIONS[c].kind, x, ratio=OPTIONS[c].ratio)
        for x, c in zip(xs, choice, strict=True)
    ]
    return xs, pack_groups(payloads, choice, OPTIONS)


def test_options_cover_every_codec():
    assert [o.label for o in OPTIONS] == [
        "full",
        "half",
        "topk@0.1",
        "topk@0.01",
        "sign",
        "defer",
        "int8",
    ]
    assert set(OPTIONS) == set(DEFAULT_OPTIONS)


def test_every_codec_round_trips_through_one_stream():
    choice = [0, 1, 2, 3, 4, 5, 6]
    xs, (codes, payload) = _packed(choice)
    assert codes.dtype == np.uint8 and payload.dtype == np.uint8
    expected = sum(
        encoded_nbytes(OPTIONS[c].kind, int(n), ratio=OPTIONS[c].ratio)
        for n, c in zip(SIZES, choice, strict=True)
    )
    assert payload.size == expected
    out = unpack_groups(codes, payload, SIZES, OPTIONS)
    np.testing.assert_array_equal(out[0], xs[0])  # full: exact
    np.testing.assert_allclose(out[1], xs[1], rtol=1e-3)  # half
    assert np.count_nonzero(out[2]) == 2  # topk@0.1 of 17 -> 2 entries
    assert np.count_nonzero(out[3]) == 1  # topk@0.01 keeps at least one
    np.testing.assert_allclose(np.abs(out[4]), np.abs(xs[4]).mean(), rtol=1e-6)
    assert out[5] is None  # deferred
    step = np.abs(xs[6]).max() / 127
    np.testing.assert_allclose(out[6], xs[6], atol=step / 2 * (1 + 1e-5))  # int8


def test_all_full_is_the_identity():
    xs, (codes, payload) = _packed([0] * len(SIZES))
    for x, y in zip(xs, unpack_groups(codes, payload, SIZES, OPTIONS), strict=True):
        np.testing.assert_array_equal(x, y)


def _repack(codes, payload, edit):
    """Split a packed stream, let ``edit`` change the group dicts, pack again."""
    groups = split_groups(codes, payload, SIZES, OPTIONS)
    edit(groups)
    raw = b"".join(
        np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
        for g in groups
        for a in g.values()
    )
    return codes, np.frombuffer(raw, np.uint8).copy()


def _set(group, key, index, value):
    group[key] = group[key].copy()
    group[key][index] = value


@pytest.mark.parametrize(
    ("choice", "edit", "reason"),
    [
        ([2] * 7, lambda g: _set(g[2], "indices", 0, 17), "out of range for size 17"),
        ([2] * 7, lambda g: _set(g[4], "indices", 1, g[4]["indices"][0]), "duplicated"),
        ([0] * 7, lambda g: _set(g[0], "values", 3, np.nan), "NaN or Inf"),
        ([1] * 7, lambda g: _set(g[2], "values", 0, np.inf), "NaN or Inf"),
        ([4] * 7, lambda g: _set(g[1], "scale", 0, -1.0), "negative"),
        (
            [4] * 7,
            lambda g: g[1].__setitem__("scale", np.ones(2, np.float32)),
            "the codec table implies",
        ),
        ([6] * 7, lambda g: _set(g[3], "levels", 2, -128), "holds -128"),
        ([6] * 7, lambda g: _set(g[5], "scale", 0, -2.0), "negative"),
        ([6] * 7, lambda g: _set(g[0], "scale", 0, np.nan), "NaN or Inf"),
    ],
    ids=[
        "index-range",
        "duplicate",
        "nan",
        "inf",
        "negative-scale",
        "scale-shape",
        "int8-level",
        "int8-scale",
        "int8-nan",
    ],
)
def test_hostile_groups_are_rejected_naming_the_group(choice, edit, reason):
    _, (codes, payload) = _packed(choice)
    codes, payload = _repack(codes, payload, edit)
    with pytest.raises(CodecError, match=reason):
        unpack_groups(codes, payload, SIZES, OPTIONS, labels=list("abcdef"))


def test_wrong_lengths_table_and_budget_are_rejected():
    _, (codes, payload) = _packed([0, 1, 2, 3, 4, 5, 6])
    with pytest.raises(CodecError, match="the codec table implies"):
        unpack_groups(codes, payload[:-1], SIZES, OPTIONS)
    with pytest.raises(CodecError, match="the codec table implies"):
        unpack_groups(codes, np.append(payload, np.uint8(0)), SIZES, OPTIONS)
    with pytest.raises(CodecError, match=r"codec table has shape \(6,\)"):
        unpack_groups(codes[:6], payload, SIZES, OPTIONS)
    bad = codes.copy()
    bad[2] = 7
    with pytest.raises(CodecError, match="codec index 7 out of range for 7 options"):
        unpack_groups(bad, payload, SIZES, OPTIONS)
    with pytest.raises(CodecError, match="uint8"):
        unpack_groups(codes.astype(np.int64), payload, SIZES, OPTIONS)
    with pytest.raises(CodecError, match="more than the budget of 50 bytes"):
        unpack_groups(codes, payload, SIZES, OPTIONS, max_bytes=50)


def test_codec_lists_parse_and_print():
    options = parse_codecs("full, half,topk@0.1,sign,defer")
    assert options == (
        Option("full"),
        Option("half"),
        Option("topk", 0.1),
        Option("sign"),
        Option("defer"),
    )
    assert parse_codecs(format_codecs(options)) == options
    for bad in ("", "gzip", "topk@x", "topk@2", "full,full", "sign@0.5"):
        with pytest.raises(CodecError):
            parse_codecs(bad)


def _plan(**changes):
    plan = EdgePlan(
        budget=200,
        codecs=OPTIONS,
        chunk=16,
        gamma=1.0,
        importance="magnitude",
        fill_decay=0.5,
        history=3,
        local_steps=5,
        server_round=1,
    )
    return EdgePlan(**{**plan.__dict__, **changes})


def test_edge_plan_round_trips_and_rejects_bad_values():
    plan = _plan()
    assert EdgePlan.from_config(plan.to_config()) == plan
    for key, value, rule in (
        ("acesync-budget", -1, "must be an integer >= 0"),
        ("acesync-gamma", 2.0, "must lie in [0, 1]"),
        ("acesync-importance", "oracle", "must be one of predictor"),
        ("local-steps", 0, "must be in [1, 10**6]"),
        ("acesync-codecs", "zip", "unknown codec"),
    ):
        config = {**plan.to_config(), key: value}
        with pytest.raises(PayloadError, match=re.escape(rule)):
            EdgePlan.from_config(config)
    config = plan.to_config()
    del config["acesync-chunk"]
    with pytest.raises(PayloadError, match="no 'acesync-chunk'"):
        EdgePlan.from_config(config)


def test_predictor_travels_as_one_array_and_is_checked():
    predictor = ImportancePredictor(alpha=0.3, seed=4)
    flat = pack_predictor(predictor)
    assert flat.dtype == np.float32 and flat.ndim == 1
    back = unpack_predictor(flat)
    np.testing.assert_array_equal(pack_predictor(back), flat)
    with pytest.raises(PredictorError, match="shape"):
        unpack_predictor(flat[:-1])
    bad = flat.copy()
    bad[0] = np.inf
    with pytest.raises(PredictorError, match="non-finite"):
        unpack_predictor(bad)


def _layout():
    arrays = {
        "conv.weight": np.zeros((4, 2, 5), np.float32),
        "conv.bias": np.zeros(4, np.float32),
        "fc.weight": np.zeros((3, 20), np.float32),
        "steps": np.zeros((), np.int64),  # not a float: not part of the update
    }
    return GroupLayout.from_arrays(arrays, 16)


def test_layout_groups_float_tensors_in_chunks():
    layout = _layout()
    assert layout.keys == ("conv.weight", "conv.bias", "fc.weight")
    assert layout.sizes.tolist() == [16, 16, 8, 4, 16, 16, 16, 12]
    assert layout.total == 104 and layout.full_bytes == 416
    v = np.arange(104, dtype=np.float32)
    back = layout.unflat(v)
    np.testing.assert_array_equal(layout.flat(back), v)
    assert [m.depth for m in layout.metas] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_compression_keeps_what_it_does_not_send():
    """Error feedback (eq. 7): sent + residual == g + γ·e, and the budget holds."""
    layout = _layout()
    rng = np.random.default_rng(1)
    state = EdgeMemory.fresh(layout, history=3)
    weights = rng.normal(size=layout.total).astype(np.float32)
    owed = np.zeros(layout.total)
    for round_ in (1, 2, 3):
        update = rng.laplace(size=layout.total).astype(np.float32)
        before = state.residual.copy()
        plan = _plan(budget=120, chunk=16, server_round=round_)
        out = compress_update(update, weights, state, plan, layout)
        assert out.encoded_bytes <= 120
        np.testing.assert_allclose(
            out.sent + state.residual, update + before, atol=1e-5
        )
        owed = update + before - out.sent
        np.testing.assert_allclose(state.residual, owed, atol=1e-5)
        codes, payload = out.codecs, out.payload
        decoded = unpack_groups(codes, payload, layout.sizes, OPTIONS, max_bytes=120)
        for i, chunk in enumerate(decoded):
            span = slice(layout.starts[i], layout.starts[i] + layout.sizes[i])
            if chunk is not None:  # what the cloud decodes is what was "sent"
                np.testing.assert_array_equal(chunk, out.sent[span])
    assert state.history[-1].max() > 0


def test_a_budget_below_the_cheapest_choice_is_a_clear_error():
    layout = _layout()
    state = EdgeMemory.fresh(layout, history=3)
    plan = _plan(codecs=(Option("full"),), budget=10)
    update = np.ones(layout.total, np.float32)
    with pytest.raises(CodecError, match="budget 10 bytes"):
        compress_update(update, update, state, plan, layout)


def test_vectorized_encoding_gives_the_per_group_bytes():
    """encode_packed == encode per group + pack_groups (the reference)."""
    rng = np.random.default_rng(7)
    for _ in range(100):
        n = int(rng.integers(1, 20))
        sizes = rng.integers(0, 40, size=n)
        x = rng.laplace(size=int(sizes.sum())) * rng.choice([1e-6, 1.0, 1e5])
        x = x.astype(np.float32)
        choice = rng.integers(0, len(OPTIONS), size=n)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        payloads = [
            encode(OPTIONS[c].kind, x[s : s + z], ratio=OPTIONS[c].ratio)
            for s, z, c in zip(starts, sizes, choice, strict=True)
        ]
        codes, reference = pack_groups(payloads, choice, OPTIONS)
        codes2, payload, decoded = encode_packed(x, sizes, choice, OPTIONS)
        np.testing.assert_array_equal(codes2, codes)
        np.testing.assert_array_equal(payload, reference)
        back = unpack_groups(codes, payload, sizes, OPTIONS)
        for s, z, b in zip(starts, sizes, back, strict=True):
            expected = np.zeros(z, np.float32) if b is None else b
            np.testing.assert_array_equal(decoded[s : s + z], expected)
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode_packed(np.array([np.nan], np.float32), np.array([1]), [0], OPTIONS)
