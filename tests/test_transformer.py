"""The transformer language model: size, causality, cuts, and token metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tandem.datasets.base import ArraySplit
from tandem.models import DEFAULT_CUTS, build_model, default_model_for
from tandem.options import ConfigError
from tandem.split import decode_cut, encode_cut, split_model
from tandem.training import evaluate, token_cross_entropy
from tandem.transformer import transformer, transformer_parameters


def test_default_size_and_auto_pick():
    model = build_model("auto", (64,), 256, tokens=True)
    assert [name for name, _ in model.named_children()] == [
        "embed",
        "block1",
        "block2",
        "block3",
        "block4",
        "norm",
        "head",
    ]
    count = sum(p.numel() for p in model.parameters())
    # 4·(12·128² + 13·128) + (256 + 64)·128 + 2·128 + 128·256 + 256
    assert count == transformer_parameters(256, 64) == 867_328
    assert 500_000 <= count <= 2_000_000
    assert default_model_for((64,), tokens=True) == "transformer"
    assert default_model_for((64,)) == "mlp"  # float vectors keep their pick
    assert DEFAULT_CUTS["transformer"] == "block1"
    with pytest.raises(ConfigError, match="token"):
        build_model("transformer", (1, 40), 10)


def test_same_seed_same_weights():
    a = build_model("transformer", (16,), 256, seed=3)
    b = build_model("transformer", (16,), 256, seed=3)
    for (ka, va), (_, vb) in zip(
        a.state_dict().items(), b.state_dict().items(), strict=True
    ):
        assert torch.equal(va, vb), ka


def test_a_future_token_does_not_change_earlier_logits():
    torch.manual_seed(0)
    model = transformer(vocab=50, context=12, width=32, layers=2, heads=4).eval()
    x = torch.randint(0, 50, (3, 12))
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert before.shape == (3, 12, 50)
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=0)
    assert (before[:, 7:] - after[:, 7:]).abs().amax() > 1e-4


def test_split_outputs_and_gradients_equal_the_whole_model():
    whole = transformer(vocab=40, context=8, width=16, layers=2, heads=2)
    x = torch.randint(0, 40, (4, 8))
    y = torch.randint(0, 40, (4, 8))
    token_cross_entropy(whole(x), y).backward()
    expected = {k: p.grad.clone() for k, p in whole.named_parameters()}
    whole.zero_grad()
    edge, cloud = split_model(whole, "block1")
    assert [n for n, _ in edge.named_children()] == ["embed", "block1"]
    acts = edge(x)
    assert acts.shape == (4, 8, 16)
    torch.testing.assert_close(cloud(acts), whole(x))
    # the SimulTrain route: cloud gradient at the cut, backpropagated by the edge
    cut = acts.detach().requires_grad_(True)
    token_cross_entropy(cloud(cut), y).backward()
    acts.backward(cut.grad)
    for k, p in whole.named_parameters():
        torch.testing.assert_close(p.grad, expected[k])


def test_int8_cut_activations_of_sequences_round_trip():
    acts = np.random.default_rng(0).normal(size=(3, 8, 16)).astype(np.float32)
    arrays = encode_cut(acts, "int8", "a")
    assert arrays["a"].shape == (3, 8, 16) and arrays["a-scale"].shape == (3,)
    out = decode_cut(arrays, "int8", "a", (3, 8, 16))
    scale = np.abs(acts).reshape(3, -1).max(axis=1)
    assert (np.abs(out - acts) <= scale[:, None, None] / 254 + 1e-7).all()


def test_token_cross_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # (1, 2, 2)
    targets = torch.tensor([[1, 0]])
    # p = 3/4 at position 0, 1/2 at position 1
    expected = -(math.log(0.75) + math.log(0.5)) / 2
    assert token_cross_entropy(logits, targets).item() == pytest.approx(expected)
    flat = torch.tensor([[0.0, math.log(3.0)]])
    assert token_cross_entropy(flat, torch.tensor([1])).item() == pytest.approx(
        -math.log(0.75)
    )


class _Uniform(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape, 256)


def test_a_uniform_model_has_perplexity_256():
    tokens = np.arange(5 * 8, dtype=np.int64).reshape(5, 8) % 256 + 1
    split = ArraySplit(tokens, (tokens + 1) % 256)
    stats = evaluate(_Uniform(), split, torch.device("cpu"), batch_size=2)
    assert stats.loss == pytest.approx(math.log(256))
    assert stats.perplexity == pytest.approx(256.0)
    assert stats.accuracy == 0.0  # argmax of ties is token 0, never a target
    assert stats.num_examples == 5
    assert stats.as_metrics()["eval-perplexity"] == stats.perplexity


def test_token_accuracy_counts_positions():
    class Copy(nn.Module):  # predicts the input token at every position
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.one_hot(x, 4).float() * 10

    x = np.array([[0, 1, 2, 3]], dtype=np.int64)
    y = np.array([[0, 1, 0, 0]], dtype=np.int64)  # 2 of 4 positions right
    stats = evaluate(Copy(), ArraySplit(x, y), torch.device("cpu"))
    assert stats.accuracy == 0.5


def test_simultrain_checks_accept_sequence_activations_and_labels():
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from tandem.protocol.simultrain import read_activations
    from tandem.wire import PayloadError

    acts = np.random.default_rng(1).normal(size=(4, 6, 8)).astype(np.float32)
    encoded = encode_cut(acts, "int8", "a")

    def reply(labels):
        arrays = {k: Array(v) for k, v in encoded.items()}
        arrays["y"] = Array(labels)
        arrays["sizes"] = Array(np.array([2, 2], dtype=np.int64))
        return RecordDict(
            {
                "meta": ConfigRecord({"v-e": 0, "base-v-c": 0}),
                "acts": ArrayRecord(arrays),
            }
        )

    targets = np.arange(24, dtype=np.int64).reshape(4, 6)
    chunk = read_activations(
        reply(targets), 0, 2, (6, 8), "int8", 256, 8, label_shape=(6,)
    )
    assert chunk.acts.shape == (4, 6, 8)
    assert chunk.labels.tolist() == targets.tolist()
    with pytest.raises(PayloadError, match=r"expected \(<= 8, 6\)"):
        read_activations(
            reply(targets[:, 0].copy()), 0, 2, (6, 8), "int8", 256, 8, label_shape=(6,)
        )
    with pytest.raises(PayloadError, match="outside"):
        read_activations(
            reply(targets + 250), 0, 2, (6, 8), "int8", 256, 8, label_shape=(6,)
        )
