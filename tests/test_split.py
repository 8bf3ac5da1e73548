"""Split maths: equivalence to the whole model, forecast, reconciliation, staleness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.config import ConfigError
from tandem.models import DEFAULT_CUTS, build_model
from tandem.split import (
    cut_bytes,
    cut_keys,
    decode_cut,
    dequantize_rows,
    encode_cut,
    forecast_gradients,
    merge_delta,
    quantize_rows,
    soft_reconcile,
    split_model,
    staleness_weight,
)


@pytest.mark.parametrize("cut", [DEFAULT_CUTS["cnn1d"], 0, 5])
def test_split_gradients_equal_whole_model_gradients(cut):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 40), torch.randint(0, 10, (8,))
    whole = build_model("cnn1d", (1, 40), 10, seed=1)
    loss = torch.nn.functional.cross_entropy(whole(x), y)
    loss.backward()
    expected = {k: p.grad.clone() for k, p in whole.named_parameters()}

    model = build_model("cnn1d", (1, 40), 10, seed=1)
    edge, cloud = split_model(model, cut)
    acts = edge(x)
    sent = acts.detach().requires_grad_(True)  # what crosses the network
    torch.nn.functional.cross_entropy(cloud(sent), y).backward()
    acts.backward(sent.grad)  # the cut-layer gradient sent back
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], rtol=1e-5, atol=1e-6)


def test_split_by_name_and_errors():
    model = build_model("cnn1d", (1, 40), 10)
    edge, cloud = split_model(model, "act2")
    assert [n for n, _ in edge.named_children()][-1] == "act2"
    assert next(n for n, _ in cloud.named_children()) == "conv3"
    for bad in ("nope", 7, -1, "fc"):
        with pytest.raises(ConfigError) as info:
            split_model(model, bad)
        assert info.value.key == "simultrain-cut"
    # the last stage but one is the last cut; numbers may come as text
    edge, cloud = split_model(model, "6")
    assert len(edge) == 7 and len(cloud) == 1
    messages = {
        "nope": "run config 'simultrain-cut' = 'nope': must name a stage: conv1, "
        "act1, conv2, act2, conv3, act3, flatten, fc",
        "-1": "run config 'simultrain-cut' = '-1': must leave both parts "
        "non-empty: 0 <= cut < 7",
    }
    for bad, message in messages.items():
        with pytest.raises(ConfigError) as info:
            split_model(model, bad)
        assert str(info.value) == message


def test_forecast_and_reconciliation_by_hand():
    grad = {"w": torch.tensor([1.0, -2.0])}
    theta = {"w": torch.tensor([0.5, 0.5])}
    cloud = {"w": torch.tensor([1.5, -0.5])}
    # ∇ + 0.5·(θ^c − θ) = [1 + 0.5, −2 − 0.5]
    torch.testing.assert_close(
        forecast_gradients(grad, theta, cloud, 0.5)["w"], torch.tensor([1.5, -2.5])
    )
    torch.testing.assert_close(
        forecast_gradients(grad, theta, cloud, 0.0)["w"], grad["w"]
    )
    # a gap of 2: ∇ + 0.5·2 (the gap is multiplied, not divided)
    far = {"w": torch.tensor([2.5, 2.5])}
    torch.testing.assert_close(
        forecast_gradients(grad, theta, far, 0.5)["w"], torch.tensor([2.0, -1.0])
    )
    # (1 − 0.25)·θ + 0.25·θ^c
    torch.testing.assert_close(
        soft_reconcile(theta, cloud, 0.25)["w"], torch.tensor([0.75, 0.25])
    )
    torch.testing.assert_close(soft_reconcile(theta, cloud, 1.0)["w"], cloud["w"])


def test_staleness_weight_and_merge():
    assert staleness_weight(0, 4) == 1.0
    assert staleness_weight(3, 4) == 0.25
    assert staleness_weight(5, 4) == 0.0
    # the bound itself is kept, one past it is dropped
    assert staleness_weight(4, 4) == 0.2
    assert staleness_weight(0, 0) == 1.0
    assert staleness_weight(1, 0) == 0.0
    with pytest.raises(
        ValueError, match=r"^a staleness gap cannot be negative, got -1$"
    ):
        staleness_weight(-1, 4)
    base = {"w": torch.zeros(2)}
    merged = merge_delta(base, {"w": torch.tensor([4.0, -8.0])}, 0.5, 2)
    torch.testing.assert_close(merged["w"], torch.tensor([1.0, -2.0]))
    # one edge (or none known yet): the whole weighted delta
    for edges in (1, 0):
        merged = merge_delta(base, {"w": torch.tensor([4.0, -8.0])}, 0.5, edges)
        torch.testing.assert_close(merged["w"], torch.tensor([2.0, -4.0]))


def test_int8_rows_round_trip_within_half_a_step():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3, 4)).astype(np.float32)
    x[2] = 0.0  # an all-zero row keeps scale 0 and decodes to zeros
    q, scale = quantize_rows(x)
    assert q.dtype == np.int8 and scale.shape == (5,) and scale[2] == 0
    back = dequantize_rows(q, scale)
    step = scale / 127
    assert (np.abs(back - x).reshape(5, -1) <= step[:, None] / 2 + 1e-7).all()
    assert (back[2] == 0).all()


@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
def test_cut_codec_round_trip_and_bytes(precision):
    x = np.linspace(-1, 1, 2 * 6, dtype=np.float32).reshape(2, 6)
    arrays = encode_cut(x, precision, "a")
    assert set(arrays) == cut_keys(precision, "a")
    per_sample = {"float32": 24, "float16": 12, "int8": 6 + 4}[precision]
    assert sum(a.nbytes for a in arrays.values()) == 2 * per_sample
    # the estimate a stream session's window is sized by: (T, d) rows too
    assert cut_bytes((6,), 2, precision) == 2 * per_sample
    tokens = encode_cut(np.ones((3, 4, 5), np.float32), precision, "a")
    assert cut_bytes((4, 5), 3, precision) == sum(a.nbytes for a in tokens.values())
    back = decode_cut(arrays, precision, "a", (2, 6))
    tolerance = {"float32": 0, "float16": 1e-3, "int8": 1 / 254 + 1e-7}[precision]
    assert np.abs(back - x).max() <= tolerance


def test_cut_codec_rejects_bad_arrays():
    good = encode_cut(np.ones((2, 3), np.float32), "int8", "g")
    with pytest.raises(ValueError, match="expected int8"):
        decode_cut({**good, "g": good["g"].astype(np.int16)}, "int8", "g", (2, 3))
    with pytest.raises(ValueError, match="'g-scale' is float32"):
        decode_cut({**good, "g-scale": np.ones(3, np.float32)}, "int8", "g", (2, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        decode_cut({"g": np.full((2, 3), np.nan, np.float32)}, "float32", "g", (2, 3))


def test_int8_rows_edge_cases():
    # small rows use their own scale (below 1 too); a zero row never divides
    x = np.array([[0.5, -0.25], [0.0, 0.0], [3.0, 1.5]], dtype=np.float64)
    with np.errstate(divide="raise", invalid="raise"):
        q, scale = quantize_rows(x)
    assert scale.dtype == np.float32 and scale.tolist() == [0.5, 0.0, 3.0]
    assert q.tolist() == [[127, -64], [0, 0], [127, 64]]
    np.testing.assert_allclose(dequantize_rows(q, scale), x, atol=0.5 * 3.0 / 127)
    # rows of no features: scales of zero, float32
    q, scale = quantize_rows(np.zeros((2, 0), np.float32))
    assert q.shape == (2, 0) and scale.dtype == np.float32 and scale.tolist() == [0, 0]


def test_encode_cut_names_the_bad_precision():
    with pytest.raises(ValueError, match=r"^precision must be one of .*not 'int4'$"):
        encode_cut(np.zeros((1, 2), np.float32), "int4", "a")
    with pytest.raises(ValueError, match=r"^precision must be one of .*not 'int4'$"):
        cut_bytes((2,), 1, "int4")


def test_decode_cut_edges():
    # int8: a zero row (scale 0) and scales below 1 decode; a negative does not
    q = np.array([[127, -127], [0, 0]], np.int8)
    arrays = {"a": q, "a-scale": np.array([0.5, 0.0], np.float32)}
    out = decode_cut(arrays, "int8", "a", (2, 2))
    assert out.tolist() == [[0.5, -0.5], [0.0, 0.0]]
    arrays["a-scale"] = np.array([0.5, -0.1], np.float32)
    with pytest.raises(ValueError, match=r"^'a-scale' must be finite and >= 0$"):
        decode_cut(arrays, "int8", "a", (2, 2))
    arrays["a-scale"] = np.ones(3, np.float32)  # (3,) for 2 rows of 5
    with pytest.raises(ValueError) as info:
        decode_cut({**arrays, "a": np.zeros((2, 5), np.int8)}, "int8", "a", (2, 5))
    assert str(info.value) == "'a-scale' is float32 (3,), expected float32 (2,)"
    # float16 arrives as float16 and is handed on as float32
    half = decode_cut({"a": np.ones((1, 3), np.float16)}, "float16", "a", (1, 3))
    assert half.dtype == np.float32
