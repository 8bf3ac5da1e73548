"""The SimulTrain edge's optimizer options: ``simultrain-edge-optimizer``
(momentum SGD or torch's Adam), ``simultrain-edge-lr`` and
``simultrain-edge-warmup``.

Each step is checked against torch's own optimizers on the same tensors;
the defaults against the SGD path as it was before the options.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_simultrain_edge import _message, _node_context

from tandem.client_app import dispatch
from tandem.clients.simultrain import (
    EdgeState,
    adam_step,
    apply_gradients,
    forward_chunk,
    sgd_step,
)
from tandem.config import RunConfig, parse_section
from tandem.datasets.base import ArraySplit
from tandem.options import ConfigError
from tandem.protocol.simultrain import (
    CloudMessage,
    SimulTrainOptions,
)
from tandem.split import forecast_gradients
from tandem.training import BatchStream

LR, MOMENTUM, ALPHA = 0.05, 0.9, 0.5


def _edge() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh())


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _split() -> ArraySplit:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    return ArraySplit(x, np.zeros(40, dtype=np.int64))


def _opts(**flat) -> SimulTrainOptions:
    base = {"simultrain-precision": "float32", "simultrain-alpha": ALPHA}
    return parse_section(SimulTrainOptions, {**base, **flat})


# ------------------------------------------------------------------ adam_step
def test_adam_step_equals_torch_optim_adam_over_three_steps():
    gen = torch.Generator().manual_seed(0)
    edge = _edge()
    theta = _params(edge)
    optimizer = torch.optim.Adam(edge.parameters(), lr=0.01)
    state: dict[str, torch.Tensor] = {}
    for step in range(1, 4):
        grads = {
            k: torch.randn(p.shape, generator=gen) for k, p in edge.named_parameters()
        }
        for k, p in edge.named_parameters():
            p.grad = grads[k].clone()
        optimizer.step()
        theta, state = adam_step(theta, grads, state, 0.01)
        for k, p in edge.named_parameters():
            torch.testing.assert_close(theta[k], p.detach(), rtol=0, atol=1e-7)
            ref = optimizer.state[p]
            torch.testing.assert_close(state[f"exp_avg/{k}"], ref["exp_avg"])
            torch.testing.assert_close(state[f"exp_avg_sq/{k}"], ref["exp_avg_sq"])
            assert float(state[f"step/{k}"]) == float(ref["step"]) == step


def test_adam_step_leaves_its_input_state_and_ungraded_tensors_alone():
    theta = {"w": torch.ones(3), "b": torch.zeros(2)}
    grads = {"w": torch.tensor([1.0, -2.0, 0.5])}
    _, first = adam_step(theta, grads, {}, 0.1)
    kept = {k: v.clone() for k, v in first.items()}
    new, second = adam_step(theta, grads, first, 0.1)
    assert set(first) == {"exp_avg/w", "exp_avg_sq/w", "step/w"}
    for k, v in kept.items():
        assert torch.equal(first[k], v), k
    assert float(second["step/w"]) == 2.0
    assert torch.equal(new["b"], theta["b"])


# ------------------------------------------------------------ apply_gradients
def _two_chunks(opts: SimulTrainOptions, lr: float):
    """Forward chunks 0 and 1 (2 micro-batches each) at θ0, apply chunk 0's
    gradients (4 micro-batches forwarded), forward chunk 2, apply chunk 1's
    (6 forwarded). Returns the final state, θ0, the rows of chunks 0 and 1
    and their cut gradients."""
    edge = _edge()
    split = _split()
    stream = BatchStream(split, 5, seed=3)
    theta0 = _params(edge)
    state = EdgeState(dict(theta0), dict(theta0), dict(theta0), {}, {})
    rows, cut_grads = [], []
    gen = np.random.default_rng(2)
    for _ in range(2):
        forward_chunk(state, edge, split, stream, 2, opts.precision)
        rows.append(state.stash[f"c{state.version - 1}/idx"].copy())
        cut_grads.append(gen.normal(size=(len(rows[-1]), 4)).astype(np.float32))
    assert state.steps == 4
    apply_gradients(
        state, edge, split, CloudMessage(1, 0, 0, {"g": cut_grads[0]}), opts, lr, 0.9
    )
    forward_chunk(state, edge, split, stream, 2, opts.precision)
    assert state.steps == 6
    apply_gradients(
        state, edge, split, CloudMessage(2, 0, 1, {"g": cut_grads[1]}), opts, lr, 0.9
    )
    return state, theta0, split, rows, cut_grads


def _chunk_grads(theta0, split, idx, cut_grad) -> dict[str, torch.Tensor]:
    """The parameter gradients of a chunk at the stashed θ0 (2 micro-batches)."""
    edge = _edge()
    edge.load_state_dict(theta0)
    edge(torch.from_numpy(split.x[idx])).backward(torch.from_numpy(cut_grad / 2))
    return {k: p.grad for k, p in edge.named_parameters()}


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_two_chunks_at_warmed_up_rates_equal_torch_optimizers(name):
    # edge-lr 0.01 replaces lr x scale; warm-up over 10 micro-batches: the
    # first step (4 forwarded) at 0.4 x 0.01, the second (6 forwarded) at 0.6
    opts = _opts(
        **{
            "simultrain-edge-optimizer": name,
            "simultrain-edge-lr": 0.01,
            "simultrain-edge-warmup": 10,
        }
    )
    rate = opts.edge_rate(LR)
    assert rate == 0.01
    state, theta0, split, rows, cut_grads = _two_chunks(opts, rate)

    ref = _edge()
    ref.load_state_dict(theta0)
    if name == "adam":
        optimizer = torch.optim.Adam(ref.parameters(), lr=rate)
    else:
        optimizer = torch.optim.SGD(ref.parameters(), lr=rate, momentum=0.9)
    for idx, g, scale in zip(rows, cut_grads, (0.4, 0.6), strict=True):
        grads = _chunk_grads(theta0, split, idx, g)
        for k, p in ref.named_parameters():  # the forecast: α·(θ_e − θ0)
            p.grad = grads[k] + ALPHA * (p.detach() - theta0[k])
        for group in optimizer.param_groups:
            group["lr"] = rate * scale
        optimizer.step()
    for k, p in ref.named_parameters():
        torch.testing.assert_close(state.theta[k], p.detach(), rtol=0, atol=1e-7)
    assert (state.adam == {}) == (name == "sgd")
    assert (state.momentum == {}) == (name == "adam")
    if name == "adam":
        assert all(
            float(state.adam[f"step/{k}"]) == 2 for k, _ in ref.named_parameters()
        )


def test_the_defaults_take_the_sgd_step_as_before_bit_for_bit():
    opts = _opts()
    assert (opts.edge_optimizer, opts.edge_lr, opts.edge_warmup) == ("sgd", 0.0, 0)
    rate = opts.edge_rate(LR)
    assert rate == LR * opts.edge_lr_scale  # the rate both callers used
    state, theta0, split, rows, cut_grads = _two_chunks(opts, rate)
    # the step as apply_gradients took it before the options
    theta, momentum = dict(theta0), {}
    for idx, g in zip(rows, cut_grads, strict=True):
        grads = forecast_gradients(
            _chunk_grads(theta0, split, idx, g), theta0, theta, ALPHA
        )
        theta, momentum = sgd_step(theta, grads, momentum, rate, 0.9)
    for k in theta:
        assert torch.equal(state.theta[k], theta[k]), k
    for k in momentum:
        assert torch.equal(state.momentum[k], momentum[k]), k
    assert state.adam == {}


def test_edge_lr_replaces_lr_times_scale_and_warm_up_ends_at_the_full_rate():
    scaled = _opts(**{"simultrain-edge-lr-scale": 0.3})
    assert scaled.edge_rate(0.001) == 0.001 * 0.3
    absolute = _opts(**{"simultrain-edge-lr": 0.0003})
    assert absolute.edge_rate(0.05) == 0.0003
    warm = _opts(**{"simultrain-edge-warmup": 45})
    assert [warm.warmed_up(0.0003, t) for t in (0, 9, 45, 90)] == [
        0.0,
        0.0003 * (9 / 45),
        0.0003,
        0.0003,
    ]
    assert _opts().warmed_up(0.0003, 0) == 0.0003  # no warm-up


# ------------------------------------------------------------- EdgeState
def test_the_adam_state_round_trips_through_context_state():
    theta = {"w": torch.ones(3), "b": torch.zeros(2)}
    grads = {"w": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([0.5, 0.25])}
    _, adam = adam_step(theta, grads, {}, 0.1)
    _, adam = adam_step(theta, grads, adam, 0.1)
    state = EdgeState(theta, dict(theta), dict(theta), {}, {}, adam=adam)
    record = RecordDict()
    state.save(record)
    loaded = EdgeState.load(record, {k: torch.zeros_like(v) for k, v in theta.items()})
    assert set(loaded.adam) == set(adam)
    for k, v in adam.items():
        assert torch.equal(loaded.adam[k], v), k
        assert loaded.adam[k].dtype == v.dtype and loaded.adam[k].shape == v.shape
    # the loaded state takes the same next step as the one kept in memory
    want = adam_step(theta, grads, adam, 0.1)
    got = adam_step(theta, grads, loaded.adam, 0.1)
    for k in theta:
        assert torch.equal(got[0][k], want[0][k]), k


def test_a_missing_adam_state_starts_fresh():
    theta = {"w": torch.ones(3)}
    # a state saved before the option existed has no adam record
    record = RecordDict()
    EdgeState(theta, dict(theta), dict(theta), {}, {}).save(record)
    del record["simultrain.adam"]
    assert EdgeState.load(record, theta).adam == {}
    assert EdgeState.load(RecordDict(), theta).adam == {}
    # a parameter missing part of its state starts fresh too
    grads = {"w": torch.tensor([1.0, -2.0, 0.5])}
    fresh = adam_step(theta, grads, {}, 0.1)
    _, partial = adam_step(theta, grads, {}, 0.1)
    del partial["step/w"]
    again = adam_step(theta, grads, partial, 0.1)
    assert torch.equal(again[0]["w"], fresh[0]["w"])


@pytest.fixture
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_the_message_transport_carries_the_adam_state_between_messages(
    task_identity,
):
    run_config = {
        "method": "simultrain",
        "mnist1d-samples": 1000,
        "batch-size": 8,
        "simultrain-precision": "float32",
        "simultrain-transport": "message",
        "simultrain-edge-optimizer": "adam",
        "simultrain-edge-lr": 0.0003,
    }
    ctx = _node_context(run_config)
    shapes = []
    for _ in range(2):
        reply = dispatch(_message(-1, 1), ctx)
        shapes.append(reply.content["acts"]["a"].shape)
    rng = np.random.default_rng(0)
    for version in range(2):  # each message a fresh EdgeState from ctx.state
        dispatch(_message(version, 0, rng.normal(size=shapes[version])), ctx)
    adam = ctx.state.array_records["simultrain.adam"]
    steps = {k: float(a.numpy()) for k, a in adam.items() if k.startswith("step/")}
    assert steps and set(steps.values()) == {2.0}
    assert len(ctx.state.array_records["simultrain.momentum"]) == 0


# ------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("simultrain-edge-optimizer", "rmsprop", "sgd"),
        ("simultrain-edge-lr", -0.001, ">= 0"),
        ("simultrain-edge-lr", "fast", "number"),
        ("simultrain-edge-warmup", -1, ">= 0"),
        ("simultrain-edge-warmup", 2.5, "integer"),
    ],
)
def test_bad_edge_optimizer_options_are_refused_naming_the_key(key, value, rule):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat({"method": "simultrain", key: value})
    assert info.value.key == key and info.value.value == value
    assert key in str(info.value) and rule in str(info.value)


def test_good_edge_optimizer_options_pass():
    opts = _opts(
        **{
            "simultrain-edge-optimizer": "adam",
            "simultrain-edge-lr": 0.0003,
            "simultrain-edge-warmup": 45,
        }
    )
    assert (opts.edge_optimizer, opts.edge_lr, opts.edge_warmup) == ("adam", 3e-4, 45)
    cfg = RunConfig.from_flat({"method": "simultrain", "simultrain-edge-lr": 0})
    assert cfg.options_as(SimulTrainOptions).edge_lr == 0.0
