"""Drive ``flwr run`` from Python: a project-local Flower home and SuperLink.

Used by the benchmark and the end-to-end tests, and handy in notebooks. It does
what ``scripts/env.sh`` does for a shell: point ``FLWR_HOME`` at a folder whose
``config.toml`` links to the project's ``flwr.toml``, pick the local
SuperLink's ports, and switch off what needs the internet. Runs are submitted
with ``flwr run --format json`` and followed with ``flwr list``, because
``flwr run --stream`` exits 0 even when the run failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.certs import TlsFiles, make_node_key, make_tls_files
from tandem.tracking import read_jsonl

__all__ = [
    "FlowerHome",
    "LoopbackDeployment",
    "RunStatus",
    "format_run_config",
    "shared_ray",
    "stage_app",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]


#: Lowest port :func:`free_port` hands out (above the registered services).
PORT_FLOOR = 20000
#: Ports this process has handed out: never twice.
_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for port-0 binds and outgoing connections."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(v) for v in text.split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port that is free now, for a server started a moment later.

    Binding port 0 and closing it is racy: the kernel hands the same
    (ephemeral) port to the next port-0 bind or outgoing connection of any
    process, e.g. another test's gRPC client, before the server binds it.
    This picks a random free port *below* the ephemeral range instead, which
    the kernel never hands out by itself, and never the same one twice in a
    process; only another process picking at random can collide.
    """
    low, _ = _ephemeral_range()
    if low - PORT_FLOOR >= 1000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(PORT_FLOOR, low)
            if port not in _HANDED_OUT and _bindable(port):
                _HANDED_OUT.add(port)
                return port
    while True:  # no room below the ephemeral range: the racy fallback
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def format_run_config(overrides: Mapping[str, object]) -> str:
    """``{"lr": 0.1, "dataset": "mnist1d"}`` -> ``lr=0.1 dataset="mnist1d"`` (TOML)."""
    parts = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, str):
            text = json.dumps(value)  # a TOML basic string
        else:
            raise TypeError(f"run-config value for '{key}' must be a scalar")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _app_files(app_dir: Path) -> dict[str, Path]:
    """The Flower App's files as ``flwr run`` collects them (relative POSIX
    path -> path; symbolic links skipped), without entering a folder that the
    app's ``.gitignore`` ignores or ``.git``."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    gitignore = app_dir / ".gitignore"
    ignored = build_pathspec(
        load_gitignore_patterns(gitignore.read_bytes() if gitignore.exists() else b"")
    )
    files: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(app_dir, followlinks=False):
        base = Path(folder).relative_to(app_dir)
        subfolders[:] = [
            d
            for d in subfolders
            if d != ".git" and not ignored.match_file(f"{(base / d).as_posix()}/")
        ]
        for name in names:
            path = Path(folder) / name
            if not path.is_symlink():
                files[(base / name).as_posix()] = path
    return files


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the files that the Flower App's FAB is built from into ``dest``.

    ``flwr run <folder>`` walks every file under the folder and resolves each
    before it applies ``.gitignore`` and the FAB's include rules: in a project
    with its virtual environment inside (``.venv``, 50,000 files) building
    the FAB took 8.3 s on 2 cores, and a submission 11.0 s (2.7 s from the
    copy). The copy holds what the FAB holds (Flower's own rules pick the
    files), so ``flwr run dest`` builds the same FAB in a fraction of a second.
    Returns ``dest``.
    """
    from flwr.cli.build import get_filtered_fab_paths
    from flwr.cli.utils import filter_paths_for_publish

    files = filter_paths_for_publish(_app_files(app_dir))
    config = tomllib.loads(Path(files["pyproject.toml"]).read_text(encoding="utf-8"))
    keep = {"pyproject.toml", *get_filtered_fab_paths(dict(files), config)}
    if ".gitignore" in files:
        keep.add(".gitignore")  # its rules apply to the copy as to the app
    if dest.exists():
        shutil.rmtree(dest)
    for rel in sorted(keep):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[rel], target)
    return dest


