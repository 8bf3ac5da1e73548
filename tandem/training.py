"""The one training loop and the one evaluation loop every method uses.

Methods differ in what they do around a step (FedAvg runs K local steps and
ships weights; SimulTrain runs the edge half and ships activations), never in
how a batch is drawn, a loss computed or accuracy counted. Batches come from a
:class:`BatchStream`, whose position (epoch, offset) is plain integers so a
node can keep it in ``Context.state`` between messages.

The loss is :func:`token_cross_entropy` for both kinds of data: a classifier's
``(B, C)`` logits against ``(B,)`` labels, and a language model's
``(B, T, V)`` logits against ``(B, T)`` next tokens, where every position is
one prediction. Evaluation reports the mean loss per prediction, the top-1
accuracy per prediction (next-token accuracy for sequences) and the
perplexity ``exp(mean loss)``; for a classifier that is ``exp`` of its
cross-entropy (1 for a perfect model, the number of classes for a uniform
one), reported for every dataset so that every run has the same metrics.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tandem.datasets.base import ArraySplit
from tandem.optim import Adam, MomentumSGD

__all__ = [
    "BatchStream",
    "EvalStats",
    "TrainStats",
    "capped_steps",
    "evaluate",
    "make_optimizer",
    "token_cross_entropy",
    "train_steps",
]


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy over every prediction: ``(..., V)`` logits, ``(...)`` targets.

    ``(B, C)`` against ``(B,)`` is plain classification; ``(B, T, V)``
    against ``(B, T)`` averages ``−log p(x_{t+1} | x_{≤t})`` over all ``B·T``
    positions (``reduction="sum"``: their sum).
    """
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction
    )


class BatchStream:
    """An endless, reproducible sequence of shuffled mini-batches.

    Epoch ``e`` visits the rows in the order ``default_rng((seed, e))``
    permutes them; ``position`` is ``(epoch, offset)`` into that order.

    Parameters
    ----------
    split : ArraySplit
        The rows to draw from.
    batch_size : int
        Rows per batch (the last batch of an epoch may be smaller).
    seed : int
        Seed of the per-epoch permutations (use a different one per node).
    epoch, offset : int (default: 0)
        Where to resume.
    """

    def __init__(
        self,
        split: ArraySplit,
        batch_size: int,
        seed: int,
        epoch: int = 0,
        offset: int = 0,
    ) -> None:
        if len(split) == 0:
            raise ValueError("cannot draw batches from an empty split")
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.offset = offset
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.split))

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, offset)`` of the next batch."""
        return self.epoch, self.offset

    def next_indices(self) -> np.ndarray:
        """Row indices of the next batch."""
        if self.offset >= len(self._order):
            self.epoch += 1
            self.offset = 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.offset : self.offset + self.batch_size]
        self.offset += len(idx)
        return idx

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` batch as CPU tensors."""
        idx = self.next_indices()
        return torch.from_numpy(self.split.x[idx]), torch.from_numpy(self.split.y[idx])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()


@dataclass(frozen=True)
class TrainStats:
    """What a call to :func:`train_steps` did.

    ``seconds`` is the wall time of all steps. ``step_seconds`` holds each
    step's compute time: the CPU time of the training thread
    (``time.thread_time``) when torch computes on that one thread (as in the
    simulation, one CPU per ClientApp), else wall time. ``compute_seconds`` is
    ``steps × lower quartile of the step times``: the work itself, without
    what a shared host adds (waiting for a core another process holds, other
    threads of the process, warm-up, bursts seen here that slowed most steps
    of one message tenfold). As ``timeit`` advises for deterministic work, the
    fast end of the distribution measures the work and the slow end the host;
    the lower quartile is a few percent under the median on a quiet host.
    The virtual clock scales it to the emulated device.
    """

    steps: int
    num_examples: int
    mean_loss: float
    seconds: float
    step_seconds: tuple[float, ...] = ()
    warm_seconds: tuple[float, ...] = ()

    @property
    def compute_seconds(self) -> float:
        """``steps × lower-quartile step time`` (seconds).

        Fewer than four steps have no quartile to drop a cold first step
        with (SyncSGD's one step per message): ``steps ×`` the fastest of
        the steps and of ``warm_seconds``, the same step repeated off the
        record (:func:`train_steps`), so every method's step is timed warm.
        """
        if not self.step_seconds:
            return self.seconds
        if len(self.step_seconds) < 4:
            if self.warm_seconds:
                return len(self.step_seconds) * min(
                    self.step_seconds + self.warm_seconds
                )
            return sum(self.step_seconds)
        q1 = statistics.quantiles(self.step_seconds, n=4, method="inclusive")[0]
        return len(self.step_seconds) * q1


