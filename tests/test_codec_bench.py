"""The fast codec paths equal their per-group references; the codec bench runs.

The references are the per-group functions the fast paths replaced:
``encode`` per group + ``pack_groups`` for :func:`encode_packed`,
``split_groups`` + ``decode`` per group for :func:`unpack_flat`,
:func:`fill_unsent` for :func:`fill_deferred`, one ``np.add.reduceat`` over
the whole vector for the blocked group sums. Inputs are seeded; groups share
sizes so that every (codec, size) class holds many rows, interleaved.
No timings are asserted (speed is the bench's job).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tandem.bench import codecs as codec_bench
from tandem.compression import codecs as codecs_module
from tandem.compression import compensate
from tandem.compression import layout as layout_module
from tandem.compression import packing as packing_module
from tandem.compression import pipeline as pipeline_module
from tandem.compression.codecs import (
    DEFAULT_OPTIONS,
    Codec,
    CodecError,
    Option,
    decode,
    encode,
    option_table,
)
from tandem.compression.groups import unflatten
from tandem.compression.int8 import int8_levels, int8_values
from tandem.compression.knapsack import _stable_argsort
from tandem.compression.layout import GroupLayout
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
from tandem.compression.rows import exclusive_cumsum, get_rows, put_rows
from tandem.importance import STRUCTURAL_FEATURES
from tandem.protocol.acesync import AceSyncOptions, EdgePlan

OPTIONS = (*DEFAULT_OPTIONS, Option("topk", 0.5))


def _case(seed: int, n: int = 60):
    """Sizes from a few values (many groups per size), values with ties."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([0, 1, 7, 8, 13, 64], size=n)
    x = rng.laplace(size=int(sizes.sum())) * rng.choice([1e-6, 1.0, 1e4])
    if seed % 2:  # coarse values: ties for top-k, equal magnitudes for sign
        x = np.round(x * 4 / np.abs(x).max(initial=1.0)) if x.size else x
    choice = rng.integers(0, len(OPTIONS), size=n)
    return sizes, x.astype(np.float32), choice


def _reference_pack(x, sizes, choice):
    starts = exclusive_cumsum(sizes)
    payloads = [
        encode(OPTIONS[c].kind, x[s : s + z], ratio=OPTIONS[c].ratio)
        for s, z, c in zip(starts, sizes, choice, strict=True)
    ]
    return pack_groups(payloads, choice, OPTIONS)


def _reference_unpack(codes, payload, sizes):
    groups = split_groups(codes, payload, sizes, OPTIONS)
    out = []
    for arrays, size, c in zip(groups, sizes.tolist(), codes.tolist(), strict=True):
        option = OPTIONS[c]
        if not option.codec.layout:
            out.append(None)
            continue
        out.append(
            decode(
                option.kind, arrays, size, max_k=option.codec.max_k(size, option.ratio)
            )
        )
    return out


@pytest.mark.parametrize("seed", range(12))
def test_encode_packed_gives_the_per_group_bytes_and_values(seed):
    sizes, x, choice = _case(seed)
    codes, reference = _reference_pack(x, sizes, choice)
    codes2, payload, decoded = encode_packed(x, sizes, choice, OPTIONS)
    np.testing.assert_array_equal(codes2, codes)
    np.testing.assert_array_equal(payload, reference)
    starts = exclusive_cumsum(sizes)
    for s, z, c in zip(starts, sizes, choice, strict=True):
        option = OPTIONS[c]
        expected = option.codec.expand(
            encode(option.kind, x[s : s + z], ratio=option.ratio), int(z)
        )
        np.testing.assert_array_equal(decoded[s : s + z], expected)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("in_place", [True, False])
