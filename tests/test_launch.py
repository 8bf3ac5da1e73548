"""Helpers of the launcher that need no Flower processes."""

from __future__ import annotations

import hashlib
import socket

from flwr.cli.build import build_fab_from_disk

from tandem.launch import (
    PORT_FLOOR,
    PROJECT_ROOT,
    FlowerHome,
    RunStatus,
    _ephemeral_range,
    free_port,
    stage_app,
)


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    low, high = _ephemeral_range()
    assert PORT_FLOOR < low <= high
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(PORT_FLOOR <= p < low for p in ports)
    with socket.socket() as sock:  # free: a server can bind it
        sock.bind(("", ports[-1]))


def _toy_app(root):
    """A Flower App folder with a virtual environment and run outputs inside."""
    (root / "app_pkg").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        (PROJECT_ROOT / "pyproject.toml")
        .read_text()
        .replace('fab-include = ["tandem/**/*.py", "README.md"]', "")
        .replace("tandem.server_app:app", "app_pkg.server:app")
        .replace("tandem.client_app:app", "app_pkg.client:app")
    )
    (root / ".gitignore").write_text(".venv/\nruns/\n*.pyc\n")
    (root / "README.md").write_text("# toy\n")
    (root / "app_pkg" / "__init__.py").write_text("")
    (root / "app_pkg" / "server.py").write_text("app = None\n")
    (root / "app_pkg" / "client.py").write_text("app = None\n")
    (root / "app_pkg" / "notes.txt").write_text("not in a FAB\n")
    (root / "app_pkg" / "cached.pyc").write_bytes(b"ignored")
    (root / "app_pkg" / "link.py").symlink_to(root / "app_pkg" / "server.py")
    for folder in (".venv/lib/site-packages/pkg", "runs/fedavg-1"):
        (root / folder).mkdir(parents=True)
        (root / folder / "module.py").write_text("x = 1\n")
        (root / folder / "config.toml").write_text("a = 1\n")
    return root


def test_a_staged_app_builds_flower_s_own_fab_without_the_ignored_folders(tmp_path):
    app = _toy_app(tmp_path / "app")
    staged = stage_app(app, tmp_path / "home" / "app")
    fab, reference = build_fab_from_disk(staged), build_fab_from_disk(app)
    assert hashlib.sha256(fab).digest() == hashlib.sha256(reference).digest()
    copied = sorted(str(p.relative_to(staged)) for p in staged.rglob("*"))
    assert copied == [
        ".gitignore",
        "README.md",
        "app_pkg",
        "app_pkg/__init__.py",
        "app_pkg/client.py",
        "app_pkg/server.py",
        "pyproject.toml",
    ]
    # staged again (the app changed): the copy follows
    (app / "app_pkg" / "server.py").write_text("app = 1\n")
    (app / "README.md").unlink()
    staged = stage_app(app, staged)
    assert not (staged / "README.md").exists()
    assert (staged / "app_pkg" / "server.py").read_text() == "app = 1\n"
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)


def test_a_home_submits_the_staged_copy(monkeypatch, tmp_path):
    app = _toy_app(tmp_path / "app")
    home = FlowerHome(tmp_path / "home", app_dir=app)
    calls = []

    def flwr(*args, timeout=120):
        calls.append(args)
        return '{"success": true, "run-id": 5}'

    monkeypatch.setattr(home, "flwr", flwr)
    assert home.submit({"method": "fedavg"}) == "5"
    assert calls[0][:2] == ("run", str(tmp_path / "home" / "app"))
    assert (tmp_path / "home" / "app" / "app_pkg" / "server.py").exists()
    unstaged = FlowerHome(tmp_path / "home2", app_dir=app, stage=False)
    monkeypatch.setattr(unstaged, "flwr", flwr)
    unstaged.submit()
    assert calls[1][:2] == ("run", str(app))


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
