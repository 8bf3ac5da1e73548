"""FedAvg, cloud side: Flower's own ``FedAvg`` strategy, instrumented.

The aggregation is :class:`flwr.serverapp.strategy.FedAvg` itself
(McMahan et al. 2017, https://arxiv.org/abs/1602.05629): the new global model
is the example-weighted mean ``θ ← Σ_k (n_k / n) θ_k`` of the replies. tandem
adds nothing to the maths; it only plugs into FedAvg's seams:

- ``evaluate_fn``: server-side evaluation of the global model on the test
  split after every round (and before the first), which also closes the
  round's report (accuracy, loss, bytes from the metered Grid);
- ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``: Flower's default
  weighted averages, whose results are kept for that report.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from tandem.server_context import ServerRun
from tandem.training import evaluate

__all__ = ["build_fedavg", "run"]


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


def build_fedavg(run: ServerRun, train_sink: dict, eval_sink: dict) -> FedAvg:
    """Flower's FedAvg configured from the run config."""
    cfg = run.cfg
    return FedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_nodes,
        train_metrics_aggr_fn=_capturing(train_sink),
        evaluate_metrics_aggr_fn=_capturing(eval_sink),
    )


def run(srv: ServerRun) -> None:
    """Run FedAvg for ``num-server-rounds`` rounds with server-side evaluation."""
    cfg = srv.cfg
    test = srv.data().test
    device = srv.device
    model = srv.build_model().to(device)
    train_metrics: dict[str, float] = {}
    client_eval: dict[str, float] = {}
    history: list[float] = []

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        # FedAvg calls this right after aggregating: the time since the last
        # reply arrived is the cloud's aggregation time for the round.
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
        return MetricRecord({"eval-loss": stats.loss, "eval-accuracy": stats.accuracy})

    strategy = build_fedavg(srv, train_metrics, client_eval)
    initial = ArrayRecord(model.cpu().state_dict())
    model.to(device)
    srv.ledger.current_round = 0
    result = strategy.start(
        grid=srv.grid,
        initial_arrays=initial,
        num_rounds=cfg.num_server_rounds,
        evaluate_fn=evaluate_global,
    )
    torch.save(result.arrays.to_torch_state_dict(), srv.tracker.run_dir / "model.pt")
    srv.tracker.finish(
        {
            "method": cfg.method,
            "rounds": cfg.num_server_rounds,
            "final-accuracy": history[-1],
            "best-accuracy": max(history),
            "bytes-up": srv.cumulative_bytes["bytes-up"],
            "bytes-down": srv.cumulative_bytes["bytes-down"],
        }
    )
