"""The SimulTrain suite's variants, and its ``splitsync`` baseline, without runs.

``splitsync`` is SimulTrain with the pipeline switched off: the same model,
cut, chunk and precision, one chunk in flight, no forecast. These tests check
what the suite asks for and how ``results.json`` times it, on hand-made
records (the end-to-end bench run is in ``test_bench.py``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from tandem.bench.cli import select_variants
from tandem.bench.runner import BenchOptions, RunRecord, _keep_log, summarize
from tandem.bench.suites import SUITES
from tandem.config import RunConfig
from tandem.launch import FlowerHome, RunStatus
from tandem.protocol.simultrain import SimulTrainOptions
from tandem.schedules import Exchange

SUITE = SUITES["simultrain"]
MB = 1_000_000
#: 1 MB takes 1 s each way, plus half of the 100 ms RTT
LINK = "8mbit/8mbit/100ms"


def _options(label: str) -> SimulTrainOptions:
    (variant,) = [v for v in SUITE.variants if v.label == label]
    flat = {**SUITE.defaults, **variant.overrides}
    return RunConfig.from_flat(flat).options_as(SimulTrainOptions)


def test_the_suite_has_splitsync_beside_simultrain_and_its_baselines():
    labels = [v.label for v in SUITE.variants]
    assert {"simultrain", "splitsync", "syncsgd", "centralized"} <= set(labels)
    assert len(labels) == len(set(labels))
    (split,) = [v for v in SUITE.variants if v.label == "splitsync"]
    assert split.overrides["method"] == "simultrain"
    assert split.schedule == "pipeline"  # re-timed by replay_pipeline
    assert split.link_option == ""  # its traffic does not read the link
    chosen = select_variants(SUITE, ["simultrain", "splitsync", "syncsgd"], {})
    assert [v.label for v in chosen.variants] == ["syncsgd", "simultrain", "splitsync"]


def test_splitsync_is_simultrain_with_one_chunk_in_flight_and_no_forecast():
    pipe, split = _options("simultrain"), _options("splitsync")
    assert pipe.in_flight == 2 and split.in_flight == 1
    assert pipe.alpha == 0.5 and split.alpha == 0.0
    # the same model, cut, chunk and precision; nothing else differs
    assert (split.cut, split.stream_chunk, split.precision) == (
        pipe.cut,
        pipe.stream_chunk,
        pipe.precision,
    )
    assert dataclasses.replace(split, window=pipe.window, alpha=pipe.alpha) == pipe


def _exchanges(serial: bool) -> list[dict]:
    # three chunks of one micro-batch, 1 MB up each; the gradients of chunk k
    # go down (1 MB) on message k + 1 (serial) or k + 2 (pipelined)
    lag = 1 if serial else 2
    return [
        {
            "event": "exchange",
            **Exchange(
                node=1,
                seq=k,
                bytes_down=MB if k >= lag else 0,
                edge_seconds=0.01,
                bytes_up=MB,
                cloud_seconds=0.01,
                grads_from=k - lag if k >= lag else -1,
                micro_batches=1,
            ).to_record(),
        }
        for k in range(3)
    ]


def _run(variant, serial: bool) -> RunRecord:
    records = [
        {
            "event": "round",
            "round": 0,
            "eval-accuracy": 0.1,
            "cum-bytes-up": 0,
            "cum-bytes-down": 0,
        },
        *_exchanges(serial),
        {
            "event": "round",
            "round": 1,
            "eval-accuracy": 0.5,
            "exchanges": 3,
            "cum-bytes-up": 3 * MB,
            "cum-bytes-down": (3 - (1 if serial else 2)) * MB,
        },
        {
            "event": "summary",
            "final-accuracy": 0.5,
            "bytes-up": 3 * MB,
            "bytes-down": (3 - (1 if serial else 2)) * MB,
            "wall-seconds": 1.0,
        },
    ]
    status = RunStatus(f"{variant.label}-0", "finished:completed", "", 1.0)
    return RunRecord(variant, 0, status, records, 2)


def test_results_time_splitsync_serial_and_simultrain_pipelined(tmp_path):
    suite = select_variants(SUITE, ["simultrain", "splitsync"], {})
    v = {x.label: x for x in suite.variants}
    # no GFLOP/s given: compute counts 0, only the link is timed
    opts = BenchOptions(out=tmp_path, profiles=(LINK,), nodes=1, steps=3)
    runs = [_run(v["simultrain"], serial=False), _run(v["splitsync"], serial=True)]
    methods = summarize(suite, opts, runs)["methods"]
    assert set(methods) == {"simultrain", "splitsync"}
    split = methods["splitsync"]
    assert split["method"] == "simultrain" and split["schedule"] == "pipeline"
    assert split["overrides"]["simultrain-window"] == 1
    # serial: down 0 B (0.05), up (1.05) -> 1.1; down chunk 0's gradients and
    # up chunk 1 -> 3.2; down chunk 1's and up chunk 2 -> 5.3 s, 3 steps
    assert split["emulated_seconds"][LINK] == pytest.approx(5.3)
    assert split["emulated_seconds_per_step"][LINK] == pytest.approx(5.3 / 3)
    # pipelined: reply 0 at 1.1; message 1 (no gradients) at once, reply 1 at
    # 2.2; message 2 with chunk 0's gradients, reply 2 at 2.2 + 2.1 = 4.3 s
    pipe = methods["simultrain"]
    assert pipe["emulated_seconds"][LINK] == pytest.approx(4.3)
    assert split["steps_per_edge"] == pipe["steps_per_edge"] == 3


def test_a_failed_runs_flower_log_is_kept_and_said(tmp_path, capsys):
    class Home:
        def __init__(self, text=None):
            self.text, self.asked = text, []

        def logs(self, run_id):
            self.asked.append(run_id)
            if self.text is None:
                raise RuntimeError("flwr log exited 1")
            return self.text

    home = Home("Traceback ...\nDataError: text file not found\n")
    _keep_log(home, "42", tmp_path / "run-42", "simultrain, seed 3")
    assert home.asked == ["42"]
    kept = tmp_path / "run-42" / "flwr.log"
    assert kept.read_text().endswith("DataError: text file not found\n")
    said = capsys.readouterr().err
    assert "run 42 (simultrain, seed 3) failed" in said and str(kept) in said
    # a log that cannot be had says why, in the same place
    _keep_log(Home(), "43", tmp_path / "run-43", "splitsync, seed 0")
    assert "flwr log exited 1" in (tmp_path / "run-43" / "flwr.log").read_text()


class _FlakyHome:
    """A SuperLink whose runs fail as scripted: ``outcomes`` per submission,
    ``"ray"`` (Ray did not start: the ServerApp wrote its round 0 and no
    more), ``"crash"`` (a run that trained and failed) or ``"ok"`` (a
    summary written)."""

    def __init__(self, out, outcomes):
        self.out, self.outcomes, self.submitted = out, list(outcomes), []

    def submit(self, overrides, federation):
        run_id = str(100 + len(self.submitted))
        outcome = self.outcomes[len(self.submitted)]
        self.submitted.append((run_id, outcome, dict(overrides)))
        folder = self.out / "runs" / f"simultrain-{run_id}"
        folder.mkdir(parents=True)
        if outcome == "ray":  # Ray starts with the first message, after round 0
            records = [{"event": "round", "round": 0}]
        else:
            last = "summary" if outcome == "ok" else "round"
            records = [{"event": "round", "round": 1}, {"event": last, "round": 2}]
        (folder / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records)
        )
        return run_id

    def status(self, run_id, connection="local"):
        (outcome,) = [o for r, o, _ in self.submitted if r == run_id]
        done = "finished:completed" if outcome == "ok" else "finished:failed"
        return RunStatus(run_id, done, "", 1.0)

    wait = FlowerHome.wait  # the real wait, on this scripted status

    def _control_target(self, connection):
        return None  # asked as through the CLI: the wait's slower cadence

    def logs(self, run_id):
        (outcome,) = [o for r, o, _ in self.submitted if r == run_id]
        if outcome == "ray":
            return "Exception: The current node timed out during startup. ...\n"
        return "Traceback ...\nValueError: a real failure\n"


@pytest.mark.parametrize(
    ("outcomes", "runs", "retried", "ok"),
    [
        (["ray", "ok"], 2, ("100",), True),
        (["ray", "ray", "ok"], 3, ("100", "101"), True),
        (["ray", "ray", "ray"], 3, ("100", "101"), False),  # RAY_RETRIES = 2
        (["crash"], 1, (), False),  # a run that trained is not run again
        (["ok"], 1, (), True),
    ],
)
def test_a_run_that_ray_did_not_start_is_submitted_again(
    tmp_path, monkeypatch, capsys, outcomes, runs, retried, ok
):
    import tandem.bench.runner as runner
    import tandem.launch as launch

    monkeypatch.setattr(launch.time, "sleep", lambda s: None)
    home = _FlakyHome(tmp_path, outcomes)
    (variant,) = [v for v in SUITE.variants if v.label == "simultrain"]
    opts = BenchOptions(out=tmp_path, profiles=(LINK,), nodes=2, steps=3)
    record = runner._run_one(home, opts, SUITE, variant, 7, None)
    assert len(home.submitted) == runs
    assert {o["seed"] for _, _, o in home.submitted} == {7}  # the same run again
    assert record.retried == retried and record.ok == ok
    assert record.status.run_id == home.submitted[-1][0]
    for run_id in retried:  # each failed attempt keeps its own log
        assert (
            "timed out during startup"
            in (tmp_path / "runs" / f"simultrain-{run_id}" / "flwr.log").read_text()
        )
    assert capsys.readouterr().err.count("submitting it again") == len(retried)
    # results.json names the attempts (records dropped: no figures needed)
    bare = dataclasses.replace(record, records=[])
    entry = summarize(SUITE, opts, [bare])["methods"]["simultrain"]["runs"][0]
    assert entry.get("retried", []) == list(retried)


def test_the_runs_metrics_are_archived_beside_the_results(tmp_path):
    import tarfile

    from tandem.bench.cli import archive_metrics

    assert archive_metrics(tmp_path) is None  # no runs: nothing to keep
    for run, files in {
        "simultrain-1": {
            "metrics.jsonl": '{"event": "summary"}\n',
            "checkpoint.npz": "x",
        },
        "syncsgd-2": {"metrics.jsonl": '{"event": "round"}\n', "flwr.log": "Traceback"},
    }.items():
        (tmp_path / "runs" / run).mkdir(parents=True)
        for name, text in files.items():
            (tmp_path / "runs" / run / name).write_text(text)
    path = archive_metrics(tmp_path)
    assert path == tmp_path / "runs-metrics.tar.gz"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "runs/simultrain-1/metrics.jsonl",
            "runs/syncsgd-2/flwr.log",
            "runs/syncsgd-2/metrics.jsonl",
        ]  # checkpoints stay out
        assert all(m.mtime == 0 for m in members)
        data = tar.extractfile("runs/simultrain-1/metrics.jsonl").read()
        assert data == b'{"event": "summary"}\n'
    # an earlier suite's run left in the folder stays out of this suite's
    (tmp_path / "runs" / "fedavg-12").mkdir()
    (tmp_path / "runs" / "fedavg-12" / "metrics.jsonl").write_text("{}\n")
    with tarfile.open(archive_metrics(tmp_path, ["2", "1"])) as tar:
        assert [m.name for m in tar.getmembers()] == [
            "runs/simultrain-1/metrics.jsonl",
            "runs/syncsgd-2/flwr.log",
            "runs/syncsgd-2/metrics.jsonl",
        ]


def test_the_tables_regenerate_from_a_committed_results_json(capsys, tmp_path):
    import json
    from pathlib import Path

    from tandem.bench.cli import report_main
    from tandem.bench.report import format_reference_table, format_table

    path = Path(__file__).parents[1] / "docs" / "bench" / "acesync" / "results.json"
    results = json.loads(path.read_text())
    assert report_main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(format_table(results))
    assert format_reference_table(results) in printed
    assert "| acesync |" in printed and "against fullsync" in printed
    bad = tmp_path / "results.json"
    bad.write_text('{"suite": "nope"}')
    with pytest.raises(SystemExit) as exit_:
        report_main([str(bad)])
    assert exit_.value.code == 2
    assert "not a suite's results.json" in capsys.readouterr().err


def test_the_raw_cloud_replay_charges_each_chunk_as_it_ran(tmp_path):
    from tandem.bench.runner import _emulate
    from tandem.network import DeviceProfile

    suite = select_variants(SUITE, ["splitsync"], {})
    (variant,) = suite.variants
    run = _run(variant, serial=True)  # the cloud takes 10 ms on each chunk
    # ... but 1 s on the last one here (this machine was busy)
    (last,) = [r for r in run.records if r.get("seq") == 2]
    last["cloud-seconds"] = 1.0
    same = DeviceProfile("here", 1.0, "")
    opts = BenchOptions(
        out=tmp_path,
        profiles=(LINK,),
        nodes=1,
        steps=3,
        edge=same,
        cloud=same,
        local_gflops_edge=1.0,
        local_gflops_cloud=1.0,
    )
    steady = _emulate(run, LINK, opts)["total"]
    raw = _emulate(run, LINK, opts, raw_cloud=True)["total"]
    # three chunks in series: the steadied cloud charges 10 ms (the median of
    # fewer than four) for the last chunk, the raw one its 1 s
    assert raw - steady == pytest.approx(1.0 - 0.01)
