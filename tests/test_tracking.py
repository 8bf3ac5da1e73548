"""Tracking: JSON lines always, W&B offline files that hold the per-round history."""

from __future__ import annotations

import io

from tandem.config import TrackingConfig
from tandem.tracking import Tracker, read_jsonl
from tests.wandb_reader import read_history


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
    assert [by_step[s]["eval-accuracy"] for s in (1, 2, 3)] == [0.25, 0.5, 0.75]
    assert by_step[3]["bytes-up"] == 3000
