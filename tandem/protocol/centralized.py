"""The centralized baseline's wire contract: one upload of a node's raw data.

The cloud sends one message of type :data:`MESSAGE_TYPE`; the node answers with
its training split in the ArrayRecord :data:`KEY_DATA`, as two arrays, ``x``
(float32 samples) and ``y`` (int64 labels); byte tokens as ``uint8`` ``x``
and ``y`` of shape ``(n, T)`` (the next token of each position).
"""

from __future__ import annotations

__all__ = ["KEY_DATA", "MESSAGE_TYPE"]

#: Message type of the one request the cloud sends each node.
MESSAGE_TYPE = "query.upload"
#: Record of the reply holding the node's training split (``x``, ``y``).
KEY_DATA = "data"