def test_groups_encoded_in_place_give_the_per_group_bytes_and_residual(
    seed, in_place, monkeypatch
):
    """Each option's groups encoded in one call (compiled loops for int8 and
    sign, rows of one size gathered 40 elements at most at a time for the
    others) give the per-group bytes and values; the residual is ``x −
    decoded`` in every encoded group and ``x`` in deferred ones, into ``x``
    itself or into another array."""
    monkeypatch.setattr(codecs_module, "_GATHER", 40)
    # fresh outputs full of NaN, not of whatever memory held: a value the
    # encoder forgets to write shows
    empty_like = np.empty_like
    monkeypatch.setattr(
        packing_module.np, "empty_like", lambda a: np.full_like(empty_like(a), np.nan)
    )
    sizes, x, _ = _case(seed, n=120)
    rng = np.random.default_rng(seed)
    runs = rng.integers(1, 9, size=120)  # runs of 1 to 8 groups, one codec each
    choice = np.repeat(rng.integers(0, len(OPTIONS), size=120), runs)[:120]
    choice[:12] = DEFAULT_OPTIONS.index(Option("defer"))  # pieces that send nothing
    codes, reference = _reference_pack(x, sizes, choice)
    expected = np.concatenate(
        [np.zeros(0, np.float32)]
        + [
            OPTIONS[c].codec.expand(
                encode(OPTIONS[c].kind, x[s : s + z], ratio=OPTIONS[c].ratio), int(z)
            )
            for s, z, c in zip(exclusive_cumsum(sizes), sizes, choice, strict=True)
        ]
    )
    costs, _ = option_table(OPTIONS, sizes)
    original = x.copy()
    residual = x if in_place else np.full_like(x, np.nan)
    codes2, payload, decoded = packing_module._encode_packed(
        x, sizes.astype(np.int64), choice, OPTIONS, costs, residual=residual
    )
    np.testing.assert_array_equal(codes2, codes)
    np.testing.assert_array_equal(payload, reference)
    np.testing.assert_array_equal(decoded, expected)
    assert np.signbit(decoded).tolist() == np.signbit(expected).tolist()
    sends = np.repeat([bool(OPTIONS[c].codec.layout) for c in choice], sizes)
    assert not sends[: int(sizes[:12].sum())].any()
    np.testing.assert_array_equal(
        residual, np.where(sends, original - decoded, original)
    )


@pytest.mark.parametrize("seed", range(12))
def test_unpack_flat_equals_decode_per_group(seed):
    sizes, x, choice = _case(seed)
    codes, payload = _reference_pack(x, sizes, choice)
    reference = _reference_unpack(codes, payload, sizes)
    flat, sent = unpack_flat(codes, payload, sizes, OPTIONS)
    assert flat.dtype == np.float32 and flat.shape == (int(sizes.sum()),)
    np.testing.assert_array_equal(sent, [r is not None for r in reference])
    for s, z, r in zip(exclusive_cumsum(sizes), sizes, reference, strict=True):
        expected = np.zeros(z, np.float32) if r is None else r
        np.testing.assert_array_equal(flat[s : s + z], expected)
    # into a reused buffer: the same, deferred groups zeroed
    buffer = np.full(flat.shape, 7.0, np.float32)
    again, _ = unpack_flat(codes, payload, sizes, OPTIONS, out=buffer)
    assert again is buffer
    np.testing.assert_array_equal(buffer, flat)
    for got, want in zip(
        unpack_groups(codes, payload, sizes, OPTIONS), reference, strict=True
    ):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_array_equal(got, want)


def test_the_default_row_methods_equal_the_vectorized_ones():
    """Codec's per-row defaults (what a new codec gets) == each built-in's."""
    rng = np.random.default_rng(3)
    for option in OPTIONS:
        codec = option.codec
        for size in (0, 5, 16):
            rows = rng.laplace(size=(9, size)).astype(np.float32)
            wire, values = codec.encode_rows(rows, option.ratio)
            wire0, values0 = Codec.encode_rows(codec, rows, option.ratio)
            np.testing.assert_array_equal(wire, wire0)
            np.testing.assert_array_equal(values, values0)
            if codec.layout:
                back = codec.decode_rows(wire, size, option.ratio)
                back0 = Codec.decode_rows(codec, wire, size, option.ratio)
                np.testing.assert_array_equal(back, back0)
                np.testing.assert_array_equal(back, values)


