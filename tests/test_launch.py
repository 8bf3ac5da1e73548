"""Helpers of the launcher that need no Flower processes."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
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
    (app / "flwr.toml").write_text('[superlink.local]\naddress = ":local:"\n')
    home = FlowerHome(tmp_path / "home", app_dir=app)
    calls = []
    started = []

    def flwr(*args, timeout=120):
        calls.append(args)
        return '{"success": true, "run-id": 5}'

    monkeypatch.setattr(home, "flwr", flwr)
    monkeypatch.setattr(home, "start_superlink", lambda: started.append(1))
    assert home.submit({"method": "fedavg"}) == "5"
    assert calls[0][:2] == ("run", str(tmp_path / "home" / "app"))
    assert (tmp_path / "home" / "app" / "app_pkg" / "server.py").exists()
    assert started == [1]  # the local SuperLink is started before flwr run
    unstaged = FlowerHome(tmp_path / "home2", app_dir=app, stage=False)
    monkeypatch.setattr(unstaged, "flwr", flwr)
    monkeypatch.setattr(unstaged, "start_superlink", lambda: started.append(2))
    unstaged.submit()
    assert calls[1][:2] == ("run", str(app))
    deployed = FlowerHome(tmp_path / "home3", app_dir=app, connections="")
    monkeypatch.setattr(deployed, "flwr", flwr)
    monkeypatch.setattr(deployed, "start_superlink", lambda: started.append(3))
    deployed.submit(connection="deploy")
    assert started == [1, 2]  # only for a connection whose address is :local:


class _Process:
    """A stand-in for the SuperLink's ``Popen``: records its command line."""

    def __init__(self, command, exits_with=None, **kwargs):
        self.command, self.kwargs = command, kwargs
        self.returncode = exits_with
        self.killed = False

    def poll(self):
        return self.returncode

    def kill(self):
        self.killed = True


def test_the_superlink_started_is_the_one_flwr_run_would_start(monkeypatch, tmp_path):
    import flwr.cli.local_superlink as flower

    import tandem.launch as launch

    home = FlowerHome(tmp_path / "home")
    ours, theirs = [], []

    def popen(command, **kwargs):
        ours.append(_Process(command, **kwargs))
        return ours[-1]

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    answers = iter([False, False, True])
    monkeypatch.setattr(home, "superlink_ready", lambda: next(answers))
    home.start_superlink()

    # Flower's own start, as `flwr run` would do it in this home's environment.
    monkeypatch.setenv("FLWR_HOME", str(home.home))
    monkeypatch.setattr(flower, "LOCAL_SUPERLINK_HTTP_API_PORT", str(home.http_port))
    monkeypatch.setattr(
        flower, "LOCAL_CONTROL_API_ADDRESS", f"127.0.0.1:{home.control_port}"
    )
    monkeypatch.setattr(
        flower.subprocess,
        "Popen",
        lambda command, **kwargs: theirs.append(_Process(command)) or theirs[-1],
    )
    monkeypatch.setattr(flower, "_is_local_superlink_started", lambda: True)
    flower._start_local_superlink()

    (mine,), (flowers,) = ours, theirs
    assert Path(mine.command[0]).name == flowers.command[0] == "flower-superlink"
    assert mine.command[1:] == flowers.command[1:]
    assert mine.kwargs["start_new_session"] is True
    assert mine.kwargs["env"]["FLWR_HOME"] == str(home.home)
    assert f"--port\0{home.http_port}\0" in "\0".join(mine.command) + "\0"


