"""SimulTrain's edge handler, driven message by message with a node Context.

The forecast correction (seed 002) is checked through what the edge reports:
the delta ``θ_e − base`` it sends on reconciliation.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from tandem.client_app import dispatch
from tandem.config import RunConfig, parse_section
from tandem.protocol.simultrain import (
    KEY_ACTS,
    KEY_DELTA,
    KEY_EDGE_PARAMS,
    KEY_GRADS,
    SimulTrainOptions,
    edge_model,
)

LR, EDGE_LR_SCALE, MOMENTUM, ALPHA = 0.05, 0.5, 0.9, 0.5
RUN_CONFIG = {
    "method": "simultrain",
    "mnist1d-samples": 1000,
    "batch-size": 8,
    "lr": LR,
    "momentum": MOMENTUM,
    "simultrain-edge-lr-scale": EDGE_LR_SCALE,
    "simultrain-alpha": ALPHA,
    "simultrain-precision": "float32",
}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _message(grad_for: int, want: int, grads=None, edge_params=None) -> Message:
    content = RecordDict(
        {"config": ConfigRecord({"grad-for": grad_for, "want": want, "v-c": 1})}
    )
    if grads is not None:
        content[KEY_GRADS] = ArrayRecord({"g": Array(grads.astype(np.float32))})
    if edge_params is not None:
        content[KEY_EDGE_PARAMS] = edge_params
    return Message(content=content, dst_node_id=7, message_type="train.simultrain")


def _node_context(run_config: dict) -> Context:
    """Node 7's Context: partition 0 of 2, an empty state."""
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=run_config,
    )


def _delta_after(forecast: str, zero_grad_step: bool) -> dict[str, np.ndarray]:
    """The delta the edge reports after one (or two) steps.

    Messages: forward chunks 0 and 1 at ``θ0``; then chunk 0's gradients
    (random: ``θ1 = θ0 − η·∇``); then, if ``zero_grad_step``, chunk 1's
    gradients, all zero, so that the step is the forecast term alone. The
    last message also carries the cloud's copy, and the edge replies with
    ``θ − θ0``.
    """
    run_config = {**RUN_CONFIG, "simultrain-forecast": forecast}
    ctx = _node_context(run_config)
    cfg = RunConfig.from_flat(dict(run_config))
    edge, _ = edge_model(cfg, parse_section(SimulTrainOptions, run_config))
    params = ArrayRecord({k: Array(v.numpy()) for k, v in edge.state_dict().items()})
    shapes = []
    for _ in range(2):
        reply = dispatch(_message(-1, 1), ctx)
        shapes.append(reply.content[KEY_ACTS]["a"].shape)
    grads = np.random.default_rng(0).normal(size=shapes[0])
    last = 1 if zero_grad_step else 0
    reply = dispatch(_message(0, 0, grads, None if last else params), ctx)
    if zero_grad_step:
        reply = dispatch(_message(1, 0, np.zeros(shapes[1]), params), ctx)
    return {k: a.numpy() for k, a in reply.content[KEY_DELTA].items()}


@pytest.mark.parametrize(
    ("forecast", "sign"),
    [
        # stash: ∇̃ = ∇ + α·(θ1 − θ0), from the stashed θ0 to the current θ1
        ("stash", +1),
        # cloud-copy: ∇̃ = ∇ + α·(θ_e^c − θ_e) = ∇ + α·(θ0 − θ1) (the copy is θ0)
        ("cloud-copy", -1),
    ],
)
def test_forecast_carries_the_gradient_toward_the_right_version(forecast, sign):
    """With a zero gradient the second step is momentum plus the forecast term.

    ``v1 = (θ0 − θ1)/η``, ``θ2 = θ1 − η·(μ·v1 + ∇̃)``; with ``∇̃ = ±α·(θ1 − θ0)``
    that is ``θ2 − θ0 = (θ1 − θ0)·(1 + μ ∓ η·α)``.
    """
    first = _delta_after(forecast, zero_grad_step=False)  # θ1 − θ0
    second = _delta_after(forecast, zero_grad_step=True)  # θ2 − θ0
    eta = LR * EDGE_LR_SCALE
    factor = 1 + MOMENTUM - sign * eta * ALPHA
    assert any(np.abs(d).max() > 1e-4 for d in first.values())  # the edge moved
    for key, d1 in first.items():
        np.testing.assert_allclose(second[key], d1 * factor, rtol=1e-4, atol=1e-7)


