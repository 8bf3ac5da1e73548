"""The benchmark on next-token data: --model, text sizes, perplexity figures."""

from __future__ import annotations

import dataclasses

import pytest
from test_acesync_bench import SUITE, _run

from tandem.bench.cli import (
    assumptions,
    build_parser,
    select_variants,
    suite_for,
    workload,
)
from tandem.bench.report import format_reference_table, format_table, write_plots
from tandem.bench.runner import BenchOptions, _overrides, summarize
from tandem.bench.suites import SUITES


def test_model_and_text_workload_reach_every_variant(tmp_path):
    args = build_parser().parse_args(
        ["acesync", "--quick", "--dataset", "pysource", "--model", "transformer"]
    )
    _, _, _, extra = workload(args, SUITE)
    assert extra["partitioner"] == "natural"  # whole modules, not a label draw
    assert extra["text-max-bytes"] == 300_000 and extra["text-test-windows"] == 256
    opts = BenchOptions(
        out=tmp_path, dataset="pysource", model=args.model, extra=extra, nodes=3
    )
    for variant in SUITE.variants:
        flat = _overrides(opts, SUITE, variant, seed=0)
        assert flat["model"] == "transformer" and flat["dataset"] == "pysource"
        assert flat["partitioner"] == "natural"
    simul = build_parser().parse_args(["simultrain", "--dataset", "pysource"])
    assert simul.model == "auto"
    assert "partitioner" not in workload(simul, SUITES["simultrain"])[3]


def test_final_perplexity_beside_final_accuracy(tmp_path):
    v = {x.label: x for x in SUITE.variants}
    opts = BenchOptions(out=tmp_path, profiles=("variable",), seeds=(0, 1), nodes=2)
    runs = []
    for seed, (full, ace) in enumerate([(10.0, 10.2), (12.0, 12.0)]):
        runs += [
            _run(v["fullsync"], seed, [0.1, 0.5], 1000, {"final-perplexity": full}),
            _run(v["acesync"], seed, [0.1, 0.5], 300, {"final-perplexity": ace}),
            _run(v["fedavg"], seed, [0.1, 0.5], 1000),  # an older run: no perplexity
        ]
    ran = select_variants(SUITE, ["fedavg", "fullsync", "acesync"], {})
    results = summarize(ran, opts, runs)
    ace = results["methods"]["acesync"]
    assert ace["final_perplexity"] == pytest.approx(11.1)
    assert ace["final_perplexity_per_seed"] == [10.2, 12.0]
    assert ace["final_perplexity_sd"] == pytest.approx(((0.9**2) * 2) ** 0.5)
    assert "final_perplexity" not in results["methods"]["fedavg"]
    ref = results["reference"]["methods"]
    assert ref["acesync"]["perplexity_vs_reference"] == pytest.approx(11.1 / 11.0)
    assert "perplexity_vs_reference" not in ref["fedavg"]
    results["assumptions"] = {"profile_names": ["variable"]}
    table = format_table(results)
    assert "final perplexity" in table.splitlines()[0]
    assert "| 11.100 ± 1.273 |" in table and "| – |" in table
    assert "1.0091x" in format_reference_table(results)
    # time to fullsync's final perplexity: the curves come from round records
    assert results["target_perplexity"] == pytest.approx(11.0)
    assert "emulated_seconds_to_target_perplexity" in ace
    assert "emulated_seconds_to_target_perplexity" not in results["methods"]["fedavg"]
    # an older run without perplexity curves: the accuracy plots only
    names = [p.name for p in write_plots(results, tmp_path)]
    assert "perplexity.png" not in names
    for m in results["methods"].values():
        for curve in m["curves"]:
            curve["perplexity"] = [256.0, 20.0]
    names = [p.name for p in write_plots(results, tmp_path)]
    assert names[-1] == "perplexity.png"
    assert (tmp_path / "perplexity.png").read_bytes()[:4] == b"\x89PNG"


def test_time_to_a_perplexity_is_the_first_round_at_or_below_it():
    from tandem.bench.runner import _time_to_target

    def entry(*curves):
        return {
            "emulated_seconds": {"4g": 0.0},
            "curves": [
                {"emulated_seconds": {"4g": [0.0, 1.0, 2.0, 3.0]}, "perplexity": c}
                for c in curves
            ],
        }

    fast, slow = [256.0, 30.0, 12.0, 11.0], [256.0, 40.0, 13.0, 12.0]
    assert _time_to_target(entry(fast, slow), 12.0, "perplexity") == {"4g": 2.5}
    assert _time_to_target(entry(fast, slow), 11.5, "perplexity") == {"4g": None}
    # round 0 (before training) never counts
    assert _time_to_target(entry([1.0, 5.0, 2.0, 2.0]), 2.0, "perplexity") == {
        "4g": 2.0
    }


def test_the_assumptions_describe_the_data_every_variant_ran_on(tmp_path):
    args = build_parser().parse_args(
        ["simultrain", "--dataset", "mnist1d", "--config", "mnist1d-samples=400"]
    )
    suite = suite_for(args)
    opts = BenchOptions(out=tmp_path, dataset="mnist1d", nodes=2, steps=10)
    data = assumptions(opts, suite, {"target_accuracy": 0.5}, ["bench"])["dataset"]
    # the --config value every variant shares, not the default 10,000 samples
    assert data["train"] + data["test"] == 400
    # a key one variant sets differently is not the data's: the default stands
    mixed = dataclasses.replace(
        suite,
        variants=(
            dataclasses.replace(suite.variants[0], overrides={"mnist1d-samples": 200}),
            *suite.variants[1:],
        ),
    )
    data = assumptions(opts, mixed, {"target_accuracy": 0.5}, ["bench"])["dataset"]
    assert data["train"] + data["test"] == 10_000
