"""FedAvg, cloud side: Flower's own ``FedAvg`` strategy, instrumented.

The aggregation is :class:`flwr.serverapp.strategy.FedAvg` itself
(McMahan et al. 2017, https://arxiv.org/abs/1602.05629): the new global model
is the example-weighted mean ``θ ← Σ_k (n_k / n) θ_k`` of the replies. tandem
adds nothing to the maths; it only plugs into FedAvg's seams:

- ``evaluate_fn``: server-side evaluation of the global model on the test
  split after every round (and before the first), which also closes the
  round's report (accuracy, loss, bytes from the metered Grid);
- ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``: Flower's default
  weighted averages, whose results are kept for that report;
- :class:`CheckedFedAvg` overrides ``configure_train`` / ``aggregate_train``
  only to drop malformed replies (counted, with reasons) and then calls
  ``super()``: the averaging is FedAvg's own.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from tandem.accounting import payload_bytes
from tandem.config import ConfigError
from tandem.failures import app_errors, stop_if_all_failed
from tandem.server_context import ServerRun
from tandem.training import evaluate
from tandem.wire import (
    KEY_ARRAYS,
    KEY_LOCAL_STEPS,
    PayloadError,
    check_arrays,
    layout_of,
)

__all__ = [
    "MAX_METRIC_LIST",
    "CheckedFedAdam",
    "CheckedFedAvg",
    "CheckedFedAvgM",
    "ReplyChecks",
    "build_fedavg",
    "check_reply",
    "log_rejection",
    "missing_replies",
    "run",
]


def _capturing(
    sink: dict[str, float],
) -> Callable[[list[RecordDict], str], MetricRecord]:
    """Flower's weighted metric average that also keeps its numbers in ``sink``."""

    def aggregate(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        metrics = aggregate_metricrecords(records, weighting_key)
        sink.clear()
        sink.update(
            {
                k: float(v)
                for k, v in metrics.items()
                if k != weighting_key and not isinstance(v, list)
            }
        )
        return metrics

    return aggregate


#: Longest list a reply's metric may hold (Flower's MetricRecord allows lists).
MAX_METRIC_LIST = 4096
#: Checkpoint names of the strategy's own arrays and of torch's RNG state.
_STRATEGY = "__strategy__/"
_TORCH_RNG = "__rng__/torch"
#: A reply's metrics by shape: ``(key, None)`` for a number, ``(key, n)`` for a
#: list of ``n`` numbers. Flower averages only replies of one shape.
MetricShape = tuple[tuple[str, int | None], ...]


def _one_record(kind: str, records: Mapping[str, object]) -> str:
    """The name of the reply's only ``kind`` record (Flower's rule: exactly one)."""
    if len(records) != 1:
        raise PayloadError(
            f"expected exactly one {kind}, got {len(records)} ({sorted(records)})"
        )
    return next(iter(records))


def _finite(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def check_reply(
    content: RecordDict,
    layout: Mapping[str, tuple[tuple[int, ...], str]],
    max_examples: float | None,
    max_bytes: int,
    weighted_by_key: str = "num-examples",
) -> MetricShape:
    """Check one FedAvg-family reply before it may touch the global model.

    The reply must be what Flower's FedAvg averages (exactly one ArrayRecord and
    one MetricRecord, whatever their names; ConfigRecords may come along) and
    safe to average: its arrays match the model sent (keys, shapes, dtypes, no
    NaN/Inf), every metric is a finite number or a list of at most
    :data:`MAX_METRIC_LIST` finite numbers, and the weight ``weighted_by_key``
    is a finite number in ``(0, max_examples]``. Which metrics a reply carries
    is not checked: a plain Flower client's reply passes.

    Returns
    -------
    MetricShape
        The metrics' keys and list lengths, to compare replies of one round.

    Raises
    ------
    PayloadError
        Naming what is wrong.
    """
    nbytes = payload_bytes(content)
    if nbytes > max_bytes:
        raise PayloadError(f"payload of {nbytes} bytes exceeds the {max_bytes} limit")
    arrays = _one_record("ArrayRecord", content.array_records)
    check_arrays(content.array_records[arrays], layout)
    name = _one_record("MetricRecord", content.metric_records)
    metrics = content.metric_records[name]
    shape: list[tuple[str, int | None]] = []
    for key in sorted(metrics.keys()):
        value = metrics[key]
        if isinstance(value, list):
            if len(value) > MAX_METRIC_LIST or not all(map(_finite, value)):
                raise PayloadError(
                    f"metric '{key}' is not a list of at most {MAX_METRIC_LIST} "
                    "finite numbers"
                )
            shape.append((key, len(value)))
        elif _finite(value):
            shape.append((key, None))
        else:
            raise PayloadError(f"metric '{key}' = {value!r} is not a finite number")
    if weighted_by_key not in metrics:
        raise PayloadError(f"metric '{weighted_by_key}' (the weight) is missing")
    weight = metrics[weighted_by_key]
    top = math.inf if max_examples is None else max_examples
    if isinstance(weight, list) or not 0 < weight <= top:
        raise PayloadError(
            f"metric '{weighted_by_key}' = {weight!r} (the weight) outside (0, {top}]"
        )
    return tuple(shape)


def _odd_shapes(shapes: Sequence[MetricShape]) -> dict[int, str]:
    """Replies (by index) whose metrics differ from the round's usual shape.

    Flower's FedAvg averages metrics key by key and stops the run when replies
    disagree; the shape most replies share (on a tie, the first reply's) is
    kept, the others are named with what differs.
    """
    counts: dict[MetricShape, int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    usual = max(shapes, key=lambda s: counts[s]) if shapes else ()
    odd = {}
    for i, shape in enumerate(shapes):
        if shape != usual:
            mine, theirs = dict(shape), dict(usual)
            missing = sorted(set(theirs) - set(mine))
            unknown = sorted(set(mine) - set(theirs))
            sizes = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
            odd[i] = (
                f"metrics differ from the round's other replies: missing {missing}, "
                f"unknown {unknown}, other list lengths {sizes}"
            )
    return odd


def missing_replies(asked: Iterable[int], replies: Sequence[Message]) -> dict[int, str]:
    """The nodes ``asked`` this round without a proper reply, each with why.

    A node is missing when it sent an error reply or none at all (the round's
    timeout passed). An error the SuperLink made for a node (e.g. "Node
    Unavailable" once a killed SuperNode missed its heartbeats) carries the
    SuperLink's own node id, not the node's: nodes without a reply of their
    own get the reasons of such errors, else the timeout.
    """
    asked = set(asked)
    answered = {m.metadata.src_node_id for m in replies if not m.has_error()}
    own = {
        m.metadata.src_node_id: m.error.reason
        for m in replies
        if m.has_error() and m.metadata.src_node_id in asked
    }
    relayed = sorted(
        {
            m.error.reason
            for m in replies
            if m.has_error() and m.metadata.src_node_id not in asked
        }
    )
    missing = {}
    for node in sorted(asked - answered):
        if node in own:
            missing[node] = f"error reply: {own[node]}"
        elif relayed:
            missing[node] = f"error reply: {' / '.join(relayed)}"
        else:
            missing[node] = "no reply within the round's timeout"
    return missing


class ReplyChecks:
    """Mixin for Flower's FedAvg family: drop malformed replies before averaging.

    FedAvg would average a NaN, a wrong shape or an inflated example count
    straight into the global model, and replies whose metrics disagree stop the
    run (``InconsistentMessageReplies``). This mixin checks each reply
    (:func:`check_reply`) against the arrays sent that round, keeps the replies
    whose metrics have the round's usual keys, reports each rejection with its
    reason through ``on_reject``, and hands only the good replies to the
    strategy's own ``aggregate_train``. The strategy's ``weighted_by_key`` is the
    weight checked; record names are not (Flower takes the one ArrayRecord and
    the one MetricRecord of a reply, whatever their names). Put it first in the
    bases: ``class CheckedFedAvg(ReplyChecks, FedAvg)``.

    Parameters
    ----------
    on_reject : callable, optional
        ``(server_round, node_id, reason) -> None`` (default: a warning in
        Flower's log).
    max_examples : float, optional
        Largest credible weight (the training set's size; default: no bound).
    on_dropout : callable, optional
        ``(server_round, node_id, reason) -> None`` for each node sent a
        train message that answered with an error or not at all
        (:func:`missing_replies`).
    **kwargs
        Passed to the Flower strategy.
    """

    weighted_by_key: str

    def __init__(
        self,
        *,
        on_reject: Callable[[int, int, str], None] | None = None,
        max_examples: float | None = None,
        on_dropout: Callable[[int, int, str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.on_reject = on_reject or log_rejection
        self.on_dropout = on_dropout
        self.max_examples = max_examples
        self._layout: dict[str, tuple[tuple[int, ...], str]] | None = None
        self._max_bytes = 0
        self._asked: list[int] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember what was sent and to whom, to check the replies against it."""
        self.expect(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._asked = [m.metadata.dst_node_id for m in messages]
        return messages

    def expect(self, arrays: ArrayRecord) -> None:
        """Check this round's replies against ``arrays`` (the model sent)."""
        self._layout = layout_of(arrays)
        # a reply holds the model plus small records: allow 2x plus 64 KiB
        self._max_bytes = 2 * payload_bytes(RecordDict({KEY_ARRAYS: arrays})) + 65536

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies that pass :func:`check_reply` and agree."""
        if self._layout is None:
            raise RuntimeError(
                "aggregate_train before configure_train (or expect): "
                "there is no model to check the replies against"
            )
        replies = list(replies)
        if self.on_dropout is not None:
            for node, why in missing_replies(self._asked, replies).items():
                self.on_dropout(server_round, node, why)
        stop_if_all_failed(server_round, self._asked, app_errors(self._asked, replies))
        good, checked, shapes = [], [], []
        for msg in replies:
            if msg.has_error():
                good.append(msg)  # FedAvg counts and logs failures itself
                continue
            try:
                shape = check_reply(
                    msg.content,
                    self._layout,
                    self.max_examples,
                    self._max_bytes,
                    self.weighted_by_key,
                )
            except PayloadError as err:
                self.on_reject(server_round, msg.metadata.src_node_id, str(err))
                continue
            checked.append(msg)
            shapes.append(shape)
        odd = _odd_shapes(shapes)
        for i, msg in enumerate(checked):
            if i in odd:
                self.on_reject(server_round, msg.metadata.src_node_id, odd[i])
            else:
                good.append(msg)
        return super().aggregate_train(server_round, good)  # type: ignore[misc]


def log_rejection(server_round: int, node_id: int, reason: str) -> None:
    """The default ``on_reject``: a warning in Flower's log."""
    log(
        WARNING,
        "round %s: rejected reply from node %s: %s",
        server_round,
        node_id,
        reason,
    )


class CheckedFedAvg(ReplyChecks, FedAvg):
    """Flower's :class:`~flwr.serverapp.strategy.FedAvg` with reply checks."""


class CheckedFedAvgM(ReplyChecks, FedAvgM):
    """Flower's :class:`~flwr.serverapp.strategy.FedAvgM` with reply checks."""


class CheckedFedAdam(ReplyChecks, FedAdam):
    """Flower's :class:`~flwr.serverapp.strategy.FedAdam` (Reddi et al., 2021,
    "Adaptive Federated Optimization", Algorithm 2) with reply checks; its
    moments ``m_t`` and ``v_t`` go into checkpoints, and the model it makes
    keeps the model's dtypes (FedAdam's float64 step size would make a
    float32 model float64, which every node would refuse)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAdam's step, in the current model's dtypes."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.current_arrays is None:
            return arrays, metrics
        dtypes = {k: v.dtype for k, v in self.current_arrays.items()}
        cast = {k: Array(a.numpy().astype(dtypes[k])) for k, a in arrays.items()}
        return ArrayRecord(cast), metrics

    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``m/<key>`` and ``v/<key>`` arrays (none before the first round)."""
        arrays: dict[str, np.ndarray] = {}
        for name, moments in (("m", self.m_t), ("v", self.v_t)):
            for key, value in (moments or {}).items():
                arrays[f"{name}/{key}"] = np.asarray(value)
        return arrays, {}

    def restore_state(
        self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]
    ) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        moments: dict[str, dict[str, np.ndarray]] = {"m": {}, "v": {}}
        for key, value in arrays.items():
            name, _, rest = key.partition("/")
            if name in moments:
                moments[name][rest] = np.array(value)
        self.m_t = moments["m"] or None
        self.v_t = moments["v"] or None


def _checkpoint(
    srv: ServerRun, arrays: ArrayRecord, server_round: int, fedavg: Any
) -> None:
    """Save the global model, the round, the RNGs and the strategy's own state.

    The strategy's state is FedAvgM's momentum (if any) and, for a strategy
    with ``checkpoint_state()`` (ACE-Sync and its baselines), its arrays
    under ``__strategy__/`` and its counters under ``"strategy"``.
    """
    state = {k: v.numpy() for k, v in arrays.items()}
    momentum = getattr(fedavg, "momentum_vector", None) or []
    state.update({f"__momentum__/{i}": np.asarray(m) for i, m in enumerate(momentum)})
    state[_TORCH_RNG] = torch.get_rng_state().numpy()
    version, internal, gauss = random.getstate()
    counters: dict[str, Any] = {
        "round": server_round,
        "python-random": [version, list(internal), gauss],
    }
    if hasattr(fedavg, "checkpoint_state"):
        extra, counters["strategy"] = fedavg.checkpoint_state()
        state.update({f"{_STRATEGY}{k}": v for k, v in extra.items()})
    srv.save_checkpoint(state, counters)


@dataclass(frozen=True)
class _Resumed:
    """A checkpoint taken apart: what :func:`run` restores."""

    round: int
    model: dict[str, torch.Tensor]
    momentum: list[np.ndarray] | None
    strategy_arrays: dict[str, np.ndarray]
    state: dict[str, Any]
    torch_rng: np.ndarray | None

    def restore(self, fedavg: Any) -> None:
        """Put the strategy's state and the RNGs back."""
        if self.torch_rng is not None:
            torch.set_rng_state(torch.from_numpy(self.torch_rng.astype(np.uint8)))
        if self.momentum is not None and hasattr(fedavg, "momentum_vector"):
            fedavg.momentum_vector = self.momentum  # FedAvgM's server momentum
        if hasattr(fedavg, "restore_state") and "strategy" in self.state:
            fedavg.restore_state(self.strategy_arrays, self.state["strategy"])
        if "python-random" in self.state:
            version, internal, gauss = self.state["python-random"]
            random.setstate((version, tuple(internal), gauss))


def _resume(srv: ServerRun, model: torch.nn.Module) -> _Resumed | None:
    """The checkpoint named by ``resume``, checked against the model."""
    checkpoint = srv.resumed()
    if checkpoint is None:
        return None
    arrays, state = checkpoint
    momentum = [
        arrays.pop(k)
        for k in sorted(
            (k for k in arrays if k.startswith("__momentum__/")),
            key=lambda k: int(k.split("/")[1]),
        )
    ]
    strategy_arrays = {
        k[len(_STRATEGY) :]: arrays.pop(k)
        for k in [k for k in arrays if k.startswith(_STRATEGY)]
    }
    rng = arrays.pop(_TORCH_RNG, None)
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    try:
        check_arrays(record, layout_of(ArrayRecord(model.cpu().state_dict())))
    except PayloadError as err:
        raise srv.resume_mismatch(err) from None
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    return _Resumed(
        int(state["round"]), tensors, momentum or None, strategy_arrays, state, rng
    )


def build_fedavg(
    run: ServerRun,
    train_sink: dict,
    eval_sink: dict,
    strategy: Callable[..., Strategy] = CheckedFedAvg,
    **extra: Any,
) -> Strategy:
    """A checked Flower FedAvg-family strategy configured from the run config."""
    cfg = run.cfg
    return strategy(  # type: ignore[call-arg]
        **extra,
        on_reject=run.reject,
        on_dropout=run.dropout,
        max_examples=len(run.data().train),
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_nodes,
        train_metrics_aggr_fn=_capturing(train_sink),
        evaluate_metrics_aggr_fn=_capturing(eval_sink),
    )


def run(
    srv: ServerRun,
    strategy: Callable[..., Strategy] = CheckedFedAvg,
    local_steps: int | None = None,
    on_finish: Callable[[ArrayRecord], Mapping[str, object]] | None = None,
    **extra: Any,
) -> None:
    """Run FedAvg for ``num-server-rounds`` rounds with server-side evaluation.

    ``strategy`` and ``extra`` pick another member of Flower's FedAvg family
    (e.g. :class:`CheckedFedAvgM` with ``server_momentum``), or any callable
    taking :func:`build_fedavg`'s keyword arguments and returning a strategy
    (e.g. a wrapper around one); ``local_steps`` overrides ``local-steps`` in
    every round's train config. ``on_finish`` is called with the final arrays
    after the last round; the entries it returns are added to the summary.
    """
    cfg = srv.cfg
    steps = cfg.train.local_steps if local_steps is None else local_steps
    test = srv.data().test
    device = srv.device
    model = srv.build_model().to(device)
    train_metrics: dict[str, float] = {}
    client_eval: dict[str, float] = {}
    history: list[float] = []
    history_ppl: list[float] = []

    resumed = _resume(srv, model)
    offset = 0 if resumed is None else resumed.round
    if offset >= cfg.num_server_rounds:
        raise ConfigError(
            "resume",
            cfg.resume,
            f"the checkpoint is at round {offset}; num-server-rounds must exceed it",
        )
    fedavg: FedAvg | None = None

    def evaluate_global(flower_round: int, arrays: ArrayRecord) -> MetricRecord:
        # FedAvg calls this right after aggregating: the time since the last
        # reply arrived is the cloud's aggregation time for the round.
        server_round = flower_round + offset  # rounds count on across a resume
        last_reply = srv.ledger.last_up_at
        cloud_seconds = 0.0 if last_reply is None else time.perf_counter() - last_reply
        model.load_state_dict(arrays.to_torch_state_dict())
        stats = evaluate(model, test, device)
        history.append(stats.accuracy)
        history_ppl.append(stats.perplexity)
        metrics: dict[str, float] = stats.as_metrics()
        if server_round > 0:
            metrics["cloud-seconds"] = cloud_seconds
            metrics.update(train_metrics)
            metrics.update({f"client-{k}": v for k, v in client_eval.items()})
        srv.report_round(server_round, metrics)
        srv.ledger.current_round = server_round + 1
        every = cfg.checkpoint_every
        if flower_round > 0 and every and server_round % every == 0:
            _checkpoint(srv, arrays, server_round, fedavg)
        return MetricRecord({"eval-loss": stats.loss, "eval-accuracy": stats.accuracy})

    fedavg = build_fedavg(srv, train_metrics, client_eval, strategy, **extra)
    if resumed is not None:
        model.load_state_dict(resumed.model)
        resumed.restore(fedavg)
    initial = ArrayRecord(model.cpu().state_dict())
    model.to(device)
    srv.ledger.current_round = offset
    result = fedavg.start(
        grid=srv.grid,
        initial_arrays=initial,
        train_config=ConfigRecord({KEY_LOCAL_STEPS: steps}),
        num_rounds=cfg.num_server_rounds - offset,
        evaluate_fn=evaluate_global,
        timeout=cfg.reply_timeout,
    )
    torch.save(result.arrays.to_torch_state_dict(), srv.tracker.run_dir / "model.pt")
    more = dict(on_finish(result.arrays)) if on_finish is not None else {}
    srv.tracker.finish(
        {
            "method": cfg.method,
            "rounds": cfg.num_server_rounds,
            "local-steps": steps,
            "steps-per-edge": steps * cfg.num_server_rounds,
            "final-accuracy": history[-1],
            "best-accuracy": max(history),
            "final-perplexity": history_ppl[-1],
            "bytes-up": srv.cumulative_bytes["bytes-up"],
            "bytes-down": srv.cumulative_bytes["bytes-down"],
            "rejected-replies": srv.rejected(),
            "dropouts": srv.dropouts(),
            "resumed-from-round": offset,
            **more,
        }
    )
