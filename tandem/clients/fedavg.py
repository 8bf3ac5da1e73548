"""FedAvg, edge side: K local SGD steps from the received global model.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017 (https://arxiv.org/abs/1602.05629), Alg. 1
``ClientUpdate``: start from the global weights, run K local steps, return the
new weights and the number of examples (the aggregation weight ``n_k``).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from tandem.accounting import KEY_COMPUTE_SECONDS
from tandem.clients.node import (
    KEY_NODE,
    NodeConfig,
    load_node_split,
    node_record,
    restore_stream,
    save_stream,
)
from tandem.config import RunConfig
from tandem.datasets import load_dataset
from tandem.models import build_model, resolve_device
from tandem.training import capped_steps, evaluate, make_optimizer, train_steps
from tandem.wire import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_LOCAL_STEPS,
    KEY_METRICS,
    PayloadError,
    arrays_to_state_dict,
    get_record,
)

__all__ = ["HANDLERS", "evaluate_handler", "train_handler"]


def _model_from(msg: Message, cfg: RunConfig) -> nn.Module:
    bundle = load_dataset(cfg.data)
    model = build_model(
        cfg.train.model,
        bundle.input_shape,
        bundle.num_classes,
        cfg.seed,
        tokens=bundle.tokens,
    )
    record = get_record(msg.content, KEY_ARRAYS, ArrayRecord)
    model.load_state_dict(arrays_to_state_dict(record, model))
    return model


def _local_steps(msg: Message, cfg: RunConfig) -> int:
    """``local-steps`` of this round's train config, else of the run config."""
    conf = msg.content.config_records.get(KEY_CONFIG)
    if conf is None or KEY_LOCAL_STEPS not in conf:
        return cfg.train.local_steps
    steps = conf[KEY_LOCAL_STEPS]
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 10**6:
        raise PayloadError(f"train config '{KEY_LOCAL_STEPS}' = {steps!r}")
    return steps


def train_handler(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train the received model for ``local-steps`` steps on this node's data."""
    node = NodeConfig.from_node_config(context.node_config)
    split = load_node_split(cfg, node, "train")
    device = resolve_device(cfg.train.edge_device, "edge-device")
    model = _model_from(msg, cfg).to(device)
    stream = restore_stream(
        context, split, cfg.train.batch_size, node.stream_seed(cfg.seed)
    )
    # SyncSGD's step is a plain gradient step: its optimizer is the cloud's
    kind = "sgd" if cfg.method == "syncsgd" else cfg.train.optimizer
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.momentum, kind)
    t = cfg.train
    steps = capped_steps(
        _local_steps(msg, cfg), t.local_epochs, len(split), t.batch_size
    )
    stats = train_steps(model, iter(stream), steps, optimizer, device)
    save_stream(context, stream)
    reply = RecordDict(
        {
            KEY_ARRAYS: ArrayRecord(model.cpu().state_dict()),
            KEY_METRICS: MetricRecord(
                {
                    "train-loss": stats.mean_loss,
                    "num-examples": len(split),
                    "train-seconds": stats.seconds,
                    KEY_COMPUTE_SECONDS: stats.compute_seconds,
                    "steps": stats.steps,
                }
            ),
            KEY_NODE: node_record(node),
        }
    )
    return Message(content=reply, reply_to=msg)


def evaluate_handler(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Evaluate the received model on this node's share of the test split."""
    node = NodeConfig.from_node_config(context.node_config)
    split = load_node_split(cfg, node, "test")
    device = resolve_device(cfg.train.edge_device, "edge-device")
    model = _model_from(msg, cfg).to(device)
    stats = evaluate(model, split, device)
    reply = RecordDict(
        {
            KEY_METRICS: MetricRecord(
                {
                    "eval-loss": stats.loss,
                    "eval-accuracy": stats.accuracy,
                    "num-examples": stats.num_examples,
                }
            )
        }
    )
    return Message(content=reply, reply_to=msg)


HANDLERS = {"train": train_handler, "evaluate": evaluate_handler}