#: Most seconds between two ``flwr list`` calls while :meth:`FlowerHome.wait`
#: waits on a run through the ``flwr`` CLI.
LIST_EVERY = 15.0
#: The same for a SuperLink asked in-process (a few ms): see :meth:`FlowerHome.status`.
DIRECT_LIST_EVERY = 2.0
#: Seconds a local SuperLink gets to answer its health check (Flower gives 15).
SUPERLINK_STARTUP_TIMEOUT = 180.0
#: What Flower logs when its simulation engine could not start Ray (a raylet
#: or the GCS timed out on a loaded machine). Ray starts with the first message
#: to a ClientApp, so no ClientApp ran; the ServerApp may have logged its
#: set-up and round 0's evaluation. Such a run is submitted again, up to
#: ``RAY_RETRIES`` times (:meth:`FlowerHome.run`, the benchmark's runner).
RAY_STARTUP_FAILURE = "timed out during startup"
RAY_RETRIES = 2


def _records_so_far(metrics: Path | None, run_id: str) -> list[dict[str, Any]]:
    """The complete records of a run's ``metrics.jsonl`` that is still being
    written (:func:`~tandem.tracking.read_jsonl` of a growing file).

    ``metrics`` is the file, or the folder holding the run's
    ``<method>-<run id>/metrics.jsonl``; no file yet gives no records.
    """
    if metrics is None:
        return []
    if metrics.suffix != ".jsonl":
        found = sorted(metrics.glob(f"*-{run_id}/metrics.jsonl"))
        metrics = found[0] if found else None
    if metrics is None or not metrics.exists():
        return []
    return read_jsonl(metrics, growing=True)


@dataclass(frozen=True)
class RunStatus:
    """A finished (or timed-out) run as ``flwr list`` reports it."""

    run_id: str
    status: str
    details: str
    elapsed: float

    @property
    def ok(self) -> bool:
        """Whether the run completed successfully."""
        return self.status == "finished:completed"


@contextlib.contextmanager
def shared_ray() -> Iterator[str | None]:
    """One local Ray cluster for the simulation runs started meanwhile.

    Flower's simulation engine starts a Ray cluster for every run and stops it
    at the run's end (``RayBackend.init_ray``: ``ray.init`` unless Ray is
    already initialised). Given ``RAY_ADDRESS``, that ``ray.init`` joins an
    existing cluster instead, and its ``ray.shutdown`` only disconnects: each
    run still gets its own job, with its own ClientApp actors and worker
    processes (they end with the run), but not its own GCS and raylet. This
    starts such a cluster in this process (all CPUs, as a run's own would
    have; no dashboard; no idle workers prestarted for this process, which
    submits no work), yields its address for ``RAY_ADDRESS``
    (:attr:`FlowerHome.extra_env`), and stops it on exit.

    Yields the caller's own ``RAY_ADDRESS`` unchanged when one is set (their
    cluster is used), or ``None`` when Ray cannot start here: runs then start
    their own clusters, as a plain ``flwr run`` does.
    """
    if os.environ.get("RAY_ADDRESS"):
        yield os.environ["RAY_ADDRESS"]
        return
    import ray

    try:
        with warnings.catch_warnings():  # Ray's notice of a future default
            warnings.simplefilter("ignore", FutureWarning)
            context = ray.init(
                address="local",  # a new cluster, never one found on this machine
                include_dashboard=False,
                log_to_driver=False,
                logging_level="WARNING",
                _system_config={"prestart_worker_first_driver": False},
            )
    except Exception as err:  # whatever stopped it, runs can start their own
        print(
            f"Ray could not start a shared cluster ({err}); each run starts its own",
            file=sys.stderr,
        )
        yield None
        return
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


