"""SimulTrain's ``simultrain-predict-weights``: each chunk forwarded, and
stashed, at SpecTrain's predicted weights ``θ_e − s·η·v`` (``s`` the chunks in
flight before it, ``η`` the edge's current rate, ``v`` its momentum)."""

from __future__ import annotations

import numpy as np
import torch

from tandem.clients.simultrain import EdgeState, forward_chunk, prediction_span
from tandem.config import parse_section
from tandem.datasets.base import ArraySplit
from tandem.protocol.simultrain import SimulTrainOptions
from tandem.split import predicted_weights
from tandem.training import BatchStream


def _edge() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh())


def _opts(**flat) -> SimulTrainOptions:
    base = {"simultrain-precision": "float32"}
    return parse_section(SimulTrainOptions, {**base, **flat})


def _state(edge: torch.nn.Module) -> EdgeState:
    theta = {k: v.detach().clone() for k, v in edge.state_dict().items()}
    return EdgeState(dict(theta), dict(theta), dict(theta), {}, {})


def test_predicted_weights_by_hand():
    theta = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    momentum = {"w": torch.tensor([0.5, -1.0])}
    out = predicted_weights(theta, momentum, 0.1)
    expected = np.array([1.0, 2.0], np.float32) - np.float32(0.1) * np.array(
        [0.5, -1.0], np.float32
    )
    np.testing.assert_array_equal(out["w"].numpy(), expected)  # 0.95, 2.1
    assert out["b"] is theta["b"]  # no buffer yet: as it is
    assert predicted_weights(theta, momentum, 0.0)["w"].tolist() == [1.0, 2.0]


def test_the_span_counts_the_chunks_in_flight_at_the_warmed_up_rate():
    edge = _edge()
    split = ArraySplit(np.ones((20, 6), np.float32), np.zeros(20, dtype=np.int64))
    state = _state(edge)
    stream = BatchStream(split, 2, seed=0)
    on = _opts(**{"simultrain-predict-weights": True, "simultrain-edge-warmup": 8})
    assert prediction_span(state, on, 0.1) == 0.0  # nothing in flight
    forward_chunk(state, edge, split, stream, 2, on.precision)
    forward_chunk(state, edge, split, stream, 2, on.precision)
    # two chunks in flight, 4 of 8 warm-up micro-batches: 2 × 0.1 × 0.5
    assert prediction_span(state, on, 0.1) == 2 * 0.1 * 0.5
    assert prediction_span(state, _opts(), 0.1) == 0.0  # off by default
    adam = _opts(
        **{"simultrain-predict-weights": True, "simultrain-edge-optimizer": "adam"}
    )
    assert prediction_span(state, adam, 0.1) == 0.0  # no momentum to predict with


def test_a_chunk_ahead_is_forwarded_and_stashed_at_the_predicted_weights():
    edge = _edge()
    split = ArraySplit(
        np.random.default_rng(1).normal(size=(20, 6)).astype(np.float32),
        np.zeros(20, dtype=np.int64),
    )
    theta0 = {k: v.detach().clone() for k, v in edge.state_dict().items()}
    for ahead in (0.0, 0.3):
        state = _state(edge)
        state.theta = {k: v.clone() for k, v in theta0.items()}
        v = torch.full((4, 6), 0.2)
        state.momentum = {"0.weight": v}
        stream = BatchStream(split, 3, seed=5)
        chunk = forward_chunk(state, edge, split, stream, 2, "float32", ahead=ahead)
        idx = state.stash["c0/idx"]
        at = {k: v.clone() for k, v in state.theta.items()}
        at["0.weight"] = at["0.weight"] - ahead * v
        reference = _edge()
        reference.load_state_dict(at)
        with torch.no_grad():
            expected = reference(torch.from_numpy(split.x[idx])).numpy()
        np.testing.assert_array_equal(chunk.acts["a"], expected)
        np.testing.assert_array_equal(state.stash["c0/w.0.weight"], at["0.weight"])
        np.testing.assert_array_equal(state.stash["c0/w.0.bias"], at["0.bias"])
        # θ_e itself does not move
        assert all(torch.equal(state.theta[k], theta0[k]) for k in theta0)
