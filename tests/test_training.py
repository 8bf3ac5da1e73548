"""The shared loop: batch streams, training steps, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tandem.datasets import ArraySplit
from tandem.training import BatchStream, evaluate, make_optimizer, train_steps


def _split(n: int = 50) -> ArraySplit:
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    return ArraySplit(x, np.arange(n, dtype=np.int64) % 2)


def test_stream_visits_every_row_once_per_epoch():
    stream = BatchStream(_split(50), batch_size=8, seed=1)
    seen = np.concatenate([stream.next_indices() for _ in range(7)])  # 6x8 + 2
    assert sorted(seen.tolist()) == list(range(50))
    assert stream.position == (0, 50)
    stream.next_indices()
    assert stream.position == (1, 8)


def test_stream_resumes_exactly_from_its_position():
    whole = BatchStream(_split(), 8, seed=5)
    expected = [whole.next_indices() for _ in range(20)]
    first = BatchStream(_split(), 8, seed=5)
    got = [first.next_indices() for _ in range(9)]
    resumed = BatchStream(_split(), 8, seed=5, epoch=first.epoch, offset=first.offset)
    got += [resumed.next_indices() for _ in range(11)]
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_steps_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    split = ArraySplit(x, y)
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    device = torch.device("cpu")
    before = evaluate(model, split, device)
    stats = train_steps(
        model, iter(BatchStream(split, 20, 0)), 100, make_optimizer(model, 0.5), device
    )
    after = evaluate(model, split, device)
    assert stats.steps == 100 and stats.num_examples == 2000
    assert after.loss < before.loss
    assert after.accuracy > 0.95


def test_evaluate_counts_exactly():
    split = ArraySplit(np.eye(4, dtype=np.float32), np.array([0, 1, 2, 0]))
    model = nn.Identity()  # logits = one-hot rows: predicts 0, 1, 2, 3
    stats = evaluate(model, split, torch.device("cpu"), batch_size=3)
    assert stats.num_examples == 4
    assert stats.accuracy == 0.75


def test_compute_seconds_ignores_a_slow_burst():
    from tandem.training import TrainStats

    quiet = (0.010,) * 10
    burst = (0.010,) * 4 + (0.5,) * 6  # most steps slowed by the host
    assert TrainStats(10, 320, 0.0, 0.1, quiet).compute_seconds == pytest.approx(0.1)
    assert TrainStats(10, 320, 0.0, 3.6, burst).compute_seconds == pytest.approx(0.1)
    assert TrainStats(2, 64, 0.0, 0.5, (0.2, 0.3)).compute_seconds == pytest.approx(0.5)


def test_a_single_step_is_timed_warm_off_the_record(monkeypatch):
    import itertools

    import tandem.training as training

    # the fake CPU clock: the real step takes 1.0 s (cold), the two repeats
    # 0.3 and 0.2 s
    ticks = itertools.accumulate([0.0, 1.0, 0.0, 0.3, 0.0, 0.2])
    monkeypatch.setattr(training, "cpu_clock", lambda: lambda: next(ticks))
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    twin = nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    optimizer = make_optimizer(model, 0.1, 0.9)
    stats = train_steps(model, iter([(x, y)]), 1, optimizer, torch.device("cpu"))
    assert stats.step_seconds == (1.0,)
    assert stats.warm_seconds == pytest.approx((0.3, 0.2))
    assert stats.compute_seconds == pytest.approx(0.2)
    # the repeats ran on a copy: the model took exactly one SGD step
    reference = make_optimizer(twin, 0.1, 0.9)
    nn.functional.cross_entropy(twin(x), y).backward()
    reference.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(optimizer.state) == 2  # its own momentum buffers only
    from tandem.training import TrainStats

    assert TrainStats(2, 8, 0.0, 1.0, (0.6, 0.4), (0.3,)).compute_seconds == 0.6
