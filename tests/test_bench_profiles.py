"""The benchmark runs a link-reading method once per profile; others are re-timed."""

from __future__ import annotations

import dataclasses
import shlex

import pytest
from test_acesync_bench import _run

from tandem.bench.cli import (
    build_parser,
    check_profiles,
    describe_profile,
    select_variants,
    workload,
)
from tandem.bench.report import format_sensitivity_table, format_table, write_plots
from tandem.bench.runner import BenchOptions, summarize
from tandem.bench.suites import SUITES, per_profile

SUITE = SUITES["acesync"]
PROFILES = ("4g", "2mbit/8mbit/120ms")


def test_link_reading_variants_run_once_per_profile():
    suite = per_profile(select_variants(SUITE, ["fedavg", "acesync"], {}), PROFILES)
    by_label = {v.label: v for v in suite.variants}
    assert list(by_label) == ["fedavg", "acesync@4g", "acesync@2mbit/8mbit/120ms"]
    assert by_label["fedavg"].profile is None  # run once, re-timed per profile
    slow = by_label["acesync@2mbit/8mbit/120ms"]
    assert slow.profile == "2mbit/8mbit/120ms"
    assert slow.overrides["acesync-link"] == "2mbit/8mbit/120ms"
    assert slow.overrides["method"] == "acesync"
    one = per_profile(select_variants(SUITE, ["acesync"], {}), ["variable"])
    (only,) = one.variants  # one profile: the label stays
    assert only.label == "acesync" and only.overrides["acesync-link"] == "variable"
    assert per_profile(one, PROFILES).variants == one.variants  # already pinned


def test_a_pinned_variant_is_timed_under_its_own_profile_only(tmp_path):
    suite = per_profile(select_variants(SUITE, ["fullsync", "acesync"], {}), PROFILES)
    v = {x.label: x for x in suite.variants}
    opts = BenchOptions(out=tmp_path, profiles=PROFILES, nodes=2)
    runs = [
        _run(v["fullsync"], 0, [0.1, 0.5], 10_000),
        _run(v["acesync@4g"], 0, [0.1, 0.5], 4_000),
        _run(v["acesync@2mbit/8mbit/120ms"], 0, [0.1, 0.45], 1_000),
    ]
    results = summarize(suite, opts, runs)
    methods = results["methods"]
    assert set(methods["fullsync"]["emulated_seconds"]) == set(PROFILES)
    assert set(methods["acesync@4g"]["emulated_seconds"]) == {"4g"}
    slow = methods["acesync@2mbit/8mbit/120ms"]
    assert set(slow["emulated_seconds"]) == {"2mbit/8mbit/120ms"}
    assert slow["profile"] == "2mbit/8mbit/120ms"
    assert slow["bytes_up"] == 2 * 1_000 < methods["acesync@4g"]["bytes_up"]
    # one round (compute counts 0 here: no GFLOP/s given): 1,000 B down at
    # 8 Mbit/s is 1 ms + RTT/2, then 1,000 B up at 2 Mbit/s 4 ms + RTT/2
    assert slow["emulated_seconds"]["2mbit/8mbit/120ms"] == pytest.approx(0.125)
    # on 4g: 1,000 B down and 4,000 B up at 50 Mbit/s, 2 x 15 ms
    fast = methods["acesync@4g"]["emulated_seconds"]["4g"]
    assert fast == pytest.approx(0.00016 + 0.00064 + 0.030)
    # bound / achieved: the busiest resource is the uplink, held 0.64 ms (its
    # RTT/2 is propagation, not load): a round on 4g is latency-bound
    efficiency = methods["acesync@4g"]["pipeline_efficiency"]["4g"]
    assert efficiency == pytest.approx(0.00064 / fast)
    # no compute to count either way: the FLOP-count model times the same
    assert methods["acesync@4g"]["pipeline_efficiency_flop_model"] == {
        "4g": pytest.approx(efficiency)
    }
    (curve,) = slow["curves"]
    assert curve["emulated_seconds_flop_model"] == curve["emulated_seconds"]
    assert set(curve["emulated_seconds_flop_model"]) == {"2mbit/8mbit/120ms"}
    results["assumptions"] = {"profile_names": list(PROFILES)}
    table = format_table(results)
    row = next(line for line in table.splitlines() if "acesync@4g" in line)
    assert "–" in row  # no figure under the profile it was not run under
    assert len(write_plots(results, tmp_path)) == 3


def test_profiles_are_checked_and_described_before_any_run(tmp_path):
    check_profiles(["4g", "2mbit/8mbit/120ms", "mix:4g,5g"])
    with pytest.raises(ValueError, match="2mbit/8mbit"):
        check_profiles(["2mbit/8mbit"])
    assert describe_profile("2mbit/8mbit/120ms") == {
        "name": "2mbit/8mbit/120ms",
        "up_mbps": 2.0,
        "down_mbps": 8.0,
        "rtt_ms": pytest.approx(120.0),
        "jitter_ms": 0.0,
    }
    assert describe_profile("mix:4g,5g") == "mix:4g,5g"


