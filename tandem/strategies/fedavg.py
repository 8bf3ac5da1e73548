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
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from tandem.accounting import KEY_COMPUTE_SECONDS, payload_bytes
from tandem.checkpoint import resume_from, save_checkpoint
from tandem.config import ConfigError
from tandem.failures import app_errors, stop_if_all_failed
from tandem.server_context import ServerRun
from tandem.training import evaluate
from tandem.wire import (
    KEY_ARRAYS,
    KEY_LOCAL_STEPS,
    KEY_METRICS,
    KEY_NODE,
    PayloadError,
    check_arrays,
    get_record,
    layout_of,
)

__all__ = [
    "CheckedFedAvg",
    "CheckedFedAvgM",
    "ReplyChecks",
    "build_fedavg",
    "check_reply",
    "missing_replies",
    "run",
]


def _capturing(
    sink: dict[str, float],
) -> Callable[[list[RecordDict], str], MetricRecord]:
    """Flower's weighted metric average that also keeps its result in ``sink``."""

    def aggregate(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        metrics = aggregate_metricrecords(records, weighting_key)
        sink.clear()
        sink.update({k: float(v) for k, v in metrics.items() if k != weighting_key})
        return metrics

    return aggregate


#: Metric keys a FedAvg reply carries (the edge handler's contract).
REPLY_METRICS = frozenset(
    {"train-loss", "num-examples", "train-seconds", KEY_COMPUTE_SECONDS, "steps"}
)
#: Records a FedAvg reply may carry.
REPLY_RECORDS = frozenset({KEY_ARRAYS, KEY_METRICS, KEY_NODE})
#: Checkpoint names of the strategy's own arrays and of torch's RNG state.
_STRATEGY = "__strategy__/"
_TORCH_RNG = "__rng__/torch"


def check_reply(
    content: RecordDict,
    layout: Mapping[str, tuple[tuple[int, ...], str]],
    max_examples: int,
    max_bytes: int,
) -> None:
    """Check one FedAvg reply before it may touch the global model.

    Raises
    ------
    PayloadError
        Naming what is wrong: unknown or missing records, an oversized
        payload, arrays that do not match the global model (keys, shapes,
        dtypes, NaN/Inf), or metrics that are missing, unknown, non-finite,
        or an example count outside ``[1, max_examples]``.
    """
    unknown = sorted(set(content.keys()) - REPLY_RECORDS)
    if unknown:
        raise PayloadError(f"unknown records {unknown}")
    nbytes = payload_bytes(content)
    if nbytes > max_bytes:
        raise PayloadError(f"payload of {nbytes} bytes exceeds the {max_bytes} limit")
    check_arrays(get_record(content, KEY_ARRAYS, ArrayRecord), layout)  # type: ignore[arg-type]
    metrics = get_record(content, KEY_METRICS, MetricRecord)
    keys = set(metrics.keys())  # type: ignore[attr-defined]
    if keys != REPLY_METRICS:
        raise PayloadError(
            f"metric keys differ: missing {sorted(REPLY_METRICS - keys)}, "
            f"unknown {sorted(keys - REPLY_METRICS)}"
        )
    for key in sorted(keys):
        value = metrics[key]  # type: ignore[index]
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise PayloadError(f"metric '{key}' = {value!r} is not a finite number")
    examples = metrics["num-examples"]  # type: ignore[index]
    if not 1 <= examples <= max_examples:
        raise PayloadError(
            f"metric 'num-examples' = {examples} outside [1, {max_examples}]"
        )


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
    straight into the global model, and one reply with odd metric keys makes
    it skip the whole round. This subclass checks each reply
    (:func:`check_reply`) against the arrays it sent that round, reports each
    rejection with its reason through ``on_reject``, and hands only the good
    replies to the strategy's own ``aggregate_train``. Put it first in the
    bases: ``class CheckedFedAvg(ReplyChecks, FedAvg)``.

    Parameters
    ----------
    on_reject : callable
        ``(server_round, node_id, reason) -> None``.
    max_examples : int
        Largest credible ``num-examples`` (the training set's size).
    on_dropout : callable, optional
        ``(server_round, node_id, reason) -> None`` for each node sent a
        train message that answered with an error or not at all
        (:func:`missing_replies`).
    **kwargs
        Passed to the Flower strategy.
    """

    def __init__(
        self,
        *,
        on_reject: Callable[[int, int, str], None],
        max_examples: int,
        on_dropout: Callable[[int, int, str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.on_reject = on_reject
        self.on_dropout = on_dropout
        self.max_examples = max_examples
        self._layout: dict[str, tuple[tuple[int, ...], str]] = {}
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
        """Aggregate the replies that pass :func:`check_reply`."""
        replies = list(replies)
        if self.on_dropout is not None:
            for node, why in missing_replies(self._asked, replies).items():
                self.on_dropout(server_round, node, why)
        stop_if_all_failed(server_round, self._asked, app_errors(self._asked, replies))
        good = []
        for msg in replies:
            if msg.has_error():
                good.append(msg)  # FedAvg counts and logs failures itself
                continue
            try:
                check_reply(
                    msg.content, self._layout, self.max_examples, self._max_bytes
                )
            except PayloadError as err:
                self.on_reject(server_round, msg.metadata.src_node_id, str(err))
                continue
            good.append(msg)
        return super().aggregate_train(server_round, good)  # type: ignore[misc]


class CheckedFedAvg(ReplyChecks, FedAvg):
    """Flower's :class:`~flwr.serverapp.strategy.FedAvg` with reply checks."""


class CheckedFedAvgM(ReplyChecks, FedAvgM):
    """Flower's :class:`~flwr.serverapp.strategy.FedAvgM` with reply checks."""


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
        "method": srv.cfg.method,
        "round": server_round,
        "seed": srv.cfg.seed,
        "python-random": [version, list(internal), gauss],
    }
    if hasattr(fedavg, "checkpoint_state"):
        extra, counters["strategy"] = fedavg.checkpoint_state()
        state.update({f"{_STRATEGY}{k}": v for k, v in extra.items()})
    save_checkpoint(srv.tracker.run_dir / "checkpoint.npz", state, counters)


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
    if not srv.cfg.resume:
        return None
    arrays, state = resume_from(srv.cfg.resume, srv.cfg.method)
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
        raise ConfigError(
            "resume", srv.cfg.resume, f"does not fit the model: {err}"
        ) from None
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
        metrics: dict[str, float] = {
            "eval-loss": stats.loss,
            "eval-accuracy": stats.accuracy,
        }
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
            "bytes-up": srv.cumulative_bytes["bytes-up"],
            "bytes-down": srv.cumulative_bytes["bytes-down"],
            "rejected-replies": srv.rejected(),
            "dropouts": srv.dropouts(),
            "resumed-from-round": offset,
            **more,
        }
    )