def test_kept_forward_passes_give_the_recomputed_gradients():
    # two chunks in flight at different weights; their backward passes
    # through the kept forward passes equal, bit for bit, the backward of a
    # forward pass recomputed at each chunk's weights (the message transport's
    # way), and a copy freed by chunk 0 serves chunk 2 without touching chunk 1
    torch = pytest.importorskip("torch")
    from tandem.clients.simultrain import KeptForwards

    cfg = RunConfig.from_flat(RUN_CONFIG)
    edge, _ = edge_model(cfg, cfg.options_as(SimulTrainOptions))
    gen = torch.Generator().manual_seed(0)
    thetas = [
        {k: torch.randn(v.shape, generator=gen) for k, v in edge.state_dict().items()}
        for _ in range(3)
    ]
    xs = [torch.randn(5, 1, 40, generator=gen) for _ in range(3)]
    kept = KeptForwards(edge)
    assert KeptForwards.usable(edge)
    acts = [kept.forward(v, thetas[v], xs[v]) for v in (0, 1)]
    grads_out = [torch.randn(acts[0].shape, generator=gen) for _ in range(3)]

    def recomputed(v):
        edge.load_state_dict(thetas[v])
        edge.zero_grad(set_to_none=True)
        out = edge(xs[v])
        out.backward(grads_out[v])
        return out.detach(), {k: p.grad.clone() for k, p in edge.named_parameters()}

    got0 = kept.backward(0, grads_out[0])
    acts.append(kept.forward(2, thetas[2], xs[2]))  # reuses chunk 0's copy
    got1 = kept.backward(1, grads_out[1])
    got2 = kept.backward(2, grads_out[2])
    for v, got in enumerate((got0, got1, got2)):
        out, want = recomputed(v)
        assert torch.equal(acts[v], out)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (v, k)
    assert len(kept.free) == 2 and not kept.kept  # two copies served three chunks
    assert kept.backward(0, grads_out[0]) is None  # done: not kept any more


def test_edge_layers_with_buffers_recompute_their_forward_pass():
    torch = pytest.importorskip("torch")
    from tandem.clients.simultrain import KeptForwards

    nn = torch.nn
    with_buffers = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2))
    assert not KeptForwards.usable(with_buffers)
    assert KeptForwards.usable(nn.Sequential(nn.Conv1d(1, 2, 3)))


# ------------------------------------------------- a stream session's pieces of work
def _session(tmp_path, run_config: dict | None = None):
    """Node 7's stream session (no stream opened): W = 2, chunks of 2."""
    from tandem.clients.simultrain import StreamedEdge

    flat = {**RUN_CONFIG, "output-dir": str(tmp_path), **(run_config or {})}
    cfg = RunConfig.from_flat(flat)
    return StreamedEdge.detached(_node_context(flat), cfg, 2, 2, 1000)


def _gradients_frame(session, version: int, seq: int, reconcile: bool) -> bytes:
    """The cloud's gradients frame for chunk ``version`` (seeded values), with
    ``θ_e^c`` (the edge's weights halved) when ``reconcile``."""
    from tandem.frames import encode_frame
    from tandem.protocol.simultrain import CloudMessage, message_frame

    rows = len(session.state.stash[f"c{version}/idx"])
    cut = tuple(int(n) for n in session.state.stash[f"c{version}/cut"])
    grads = np.random.default_rng(version).standard_normal((rows, *cut))
    params = None
    if reconcile:
        params = {k: v.numpy() / 2 for k, v in session.state.theta.items()}
    msg = CloudMessage(
        v_c=version,
        want=2,
        grad_for=version,
        grads={"g": grads.astype(np.float32)},
        edge_params=params,
    )
    return encode_frame(message_frame(msg, seq))


def _stream_chunks(session, chunks: int) -> list[dict]:
    """Forward ``chunks`` chunks and apply their gradients (every third with
    a reconciliation), two in flight; the frames sent, decoded."""
    from tandem.frames import decode_frame
    from tandem.protocol.simultrain import frame_reply

    sent = []
    for seq in range(chunks):
        sent.append(frame_reply(decode_frame(session.forward(2), 2**26)))
        if len(session.in_flight) == 2:
            version = session.in_flight[0]
            session.receive(_gradients_frame(session, version, seq, version % 3 == 0))
    return sent


