"""Fail fast: a round where every node fails alike stops the run, with the error."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity
from inprocess import run_inprocess

from tandem.config import ConfigError, RunConfig, TrackingConfig
from tandem.datasets import ArraySplit, DataBundle
from tandem.failures import (
    RunFailedError,
    app_errors,
    common_failure,
    run_reporting_failure,
    stop_if_all_failed,
    tidy_reason,
)
from tandem.preflight import (
    check_partitions,
    check_simultrain_cut,
    data_lines,
    data_report,
)
from tandem.tracking import Tracker, read_jsonl

WHY = "run config 'num-partitions' = 10: must not exceed the 3 natural ids"
SIMULATION = (
    "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\n"
    f"Exception ClientAppException occurred. Message: {WHY}'>"
)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _error(node: int, reply_to: str, reason: str, code: int) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    sent.metadata.__dict__["_message_id"] = reply_to
    reply = Message(Error(code=code, reason=reason), reply_to=sent)
    reply.metadata.__dict__["_src_node_id"] = node
    reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return reply


def _failing(
    reasons: dict[int, str], code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
):
    """A tamper that turns node replies into ClientApp error replies."""

    def tamper(node: int, reply: Message) -> Message:
        if node not in reasons:
            return reply
        return _error(node, reply.metadata.reply_to_message_id, reasons[node], code)

    return tamper


def test_flower_error_reasons_are_tidied():
    assert tidy_reason(SIMULATION) == WHY  # the simulation engine's wrapping
    assert tidy_reason(f"<class 'tandem.config.ConfigError'>:<'{WHY}'>") == WHY
    assert tidy_reason("  Node Unavailable ") == "Node Unavailable"


def test_common_failure_needs_every_node_and_one_error():
    assert common_failure([1, 2], {1: "a", 2: "a"}) == "a"
    assert common_failure([1, 2], {1: "a", 2: "b"}) is None
    assert common_failure([1, 2], {1: "a"}) is None  # node 2 did not fail
    assert common_failure([], {}) is None
    with pytest.raises(RunFailedError, match=r"^round 4: every node \(2\) failed: a$"):
        stop_if_all_failed(4, [1, 2], {1: "a", 2: "a"})
    stop_if_all_failed(4, [1, 2], {1: "a", 2: "b"})  # no raise


def test_only_the_clientapps_own_errors_count():
    replies = [
        _error(1, "m1", SIMULATION, ErrorCode.CLIENT_APP_RAISED_EXCEPTION),
        _error(2, "m2", "Node Unavailable", ErrorCode.NODE_UNAVAILABLE),
        _error(9, "m9", SIMULATION, ErrorCode.CLIENT_APP_RAISED_EXCEPTION),
    ]
    assert app_errors([1, 2], replies) == {1: WHY}  # 2 is unreachable, 9 not asked


FEDAVG = {"method": "fedavg", "mnist1d-samples": 600, "local-steps": 2}
ACESYNC = {**FEDAVG, "method": "acesync", "acesync-clusters": 1}
SIMULTRAIN = {
    "method": "simultrain",
    "mnist1d-samples": 600,
    "simultrain-chunk": 2,
    "simultrain-steps": 8,
    "simultrain-eval-every": 4,
}


@pytest.mark.parametrize(
    "config", [FEDAVG, ACESYNC, SIMULTRAIN], ids=lambda c: c["method"]
)
def test_every_node_failing_alike_stops_the_run_with_the_error(tmp_path, config):
    tamper = _failing({1: SIMULATION, 2: SIMULATION, 3: SIMULATION})
    with pytest.raises(RunFailedError) as info:
        run_inprocess(
            {**config, "num-server-rounds": 3}, nodes=3, out=tmp_path, tamper=tamper
        )
    assert str(info.value) == f"round 1: every node (3) failed: {WHY}"
    (metrics,) = tmp_path.glob("*/metrics.jsonl")
    assert all(r["event"] != "round" or r["round"] == 0 for r in read_jsonl(metrics))


def test_different_errors_or_one_good_node_let_the_run_go_on(tmp_path):
    records, _ = run_inprocess(
        {**FEDAVG, "num-server-rounds": 2},
        nodes=3,
        out=tmp_path,
        tamper=_failing({1: "<class 'X'>:<'a'>", 2: "<class 'X'>:<'b'>"}),
    )
    assert records[-1]["event"] == "summary"
    assert records[-1]["dropouts"] == 4  # nodes 1 and 2 in both rounds


def test_the_failure_is_recorded_then_raised_for_flower(tmp_path):
    out = io.StringIO()
    tracker = Tracker(
        TrackingConfig(output_dir=str(tmp_path)), "r", "g", {}, 1, console=out
    )

    def body() -> None:
        raise RunFailedError("round 1: every node (3) failed: bad")

    with pytest.raises(RunFailedError):
        run_reporting_failure(tracker.fail, body)
    assert read_jsonl(tracker.path)[-1] == {
        "event": "failed",
        "reason": "round 1: every node (3) failed: bad",
        "wall-seconds": read_jsonl(tracker.path)[-1]["wall-seconds"],
    }


def _bundle(users: list[int]) -> DataBundle:
    y = np.array([0, 1, 2, 0, 1, 2][: len(users)], dtype=np.int64)
    split = ArraySplit(
        np.zeros((len(users), 1, 4), np.float32), y, np.array(users, np.int64)
    )
    return DataBundle("wisdm", split, split, ("a", "b", "c"), {"records": 9})


def test_more_nodes_than_natural_ids_fail_on_the_server():
    cfg = RunConfig.from_flat(
        {"dataset": "wisdm", "data-path": "w.txt", "partitioner": "natural"}
    )
    bundle = _bundle([7, 7, 12, 33])  # three users
    check_partitions(cfg, bundle, 3)  # one user each: fine
    with pytest.raises(
        ConfigError, match="'num-partitions' = 10: must not exceed the 3"
    ):
        check_partitions(cfg, bundle, 10)
    iid = RunConfig.from_flat({"dataset": "wisdm", "data-path": "w.txt"})
    check_partitions(iid, bundle, 10)  # iid needs no natural ids


class _Server:
    """What check_simultrain_cut reads of a ServerRun: the config and the model."""

    def __init__(self, flat: dict) -> None:
        self.cfg = RunConfig.from_flat({"mnist1d-samples": 200, **flat})

    def build_model(self):
        from tandem.models import build_model

        return build_model("cnn1d", (1, 40), 10, 0)


@pytest.mark.parametrize("method", ["fedavg", "acesync", "simultrain"])
def test_a_cut_naming_no_stage_stops_any_method_before_training(method):
    server = _Server({"method": method, "simultrain-cut": "nonexistent"})
    with pytest.raises(ConfigError, match="'simultrain-cut' = 'nonexistent'"):
        check_simultrain_cut(server)
    for cut in ("default", "conv1", "1"):
        check_simultrain_cut(_Server({"method": method, "simultrain-cut": cut}))


def test_every_dataset_reports_samples_and_classes_per_split():
    report = data_report(_bundle([7, 7, 12, 33]))
    assert report["train"] == {"samples": 4, "classes": 3, "natural-ids": 3}
    assert report["records"] == 9  # the source's own report is kept
    lines = data_lines({k: v for k, v in report.items() if k != "records"})
    assert lines == [
        "data wisdm: train 4 samples (3 classes, 3 natural ids); "
        "test 4 samples (3 classes, 3 natural ids); 3 classes in all"
    ]


def test_local_epochs_reach_the_nodes(tmp_path):
    records, _ = run_inprocess(
        {**FEDAVG, "local-steps": 50, "local-epochs": 1.0, "num-server-rounds": 1},
        nodes=3,
        out=tmp_path,
    )
    # 600 samples, 480 to train, 160 a node: one epoch is ceil(160 / 32) = 5 steps
    (round_1,) = [r for r in records if r["event"] == "round" and r["round"] == 1]
    assert round_1["steps"] == 5


def test_simultrain_reports_periods_as_periods(tmp_path, capsys):
    records, _ = run_inprocess(SIMULTRAIN, nodes=2, out=tmp_path)
    out = capsys.readouterr().out
    assert "period 1/3" in out and "round 1/" not in out  # 8 steps, eval every 4
    assert records[-1]["periods"] == 3 and "rounds" not in records[-1]
    done = next(line for line in out.splitlines() if "done:" in line)
    shown = done.split("done:", 1)[1]
    assert "[" not in shown and "{" not in shown  # per-period lists stay in the file
    assert "emulated-seconds-per-period" not in shown
    assert out.splitlines()[-1].startswith("[tandem] plot it:   tandem plot ")
