"""Centralized baseline, cloud side: collect the raw data once, train in the cloud.

The accuracy ceiling of the split-training comparison (seeds 000-003: raw
data to the cloud, cloud trains). Every edge uploads its training partition
once (``query.upload``, counted in bytes); the cloud checks each upload, joins
them and trains the whole model with the shared training loop
(:func:`tandem.training.train_steps`): per round, ``local-steps`` × (number
of edges) SGD steps of ``batch-size`` samples, i.e. as many samples per round
as the edges of a split or federated run process together. The test
accuracy is reported after every round; the cloud's compute time per round
(``cloud-seconds``) feeds the emulated timeline.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from tandem.datasets import ArraySplit
from tandem.protocol.centralized import KEY_DATA, MESSAGE_TYPE
from tandem.server_context import ServerRun
from tandem.training import BatchStream, evaluate, make_optimizer, train_steps
from tandem.wire import KEY_NODE, PayloadError, get_record, read_array

__all__ = ["check_upload", "run"]


def check_upload(
    content: RecordDict,
    input_shape: tuple[int, ...],
    num_classes: int,
    max_rows: int,
    tokens: bool = False,
) -> ArraySplit:
    """Validate one raw-data upload; return it as an :class:`ArraySplit`.

    ``x`` is float32 ``(n, *input_shape)`` and ``y`` int64 ``(n,)``; with
    ``tokens``, ``x`` holds token ids ``(n, T)`` in ``[0, num_classes)`` and
    ``y`` the next token of each position, of the same shape, both int64 or
    both uint8 (byte tokens), returned as int64.

    Raises
    ------
    PayloadError
        On missing or unknown arrays, wrong dtypes or shapes, NaN/Inf, labels
        outside ``[0, num_classes)``, or more rows than the dataset has.
    """
    record = get_record(content, KEY_DATA, ArrayRecord)
    if set(record) != {"x", "y"}:  # type: ignore[arg-type]
        raise PayloadError(f"upload arrays {sorted(record)}, expected x, y")  # type: ignore[arg-type]
    x, y = record["x"], record["y"]  # type: ignore[index]
    if tokens:
        ok = x.dtype == y.dtype and x.dtype in ("int64", "uint8")
    else:
        ok = x.dtype == "float32" and y.dtype == "int64"
    if not ok:
        raise PayloadError(f"upload dtypes x={x.dtype} y={y.dtype}")
    rows = x.shape[0] if x.shape else 0
    label_shape = (rows, *input_shape) if tokens else (rows,)
    if tuple(x.shape[1:]) != tuple(input_shape) or tuple(y.shape) != label_shape:
        labels = f"(n, {', '.join(map(str, input_shape))})" if tokens else "(n,)"
        raise PayloadError(
            f"upload shapes x={tuple(x.shape)} y={tuple(y.shape)}, expected "
            f"(n, {', '.join(map(str, input_shape))}) and {labels}"
        )
    if not 1 <= rows <= max_rows:
        raise PayloadError(f"upload of {rows} rows outside [1, {max_rows}]")
    xs, ys = read_array(x, "x"), read_array(y, "y")  # bytes as declared
    if tokens:
        xs, ys = xs.astype(np.int64), ys.astype(np.int64)
    if not np.isfinite(xs).all():
        raise PayloadError("upload holds NaN or Inf")
    if ys.min() < 0 or ys.max() >= num_classes:
        raise PayloadError(f"labels outside [0, {num_classes})")
    if tokens and (xs.min() < 0 or xs.max() >= num_classes):
        raise PayloadError(f"token ids outside [0, {num_classes})")
    return ArraySplit(np.ascontiguousarray(xs), np.ascontiguousarray(ys))


def run(srv: ServerRun) -> None:
    """Collect every edge's data, then train ``num-server-rounds`` rounds."""
    cfg = srv.cfg
    data = srv.data()
    device = srv.device
    nodes = srv.wait_for_nodes()
    srv.ledger.current_round = 1
    messages = [
        Message(content=RecordDict(), dst_node_id=n, message_type=MESSAGE_TYPE)
        for n in nodes
    ]
    parts = []
    for reply in srv.grid.send_and_receive(messages):
        node = reply.metadata.src_node_id
        if reply.has_error():
            srv.reject(1, node, f"error: {reply.error.reason}")
            continue
        try:
            part = check_upload(
                reply.content,
                data.input_shape,
                data.num_classes,
                len(data.train),
                tokens=data.tokens,
            )
        except PayloadError as err:
            srv.reject(1, node, str(err))
        else:
            parts.append((_partition_id(reply.content, node), part))
    if not parts:
        raise RuntimeError("no edge uploaded usable data")
    # pool in partition order, whatever order the replies came in, so that a
    # seed gives the same run
    ordered = [part for _, part in sorted(parts, key=lambda item: item[0])]
    pooled = ArraySplit(
        np.concatenate([p.x for p in ordered]), np.concatenate([p.y for p in ordered])
    )
    model = srv.build_model().to(device)
    optimizer = make_optimizer(
        model, cfg.train.lr, cfg.train.momentum, cfg.train.optimizer
    )
    stream = BatchStream(pooled, cfg.train.batch_size, cfg.seed)
    steps = cfg.train.local_steps * len(parts)
    history = []
    perplexity = float("nan")
    srv.report_round(0, _eval(model, data.test, device))
    for rnd in range(1, cfg.num_server_rounds + 1):
        srv.ledger.current_round = rnd
        tick = time.perf_counter()
        stats = train_steps(model, iter(stream), steps, optimizer, device)
        metrics = _eval(model, data.test, device)
        metrics.update(
            {"train-loss": stats.mean_loss, "cloud-seconds": time.perf_counter() - tick}
        )
        history.append(metrics["eval-accuracy"])
        perplexity = metrics["eval-perplexity"]
        srv.report_round(rnd, metrics)
    torch.save(model.cpu().state_dict(), srv.tracker.run_dir / "model.pt")
    srv.tracker.finish(
        {
            "method": cfg.method,
            "rounds": cfg.num_server_rounds,
            "local-steps": cfg.train.local_steps,
            "steps-per-edge": cfg.train.local_steps * cfg.num_server_rounds,
            "edges": len(parts),
            "final-accuracy": history[-1],
            "best-accuracy": max(history),
            "final-perplexity": perplexity,
            "bytes-up": srv.cumulative_bytes["bytes-up"],
            "bytes-down": srv.cumulative_bytes["bytes-down"],
            "rejected-replies": srv.rejected(),
        }
    )


def _partition_id(content: RecordDict, node_id: int) -> int:
    """The partition a reply says it holds (its node id if it does not say)."""
    record = content.config_records.get(KEY_NODE)
    value = None if record is None else record.get("partition-id")
    return value if isinstance(value, int) else node_id


def _eval(model: torch.nn.Module, test: ArraySplit, device: torch.device) -> dict:
    stats = evaluate(model, test, device)
    return stats.as_metrics()
