"""Centralized baseline, edge side: hand the raw training data to the cloud once.

One handler, message type ``query.upload``: the reply carries this node's
training partition as two arrays, ``x`` (float32 samples) and ``y`` (int64
labels), so the upload is counted at its real serialized size. Byte tokens
(ids below 256) travel as ``uint8`` ``x`` and ``y`` of shape ``(n, T)``: the
raw text's size twice over, not eight times that in int64.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from tandem.accounting import KEY_COMPUTE_SECONDS
from tandem.clients.node import NodeConfig, load_node_split, node_record
from tandem.config import RunConfig
from tandem.protocol.centralized import KEY_DATA, MESSAGE_TYPE
from tandem.wire import KEY_METRICS, KEY_NODE

__all__ = ["HANDLERS"]


def upload_handler(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Reply with this node's training split."""
    node = NodeConfig.from_node_config(context.node_config)
    split = load_node_split(cfg, node, "train")
    x, y = split.x, split.y
    if split.tokens and len(y) and max(int(x.max()), int(y.max())) < 256:
        x, y = x.astype(np.uint8), y.astype(np.uint8)
    reply = RecordDict(
        {
            KEY_DATA: ArrayRecord({"x": Array(x), "y": Array(y)}),
            KEY_METRICS: MetricRecord({KEY_COMPUTE_SECONDS: 0.0}),
            KEY_NODE: node_record(node),
        }
    )
    return Message(content=reply, reply_to=msg)


HANDLERS = {MESSAGE_TYPE: upload_handler}