def test_quick_workload_of_a_step_suite():
    args = build_parser().parse_args(["acesync", "--quick"])
    nodes, rounds, steps, extra = workload(args, SUITE)
    assert (nodes, rounds, steps) == (3, None, 50)
    assert extra == {"mnist1d-samples": 1000}


def test_headline_ratios_are_re_timed_at_half_and_twice_the_edge_factor(tmp_path):
    suite = per_profile(
        select_variants(SUITE, ["fullsync", "acesync"], {}), ["2mbit/8mbit/120ms"]
    )
    v = {x.label: x for x in suite.variants}
    # edge factor 1 (8 GFLOP/s here, 8 on the device); the cloud's compute 0
    opts = BenchOptions(
        out=tmp_path,
        profiles=("2mbit/8mbit/120ms",),
        nodes=2,
        rounds=1,
        local_gflops_edge=8.0,
    )
    runs = [
        _run(v["fullsync"], 0, [0.1, 0.5], 10_000),
        _run(v["acesync"], 0, [0.1, 0.5], 1_000),
    ]
    results = summarize(suite, opts, runs)
    # one round of 50 steps: 1,000 B down (1 ms + 60 ms), 10 ms x k of edge
    # compute, then the upload: 10,000 B at 2 Mbit/s is 40 ms + 60 ms, and
    # 1,000 B 4 ms + 60 ms; so (125 + 10k) / (161 + 10k) ms
    full = results["methods"]["fullsync"]
    by_k = full["emulated_seconds_per_step_by_edge_factor"]["2mbit/8mbit/120ms"]
    assert by_k == pytest.approx({"0.5": 0.166 / 50, "1": 0.171 / 50, "2": 0.181 / 50})
    (row,) = results["sensitivity"]
    assert (row["numerator"], row["denominator"]) == ("acesync", "fullsync")
    assert row["profile"] == "2mbit/8mbit/120ms"
    assert row["ratio_by_edge_factor"] == pytest.approx(
        {"0.5": 0.130 / 0.166, "1": 0.135 / 0.171, "2": 0.145 / 0.181}
    )
    table = format_sensitivity_table(results)
    assert "| acesync / fullsync | 2mbit/8mbit/120ms | 0.783x | 0.789x | 0.801x |" in (
        table
    )
    assert format_sensitivity_table({"sensitivity": []}) == ""
    # probes after the runs that read 39% faster: the runs re-timed at x1.389
    # too (an edge 1.389 times slower: 13.89 ms of compute), and named
    after = summarize(suite, dataclasses.replace(opts, edge_scale_after=1.38867), runs)
    by_k = after["methods"]["fullsync"]["emulated_seconds_per_step_by_edge_factor"]
    assert list(by_k["2mbit/8mbit/120ms"]) == ["0.5", "1", "1.389", "2"]
    assert by_k["2mbit/8mbit/120ms"]["1.389"] == pytest.approx(0.17489 / 50)
    (row,) = after["sensitivity"]
    assert row["after_probes_scale"] == "1.389"
    assert row["ratio_by_edge_factor"]["1.389"] == pytest.approx(0.13889 / 0.17489)
    assert "| edge factor x1.389 (probes after the runs) | edge factor x2 |" in (
        format_sensitivity_table(after)
    )


