"""Checkpoints and resume: no pickle, no lost or double-applied round."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from inprocess import run_inprocess

from tandem.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tandem.config import ConfigError, RunConfig
from tandem.datasets import load_dataset
from tandem.models import build_model
from tandem.protocol.acesync import AceSyncOptions
from tandem.strategies.acesync import AceSync

RUN = {"method": "fedavg", "mnist1d-samples": 1000, "local-steps": 5}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_round_trip_and_refusals(tmp_path):
    path = save_checkpoint(
        tmp_path / "c.npz", {"w": np.arange(3, dtype=np.float32)}, {"round": 2}
    )
    arrays, state = load_checkpoint(path)
    assert arrays["w"].tolist() == [0, 1, 2] and state == {"round": 2, "format": 1}
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.npz")
    # a checkpoint from a newer format is refused, not guessed at
    blob = np.frombuffer(json.dumps({"format": 99}).encode(), np.uint8)
    np.savez(tmp_path / "future.npz", __state__=blob)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path / "future.npz")
    # object arrays (pickles) are never loaded
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), __state__=blob)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "obj.npz")


def _rounds(records):
    return [r for r in records if r["event"] == "round"]


@pytest.mark.parametrize(
    ("method", "optimizer"),
    [("fedavg", "sgd"), ("syncsgd", "sgd"), ("syncsgd", "adam")],
)
def test_a_resumed_run_continues_from_the_checkpoint(tmp_path, method, optimizer):
    config = {**RUN, "method": method, "num-server-rounds": 2, "optimizer": optimizer}
    first, _ = run_inprocess(config, nodes=2, out=tmp_path / "a")
    ckpt = next((tmp_path / "a").glob("*/checkpoint.npz"))
    arrays, state = load_checkpoint(ckpt)
    assert state["round"] == 2 and state["method"] == method
    if method == "syncsgd" and optimizer == "sgd":  # FedAvgM's server momentum
        assert any(k.startswith("__momentum__/") for k in arrays)
    assert first[-1]["rejected-replies"] == 0  # the model kept its dtypes
    if optimizer == "adam":  # FedAdam's two moments, one per array each
        layout = {k for k in arrays if not k.startswith("__")}
        for moment in ("m", "v"):
            keys = {k for k in arrays if k.startswith(f"__strategy__/{moment}/")}
            assert {k.split("/", 2)[2] for k in keys} == layout
    resumed, _ = run_inprocess(
        {**config, "num-server-rounds": 4, "resume": str(ckpt)},
        nodes=2,
        out=tmp_path / "b",
    )
    rounds = _rounds(resumed)
    # it starts from round 2's model (same accuracy), then runs rounds 3 and 4
    assert [r["round"] for r in rounds] == [2, 3, 4]
    assert rounds[0]["eval-accuracy"] == _rounds(first)[-1]["eval-accuracy"]
    assert resumed[-1]["resumed-from-round"] == 2
    # exactly two more rounds of training messages went out: nothing replayed
    sent = {r["round"] for r in resumed if r["event"] == "bytes"}
    assert sent == {3, 4}


def test_resume_refuses_a_checkpoint_of_another_method(tmp_path):
    run_inprocess({**RUN, "num-server-rounds": 1}, nodes=2, out=tmp_path / "a")
    ckpt = next((tmp_path / "a").glob("*/checkpoint.npz"))
    with pytest.raises(ConfigError, match="checkpoint of method 'fedavg'"):
        run_inprocess(
            {**RUN, "method": "syncsgd", "resume": str(ckpt)},
            nodes=2,
            out=tmp_path / "b",
        )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_simultrain_resumes_from_its_checkpoint(tmp_path, optimizer):
    config = {
        "method": "simultrain",
        "mnist1d-samples": 1000,
        "simultrain-chunk": 2,
        "simultrain-steps": 30,
        "simultrain-eval-every": 10,
        "checkpoint-every": 2,  # periods 1, 2, 3: only period 2 is saved
        "optimizer": optimizer,
        "lr": 0.05 if optimizer == "sgd" else 0.003,
    }
    run_inprocess(config, nodes=2, out=tmp_path / "a")
    ckpt = next((tmp_path / "a").glob("*/checkpoint.npz"))
    arrays, state = load_checkpoint(ckpt)
    assert state["period"] == 2 and 10 <= state["steps-done"] < 30
    # the cloud optimizer's state per parameter of θ_c
    names = {k.split("/")[2] for k in arrays if k.startswith("optimizer/")}
    expected = (
        {"momentum_buffer"} if optimizer == "sgd" else {"step", "exp_avg", "exp_avg_sq"}
    )
    assert names == expected
    if optimizer == "adam":  # one cloud step per micro-batch so far
        steps = {float(v) for k, v in arrays.items() if k.endswith("/step")}
        assert steps == {float(state["cloud-steps"])}
    else:  # the other optimizer's state does not fit this run
        with pytest.raises(ConfigError, match="not this run's optimizer's"):
            run_inprocess(
                {**config, "optimizer": "adam", "resume": str(ckpt)},
                nodes=2,
                out=tmp_path / "c",
            )
    resumed, _ = run_inprocess(
        {**config, "resume": str(ckpt)}, nodes=2, out=tmp_path / "b"
    )
    rounds = _rounds(resumed)
    assert rounds[0]["round"] == 2  # it starts where the checkpoint was
    summary = resumed[-1]
    assert summary["rejected-replies"] == 0
    # each edge does only the steps left, starting from the cloud's copy
    exchanges = [r for r in resumed if r["event"] == "exchange"]
    for node in (1, 2):
        steps = sum(e["micro-batches"] for e in exchanges if e["node-id"] == node)
        assert steps == 30 - state["steps-done"]
    assert summary["final-accuracy"] > 0.3  # measured 0.37, chance 0.1


def test_acesync_resumes_with_its_policy_state(tmp_path):
    config = {
        "method": "acesync",
        "mnist1d-samples": 1000,
        "local-steps": 5,
        "num-server-rounds": 3,
        "checkpoint-every": 2,  # rounds 1, 2, 3: only round 2 is saved
        "partitioner": "dirichlet",
        "acesync-clusters": 1,
        "acesync-personalize-rounds": 0,
        "acesync-divergence-threshold": 1.05,  # some devices get scaled budgets
        "acesync-sync-action": "budget",
    }
    first, _ = run_inprocess(config, nodes=3, out=tmp_path / "a")
    ckpt = next((tmp_path / "a").glob("*/checkpoint.npz"))
    arrays, state = load_checkpoint(ckpt)
    assert state["round"] == 2
    kept = state["strategy"]
    assert "__strategy__/predictor" in arrays
    assert {k.split("/")[2] for k in arrays if "/cache/" in k} == {"1", "2", "3"}
    assert set(kept["estimators"]) == set(kept["budget-scale"]) == {"1", "2", "3"}
    assert kept["asked"] == {"1": 2, "2": 2, "3": 2}
    resumed, _ = run_inprocess(
        {**config, "resume": str(ckpt)}, nodes=3, out=tmp_path / "b"
    )
    assert [r["round"] for r in _rounds(resumed)] == [2, 3]
    assert resumed[-1]["resumed-from-round"] == 2

    # round 3 is planned from the restored state exactly as the uninterrupted
    # run planned it: bandwidth estimates, budgets, budget scales, steps
    def plans(records):
        return sorted(
            (r["node-id"], r["bandwidth-mbps"], r["budget"], r["budget-scale"])
            for r in records
            if r["event"] == "plan" and r["round"] == 3
        )

    assert plans(resumed) == plans(first) and len(plans(first)) == 3
    # the uninterrupted run sent compressed deltas in round 3; the resumed
    # cloud has no record of the devices' models and sends them in full
    deltas = [r for r in first if r["event"] == "downlink" and r["round"] == 3]
    assert {r["node-id"] for r in deltas} == {1, 2, 3}
    assert not [r for r in resumed if r["event"] == "downlink"]
    assert {r["round"] for r in resumed if r["event"] == "plan"} == {3}
    # the predictor the resumed run broadcast is the one the first run trained
    scores = [r for r in resumed if r["event"] == "acesync"]
    assert len(scores) == 1 and math.isfinite(scores[0]["predictor-rank-corr"])


def test_acesync_state_round_trips(tmp_path):
    run_inprocess(
        {
            "method": "acesync",
            "mnist1d-samples": 1000,
            "local-steps": 5,
            "num-server-rounds": 2,
            "acesync-clusters": 1,
            "acesync-personalize-rounds": 0,
        },
        nodes=2,
        out=tmp_path,
    )
    arrays, state = load_checkpoint(next(tmp_path.glob("*/checkpoint.npz")))
    prefix = "__strategy__/"
    inner = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    fresh = AceSync(FedAvg(), options=AceSyncOptions(), local_steps=5)
    fresh.restore_state(inner, state["strategy"])
    again, again_state = fresh.checkpoint_state()
    assert again_state == state["strategy"]
    assert set(again) == set(inner)
    for key, value in again.items():
        np.testing.assert_array_equal(value, inner[key])


def test_an_interrupted_fedavgm_run_continues_exactly_as_an_uninterrupted_one(
    tmp_path,
):
    """Rounds 3-4 after a resume equal rounds 3-4 of a run never stopped.

    FedAvgM's server momentum must come back (``v`` of round 2 feeds round 3)
    and so must Python's RNG, which samples half of the 4 nodes each round:
    it is scrambled between the two halves, as a restarted process would be.
    The nodes keep their state (data positions), as SuperNodes do. Torch's
    RNG, which nothing on this path draws from, ends as the checkpoint left it.
    """
    config = {
        **RUN,
        "method": "syncsgd",
        "num-server-rounds": 4,
        "fraction-train": 0.5,
    }
    random.seed(7)
    whole, _ = run_inprocess(config, nodes=4, out=tmp_path / "whole")
    random.seed(7)
    _, edges = run_inprocess(
        {**config, "num-server-rounds": 2}, nodes=4, out=tmp_path / "a"
    )
    torch_rng = torch.get_rng_state().clone()
    ckpt = next((tmp_path / "a").glob("*/checkpoint.npz"))
    random.seed(12345)  # a new process: other RNG states
    torch.manual_seed(12345)
    resumed, _ = run_inprocess(
        {**config, "resume": str(ckpt)}, nodes=4, out=tmp_path / "b", edges=edges
    )
    assert torch.equal(torch.get_rng_state(), torch_rng)

    def trained(records):  # (round, node) pairs that trained, and the results
        return sorted(
            (r["round"], r["node-id"]) for r in records if r["event"] == "bytes"
        ), [
            (r["round"], r["eval-accuracy"], r["eval-loss"])
            for r in _rounds(records)
            if r["round"] > 2
        ]

    assert trained(resumed) == trained([r for r in whole if r.get("round", 0) > 2])
    final_whole, _ = load_checkpoint(
        next((tmp_path / "whole").glob("*/checkpoint.npz"))
    )
    final_resumed, _ = load_checkpoint(next((tmp_path / "b").glob("*/checkpoint.npz")))
    assert set(final_whole) == set(final_resumed)
    assert any(k.startswith("__momentum__/") for k in final_whole)
    for key, value in final_whole.items():
        np.testing.assert_array_equal(final_resumed[key], value, err_msg=key)


def test_syncsgd_with_adam_takes_adams_first_step(tmp_path):
    # one round, one node: FedAdam's m = 0.1·Δ and v = 0.001·Δ² under
    # η_1 = lr·√(1 − 0.999²) / (1 − 0.9²) move every weight whose gradient is
    # not 0 by η_1·0.1 / √0.001 = 0.7442·lr, up to τ = 1e-8·lr (Flower's
    # default τ = 1e-3 would move them by far less), in float32
    lr = 0.01
    config = {**RUN, "method": "syncsgd", "optimizer": "adam", "lr": lr}
    run_inprocess({**config, "num-server-rounds": 1}, nodes=1, out=tmp_path)
    arrays, _ = load_checkpoint(next(tmp_path.glob("*/checkpoint.npz")))
    cfg = RunConfig.from_flat({**config, "output-dir": str(tmp_path)})
    data = load_dataset(cfg.data)
    start = build_model(cfg.train.model, data.input_shape, data.num_classes, cfg.seed)
    step = math.sqrt(1 - 0.999**2) / (1 - 0.9**2) * 0.1 / math.sqrt(0.001) * lr
    assert {arrays[k].dtype for k in start.state_dict()} == {np.dtype("float32")}
    moved = np.concatenate(
        [np.abs(arrays[k] - v.numpy()).ravel() for k, v in start.state_dict().items()]
    )
    assert (moved > 0).mean() > 0.9  # nearly every weight has a gradient
    # τ shortens the step of a weight whose gradient is tiny, never lengthens it
    assert np.median(moved[moved > 0]) == pytest.approx(step, rel=2e-3)
    assert moved.max() <= step * (1 + 1e-4)
