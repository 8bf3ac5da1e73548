"""``tandem bench split-schedule``: SimulTrain's edge schedule without Flower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tandem.bench.split_schedule import Schedule, main, parse_schedule, train_schedule
from tandem.config import RunConfig
from tandem.datasets import load_dataset
from tandem.models import build_model

FLAT = {"mnist1d-samples": 600, "batch-size": 8, "lr": 0.05, "momentum": 0.9}


def _cfg(**extra) -> RunConfig:
    return RunConfig.from_flat({**FLAT, **extra})


def _forward_chunk(edge, cloud, cloud_opt, rng, bundle):
    """Two micro-batches of 8 forwarded by ``edge``, the cloud stepped on
    each: the chunk's inputs and its cut gradient (mean over the two)."""
    xs, gs = [], []
    for _ in range(2):
        idx = rng.integers(0, len(bundle.train), 8)
        x = torch.from_numpy(bundle.train.x[idx])
        a = edge(x).detach().requires_grad_(True)
        cloud_opt.zero_grad()
        torch.nn.functional.cross_entropy(
            cloud(a), torch.from_numpy(bundle.train.y[idx])
        ).backward()
        cloud_opt.step()
        xs.append(x)
        gs.append(a.grad)
    return torch.cat(xs), torch.cat(gs) / 2


def _late_step(queued, at, edge, edge_opt):
    """With two chunks queued, the older one's gradient (back-propagated at
    its stash, in ``at``) stepped into ``edge``: one chunk late."""
    if len(queued) > 1:
        x, g, stash = queued.pop(0)
        at.load_state_dict(stash)
        at.zero_grad()
        at(x).backward(g)
        for p, q in zip(edge.parameters(), at.parameters(), strict=True):
            p.grad = q.grad
        edge_opt.step()


def _close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (k, p), (_, q) in zip(
        a.state_dict().items(), b.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=k)


def _whole_model(cfg, steps, seed, optimizers):
    """By hand: the whole model, one step of each of ``optimizers(model)``
    per micro-batch, drawn with the probe's generator."""
    bundle = load_dataset(cfg.data)
    whole = build_model("cnn1d", bundle.input_shape, bundle.num_classes, cfg.seed)
    opts = optimizers(whole)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(bundle.train), 8)
        for opt in opts:
            opt.zero_grad()
        torch.nn.functional.cross_entropy(
            whole(torch.from_numpy(bundle.train.x[idx])),
            torch.from_numpy(bundle.train.y[idx]),
        ).backward()
        for opt in opts:
            opt.step()
    return whole


def test_one_micro_batch_per_step_and_no_delay_is_whole_model_sgd():
    cfg = _cfg()
    steps, seed = 12, 3
    edge, cloud = train_schedule(cfg, Schedule(1, 0, 1.0), steps, seed)
    whole = _whole_model(
        cfg,
        steps,
        seed,
        lambda m: [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)],
    )
    _close(torch.nn.Sequential(*edge, *cloud), whole)


def test_a_delay_of_one_chunk_applies_each_chunk_one_chunk_later():
    cfg = _cfg()
    # 2/1/1 after 4 micro-batches has applied chunk 0 only (chunk 1 still
    # queued): the edge 2/0/1 has after chunk 0, whose gradients came from the
    # same first two cloud steps
    late, _ = train_schedule(cfg, Schedule(2, 1, 1.0), 4, seed=5)
    early, _ = train_schedule(cfg, Schedule(2, 0, 1.0), 2, seed=5)
    _close(late, early)
    fresh, _ = train_schedule(cfg, Schedule(2, 0, 1.0), 0, seed=5)
    moved = sum(
        float((p - q).detach().abs().sum())
        for p, q in zip(late.parameters(), fresh.parameters(), strict=True)
    )
    assert moved > 0


def test_a_zero_scale_freezes_the_edge_only():
    cfg = _cfg()
    edge, cloud = train_schedule(cfg, Schedule(1, 0, 0.0), 6, seed=1)
    edge0, cloud0 = train_schedule(cfg, Schedule(1, 0, 0.0), 0, seed=1)
    _close(edge, edge0)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(cloud.parameters(), cloud0.parameters(), strict=True)
    )


