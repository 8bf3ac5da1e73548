"""Helpers of the launcher that need no Flower processes."""

from __future__ import annotations

import socket

from tandem.launch import (
    PORT_FLOOR,
    FlowerHome,
    RunStatus,
    _ephemeral_range,
    free_port,
)


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    low, high = _ephemeral_range()
    assert PORT_FLOOR < low <= high
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(PORT_FLOOR <= p < low for p in ports)
    with socket.socket() as sock:  # free: a server can bind it
        sock.bind(("", ports[-1]))


class _Clock:
    """Virtual time for :meth:`FlowerHome.wait`: ``sleep`` advances it, and
    the run writes its summary at ``summary_at`` and ends at ``ends_at``."""

    def __init__(self, metrics, summary_at=40.0, ends_at=41.0):
        self.now, self.metrics = 0.0, metrics
        self.summary_at, self.ends_at = summary_at, ends_at
        self.asked: list[float] = []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        if self.metrics is not None and self.now >= self.summary_at:
            self.metrics.parent.mkdir(parents=True, exist_ok=True)
            self.metrics.write_text('{"event": "round"}\n{"event": "summary"}\n')

    def status(self, run_id, connection="local"):
        self.asked.append(self.now)
        done = self.now >= self.ends_at
        return RunStatus(run_id, "finished:completed" if done else "running", "", 0)


def _wait_on(monkeypatch, tmp_path, clock, metrics):
    import tandem.launch as launch

    monkeypatch.setattr(launch.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(launch.time, "sleep", clock.sleep)
    home = FlowerHome(tmp_path / "home")
    monkeypatch.setattr(home, "status", clock.status)
    return home.wait("7", timeout=600, metrics=metrics)


def test_wait_asks_flower_rarely_and_at_once_when_the_summary_is_written(
    monkeypatch, tmp_path
):
    metrics = tmp_path / "runs" / "fedavg-7" / "metrics.jsonl"
    clock = _Clock(metrics)
    status = _wait_on(monkeypatch, tmp_path, clock, tmp_path / "runs")
    assert status.ok
    # 1 s, then intervals doubling up to 15 s; from the summary on, every 0.5 s
    assert clock.asked == [1.0, 3.0, 7.0, 15.0, 30.0, 40.0, 40.5, 41.0]


def test_wait_without_a_metrics_file_keeps_to_the_doubling_intervals(
    monkeypatch, tmp_path
):
    clock = _Clock(None)
    status = _wait_on(monkeypatch, tmp_path, clock, None)
    assert status.ok
    assert clock.asked == [1.0, 3.0, 7.0, 15.0, 30.0, 45.0]


def test_a_line_still_being_written_is_left_for_the_next_read(tmp_path):
    from tandem.launch import _records_so_far

    run = tmp_path / "acesync-7" / "metrics.jsonl"
    assert _records_so_far(tmp_path, "7") == []  # no folder yet
    run.parent.mkdir()
    run.write_text('{"event": "round", "round": 1}\n{"event": "summ')
    assert _records_so_far(tmp_path, "7") == [{"event": "round", "round": 1}]
    assert _records_so_far(run, "7") == [{"event": "round", "round": 1}]
    assert _records_so_far(tmp_path, "8") == []  # another run's folder
    run.write_text(run.read_text() + 'ary"}\n')
    assert _records_so_far(run, "7")[-1] == {"event": "summary"}