def _class_of_int8(groups: int = 50, size: int = 16):
    sizes = np.full(groups, size)
    x = np.random.default_rng(5).laplace(size=groups * size).astype(np.float32)
    choice = np.where(np.arange(groups) % 3 == 0, 5, 2)  # int8 and sign, mixed
    codes, payload, _ = encode_packed(x, sizes, choice, OPTIONS)
    offsets = exclusive_cumsum(
        [size + 4 if c == 2 else size // 8 + 4 for c in choice.tolist()]
    )
    return sizes, codes, payload, offsets


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda p, o: p.__setitem__(o, 0x80), "holds -128"),  # a level of -128
        (
            lambda p, o: p.__setitem__(slice(o + 16, o + 20), [0, 0, 0x80, 0xBF]),
            "is negative",
        ),
        (
            lambda p, o: p.__setitem__(slice(o + 16, o + 20), [0, 0, 0xC0, 0x7F]),
            "NaN or Inf",
        ),
    ],
    ids=["level", "negative-scale", "nan-scale"],
)
def test_a_bad_group_among_many_of_its_class_is_named(edit, reason):
    sizes, codes, payload, offsets = _class_of_int8()
    bad = 37  # an int8 group (37 % 3 != 0), mid-class
    payload = payload.copy()
    edit(payload, int(offsets[bad]))
    labels = [f"g{i}" for i in range(sizes.size)]
    with pytest.raises(CodecError, match=f"group g{bad}: int8 .*{reason}"):
        unpack_flat(codes, payload, sizes, OPTIONS, labels=labels)


def test_sign_padding_and_topk_duplicates_are_named_in_a_class():
    sizes = np.full(20, 13)
    x = np.random.default_rng(6).laplace(size=260).astype(np.float32)
    choice = np.full(20, OPTIONS.index(Option("sign")))
    codes, payload, _ = encode_packed(x, sizes, choice, OPTIONS)
    payload = payload.copy()
    payload[11 * 6 + 1] |= 1  # group 11's second sign byte: a padding bit
    with pytest.raises(CodecError, match="group 11: sign 'signs' has padding"):
        unpack_flat(codes, payload, sizes, OPTIONS)
    choice = np.full(20, OPTIONS.index(Option("topk", 0.5)))  # k = 6 of 13
    codes, payload, _ = encode_packed(x, sizes, choice, OPTIONS)
    payload = payload.copy()
    payload[9 * 48 + 4 : 9 * 48 + 8] = payload[9 * 48 : 9 * 48 + 4]
    with pytest.raises(CodecError, match="group 9: topk 'indices' has duplicated"):
        unpack_flat(codes, payload, sizes, OPTIONS)
    payload[9 * 48 : 9 * 48 + 4] = [13, 0, 0, 0]
    with pytest.raises(CodecError, match="group 9: topk 'indices' has index 13"):
        unpack_flat(codes, payload, sizes, OPTIONS)


def test_rows_are_cut_and_written_back_at_their_offsets():
    flat = np.arange(20, dtype=np.float32)
    np.testing.assert_array_equal(
        get_rows(flat, np.array([0, 7, 12]), 3), [[0, 1, 2], [7, 8, 9], [12, 13, 14]]
    )
    assert get_rows(flat, np.array([4, 6, 8]), 2).base is not None  # a view
    put_rows(flat, np.array([1, 10]), np.array([[-1, -2], [-3, -4]], np.float32))
    assert flat[:4].tolist() == [0, -1, -2, 3] and flat[9:13].tolist() == [
        9,
        -3,
        -4,
        12,
    ]
    np.testing.assert_array_equal(exclusive_cumsum(np.array([3, 4, 5])), [0, 3, 7])


@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
def test_fill_deferred_equals_fill_unsent_and_refreshes_the_cache(decay):
    rng = np.random.default_rng(8)
    sizes = rng.choice([1, 4, 9], size=30)
    total = int(sizes.sum())
    cache = rng.normal(size=total).astype(np.float32)
    rounds = rng.integers(-1, 5, size=30)
    sent = rng.random(30) < 0.6
    decoded = rng.normal(size=total).astype(np.float32)
    update, new_cache, new_rounds = decoded.copy(), cache.copy(), rounds.copy()
    fill_deferred(update, sent, new_cache, new_rounds, sizes, 6, decay)
    stand_in = fill_unsent(cache, rounds, sizes, 6, decay)
    sent_elements = np.repeat(sent, sizes)
    np.testing.assert_array_equal(update, np.where(sent_elements, decoded, stand_in))
    np.testing.assert_array_equal(new_cache, np.where(sent_elements, decoded, cache))
    np.testing.assert_array_equal(new_rounds, np.where(sent, 6, rounds))
    with pytest.raises(ValueError, match="decay must be in"):
        fill_deferred(update, sent, new_cache, new_rounds, sizes, 6, 1.5)