@dataclass(frozen=True)
class EvalStats:
    """Loss, accuracy and perplexity over a split.

    ``loss`` and ``accuracy`` are per prediction (per token for sequences);
    ``num_examples`` counts rows (sequences).
    """

    loss: float
    accuracy: float
    num_examples: int

    @property
    def perplexity(self) -> float:
        """``exp(loss)``: 256 for a uniform model over bytes, 1 for a perfect one."""
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def as_metrics(self) -> dict[str, float]:
        """``eval-loss``, ``eval-accuracy`` and ``eval-perplexity``."""
        return {
            "eval-loss": self.loss,
            "eval-accuracy": self.accuracy,
            "eval-perplexity": self.perplexity,
        }


def cpu_clock() -> Callable[[], float]:
    """The clock that times this thread's compute: CPU time of the thread
    (``time.thread_time``) when torch computes on that one thread, else wall
    time (torch's other threads work for it too)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


#: What :func:`make_optimizer` returns.
Optimizer = MomentumSGD | Adam


def make_optimizer(
    model: nn.Module, lr: float, momentum: float = 0.0, kind: str = "sgd"
) -> Optimizer:
    """The run's optimizer (``optimizer``) on ``model``'s parameters.

    ``"sgd"``: plain SGD with optional heavy-ball momentum,
    :class:`torch.optim.SGD`'s step without its ``torch._dynamo`` import
    (:class:`~tandem.optim.MomentumSGD`). ``"adam"``: torch's Adam at
    ``lr`` with betas (0.9, 0.999) and eps 1e-8 (:class:`~tandem.optim.Adam`);
    ``momentum`` is not used.

    Raises
    ------
    ValueError
        If ``kind`` is neither.
    """
    if kind == "adam":
        return Adam(model.parameters(), lr=lr)
    if kind != "sgd":
        raise ValueError(f"optimizer must be 'sgd' or 'adam', not {kind!r}")
    return MomentumSGD(model.parameters(), lr=lr, momentum=momentum)


def capped_steps(steps: int, epochs: float, examples: int, batch_size: int) -> int:
    """Local steps with at most ``epochs`` passes over a node's data.

    ``min(steps, ceil(epochs · examples / batch_size))``, at least 1; ``epochs``
    of 0 means no cap. A small partition then trains a few epochs per round
    instead of the dozens a fixed ``local-steps`` would make it.
    """
    if epochs <= 0:
        return steps
    return max(1, min(steps, math.ceil(epochs * examples / batch_size)))


#: Fewer steps than this per call are also timed warm (:func:`train_steps`).
WARM_BELOW = 4
#: Off-the-record repeats of the last step when there are so few.
WARM_REPEATS = 2


def train_steps(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    optimizer: Optimizer,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
        token_cross_entropy
    ),
) -> TrainStats:
    """Run ``steps`` SGD steps on batches drawn from ``batches``.

    Returns the mean training loss over the steps (per prediction) and the
    wall time they took. Fewer than :data:`WARM_BELOW` steps are followed by
    :data:`WARM_REPEATS` repeats of the last step on a copy of the model and
    optimizer, off the record, timed as ``warm_seconds``
    (:attr:`TrainStats.compute_seconds`).
    """
    model.train()
    total_loss = 0.0
    seen = 0
    step_seconds = []
    clock = cpu_clock()
    start = time.perf_counter()
    for _ in range(steps):
        tick = clock()
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(y)  # syncs the device
        seen += len(y)
        step_seconds.append(clock() - tick)
    seconds = time.perf_counter() - start
    warm = []
    if 0 < steps < WARM_BELOW:
        twin, twin_optimizer = copy.deepcopy((model, optimizer))  # shared memo
        for _ in range(WARM_REPEATS):
            tick = clock()
            twin_optimizer.zero_grad(set_to_none=True)
            loss_fn(twin(x), y).backward()
            twin_optimizer.step()
            warm.append(clock() - tick)
    return TrainStats(
        steps,
        seen,
        total_loss / max(seen, 1),
        seconds,
        tuple(step_seconds),
        tuple(warm),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, split: ArraySplit, device: torch.device, batch_size: int = 1024
) -> EvalStats:
    """Mean cross-entropy and top-1 accuracy per prediction of ``model`` on ``split``.

    A prediction is a row (classification) or a position of a row (token
    sequences, ``T`` per row).
    """
    model.eval()
    total_loss = 0.0
    correct = 0
    for start in range(0, len(split), batch_size):
        x = torch.from_numpy(split.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(split.y[start : start + batch_size]).to(device)
        logits = model(x)
        total_loss += float(token_cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == y).sum())
    n = len(split)
    predictions = int(split.y.size)
    return EvalStats(total_loss / max(predictions, 1), correct / max(predictions, 1), n)