def test_rederive_rebuilds_the_results_from_the_archived_metrics(tmp_path, capsys):
    import dataclasses
    import json
    import shutil

    from tandem.bench.cli import (
        archive_metrics,
        assumptions,
        bench_options,
        build_parser,
        main,
    )
    from tandem.launch import RunStatus

    command = [
        "acesync",
        "--profile",
        "2mbit/8mbit/120ms",
        "--variants",
        "fullsync",
        "acesync",
        "--rounds",
        "1",
        "--nodes",
        "2",
        "--config",
        'wandb-entity="a team"',  # a value with a space and quotes
        "--out",
        str(tmp_path),
    ]
    suite = per_profile(
        select_variants(SUITE, ["fullsync", "acesync"], {}), ["2mbit/8mbit/120ms"]
    )
    v = {x.label: x for x in suite.variants}
    opts = bench_options(build_parser().parse_args(command), suite, (8.0, 100.0))
    runs = []
    for i, (label, seed, up) in enumerate(
        [("fullsync", 0, 10_000), ("fullsync", 1, 9_000), ("acesync", 0, 1_000)]
    ):
        run = _run(v[label], seed, [0.1, 0.4 + seed / 10], up)
        status = RunStatus(str(100 + i), run.status.status, "", 1.0)
        retried = ("99",) if i == 2 else ()  # an attempt Ray did not start
        runs.append(dataclasses.replace(run, status=status, retried=retried))
        folder = tmp_path / "runs" / f"{label}-{100 + i}"
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in run.records)
        )
    results = summarize(suite, opts, runs)
    results["assumptions"] = assumptions(opts, suite, results, command)
    assert archive_metrics(tmp_path) is not None
    shutil.rmtree(tmp_path / "runs")  # only the archive is committed
    older = json.loads(json.dumps(results))  # as an older summary wrote it
    del older["sensitivity"]
    for entry in older["methods"].values():
        del entry["emulated_seconds_per_step_by_edge_factor"]
    (tmp_path / "results.json").write_text(json.dumps(older))
    assert main(["rederive", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["methods"] == json.loads(json.dumps(results["methods"]))
    assert again["sensitivity"] == results["sensitivity"] != []
    assert again["methods"]["fullsync"]["final_accuracy_per_seed"] == [0.4, 0.5]
    assert again["methods"]["acesync"]["runs"][0]["retried"] == ["99"]
    assert again["assumptions"]["devices"] == results["assumptions"]["devices"]
    assert "rederived" in again["assumptions"]
    # the recorded command reads back as the argv it ran with, quotes and all
    recorded = shlex.split(again["assumptions"]["command"])
    assert recorded == ["tandem", "bench", *command]
    assert "| acesync / fullsync | 2mbit/8mbit/120ms |" in capsys.readouterr().out


def test_the_calibration_is_the_median_of_interleaved_probes(monkeypatch):
    import tandem.bench.cli as cli

    # one core, then every thread, nine times over; then a second block that
    # agrees with the first: the calibration has settled
    first = [60.0, 120.0, 80.0, 125.0, 59.0, 90.0] + [70.0, 100.0] * 6
    readings = iter(first + [70.0, 100.0] * 9 + [1e9] * 100)
    monkeypatch.setattr(cli, "measure_local_gflops", lambda threads=1: next(readings))
    suite = select_variants(SUITES["simultrain"], ["simultrain"], {})
    args = build_parser().parse_args(["simultrain", "--profile", "4g"])
    opts = cli.bench_options(args, per_profile(suite, ["4g"]))
    assert opts.calibration["edge"] == [60.0, 80.0, 59.0] + [70.0] * 15
    assert opts.calibration["cloud"] == [120.0, 125.0, 90.0] + [100.0] * 15
    assert opts.local_gflops_edge == 70.0 and opts.local_gflops_cloud == 100.0
    # the edge factor the runs get follows the median: 70 / 8 GFLOP/s
    assert opts.extra["simultrain-edge-factor"] == 8.75
    given = build_parser().parse_args(
        ["simultrain", "--profile", "4g", "--local-gflops", "50"]
    )
    opts = cli.bench_options(given, per_profile(suite, ["4g"]))
    assert opts.calibration == {} and opts.local_gflops_cloud == 50.0


def _probing(edge_blocks):
    """A probe that reads the given blocks of one-core GFLOP/s, 100 on all threads."""
    edge = iter([x for block in edge_blocks for x in block])
    return lambda threads: next(edge) if threads == 1 else 100.0


SETTLING = [38.5, 45.0, 50.0, 55.0, 60.0, 62.0, 65.0, 67.0, 69.1]  # one block
STEADY_80 = [79.0, 80.0, 81.0, 80.5, 79.5, 80.0, 80.2, 79.8, 80.0]


def test_a_calibration_waits_for_the_machine_to_settle():
    from tandem.bench.cli import calibrated, calibration_check, calibration_probes

    # a machine settling in its first block: that block's median (60) would
    # have been the calibration; two steady blocks that agree end it at 80
    probes = calibration_probes(probe=_probing([SETTLING, STEADY_80, STEADY_80]))
    assert len(probes["edge"]) == 27 and probes["cloud"] == [100.0] * 27
    assert calibrated(probes) == 80.0
    # steady blocks that disagree (60 then 80) are not settled either
    steady_60 = [x - 20.0 for x in STEADY_80]
    probes = calibration_probes(probe=_probing([steady_60, STEADY_80, STEADY_80]))
    assert len(probes["edge"]) == 27 and calibrated(probes) == 80.0
    # the probes after the runs read 20% slower: the check says so
    after = calibration_probes(
        probe=_probing([[x * 0.8 for x in STEADY_80]] * 2), max_blocks=2
    )
    check = calibration_check(probes, after)
    assert check["settled"] and check["blocks"] == 3
    assert check["edge_gflops_before"] == 80.0 and check["edge_gflops_after"] == 64.0
    assert check["drift"] == pytest.approx(-0.2)


def test_a_machine_that_never_settles_is_probed_at_most_max_blocks_and_flagged():
    from tandem.bench.cli import calibration_check, calibration_probes

    jumpy = [40.0, 80.0] * 4 + [60.0]
    probes = calibration_probes(probe=_probing([jumpy] * 5), max_blocks=5)
    assert len(probes["edge"]) == 45
    check = calibration_check(probes, probes)
    assert not check["settled"] and check["blocks"] == 5 and check["drift"] == 0.0