def test_group_norms_and_density_by_pieces_equal_one_reduceat():
    rng = np.random.default_rng(9)
    shapes = {"a.weight": (300, 257), "a.bias": (257,), "b.weight": (129, 1001)}
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    layout = GroupLayout.from_arrays(arrays, 256)
    v = layout.flat(arrays) * np.float32(3.7)
    v[::5] = 0.0
    assert v.size > 4 * (1 << 15)
    np.testing.assert_allclose(
        layout.group_sq_norms(v),
        np.add.reduceat(np.square(v, dtype=np.float64), layout.starts),
        rtol=2e-6,
    )
    nonzero = np.add.reduceat((v != 0).astype(np.float64), layout.starts)
    features = layout.structural(v)
    density = STRUCTURAL_FEATURES.index("density")
    expected = np.clip(nonzero / np.maximum(layout.sizes, 1), 0, 1)
    np.testing.assert_array_equal(features[:, density], expected.astype(features.dtype))
    dense = np.abs(v) + np.float32(1.0)  # no zero weight: the shortcut
    nonzero = np.add.reduceat((dense != 0).astype(np.float64), layout.starts)
    expected = np.clip(nonzero / np.maximum(layout.sizes, 1), 0, 1)
    np.testing.assert_array_equal(
        layout.structural(dense)[:, density], expected.astype(features.dtype)
    )


def test_density_counts_zeros_per_group():
    """Zeros counted in one compiled pass (-0.0 included, a group of 256
    zeros, groups of 64, 128, 256 and the ends of tensors) give the
    densities of the zeros counted with numpy."""
    rng = np.random.default_rng(21)
    shapes = {
        "a.weight": (40, 64),
        "b.weight": (3, 128),
        "c.bias": (37,),
        "c.weight": (2, 256),
    }
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    layout = GroupLayout.from_arrays(arrays, 256)
    assert len(set(layout.sizes.tolist())) > 1
    v = layout.flat(arrays)
    v[rng.random(v.size) < 0.3] = 0.0
    v[7] = -0.0
    v[-256:] = 0.0  # a whole group of 256 zeros
    zeros = np.add.reduceat((v == 0).astype(np.int64), layout.starts)
    assert zeros.max() == 256
    np.testing.assert_array_equal(layout._zero_counts(v), zeros)
    density = STRUCTURAL_FEATURES.index("density")
    expected = (layout.sizes - zeros) / layout.sizes
    np.testing.assert_array_equal(
        layout.structural(v)[:, density], expected.astype(np.float32)
    )


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_feedback_and_energies_in_one_pass_equal_the_two_steps(gamma, monkeypatch):
    """Compensated and squared piece by piece (pieces of 100 elements here),
    a round gives the bytes, values, residual and history of the two steps
    apart (``compensate``, then ``group_sq_norms``); a NaN in the update is
    refused with the same message, and an overflow of ``g + γ·e`` raises as it did."""
    monkeypatch.setattr(layout_module, "_PIECE", 100)
    opts = AceSyncOptions()
    rng = np.random.default_rng(int(gamma * 10))
    arrays = {
        "a.weight": rng.normal(size=(30, 20)).astype(np.float32),
        "a.bias": rng.normal(size=7).astype(np.float32),
        "b.weight": rng.normal(size=(9, 40)).astype(np.float32),
    }
    layout = GroupLayout.from_arrays(arrays, 16)
    weights = layout.flat(arrays)
    plan = EdgePlan(
        budget=900,
        codecs=opts.options,
        chunk=16,
        gamma=gamma,
        importance="magnitude",
        fill_decay=opts.fill_decay,
        history=opts.history,
        local_steps=1,
        server_round=2,
    )

    def rounds(blocks, in_place=False):
        if not blocks:

            def two_steps(update, residual, gamma, layout, in_place=False):
                compensated = compensate(update, residual, gamma)
                return compensated, layout.group_sq_norms(compensated)

            monkeypatch.setattr(pipeline_module, "_feedback", two_steps)
        memory = EdgeMemory.fresh(layout, opts.history)
        memory.residual = first = rng_residual.copy()
        outs = [
            compress_update(u, weights, memory, plan, layout, in_place=in_place)
            for u in updates
        ]
        # in place: g̃ and the residual in the first residual's buffer each
        # round; else that array as it was
        assert (memory.residual is first) == in_place
        if not in_place:
            assert first.tobytes() == rng_residual.tobytes()
        return outs, memory

    draw = np.random.default_rng(7)
    updates = [draw.laplace(size=layout.total).astype(np.float32) for _ in range(3)]
    rng_residual = draw.normal(size=layout.total).astype(np.float32)
    fast, in_place = rounds(True), rounds(True, in_place=True)
    slow, reference = rounds(False)
    for outs, memory in (fast, in_place):
        for a, b in zip(outs, slow, strict=True):
            np.testing.assert_array_equal(a.payload, b.payload)
            assert a.sent.tobytes() == b.sent.tobytes()
            assert a.kept_fraction == b.kept_fraction
        assert memory.residual.tobytes() == reference.residual.tobytes()
        assert memory.history.tobytes() == reference.history.tobytes()
    monkeypatch.undo()
    # a read-only residual is not written, in place or not
    frozen = rng_residual.copy()
    frozen.flags.writeable = False
    memory = EdgeMemory.fresh(layout, opts.history)
    memory.residual = frozen
    compress_update(updates[0], weights, memory, plan, layout, in_place=True)
    assert memory.residual is not frozen
    assert frozen.tobytes() == rng_residual.tobytes()
    bad = updates[0].copy()
    bad[5] = np.nan
    with pytest.raises(CodecError, match="x holds NaN or Inf"):
        compress_update(bad, weights, EdgeMemory.fresh(layout, 2), plan, layout)
    huge = np.full(layout.total, 3e38, np.float32)
    memory = EdgeMemory.fresh(layout, 2)
    memory.residual = huge.copy()
    if gamma > 0:
        with pytest.raises(ValueError, match="latest must be finite"):
            compress_update(huge, weights, memory, plan, layout)


