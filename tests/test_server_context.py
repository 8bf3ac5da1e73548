"""ServerRun's shared helpers: waiting on nodes, checkpoints, typed options."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.config import ConfigError, RunConfig
from tandem.server_context import CHECKPOINT_NAME, ServerRun


class ArrivingNodes:
    """A Grid whose nodes connect one per poll, up to ``total``."""

    def __init__(self, total: int) -> None:
        self.total, self.polls = total, 0

    def get_node_ids(self) -> list[int]:
        self.polls += 1
        return list(range(min(self.polls, self.total), 0, -1))


def _run(tmp_path, grid, **flat) -> ServerRun:
    cfg = RunConfig.from_flat({"output-dir": str(tmp_path), **flat})
    return ServerRun.open(cfg, grid, run_id=7)


def test_wait_for_nodes_returns_sorted_ids_once_min_nodes_are_there(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("tandem.server_context.time.sleep", lambda s: None)
    srv = _run(tmp_path, ArrivingNodes(5), **{"min-nodes": 3})
    assert srv.wait_for_nodes() == [1, 2, 3]
    assert srv.wait_for_nodes(minimum=5) == [1, 2, 3, 4, 5]


def test_wait_for_nodes_gives_up_after_the_timeout(tmp_path):
    srv = _run(tmp_path, ArrivingNodes(1))
    with pytest.raises(RuntimeError, match="only 1 nodes connected, need 2"):
        srv.wait_for_nodes(timeout=0.0)


def test_checkpoint_round_trip_and_method_check(tmp_path):
    srv = _run(tmp_path, ArrivingNodes(1), seed=3)
    assert srv.resumed() is None  # no resume asked
    path = srv.save_checkpoint({"w": np.arange(3.0)}, {"round": 4})
    assert path == srv.tracker.run_dir / CHECKPOINT_NAME
    again = _run(tmp_path / "b", ArrivingNodes(1), resume=str(path))
    arrays, state = again.resumed()
    np.testing.assert_array_equal(arrays["w"], np.arange(3.0))
    assert (state["round"], state["method"], state["seed"]) == (4, "fedavg", 3)
    other = _run(tmp_path / "c", ArrivingNodes(1), resume=str(path), method="syncsgd")
    with pytest.raises(ConfigError, match="checkpoint of method 'fedavg'"):
        other.resumed()
    err = again.resume_mismatch("array 'w' has shape (3,)")
    assert err.key == "resume" and "does not fit the model" in str(err)


def test_options_are_typed_through_the_run(tmp_path):
    from tandem.protocol.simultrain import SimulTrainOptions

    srv = _run(tmp_path, ArrivingNodes(1), method="simultrain")
    assert srv.options_as(SimulTrainOptions) is srv.cfg.options
    assert srv.tracker.run_dir.name.startswith("simultrain-7")