@pytest.mark.parametrize("extra", [{}, {"simultrain-edge-optimizer": "adam"}])
def test_repeats_off_the_record_leave_the_session_as_it_was(
    tmp_path, monkeypatch, extra
):
    from tandem.clients import simultrain as edge_side

    runs = {}
    for repeats in (0, 2):
        monkeypatch.setattr(edge_side, "WARM_REPEATS", repeats)
        session = _session(tmp_path / str(repeats), extra)
        runs[repeats] = (session, _stream_chunks(session, 9))
    (plain, plain_sent), (warm, warm_sent) = runs[0], runs[2]
    assert warm.state.version == plain.state.version == 9
    assert warm.batches.position == plain.batches.position
    assert list(warm.in_flight) == list(plain.in_flight) == [8]
    assert sorted(warm.state.stash) == sorted(plain.state.stash)
    for name in ("theta", "theta_cloud", "base", "momentum", "adam"):
        mine, theirs = getattr(warm.state, name), getattr(plain.state, name)
        assert sorted(mine) == sorted(theirs), name
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), (name, key)
    assert warm.state.theta != {} and (warm.state.momentum or warm.state.adam)
    for mine, theirs in zip(warm_sent, plain_sent, strict=True):
        assert mine.version == theirs.version and mine.steps == theirs.steps
        np.testing.assert_array_equal(mine.acts["a"], theirs.acts["a"])
        np.testing.assert_array_equal(mine.labels, theirs.labels)
        assert (mine.delta is None) == (theirs.delta is None)
        for key in mine.delta or {}:
            np.testing.assert_array_equal(mine.delta[key], theirs.delta[key])
    assert sum(f.delta is not None for f in warm_sent) == 3  # chunks 0, 3 and 6


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_each_piece_of_work_is_charged_warm(tmp_path, monkeypatch):
    # The live forward pass and the live step 1 each burn 50 ms of CPU more
    # than their repeats: the session charges the repeats' time, a few ms
    # (the live time without the repeats: 50 ms and more)
    from tandem.clients import simultrain as edge_side

    session = _session(tmp_path)
    kept_forward, apply_gradients = session.kept.forward, edge_side.apply_gradients

    def slow_forward(*args):  # the live chunk's; its repeats use twin_kept
        _burn(0.05)
        return kept_forward(*args)

    def slow_step(state, *args, **kwargs):
        if state is session.state:
            _burn(0.05)
        return apply_gradients(state, *args, **kwargs)

    monkeypatch.setattr(session.kept, "forward", slow_forward)
    monkeypatch.setattr(edge_side, "apply_gradients", slow_step)
    charged = {"forward": [], "receive": []}
    for seq in range(6):
        session.forward(2)  # its frame carries what came before it
        charged["forward"].append(session.total_compute + session.compute)
        if len(session.in_flight) == 2:
            before = session.compute
            version = session.in_flight[0]
            session.receive(_gradients_frame(session, version, seq, False))
            charged["receive"].append(session.compute - before)
    steps = np.diff(charged["forward"])
    assert len(steps) == 5 and len(charged["receive"]) == 5
    # each chunk: its forward part (and its frame), one receive
    assert steps.max() < 0.03 and max(charged["receive"]) < 0.03
    assert session.state.version == 6 and len(session.in_flight) == 1


def test_a_stream_session_runs_torch_on_one_thread(tmp_path, monkeypatch):
    # its pieces are timed by the thread's CPU clock (a deployment's
    # ClientApp otherwise gets a torch thread per core); the count is put back
    from tandem.clients import simultrain as edge_side
    from tandem.protocol.simultrain import SESSION_TYPE

    flat = {**RUN_CONFIG, "output-dir": str(tmp_path)}
    cfg = RunConfig.from_flat(flat)
    context = _node_context(flat)
    start = _session(tmp_path / "start").start  # W = 2, chunks of 2
    msg = Message(content=start.to_content(), dst_node_id=7, message_type=SESSION_TYPE)
    seen = []
    monkeypatch.setattr(
        edge_side.StreamedEdge,
        "run",
        lambda self, node_id: seen.append(torch.get_num_threads()),
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        reply = edge_side.session_handler(msg, context, cfg)
        assert seen == [1] and torch.get_num_threads() == 2
        assert reply.content is not None
    finally:
        torch.set_num_threads(threads)