def test_compress_update_reports_its_steps():
    opts = AceSyncOptions()
    arrays = {"w": np.random.default_rng(1).normal(size=(40, 30)).astype(np.float32)}
    layout = GroupLayout.from_arrays(arrays, 64)
    plan = EdgePlan(
        budget=2000,
        codecs=opts.options,
        chunk=64,
        gamma=1.0,
        importance="magnitude",
        fill_decay=opts.fill_decay,
        history=opts.history,
        local_steps=1,
        server_round=1,
    )
    stages: dict[str, float] = {}
    update = layout.flat(arrays)
    memory = EdgeMemory.fresh(layout, opts.history)
    out = compress_update(update, update, memory, plan, layout, stages=stages)
    assert set(stages) == set(codec_bench.ENCODE_STAGES)
    assert all(v >= 0 for v in stages.values())
    assert out.encoded_bytes <= 2000


def test_codec_bench_quick_writes_its_results(tmp_path, capsys):
    assert codec_bench.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    tiny = results["cases"]["tiny"]
    arrays = codec_bench.model_arrays(codec_bench.CASES["tiny"], 0)
    assert tiny["parameters"] == sum(a.size for a in arrays.values())
    assert tiny["float32_bytes"] == 4 * tiny["parameters"]
    assert 0 < tiny["budget_bytes"] < tiny["float32_bytes"]
    assert sum(tiny["codec_mix"].values()) == 2 * tiny["groups"]  # 2 rounds
    assert set(tiny["encode"]["stages_seconds"]) == set(codec_bench.ENCODE_STAGES)
    assert set(tiny["decode"]["stages_seconds"]) == set(codec_bench.DECODE_STAGES)
    per = {"encode": "seconds_per_round", "decode": "seconds_per_reply"}
    for side in ("encode", "decode"):
        assert tiny[side]["gb_per_s"] == pytest.approx(
            tiny["float32_bytes"] / tiny[side]["seconds"] / 1e9
        )
        times = tiny[side][per[side]]
        assert len(times) == 2 and tiny[side]["seconds"] == pytest.approx(
            sum(times) / 2  # the median of two
        )
        assert tiny[side]["best_seconds"] == min(times)
        assert tiny[side]["best_gb_per_s"] == pytest.approx(
            tiny["float32_bytes"] / min(times) / 1e9
        )
    assert tiny["cloud_round"]["devices"] == 4
    assert results["assumptions"]["threads"]["torch"] == 1
    copies = results["assumptions"]["memory_copy_gb_per_s"]
    assert copies["before"] > 0 and copies["after"] > 0
    assert "| tiny |" in capsys.readouterr().out


