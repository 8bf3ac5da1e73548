"""FedAvg's edge handler, called directly with a node Context."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from tandem.client_app import dispatch
from tandem.clients.node import STREAM_STATE_KEY, NodeConfig
from tandem.config import ConfigError
from tandem.models import build_model
from tandem.wire import PayloadError

RUN_CONFIG = {"mnist1d-samples": 1000, "local-steps": 5, "batch-size": 16}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _context(node_config=None) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config=node_config or {"partition-id": 1, "num-partitions": 4},
        state=RecordDict(),
        run_config=dict(RUN_CONFIG),
    )


def _train_message(arrays: ArrayRecord, message_type: str = "train") -> Message:
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({"server-round": 1})}
    )
    return Message(content=content, dst_node_id=7, message_type=message_type)


def _global() -> ArrayRecord:
    return ArrayRecord(build_model("cnn1d", (1, 40), 10).state_dict())


def test_train_returns_new_weights_metrics_and_keeps_stream_position():
    ctx = _context()
    reply = dispatch(_train_message(_global()), ctx)
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    assert set(arrays) == set(_global())
    before = _global()["fc.bias"].numpy()
    assert not np.array_equal(arrays["fc.bias"].numpy(), before)  # it trained
    assert metrics["num-examples"] == 200  # 800 train rows / 4 nodes
    assert metrics["steps"] == 5
    assert ctx.state.config_records[STREAM_STATE_KEY]["offset"] == 80
    dispatch(_train_message(_global()), ctx)
    assert ctx.state.config_records[STREAM_STATE_KEY]["offset"] == 160


def test_evaluate_reports_accuracy_on_the_nodes_test_share():
    reply = dispatch(_train_message(_global(), "evaluate"), _context())
    metrics = reply.content["metrics"]
    assert 0.0 <= metrics["eval-accuracy"] <= 1.0
    assert metrics["num-examples"] == 50  # 200 test rows / 4 nodes


def test_bad_arrays_are_rejected_with_the_key_named():
    arrays = _global()
    arrays["fc.bias"] = Array(np.zeros(3, dtype=np.float32))
    with pytest.raises(PayloadError, match=r"'fc.bias' has shape \(3,\)"):
        dispatch(_train_message(arrays), _context())


def test_unknown_message_type_is_rejected():
    expected = r"no handler for message type 'train\.forward'"
    with pytest.raises(ValueError, match=expected):
        dispatch(_train_message(_global(), "train.forward"), _context())


def test_node_config_is_checked():
    with pytest.raises(ConfigError, match="partition-id"):
        NodeConfig.from_node_config({"partition-id": 4, "num-partitions": 4})
    with pytest.raises(ConfigError, match="is required"):
        NodeConfig.from_node_config({})


def test_declared_link_is_validated_and_reported(tmp_path):
    node = NodeConfig.from_node_config(
        {"partition-id": 0, "num-partitions": 4, "link-profile": "4g"}
    )
    assert node.link == "4g"
    trace = tmp_path / "link.csv"
    trace.write_text("time_s,mbps\n0,10\n1,20\n")
    node = NodeConfig.from_node_config(
        {"partition-id": 0, "num-partitions": 4, "link-trace": str(trace)}
    )
    assert node.link == "table:0,10,10,0;1,20,20,0"  # sent inline
    with pytest.raises(ConfigError, match="unknown link profile '3g'"):
        NodeConfig.from_node_config(
            {"partition-id": 0, "num-partitions": 4, "link-profile": "3g"}
        )
    bad = tmp_path / "bad.csv"
    bad.write_text("0,10\n1,x\n")
    with pytest.raises(ConfigError, match=r"bad\.csv:2"):
        NodeConfig.from_node_config(
            {"partition-id": 0, "num-partitions": 4, "link-trace": str(bad)}
        )
    ctx = _context({"partition-id": 1, "num-partitions": 4, "link-profile": "5g"})
    reply = dispatch(_train_message(_global()), ctx)
    assert reply.content["node"]["link"] == "5g"
    assert reply.content["node"]["partition-id"] == 1
