"""SimulTrain's contract: message builders and readers, options, the edge's step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from tandem.clients.simultrain import sgd_step
from tandem.config import ConfigError, RunConfig, parse_section
from tandem.protocol.simultrain import (
    KEY_ACTS,
    KEY_DELTA,
    KEY_EDGE_PARAMS,
    KEY_GRADS,
    KEY_META,
    CloudMessage,
    EdgeReply,
    SimulTrainOptions,
    read_activations,
    read_compute_seconds,
    read_delta,
)
from tandem.split import encode_cut
from tandem.wire import KEY_CONFIG, KEY_METRICS, PayloadError

LAYOUT = {"w": ((2, 3), "float32"), "b": ((3,), "float32")}
PARAMS = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.ones(3, np.float32),
}


def test_cloud_message_round_trip_and_wire_keys():
    grads = encode_cut(np.full((4, 5), 0.5, np.float32), "int8", "g")
    msg = CloudMessage(v_c=7, want=2, grad_for=3, grads=grads, edge_params=PARAMS)
    content = msg.to_content()
    assert list(content) == [KEY_GRADS, KEY_EDGE_PARAMS, KEY_CONFIG]
    assert dict(content[KEY_CONFIG]) == {"v-c": 7, "want": 2, "grad-for": 3}
    back = CloudMessage.from_content(content, LAYOUT)
    assert (back.v_c, back.want, back.grad_for) == (7, 2, 3)
    np.testing.assert_array_equal(back.edge_params["w"], PARAMS["w"])
    # int8 with one scale per row: 0.5 is exactly 127 steps of 0.5/127
    np.testing.assert_array_equal(back.gradients("int8", (4, 5)), np.full((4, 5), 0.5))


def test_a_bare_cloud_message_holds_only_its_config():
    content = CloudMessage(v_c=0, want=4, grad_for=-1).to_content()
    assert list(content) == [KEY_CONFIG]
    back = CloudMessage.from_content(content, LAYOUT)
    assert back.grads is None and back.edge_params is None


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda c: c.pop(KEY_GRADS), "missing record 'grads'"),
        (lambda c: c.pop(KEY_CONFIG), "missing record 'config'"),
        (lambda c: c[KEY_CONFIG].__setitem__("want", 1.5), "'want' = 1.5"),
        (
            lambda c: c.__setitem__(
                KEY_EDGE_PARAMS,
                ArrayRecord(
                    {"w": Array(PARAMS["w"].T.copy()), "b": Array(PARAMS["b"])}
                ),
            ),
            r"'w' has shape \(3, 2\)",
        ),
    ],
)
def test_a_bad_cloud_message_is_refused(tamper, reason):
    grads = encode_cut(np.zeros((4, 5), np.float32), "float32", "g")
    content = CloudMessage(1, 1, 0, grads, PARAMS).to_content()
    tamper(content)
    with pytest.raises(PayloadError, match=reason):
        CloudMessage.from_content(content, LAYOUT)


def test_gradients_of_the_wrong_precision_or_shape_are_refused():
    grads = encode_cut(np.zeros((4, 5), np.float32), "float32", "g")
    msg = CloudMessage(1, 1, 0, grads)
    with pytest.raises(PayloadError, match="gradient arrays"):
        msg.gradients("int8", (4, 5))
    with pytest.raises(PayloadError, match=r"expected float32 \(3, 5\)"):
        msg.gradients("float32", (3, 5))
    with pytest.raises(PayloadError, match="no cut-layer gradients"):
        CloudMessage(1, 1, -1).gradients("float32", (4, 5))


def _reply(**kw):
    acts = np.linspace(-1, 1, 3 * 4, dtype=np.float32).reshape(3, 4)
    base = {
        "version": 5,
        "base_v_c": 2,
        "compute_seconds": 0.25,
        "steps": 6,
        "delta": {k: v * 0.5 for k, v in PARAMS.items()},
        "acts": encode_cut(acts, "float32", "a"),
        "labels": np.array([0, 9, 3], np.int64),
        "sizes": np.array([2, 1], np.int64),
    }
    return EdgeReply(**{**base, **kw})


def test_edge_reply_is_read_back_by_the_cloud_readers():
    content = _reply().to_content()
    assert list(content) == [KEY_DELTA, KEY_ACTS, KEY_META, KEY_METRICS]
    assert list(content[KEY_ACTS]) == ["a", "y", "sizes"]
    assert dict(content[KEY_META]) == {"v-e": 5, "base-v-c": 2}
    assert read_compute_seconds(content) == 0.25
    delta = read_delta(content, LAYOUT)
    np.testing.assert_array_equal(delta["w"], PARAMS["w"] * 0.5)
    chunk = read_activations(content, 5, 2, (4,), "float32", 10, max_rows=8)
    assert chunk.labels.tolist() == [0, 9, 3] and chunk.sizes.tolist() == [2, 1]
    np.testing.assert_array_equal(
        chunk.acts[0], np.linspace(-1, 1, 12, dtype=np.float32)[:4]
    )


def test_a_reply_without_chunk_or_delta():
    content = _reply(delta=None, acts=None, labels=None, sizes=None, version=-1)
    content = content.to_content()
    assert list(content) == [KEY_META, KEY_METRICS]
    assert read_delta(content, LAYOUT) is None


@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf")])
def test_a_bad_compute_time_is_refused(value):
    content = RecordDict({KEY_METRICS: MetricRecord({"compute-seconds": value})})
    with pytest.raises(PayloadError, match="compute-seconds"):
        read_compute_seconds(content)


def test_a_delta_of_the_wrong_layout_is_refused():
    content = _reply(delta={"w": PARAMS["w"]}).to_content()
    with pytest.raises(PayloadError):
        read_delta(content, LAYOUT)


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("link", ["4gg", "mix:4g,4gg", "2mbit/8mbit"])
def test_a_bad_link_is_refused_when_the_config_is_parsed(link):
    flat = {"method": "simultrain", "simultrain-link": link}
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat(flat)
    assert info.value.key == "simultrain-link" and info.value.value == link
    assert "simultrain-link" in str(info.value)


@pytest.mark.parametrize(
    "link", ["4g", "5g", "lan", "wifi", "variable", "mix:4g,5g", "2mbit/8mbit/120ms"]
)
def test_good_links_pass(link):
    assert parse_section(SimulTrainOptions, {"simultrain-link": link}).link == link


def test_every_option_but_the_cut_has_a_rule():
    # the cut depends on the model: split_model checks it before any training;
    # a boolean's rule is its type
    unchecked = [
        f.metadata["key"]
        for f in dataclasses.fields(SimulTrainOptions)
        if f.metadata["check"] is None and f.metadata["choices"] is None
    ]
    assert unchecked == [
        "simultrain-cut",
        "simultrain-predict-weights",
        "simultrain-realtime",
    ]
    for key in unchecked[1:]:
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_flat({key: "yes"})


# ------------------------------------------------------------------ edge step
def test_the_edge_step_is_heavy_ball_sgd_by_hand():
    # dyadic numbers, so every product and sum below is exact in float32
    theta = {"weight": torch.tensor([[1.0, -2.0]])}
    lr, beta = 0.5, 0.5
    g1 = {"weight": torch.tensor([[0.25, 1.0]])}
    g2 = {"weight": torch.tensor([[-0.5, 0.5]])}
    theta, buf = sgd_step(theta, g1, {}, lr, beta)
    # v1 = g1; θ1 = θ0 − lr·v1 = [1 − 0.125, −2 − 0.5]
    assert buf["weight"].tolist() == [[0.25, 1.0]]
    assert theta["weight"].tolist() == [[0.875, -2.5]]
    theta, buf = sgd_step(theta, g2, buf, lr, beta)
    # v2 = β·v1 + g2 = [−0.375, 1.0]; θ2 = θ1 − lr·v2 = [1.0625, −3.0]
    assert buf["weight"].tolist() == [[-0.375, 1.0]]
    assert theta["weight"].tolist() == [[1.0625, -3.0]]


def test_the_edge_step_leaves_buffers_and_ungraded_tensors_alone():
    edge = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    theta = {k: v.detach().clone() for k, v in edge.state_dict().items()}
    grads = {"0.weight": torch.ones(2, 2)}
    new, buf = sgd_step(theta, grads, {}, 0.1, 0.9)
    assert set(buf) == {"0.weight"}
    for k in theta:
        if k != "0.weight":
            assert torch.equal(new[k], theta[k]), k
    assert torch.allclose(new["0.weight"], theta["0.weight"] - 0.1)


def test_the_edge_step_equals_torch_optim_sgd_carried_over_messages():
    # the reference: one torch.optim.SGD kept for the whole run; the edge
    # rebuilds nothing and carries the momentum between messages itself
    gen = torch.Generator().manual_seed(0)
    edge = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU())
    theta = {k: v.detach().clone() for k, v in edge.state_dict().items()}
    optimizer = torch.optim.SGD(edge.parameters(), lr=0.05, momentum=0.9)
    buffers: dict[str, torch.Tensor] = {}
    for _ in range(6):
        grads = {
            k: torch.randn(p.shape, generator=gen) for k, p in edge.named_parameters()
        }
        for k, p in edge.named_parameters():
            p.grad = grads[k].clone()
        optimizer.step()
        theta, buffers = sgd_step(theta, grads, buffers, 0.05, 0.9)
        for k, p in edge.named_parameters():
            assert torch.equal(theta[k], p.detach()), k
            assert torch.equal(buffers[k], optimizer.state[p]["momentum_buffer"]), k
