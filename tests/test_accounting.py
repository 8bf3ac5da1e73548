"""Byte accounting against Flower's own serialization."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from tandem.accounting import ByteLedger, MeteredGrid, payload_bytes


def _record(n: int) -> RecordDict:
    return RecordDict(
        {"arrays": ArrayRecord({"w": Array(np.arange(n, dtype=np.float32))})}
    )


def test_payload_grows_by_exactly_the_array_bytes():
    # 1,000 more float32 values are 4,000 more bytes on the wire, exactly;
    # the rest is Flower's fixed framing (npy header, object ids, keys).
    assert payload_bytes(_record(2000)) - payload_bytes(_record(1000)) == 4000
    overhead = payload_bytes(_record(1000)) - 4000
    assert 128 <= overhead < 1024


def test_payload_is_the_sum_of_flowers_deflated_objects():
    record = _record(1000)
    arr_rec = record["arrays"]
    array = arr_rec["w"]
    chunks = list(array.children.values())
    expected = (
        len(record.deflate())
        + len(arr_rec.deflate())
        + len(array.deflate())
        + sum(len(c.deflate()) for c in chunks)
    )
    assert payload_bytes(record) == expected
    # the chunk holds the .npy bytes: a 128-byte header + the raw float32 data
    assert sum(len(c.data) for c in chunks) == 128 + 4000


def test_config_only_payload_is_small():
    small = RecordDict({"config": ConfigRecord({"server-round": 1})})
    assert 0 < payload_bytes(small) < 512


class EchoGrid(Grid):
    """A Grid whose nodes reply with a fixed-size payload."""

    def __init__(self, reply_size: int) -> None:
        self.reply_size = reply_size
        self.pending: dict[str, Message] = {}

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(
            content=content, message_type=message_type, dst_node_id=dst_node_id
        )

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.pending) + i}"
            ids.append(msg.metadata.message_id)
            self.pending[msg.metadata.message_id] = msg
        return ids

    def pull_messages(self, message_ids):
        out = []
        for mid in message_ids:
            msg = self.pending.pop(mid)
            content = _record(self.reply_size)
            content["metrics"] = MetricRecord({"compute-seconds": 0.5})
            content["node"] = ConfigRecord({"link": "4g"})
            reply = Message(content, reply_to=msg)
            out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


class LastFirstGrid(EchoGrid):
    """Replies pulled one per call, the last node's first."""

    def get_node_ids(self):
        return [1, 2, 3]

    def pull_messages(self, message_ids):
        return super().pull_messages(sorted(message_ids)[-1:])


@pytest.fixture
def task_identity(monkeypatch):
    """Messages built outside a Flower process need a task identity."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_metered_grid_records_both_directions_per_node_and_round(task_identity):
    ledger = ByteLedger()
    grid = MeteredGrid(EchoGrid(reply_size=500), ledger)
    down = [Message(_record(1000), dst_node_id=n, message_type="train") for n in (1, 2)]
    ledger.current_round = 3
    replies = list(grid.send_and_receive(down))
    assert len(replies) == 2
    totals = ledger.totals(3)
    assert totals["messages-down"] == 2 and totals["messages-up"] == 2
    assert totals["bytes-down"] == 2 * payload_bytes(_record(1000))
    reply = _record(500)
    reply["metrics"] = MetricRecord({"compute-seconds": 0.5})
    reply["node"] = ConfigRecord({"link": "4g"})
    assert totals["bytes-up"] == 2 * payload_bytes(reply)
    per_node = ledger.per_node(3)
    assert set(per_node) == {1, 2}
    assert per_node[1]["bytes-down"] == payload_bytes(_record(1000))
    assert per_node[1]["edge-seconds"] == 0.5  # the compute the reply reported
    assert per_node[1]["link"] == "4g"  # the link the node declared
    assert ledger.totals(4)["bytes-up"] == 0


def test_replies_come_back_in_node_order_whatever_order_they_arrive_in(
    task_identity, monkeypatch
):
    import tandem.accounting as accounting

    monkeypatch.setattr(accounting, "POLL_SECONDS", 0.0)
    grid = MeteredGrid(LastFirstGrid(reply_size=10), ByteLedger())
    inner = grid.inner
    arrived = []
    pull = inner.pull_messages
    inner.pull_messages = lambda ids: arrived.extend(got := pull(ids)) or got
    down = [
        Message(_record(10), dst_node_id=n, message_type="train") for n in (2, 3, 1)
    ]
    replies = list(grid.send_and_receive(down))
    assert [m.metadata.src_node_id for m in arrived] == [1, 3, 2]  # m2, m1, m0
    assert [m.metadata.src_node_id for m in replies] == [1, 2, 3]
