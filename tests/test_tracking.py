"""Tracking: JSON lines always, W&B offline files that hold the per-round history."""

from __future__ import annotations

import io
import json

from tandem.config import TrackingConfig
from tandem.tracking import Tracker, read_jsonl
from tests.wandb_reader import read_history, read_summary


def _run(tmp_path, **kw) -> Tracker:
    cfg = TrackingConfig(output_dir=str(tmp_path), **kw)
    out = io.StringIO()
    tracker = Tracker(cfg, "run-1", "group-1", {"lr": 0.1}, total_rounds=3, console=out)
    for r in range(1, 4):
        tracker.log_round(r, {"eval-accuracy": 0.25 * r, "bytes-up": 1000 * r})
    tracker.log_event("bytes", {"round": 3, "node-id": 7, "bytes-up": 10})
    tracker.finish({"final-accuracy": 0.75, "nan-metric": float("nan")})
    tracker.console_text = out.getvalue()  # type: ignore[attr-defined]
    return tracker


def test_jsonl_and_console(tmp_path):
    tracker = _run(tmp_path)
    records = read_jsonl(tmp_path / "run-1" / "metrics.jsonl")
    assert [r["event"] for r in records] == [
        "config",
        "round",
        "round",
        "round",
        "bytes",
        "summary",
    ]
    assert records[0]["config"] == {"lr": 0.1}
    assert [r["eval-accuracy"] for r in records[1:4]] == [0.25, 0.5, 0.75]
    assert records[-1]["final-accuracy"] == 0.75
    assert records[-1]["nan-metric"] is None  # NaN is not valid JSON
    assert "round 2/3" in tracker.console_text
    assert "acc 50.00%" in tracker.console_text


def test_wandb_offline_history_holds_every_round(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    _run(tmp_path, wandb=True, wandb_mode="offline", wandb_project="tandem-test")
    history = read_history(tmp_path / "run-1")
    by_step = {row["_step"]: row for row in history}
    assert sorted(by_step) == [1, 2, 3]
    assert [by_step[s]["round/eval-accuracy"] for s in (1, 2, 3)] == [0.25, 0.5, 0.75]
    assert by_step[3]["round/bytes-up"] == 3000


def _two_rounds(tmp_path, monkeypatch) -> tuple[Tracker, io.StringIO]:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = TrackingConfig(
        output_dir=str(tmp_path),
        wandb=True,
        wandb_mode="offline",
        wandb_project="tandem-test",
    )
    out = io.StringIO()
    tracker = Tracker(cfg, "run-1", "g", {}, total_rounds=2, console=out)
    for r in (1, 2):  # as ServerRun.report_round: node bytes, then the round
        tracker.log_event("bytes", {"round": r, "node-id": 7, "bytes-up": 100 * r})
        tracker.log_event("bytes", {"round": r, "node-id": 9, "bytes-up": 1})
        tracker.log_round(r, {"eval-accuracy": 0.5, "bytes-up": 100 * r + 1})
    return tracker, out


def test_wandb_round_and_final_figures_have_distinct_names(tmp_path, monkeypatch):
    tracker, _ = _two_rounds(tmp_path, monkeypatch)
    tracker.finish({"bytes-up": 302, "final-accuracy": 0.5, "dropouts": 0})
    summary = read_summary(tmp_path / "run-1")
    assert summary["total/bytes-up"] == 302  # the run's total, not round 2's
    assert summary["round/bytes-up"] == 201  # the last round's, under its name
    assert summary["final/final-accuracy"] == 0.5
    assert summary["total/dropouts"] == 0
    assert "bytes-up" not in summary
    rows = {r["_step"]: r for r in read_history(tmp_path / "run-1")}
    assert [rows[s]["node/7/bytes-up"] for s in (1, 2)] == [100, 200]  # per node
    assert rows[2]["node/9/bytes-up"] == 1
    (table,) = (tmp_path / "run-1").glob(
        "wandb/offline-run-*/files/media/table/**/*.json"
    )
    data = json.loads(table.read_text())
    assert data["columns"] == ["node-id", "bytes-up", "bytes-down"]
    assert data["data"] == [[7, 300, 0], [9, 2, 0]]  # each node's total


def test_summary_is_printed_last_without_per_node_dicts(tmp_path):
    out = io.StringIO()
    cfg = TrackingConfig(output_dir=str(tmp_path))
    tracker = Tracker(cfg, "run-1", "g", {}, total_rounds=1, console=out)
    tracker.finish(
        {"method": "acesync", "bytes-up": 854160, "per-node": {"1": 2}, "xs": [1, 2]}
    )
    lines = out.getvalue().splitlines()
    done = next(line for line in lines if "done:" in line)
    assert "method acesync" in done and "bytes-up 854,160" in done
    assert "per-node" not in done and "xs" not in done and "{" not in done
    assert lines[-2] == f"[tandem] run folder {tmp_path.resolve() / 'run-1'}"
    assert lines[-1].endswith(
        f"tandem plot {tmp_path.resolve() / 'run-1'} --out "
        f"{tmp_path.resolve() / 'run-1'}/plot.png"
    )
    summary = read_jsonl(tmp_path / "run-1" / "metrics.jsonl")[-1]
    assert summary["per-node"] == {"1": 2}  # kept in the file


def test_periods_are_reported_as_periods(tmp_path):
    out = io.StringIO()
    cfg = TrackingConfig(output_dir=str(tmp_path))
    tracker = Tracker(cfg, "run-1", "g", {}, total_rounds=1, console=out)
    tracker.set_total_rounds(7, unit="period")
    tracker.log_round(3, {"eval-accuracy": 0.5})
    assert "period 3/7" in out.getvalue() and "round" not in out.getvalue()


def test_a_failed_run_is_recorded_with_its_reason(tmp_path):
    out = io.StringIO()
    cfg = TrackingConfig(output_dir=str(tmp_path))
    tracker = Tracker(cfg, "run-1", "g", {}, total_rounds=1, console=out)
    tracker.fail("round 1: every node (3) failed: bad key")
    tracker.fail("again")  # closed: ignored
    records = read_jsonl(tmp_path / "run-1" / "metrics.jsonl")
    assert records[-1]["event"] == "failed"
    assert records[-1]["reason"] == "round 1: every node (3) failed: bad key"
    assert "run FAILED: round 1: every node (3) failed: bad key" in out.getvalue()