def test_the_bench_cli_routes_codecs(tmp_path):
    from tandem.bench.cli import main

    assert main(["codecs", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").exists()


#: How the rows are encoded: as rows into a (k, L) wire; as groups of a flat
#: update with the residual into another array, or over the update; as
#: groups listed out of order to scattered offsets with gaps, every third
#: left out, with the residual apart or in place.
ROW_PATHS = pytest.mark.parametrize(
    "residual",
    ["none", "apart", "in place", "scattered", "scattered in place"],
)


def _encode_rows_by(
    kind: str, rows: np.ndarray, residual: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(wire, decoded)`` of codec ``kind`` on ``rows`` ``(k, n)``; the
    residual, when asked for, checked to be ``rows − decoded`` bit for bit,
    and the stream's and the outputs' elements outside the listed groups
    checked untouched."""
    codec = Option(kind).codec
    if residual == "none":
        return codec.encode_rows(rows, None)
    k, size = rows.shape
    width = int(codec.nbytes(np.asarray(size), None))
    listed = np.arange(k)
    offsets = listed * width
    if residual.startswith("scattered"):  # backwards, a 3-byte gap after each
        offsets = (k - 1 - listed) * (width + 3) + 1
        listed = np.random.default_rng(k).permutation(np.delete(listed, listed[1::3]))
    stream = np.full(int(offsets.max(initial=0)) + width + 5, 0xAB, dtype=np.uint8)
    flat = rows.reshape(-1).copy()
    decoded = np.full_like(flat, np.nan)
    in_place = residual.endswith("in place")
    rest = flat if in_place else np.full_like(flat, np.nan)
    codec.encode_groups(
        flat,
        listed * size,
        np.full(listed.size, size),
        None,
        stream,
        offsets[listed],
        decoded,
        rest.view(),  # another view object of the same memory (or array)
    )
    wire = np.zeros((k, width), dtype=np.uint8)
    written = np.zeros(stream.size, dtype=bool)
    for r in listed:
        wire[r] = stream[offsets[r] : offsets[r] + width]
        written[offsets[r] : offsets[r] + width] = True
    assert (stream[~written] == 0xAB).all()  # nothing else written
    decoded, rest = decoded.reshape(k, size), rest.reshape(k, size)
    left_out = np.setdiff1d(np.arange(k), listed)
    assert np.isnan(decoded[left_out]).all()
    if in_place:
        np.testing.assert_array_equal(rest[left_out], rows[left_out])
    else:
        assert np.isnan(rest[left_out]).all()
    if left_out.size:  # the rows left out: encoded on their own
        wire[left_out], decoded[left_out] = codec.encode_rows(rows[left_out], None)
        rest[left_out] = rows[left_out] - decoded[left_out]
    expected = rows - decoded
    np.testing.assert_array_equal(rest.view(np.uint32), expected.view(np.uint32))
    return wire, decoded


@ROW_PATHS
@pytest.mark.parametrize("size", [1, 7, 8, 13, 64, 129, 255, 256, 300, 1031])
def test_sign_rows_are_the_per_group_encoding_bit_for_bit(residual, size):
    """Sign bits (the padding zero), the scale ``mean|x|`` summed in float64
    in numpy's pairwise order (blocks of 128, halves cut at a multiple of 8:
    the sizes cross each case) and ``±a``, against ``Sign.encode`` and
    ``expand`` per group; magnitudes over 60 decades, so that the order of
    the float64 sum shows, zeros and −0."""
    rng = np.random.default_rng(size)
    rows = rng.laplace(size=(24, size)) * 10.0 ** rng.uniform(-30, 30, (24, size))
    rows = rows.astype(np.float32)
    rows[0] = 0.0
    rows[1, ::2] = -0.0
    wire, values = _encode_rows_by("sign", rows, residual)
    for r in range(len(rows)):
        payload = encode("sign", rows[r])
        expected = np.concatenate(
            [payload["signs"], payload["scale"].astype("<f4").view(np.uint8)]
        )
        np.testing.assert_array_equal(wire[r], expected)
        got = Option("sign").codec.expand(payload, size)
        np.testing.assert_array_equal(values[r].view(np.uint32), got.view(np.uint32))


@pytest.mark.parametrize("size", [256, 1024, 4096])  # / size exact
def test_the_sign_scale_sum_follows_numpys_order(size):
    """``1 + 2⁻²⁴`` (a float32 midpoint) and many ``2⁻⁵⁴``: one by one, each
    ``2⁻⁵⁴`` is lost to float64 rounding and the mean rounds down to even in
    float32; numpy's pairwise sum adds them up first and the mean rounds up.
    The scale's bytes follow numpy's order."""
    rows = np.full((2, size), 2.0**-54, dtype=np.float32)
    rows[0, :2] = 1.0, 2.0**-24
    rows[1, :2] = 2.0**-24, 1.0
    wide = np.abs(rows, dtype=np.float64)
    pairwise = (wide.sum(axis=1) / size).astype(np.float32)
    one_by_one = (np.array([sum(row.tolist(), 0.0) for row in wide]) / size).astype(
        np.float32
    )
    assert (pairwise != one_by_one).all()
    wire, _ = _encode_rows_by("sign", rows, "apart")
    scale = wire[:, -4:].copy().view("<f4")[:, 0]
    np.testing.assert_array_equal(scale, pairwise)


@ROW_PATHS
def test_int8_scale_of_zeros_is_plus_zero(residual):
    rows = np.array([[0.0, -0.0, 0.0], [-0.0, -0.0, -0.0], [1.0, -3.0, 2.0]])
    rows = rows.astype(np.float32)
    wire, _ = _encode_rows_by("int8", rows, residual)
    for r in range(3):
        reference = encode("int8", rows[r])["scale"].astype("<f4").view(np.uint8)
        np.testing.assert_array_equal(wire[r, 3:], reference)
    assert wire[:2, 3:].tolist() == [[0, 0, 0, 0]] * 2


@ROW_PATHS
def test_int8_rows_keep_the_formula_bit_for_bit(residual):
    """``rint(x / a · 127)`` exactly, not ``x · (127 / a)``: on these 2^20
    Laplace values the two round one level apart at least once; zeros (a −0
    level decodes as +0) and scales from subnormal to huge, with and without
    the residual."""
    rng = np.random.default_rng(0)
    rows = rng.laplace(size=(4096, 256)).astype(np.float32)
    scale = np.abs(rows).max(axis=1, keepdims=True)
    shortcut = np.rint(rows * (np.float32(127.0) / scale))
    assert (np.rint(rows / scale * np.float32(127.0)) != shortcut).any()
    rows[2048:] *= (10.0 ** rng.uniform(-40, 30, size=(2048, 1))).astype(np.float32)
    rows[rng.random(rows.shape) < 0.05] = 0.0
    rows[:3] = 0.0
    rows[3, :7] = -0.0
    scale = np.abs(rows).max(axis=1, keepdims=True)
    wire, values = _encode_rows_by("int8", rows, residual)
    levels = int8_levels(rows, scale)
    np.testing.assert_array_equal(wire[:, :256].view(np.int8), levels)
    np.testing.assert_array_equal(wire[:, 256:].copy().view("<f4"), scale)
    expected = int8_values(levels, scale) + np.float32(0.0)
    np.testing.assert_array_equal(values.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("ties", [False, True])
def test_the_knapsack_sort_is_the_stable_one(ties):
    rng = np.random.default_rng(11)
    key = rng.normal(size=5000)
    if ties:  # equal keys must stay in index order
        key = np.round(key, 1)
        key[::7] = -0.0
    np.testing.assert_array_equal(_stable_argsort(key), np.argsort(key, kind="stable"))


def test_unflat_equals_unflatten_of_the_groups():
    rng = np.random.default_rng(12)
    shapes = {"a": (5, 7), "b": (), "c": (0,), "d": (300,), "e": (3, 2, 4)}
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    layout = GroupLayout.from_arrays(arrays, 16)
    v = rng.normal(size=layout.total).astype(np.float32)
    fast = layout.unflat(v)
    reference = unflatten(np.split(v, layout.starts[1:]), layout.groups)
    assert list(fast) == list(reference)
    for key, value in reference.items():
        assert fast[key].shape == value.shape and fast[key].dtype == np.float32
        np.testing.assert_array_equal(fast[key], value)
    assert not any(np.shares_memory(a, v) for a in fast.values())  # fresh
    with pytest.raises(ValueError, match="vector has shape"):
        layout.unflat(v[:-1])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats, --devices"),
        (["--bandwidth", "-1"], "--bandwidth"),
    ],
)
def test_the_codec_bench_refuses_bad_options(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        codec_bench.main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