@dataclass
class FlowerHome:
    """A Flower home using the project's ``flwr.toml``, with its own SuperLink.

    Parameters
    ----------
    home : Path
        Folder for ``config.toml`` (a link to ``flwr.toml``) and SuperLink state.
    http_port, control_port : int (default: free ports)
        Ports of the local SuperLink this home starts.
    app_dir : Path (default: the project root)
        The Flower App to run.
    connections : str | None (default: None)
        TOML text for ``config.toml`` instead of a link to ``flwr.toml`` (e.g.
        a deployment connection on a test's own ports).
    stage : bool (default: True)
        Submit a copy of the app's FAB files (:func:`stage_app`, made at the
        first submission, in ``home/app``) rather than ``app_dir`` itself.
    extra_env : Mapping[str, str] (default: none)
        More environment for the ``flwr`` CLI and the SuperLink it starts (so
        for every run's simulation process), e.g. ``RAY_ADDRESS`` from
        :func:`shared_ray`. Set before the SuperLink starts.
    """

    home: Path
    http_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    app_dir: Path = PROJECT_ROOT
    connections: str | None = None
    stage: bool = True
    extra_env: Mapping[str, str] = field(default_factory=dict)
    _staged: Path | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        config = self.home / "config.toml"
        if self.connections is not None:
            config.write_text(self.connections, encoding="utf-8")
        elif not config.exists():
            config.symlink_to(self.app_dir / "flwr.toml")

    @property
    def env(self) -> dict[str, str]:
        """Environment for the ``flwr`` CLI (and the SuperLink it starts)."""
        # The flwr CLI and the SuperLink it starts are found on PATH: put this
        # interpreter's scripts first, so an un-activated venv works too.
        scripts = str(Path(sys.executable).parent)
        return {
            **os.environ,
            "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")]),
            "FLWR_HOME": str(self.home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            **self.extra_env,
        }

    def flwr(self, *args: str, timeout: float = 120) -> str:
        """Run a ``flwr`` CLI command; return its stdout."""
        flwr = Path(sys.executable).parent / "flwr"
        proc = subprocess.run(
            [str(flwr) if flwr.exists() else "flwr", *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"flwr {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc.stdout

    def submit(
        self,
        run_config: Mapping[str, object] | None = None,
        federation_config: Mapping[str, object] | None = None,
        connection: str = "local",
    ) -> str:
        """Submit a run; return its run id (the run goes on in the background)."""
        app = self.app_dir
        if self.stage:
            if self._staged is None:
                self._staged = stage_app(self.app_dir, self.home / "app")
            app = self._staged
        if self._connection(connection).get("address") == ":local:":
            self.start_superlink()  # the one flwr run would start, given more time
        args = ["run", str(app), connection, "--format", "json"]
        if run_config:
            args += ["--run-config", format_run_config(run_config)]
        if federation_config:
            args += ["--federation-config", format_run_config(federation_config)]
        out = self.flwr(*args, timeout=180)
        reply = json.loads(out[out.index("{") :])
        if not reply.get("success"):
            raise RuntimeError(f"flwr run refused the run: {reply}")
        return str(reply["run-id"])

    def status(self, run_id: str, connection: str = "local") -> RunStatus:
        """The run's current status, as ``flwr list`` reports it.

        A ``flwr list`` process costs about 2 s of CPU, taken from the run it
        waits on. So for a connection of this home's ``config.toml`` that
        needs no account login (the local SuperLink, or an address with
        ``insecure`` or ``root-certificates``: the loopback deployments),
        the question goes straight to the SuperLink's Control API from this
        process, with Flower's own client and the CLI's formatting of the
        reply (about 5 ms of CPU). Any other connection goes through the CLI.
        """
        target = self._control_target(connection)
        if target is not None:
            return self._direct_status(run_id, *target)
        out = self.flwr("list", connection, "--run-id", run_id, "--format", "json")
        reply = json.loads(out[out.index("{") :])
        (run,) = [r for r in reply["runs"] if str(r["run-id"]) == run_id]
        return RunStatus(
            run_id, run["status"], str(run.get("status-details", "")), run["elapsed"]
        )

    def _connection(self, connection: str) -> dict[str, Any]:
        """``connection``'s entry in this home's ``config.toml`` ({} if none)."""
        try:
            config = tomllib.loads((self.home / "config.toml").read_text("utf-8"))
            entry = config["superlink"][connection]
        except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
            return {}
        return entry if isinstance(entry, dict) else {}

    def _control_target(self, connection: str) -> tuple[str, bytes | None] | None:
        """``(address, root certificate or None if insecure)`` of ``connection``'s
        Control API, when this process can ask it directly; else None."""
        entry = self._connection(connection)
        address = entry.get("address")
        if address == ":local:":
            return f"127.0.0.1:{self.http_port}", None
        known = {"address", "insecure", "root-certificates"}
        if not isinstance(address, str) or set(entry) - known:
            return None  # e.g. an account login or federation options
        if entry.get("insecure") is True:
            return address, None
        root = entry.get("root-certificates")
        if isinstance(root, str) and Path(root).is_file():
            return address, Path(root).read_bytes()
        return None

    def _direct_status(
        self, run_id: str, address: str, root: bytes | None
    ) -> RunStatus:
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.cli.run_utils import format_runs
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=root is None,
            root_certificates=root,
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
            ],
        )
        try:
            reply = client.ListRuns(ListRunsRequest(run_id=int(run_id)))
        finally:
            client.close()
        runs = [run_from_proto(proto) for proto in reply.run_dict.values()]
        (row,) = [r for r in format_runs(runs, reply.now) if str(r.run_id) == run_id]
        return RunStatus(run_id, row.status_text, str(row.details), row.elapsed)

    def logs(self, run_id: str, connection: str = "local") -> str:
        """The run's log as the SuperLink kept it (``flwr log --show``)."""
        return self.flwr("log", run_id, connection, "--show")

    def wait(
        self,
        run_id: str,
        timeout: float = 600,
        connection: str = "local",
        metrics: Path | None = None,
        on_records: Callable[[list[dict[str, Any]]], None] | None = None,
        list_every: float | None = None,
    ) -> RunStatus:
        """Wait until the run has finished (or ``timeout`` seconds pass).

        Flower is asked for the run's status after 1 s, then at intervals
        that double up to ``list_every`` (default: :data:`DIRECT_LIST_EVERY`
        for a SuperLink asked in-process, see :meth:`status`; else
        :data:`LIST_EVERY`, because each ``flwr list`` is a Python process,
        about 2 s of CPU, competing with the run's own processes for the
        cores). In between, the run's own metrics file is the cheap
        signal: ``metrics`` is that ``metrics.jsonl``, or the ``output-dir``
        in which the run makes its folder (``<method>-<run id>``). Once the
        file holds the run's summary, Flower is asked every half second
        until Flower says the run has finished. ``on_records`` gets the
        file's records at every read (to follow the run's progress).
        """
        if list_every is None:
            direct = self._control_target(connection) is not None
            list_every = DIRECT_LIST_EVERY if direct else LIST_EVERY
        deadline = time.monotonic() + timeout
        interval = min(1.0, list_every)
        next_list = time.monotonic() + interval
        while True:
            records = _records_so_far(metrics, run_id)
            if on_records is not None:
                on_records(records)
            summary = any(r.get("event") == "summary" for r in records)
            now = time.monotonic()
            if summary or now >= next_list or now > deadline:
                status = self.status(run_id, connection)
                if status.status.startswith("finished") or time.monotonic() > deadline:
                    return status
                interval = min(2 * interval, list_every)
                next_list = time.monotonic() + interval
            time.sleep(0.5)

    def run(
        self,
        run_config: Mapping[str, object] | None = None,
        federation_config: Mapping[str, object] | None = None,
        timeout: float = 600,
        connection: str = "local",
    ) -> RunStatus:
        """Submit a run and wait for it to finish (its ``output-dir``, when
        ``run_config`` sets one, tells :meth:`wait` when it is done).

        A run whose simulation engine could not start Ray
        (:data:`RAY_STARTUP_FAILURE` in its log) is submitted again, up to
        :data:`RAY_RETRIES` times; the status returned is the last attempt's.
        """
        out = (run_config or {}).get("output-dir")
        metrics = Path(str(out)) if out else None
        for attempt in range(RAY_RETRIES + 1):
            run_id = self.submit(run_config, federation_config, connection)
            status = self.wait(run_id, timeout, connection, metrics)
            if (
                status.ok
                or status.status != "finished:failed"
                or attempt == RAY_RETRIES
            ):
                break
            if RAY_STARTUP_FAILURE not in self.logs(run_id, connection):
                break
            print(
                f"run {run_id}: Ray did not start; submitting it again", file=sys.stderr
            )
        return status

    def superlink_ready(self) -> bool:
        """Whether this home's local SuperLink answers its health check."""
        url = f"http://127.0.0.1:{self.http_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                return 200 <= reply.status < 300
        except (OSError, ValueError):
            return False

    def start_superlink(self, timeout: float = SUPERLINK_STARTUP_TIMEOUT) -> None:
        """Start the local SuperLink ``flwr run`` would start, and wait for it.

        ``flwr run`` with a ``:local:`` connection starts this very SuperLink
        (the same command line) when none answers, but gives it 15 s and then
        kills it: on a loaded machine (two test workers on two cores) its
        first start, which imports Flower and creates the database, can take
        longer. Here it gets ``timeout`` seconds; ``flwr run`` then finds it
        running. Does nothing if it already answers.
        """
        if self.superlink_ready():
            return
        runtime = self.home / "local-superlink"
        runtime.mkdir(parents=True, exist_ok=True)
        log = runtime / "superlink.log"
        superlink = Path(sys.executable).parent / "flower-superlink"
        command = [
            str(superlink) if superlink.exists() else "flower-superlink",
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            f"127.0.0.1:{self.control_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.http_port),
            "--log-file",
            str(log),
            "--log-rotation-interval-hours",
            "24",
            "--log-rotation-backup-count",
            "7",
            "--database",
            str(runtime / "state.db"),
        ]
        process = subprocess.Popen(
            command,
            env=self.env,
            cwd=self.home,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the local SuperLink exited with code {process.returncode}; "
                    f"see {log}"
                )
            if self.superlink_ready():
                return
            time.sleep(0.2)
        process.kill()
        raise RuntimeError(
            f"the local SuperLink did not start within {timeout:.0f} s; see {log}"
        )

    def superlink_pids(self) -> list[int]:
        """PIDs of the local SuperLink this home started (found by its port)."""
        pids = []
        needle = f"--port\0{self.http_port}\0".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"flower-superlink" in cmdline and needle in cmdline:
                pids.append(int(entry.name))
        return pids

    def stop_superlink(self, grace: float = 10.0) -> None:
        """Stop the SuperLink (and its process group), waiting up to ``grace`` s."""
        for pid in self.superlink_pids():
            try:
                os.killpg(os.getpgid(pid), signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + grace
        while self.superlink_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.superlink_pids():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


@dataclass
class LoopbackDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1, for trying the deployment engine.

    By default insecure (no TLS, no node authentication): loopback trials
    only. With ``secure=True`` it runs as a real deployment should: TLS with a
    private CA and a server certificate for the loopback names, and SuperNode
    authentication, each node's public key registered with ``flwr supernode
    register`` before the node starts. Every process gets its own session, so
    :meth:`stop` ends each with its children.

    Parameters
    ----------
    root : Path
        Folder for state, certificates, keys, per-node Flower homes and logs.
    num_nodes : int (default: 2)
        SuperNodes to start; node ``i`` gets
        ``--node-config "partition-id=i num-partitions=num_nodes"`` plus
        ``node_config``.
    secure : bool (default: False)
        TLS and SuperNode authentication.
    unregistered : int (default: 0)
        With ``secure``: extra SuperNodes whose keys are *not* registered
        (the SuperLink must refuse them); logs ``intruder<i>.log``.
    node_config : str (default: "")
        Extra ``key=value`` pairs for every node's ``--node-config``.
    """

    root: Path
    num_nodes: int = 2
    secure: bool = False
    unregistered: int = 0
    node_config: str = ""
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    tls: TlsFiles | None = None

    def _spawn(self, args: list[str], home: Path, log: str) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        env = {**FlowerHome(home / "cli").env, "FLWR_HOME": str(home)}
        with (self.root / log).open("a") as out:
            proc = subprocess.Popen(
                args,
                env=env,
                cwd=PROJECT_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(proc)
        return proc

    def start(self) -> None:
        """Start the SuperLink, then the SuperNodes; wait until the link listens."""
        self.root.mkdir(parents=True, exist_ok=True)
        security = ["--insecure"]
        if self.secure:
            self.tls = make_tls_files(self.root / "tls")
            security = [
                "--ssl-ca-certfile",
                str(self.tls.ca_cert),
                "--ssl-certfile",
                str(self.tls.server_cert),
                "--ssl-keyfile",
                str(self.tls.server_key),
                "--enable-supernode-auth",
            ]
        self._spawn(
            [
                "flower-superlink",
                *security,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.root / "state.db"),
            ],
            self.root / "superlink",
            "superlink.log",
        )
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the SuperLink did not start within 60 s")
            time.sleep(0.3)
        names = [f"node{i}" for i in range(self.num_nodes)]
        if self.secure:
            names += [f"intruder{i}" for i in range(self.unregistered)]
        for name in names:
            self.start_node(name)

    def start_node(self, name: str) -> None:
        """Start SuperNode ``name`` (``node<i>`` or ``intruder<i>``), again if need be.

        ``node<i>`` gets partition ``i``; with ``secure``, its key is made and
        registered the first time (an ``intruder`` key never is). Its log is
        ``<name>.log``, appended to on a restart.
        """
        index = int(name.removeprefix("node").removeprefix("intruder"))
        security = ["--insecure"]
        if self.tls is not None:
            private = self.root / "keys" / name
            public = private.with_suffix(".pub")
            if not private.exists():
                private, public = make_node_key(private)
                if name.startswith("node"):
                    cli = FlowerHome(self.root / "cli", connections=self.connections)
                    cli.flwr("supernode", "register", str(public), "deploy")
            security = [
                "--root-certificates",
                str(self.tls.ca_cert),
                "--auth-supernode-private-key",
                str(private),
            ]
        partition = index % self.num_nodes
        config = f"partition-id={partition} num-partitions={self.num_nodes}"
        self.nodes[name] = self._spawn(
            [
                "flower-supernode",
                *security,
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--node-config",
                f"{config} {self.node_config}".strip(),
            ],
            self.root / name,
            f"{name}.log",
        )

    def node_ids(self, name: str) -> list[int]:
        """The node ids SuperNode ``name`` was given, one per start, from its log."""
        log = (self.root / f"{name}.log").read_text(errors="replace")
        return [int(m) for m in re.findall(r"SuperNode ID: (\d+)", log)]

    def kill_node(self, name: str) -> None:
        """Kill SuperNode ``name`` and its ClientApps at once (SIGKILL): a crash."""
        proc = self.nodes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    @property
    def connections(self) -> str:
        """A ``config.toml`` with a ``deploy`` connection to this SuperLink."""
        if self.secure:
            if self.tls is None:
                raise RuntimeError("start() makes the certificates first")
            security = f'root-certificates = "{self.tls.ca_cert}"\n'
        else:
            security = "insecure = true\n"
        return (
            '[superlink]\ndefault = "deploy"\n\n'
            f'[superlink.deploy]\naddress = "127.0.0.1:{self.port}"\n{security}'
        )

    def stop(self, grace: float = 10.0) -> None:
        """End every process (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        for proc in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes.clear()
        self.nodes.clear()