def test_a_slow_superlink_is_waited_for_and_a_dead_one_reported(monkeypatch, tmp_path):
    import tandem.launch as launch

    clock = {"now": 0.0}
    monkeypatch.setattr(launch.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(
        launch.time, "sleep", lambda s: clock.__setitem__("now", clock["now"] + s)
    )
    home = FlowerHome(tmp_path / "home")
    spawned = []
    monkeypatch.setattr(
        launch.subprocess,
        "Popen",
        lambda command, **kw: spawned.append(_Process(command)) or spawned[-1],
    )
    # Answers only after 40 s: `flwr run` would have killed it at 15 s.
    monkeypatch.setattr(home, "superlink_ready", lambda: clock["now"] >= 40.0)
    home.start_superlink()
    assert 40.0 <= clock["now"] < 41.0 and not spawned[0].killed

    clock["now"] = 0.0
    monkeypatch.setattr(home, "superlink_ready", lambda: False)
    with pytest.raises(RuntimeError, match="did not start within 60 s"):
        home.start_superlink(timeout=60)
    assert spawned[1].killed and 60.0 <= clock["now"] < 61.0

    monkeypatch.setattr(
        launch.subprocess,
        "Popen",
        lambda command, **kw: _Process(command, exits_with=1),
    )
    with pytest.raises(RuntimeError, match="exited with code 1"):
        home.start_superlink()

    ready = FlowerHome(tmp_path / "ready")
    monkeypatch.setattr(ready, "superlink_ready", lambda: True)
    monkeypatch.setattr(launch.subprocess, "Popen", None)  # must not be called
    ready.start_superlink()


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


def _wait_on(monkeypatch, tmp_path, clock, metrics, connections=""):
    import tandem.launch as launch

    monkeypatch.setattr(launch.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(launch.time, "sleep", clock.sleep)
    # By default a home of its own connections: asked through the CLI.
    home = FlowerHome(tmp_path / "home", connections=connections)
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


def test_a_superlink_asked_in_process_is_asked_often(monkeypatch, tmp_path):
    clock = _Clock(None, ends_at=9.0)
    status = _wait_on(monkeypatch, tmp_path, clock, None, connections=None)
    assert status.ok
    assert clock.asked == [1.0, 3.0, 5.0, 7.0, 9.0]  # every 2 s, not 15


def test_connections_without_an_account_login_are_asked_in_process(
    monkeypatch, tmp_path
):
    home = FlowerHome(tmp_path / "local", http_port=20123)  # the project's flwr.toml
    assert home._control_target("local") == ("127.0.0.1:20123", None)
    assert home._control_target("deploy") == ("127.0.0.1:39200", None)
    assert home._control_target("nowhere") is None
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    config = (
        '[superlink]\ndefault = "tls"\n'
        f'[superlink.tls]\naddress = "127.0.0.1:20001"\nroot-certificates = "{ca}"\n'
        '[superlink.gone]\naddress = "127.0.0.1:20002"\n'
        'root-certificates = "/no/such/ca.pem"\n'
        '[superlink.account]\naddress = "example.org:443"\nenable-account-auth = true\n'
    )
    other = FlowerHome(tmp_path / "other", connections=config)
    assert other._control_target("tls") == ("127.0.0.1:20001", ca.read_bytes())
    assert other._control_target("gone") is None
    assert other._control_target("account") is None
    assert FlowerHome(tmp_path / "empty", connections="")._control_target("x") is None

    asked = []
    monkeypatch.setattr(
        other, "_direct_status", lambda run_id, *target: asked.append((run_id, target))
    )
    monkeypatch.setattr(other, "flwr", lambda *args, **kw: pytest.fail("CLI asked"))
    other.status("12", "tls")
    assert asked == [("12", ("127.0.0.1:20001", ca.read_bytes()))]
    reply = '{"runs": [{"run-id": "12", "status": "running", "elapsed": 3.5}]}'
    monkeypatch.setattr(other, "flwr", lambda *args, **kw: reply)
    assert other.status("12", "account") == RunStatus("12", "running", "", 3.5)


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


@pytest.mark.parametrize(
    ("outcomes", "submitted", "final"),
    [
        (["ray", "ok"], 2, "finished:completed"),
        (["ray", "ray", "ray"], 3, "finished:failed"),  # RAY_RETRIES = 2
        (["crash"], 1, "finished:failed"),  # a run that failed otherwise: once
        (["stopped"], 1, "finished:stopped"),
    ],
)
def test_a_run_that_ray_did_not_start_is_submitted_again(
    tmp_path, capsys, outcomes, submitted, final
):
    home = FlowerHome(tmp_path / "home")
    runs: list[str] = []
    logs = {
        "ray": "Exception: The current node timed out during startup. ...",
        "crash": "Traceback ...\nValueError: a real failure",
        "stopped": "",
        "ok": "",
    }
    statuses = {
        "ray": "finished:failed",
        "crash": "finished:failed",
        "stopped": "finished:stopped",
        "ok": "finished:completed",
    }

    def submit(run_config, federation_config, connection):
        runs.append(outcomes[len(runs)])
        return str(len(runs))

    home.submit = submit
    home.wait = lambda run_id, *a: RunStatus(run_id, statuses[runs[-1]], "", 1.0)
    home.logs = lambda run_id, connection="local": logs[runs[int(run_id) - 1]]
    status = home.run({"method": "fedavg"})
    assert len(runs) == submitted and status.status == final
    assert status.run_id == str(submitted)  # the last attempt's
    err = capsys.readouterr().err
    assert err.count("Ray did not start") == (submitted - 1)