@pytest.mark.parametrize("text", ["4/1", "0/1/1", "4/-1/1", "4/1/-0.5", "a/1/1"])
def test_a_bad_schedule_is_refused_by_name(text):
    with pytest.raises(ValueError, match="CHUNK"):
        parse_schedule(text)


def test_the_command_prints_and_writes_each_schedule(tmp_path, capsys):
    out = tmp_path / "s.json"
    argv = ["--dataset", "mnist1d", "--steps", "4", "--batch-size", "8"]
    argv += ["--seeds", "0", "1", "--schedules", "1/0/1", "2/1/0", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| 1/0/1 |" in table and "1.000x" in table and "| 2/1/0 |" in table
    runs = json.loads(out.read_text())["runs"]
    assert sorted(runs) == ["1/0/1", "2/1/0"]
    assert [r["seed"] for r in runs["2/1/0"]] == [0, 1]
    with pytest.raises(SystemExit):
        main(["--schedules", "4/1"])


def test_delayed_gradients_are_taken_at_the_weights_of_their_forward():
    # 2/1/1 over 8 micro-batches, by hand with the stashes written out: chunk
    # k is forwarded at the edge's weights w_k and back-propagated at w_k once
    # chunk k + 1 is queued; the step goes to the newer weights
    cfg = _cfg()
    edge, cloud = train_schedule(cfg, Schedule(2, 1, 1.0), 8, seed=7)
    bundle = load_dataset(cfg.data)
    whole = build_model("cnn1d", bundle.input_shape, bundle.num_classes, cfg.seed)
    e, c = whole[:1], whole[1:]  # the cnn1d's default cut: after conv1
    at = build_model("cnn1d", bundle.input_shape, bundle.num_classes, cfg.seed)[:1]
    e_opt = torch.optim.SGD(e.parameters(), lr=0.05, momentum=0.9)
    c_opt = torch.optim.SGD(c.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(7)
    queued = []
    for _ in range(4):  # chunks
        stash = {k: v.clone() for k, v in e.state_dict().items()}
        queued.append((*_forward_chunk(e, c, c_opt, rng, bundle), stash))
        _late_step(queued, at, e, e_opt)
    _close(edge, e)
    _close(cloud, c)


def test_the_cut_decides_which_stages_the_schedule_holds_back():
    # cnn1d's stages are conv1 act1 conv2 ...: cut after conv2 instead of the
    # default (after act1), a frozen edge keeps all three at their start
    cfg = _cfg()
    bundle = load_dataset(cfg.data)
    names = [
        n
        for n, _ in build_model(
            "cnn1d", bundle.input_shape, bundle.num_classes, cfg.seed
        ).named_children()
    ]
    edge, _ = train_schedule(cfg, Schedule(1, 0, 0.0), 4, seed=2, cut=names[2])
    assert [n for n, _ in edge.named_children()] == names[:3]
    start, _ = train_schedule(cfg, Schedule(1, 0, 0.0), 0, seed=2, cut=names[2])
    _close(edge, start)
    default, _ = train_schedule(cfg, Schedule(1, 0, 0.0), 4, seed=2)
    assert [n for n, _ in default.named_children()] == names[:2]
    # 1/0/1 is whole-model SGD wherever the cut is
    a = train_schedule(cfg, Schedule(1, 0, 1.0), 5, seed=2, cut=names[2])
    b = train_schedule(cfg, Schedule(1, 0, 1.0), 5, seed=2)
    _close(torch.nn.Sequential(*a[0], *a[1]), torch.nn.Sequential(*b[0], *b[1]))


def test_a_cut_that_names_no_stage_is_refused_by_its_option(capsys):
    with pytest.raises(SystemExit):
        main(["--dataset", "mnist1d", "--steps", "1", "--cut", "nowhere"])
    assert "--cut" in capsys.readouterr().err


def test_an_adam_edge_without_delay_is_adam_on_the_edge_and_sgd_on_the_cloud():
    cfg = _cfg()
    steps, seed = 10, 4
    edge, cloud = train_schedule(
        cfg, Schedule(1, 0, 0.5), steps, seed, edge_optimizer="adam", edge_lr=0.01
    )
    n = len(edge)
    whole = _whole_model(
        cfg,
        steps,
        seed,
        lambda m: [
            torch.optim.Adam(m[:n].parameters(), lr=0.005),  # 0.01 x S
            torch.optim.SGD(m[n:].parameters(), lr=0.05, momentum=0.9),
        ],
    )
    _close(torch.nn.Sequential(*edge, *cloud), whole)
    with pytest.raises(ValueError, match="edge optimizer"):
        train_schedule(cfg, Schedule(1, 0, 1.0), 1, seed, edge_optimizer="lion")


def test_delay_compensation_adds_lambda_g_squared_times_the_weights_move():
    # 2/1/1, plain SGD: after 6 micro-batches the edge has taken two steps;
    # the second one applies chunk 1, forwarded at w0, to w1. DC-ASGD adds
    # lr * lam * g1^2 * (w1 - w0) to it; nothing else changes.
    cfg = _cfg(momentum=0.0)
    lam, lr = 1e5, 0.05
    w0, _ = train_schedule(cfg, Schedule(2, 1, 1.0), 0, seed=6)
    w1, _ = train_schedule(cfg, Schedule(2, 1, 1.0), 4, seed=6)
    plain, _ = train_schedule(cfg, Schedule(2, 1, 1.0), 6, seed=6)
    fixed, _ = train_schedule(cfg, Schedule(2, 1, 1.0), 6, seed=6, compensation=lam)
    biggest = 0.0
    for name, p in fixed.state_dict().items():
        a, b = w1.state_dict()[name], w0.state_dict()[name]
        g1 = (a - plain.state_dict()[name]) / lr
        expected = plain.state_dict()[name] - lr * lam * g1 * g1 * (a - b)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6, msg=name)
        biggest = max(biggest, float((p - plain.state_dict()[name]).abs().max()))
    assert biggest > 1e-5  # the correction is there, not lost in rounding
    # without delay the weights have not moved, and it changes nothing
    on_time, _ = train_schedule(cfg, Schedule(1, 0, 1.0), 6, seed=6)
    on_time_dc, _ = train_schedule(
        cfg, Schedule(1, 0, 1.0), 6, seed=6, compensation=lam
    )
    _close(on_time_dc, on_time)


def _chunks_of_two_one_late_by_hand(cfg, chunks, seed, predict):
    """By hand: 2/1/1 on the cnn1d for ``chunks`` chunks; with ``predict``
    each chunk is forwarded and back-propagated at ``w − 1 · lr · v``
    (SpecTrain, one edge step ahead), else at the edge's weights."""
    bundle = load_dataset(cfg.data)
    whole = build_model("cnn1d", bundle.input_shape, bundle.num_classes, cfg.seed)
    e, c = whole[:1], whole[1:]
    at = build_model("cnn1d", bundle.input_shape, bundle.num_classes, cfg.seed)[:1]
    e_opt = torch.optim.SGD(e.parameters(), lr=0.05, momentum=0.9)
    c_opt = torch.optim.SGD(c.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(seed)
    queued = []
    for _ in range(chunks):
        stash = {}
        for name, p in e.named_parameters():
            v = e_opt.state.get(p, {}).get("momentum_buffer")
            ahead = p.detach() - 0.05 * v if predict and v is not None else p
            stash[name] = ahead.detach().clone()
        at.load_state_dict(stash)
        queued.append((*_forward_chunk(at, c, c_opt, rng, bundle), stash))
        _late_step(queued, at, e, e_opt)
    return e, c


def test_weight_prediction_takes_each_chunk_at_w_minus_d_lr_v():
    # SpecTrain on 2/1/1 over 5 chunks: from the third chunk on the momentum
    # buffer is there, and each chunk is forwarded and back-propagated at the
    # weights predicted one edge step ahead
    cfg = _cfg()
    edge, cloud = train_schedule(cfg, Schedule(2, 1, 1.0), 10, seed=7, predict=True)
    e, c = _chunks_of_two_one_late_by_hand(cfg, 5, seed=7, predict=True)
    _close(edge, e)
    _close(cloud, c)
    plain, _ = train_schedule(cfg, Schedule(2, 1, 1.0), 10, seed=7)
    _close(plain, _chunks_of_two_one_late_by_hand(cfg, 5, seed=7, predict=False)[0])
    assert (
        max(
            float((p - q).detach().abs().max())
            for p, q in zip(edge.parameters(), plain.parameters(), strict=True)
        )
        > 1e-5
    )
    # without delay there is nothing to predict
    on_time = train_schedule(cfg, Schedule(2, 0, 1.0), 6, seed=7)
    on_time_p = train_schedule(cfg, Schedule(2, 0, 1.0), 6, seed=7, predict=True)
    _close(
        torch.nn.Sequential(*on_time[0], *on_time[1]),
        torch.nn.Sequential(*on_time_p[0], *on_time_p[1]),
    )
    with pytest.raises(ValueError, match="sgd"):
        train_schedule(
            cfg, Schedule(2, 1, 1.0), 1, seed=7, predict=True, edge_optimizer="adam"
        )


def test_edge_warmup_raises_only_the_edge_rate_linearly():
    # 1/0/1 with a warm-up of 4 micro-batches: the edge's step after
    # micro-batch t runs at 0.05 * min(1, t / 4), the cloud's at 0.05
    cfg = _cfg()
    steps, seed, n = 7, 8, 4
    edge, cloud = train_schedule(cfg, Schedule(1, 0, 1.0), steps, seed, edge_warmup=n)
    bundle = load_dataset(cfg.data)
    whole = build_model("cnn1d", bundle.input_shape, bundle.num_classes, cfg.seed)
    e_opt = torch.optim.SGD(whole[:1].parameters(), lr=0.05, momentum=0.9)
    c_opt = torch.optim.SGD(whole[1:].parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(seed)
    for t in range(1, steps + 1):
        idx = rng.integers(0, len(bundle.train), 8)
        whole.zero_grad()
        torch.nn.functional.cross_entropy(
            whole(torch.from_numpy(bundle.train.x[idx])),
            torch.from_numpy(bundle.train.y[idx]),
        ).backward()
        e_opt.param_groups[0]["lr"] = 0.05 * min(1.0, t / n)
        e_opt.step()
        c_opt.step()
    _close(torch.nn.Sequential(*edge, *cloud), whole)
    plain, _ = train_schedule(cfg, Schedule(1, 0, 1.0), steps, seed)
    assert any(
        not torch.allclose(p, q, rtol=0, atol=1e-6)
        for p, q in zip(edge.parameters(), plain.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="warm-up"):
        train_schedule(cfg, Schedule(1, 0, 1.0), 1, seed, edge_warmup=-1)


def test_edge_momentum_is_the_edge_sgds_only():
    cfg = _cfg()
    steps, seed = 8, 9
    edge, cloud = train_schedule(
        cfg, Schedule(1, 0, 1.0), steps, seed, edge_momentum=0.5
    )
    n = len(edge)
    whole = _whole_model(
        cfg,
        steps,
        seed,
        lambda m: [
            torch.optim.SGD(m[:n].parameters(), lr=0.05, momentum=0.5),
            torch.optim.SGD(m[n:].parameters(), lr=0.05, momentum=0.9),
        ],
    )
    _close(torch.nn.Sequential(*edge, *cloud), whole)
    with pytest.raises(ValueError, match="momentum"):
        train_schedule(cfg, Schedule(1, 0, 1.0), 1, seed, edge_momentum=1.0)


def test_the_new_options_are_refused_when_out_of_range(capsys):
    base = ["--dataset", "mnist1d", "--steps", "1", "--seeds", "0"]
    for bad in (
        ["--edge-warmup", "-2"],
        ["--edge-momentum", "1.5"],
        ["--predict-weights", "--edge-optimizer", "adam"],
    ):
        with pytest.raises(SystemExit):
            main(base + bad)
        assert bad[0] in capsys.readouterr().err
