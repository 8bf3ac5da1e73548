"""The acesync suite's bookkeeping: periods, the reference target, rounds to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.bench.cli import (
    build_parser,
    parse_config_items,
    select_variants,
    suite_for,
)
from tandem.bench.report import format_reference_table, format_table, write_plots
from tandem.bench.runner import BenchOptions, RunRecord, _overrides, summarize
from tandem.bench.suites import SUITES, Variant
from tandem.launch import RunStatus

SUITE = SUITES["acesync"]


def test_config_items_parse_as_toml():
    assert parse_config_items(
        ["acesync-c-min=0.6", "local-steps=20", 'dataset="mnist1d"', "x=word", "b=true"]
    ) == {
        "acesync-c-min": 0.6,
        "local-steps": 20,
        "dataset": "mnist1d",
        "x": "word",
        "b": True,
    }
    for bad, why in (("c-min", "not KEY=VALUE"), ("=1", "not KEY=VALUE")):
        with pytest.raises(ValueError, match=why):
            parse_config_items([bad])
    with pytest.raises(ValueError, match="cannot change 'method'"):
        parse_config_items(["method=topk"])


def test_a_subset_of_variants_with_config_over_theirs():
    sub = select_variants(SUITE, ["acesync", "fullsync"], {"acesync-c-min": 0.6})
    assert [v.label for v in sub.variants] == ["fullsync", "acesync"]  # suite order
    assert all(v.overrides["acesync-c-min"] == 0.6 for v in sub.variants)
    assert sub.variants[1].overrides["method"] == "acesync"
    assert sub.reference == "fullsync" and sub.steps == SUITE.steps
    # without the reference there is no table against it
    assert select_variants(SUITE, ["acesync"], {}).reference is None
    assert select_variants(SUITE, None, {}).variants == SUITE.variants
    with pytest.raises(ValueError, match=r"no variant \['acesink'\]"):
        select_variants(SUITE, ["acesink"], {})


def test_the_suite_compares_its_variants_on_the_same_steps():
    opts = BenchOptions(out=Path("unused"), steps=SUITE.steps, rounds=None)
    labels = [v.label for v in SUITE.variants]
    assert labels == [
        "fedavg",
        "fullsync",
        "topk",
        "fedavg-periodic",
        "acesync",
        "acesync-magnitude",
    ]
    assert SUITE.reference == "fullsync" and SUITE.profiles == ("variable",)
    for variant in SUITE.variants:
        assert opts.steps_for(variant) == SUITE.steps
    periodic = SUITE.variants[3]
    assert periodic.period == 3 and periodic.local_steps == 150
    assert opts.rounds_for(periodic) == 7 and opts.rounds_for(SUITE.variants[1]) == 21


def test_on_a_token_dataset_the_suite_keeps_its_variants_at_its_token_size():
    args = build_parser().parse_args(
        ["acesync", "--dataset", "pysource", "--config", "batch-size=8"]
    )
    suite = suite_for(args)
    assert [v.label for v in suite.variants] == [v.label for v in SUITE.variants]
    assert (suite.nodes, suite.steps) == (10, 210)
    opts = BenchOptions(out=Path("unused"), steps=suite.steps, rounds=None)
    for variant in suite.variants:
        # 10 local steps a round, the user's --config over the token size
        assert variant.overrides["batch-size"] == 8
        assert variant.overrides["local-steps"] == 10
        assert opts.steps_for(variant) == 210
    periodic = suite.variants[3]
    assert periodic.local_steps == 30 and opts.rounds_for(periodic) == 7
    assert opts.rounds_for(suite.variants[1]) == 21
    # on MNIST-1D the suite is as defined; SimulTrain's keeps nodes and steps
    plain = suite_for(build_parser().parse_args(["acesync"]))
    assert (plain.nodes, plain.steps) == (SUITE.nodes, SUITE.steps) == (10, 1050)
    assert all("batch-size" not in v.overrides for v in plain.variants)
    text = suite_for(build_parser().parse_args(["simultrain", "--dataset", "text"]))
    assert (text.nodes, text.steps) == (2, 300)
    assert {v.overrides["batch-size"] for v in text.variants} == {16}
    assert {v.overrides["text-test-windows"] for v in text.variants} == {256}
    # a token default sits under the variants' own values
    assert text.defaults["simultrain-edge-lr-scale"] == 0.25
    flat = {
        v.label: _overrides(BenchOptions(out=Path("unused")), text, v, seed=0)
        for v in text.variants
    }
    assert flat["simultrain-no-reconcile"]["simultrain-lambda"] == 0.0
    assert flat["simultrain-no-reconcile"]["simultrain-edge-lr-scale"] == 0.25
    assert "simultrain-edge-lr-scale" not in SUITES["simultrain"].defaults


def test_a_periodic_variant_must_state_its_period():
    with pytest.raises(ValueError, match="must set acesync-period"):
        Variant("p", {"method": "fedavg-periodic", "local-steps": 50})


def _run(variant, seed, accuracies, bytes_up, extra=None):
    records = [{"event": "config", "config": {}}]
    cum_up = cum_down = 0
    for r, acc in enumerate(accuracies):
        if r > 0:
            for node in (1, 2):
                records.append(
                    {
                        "event": "bytes",
                        "round": r,
                        "node-id": node,
                        "bytes-up": bytes_up,
                        "bytes-down": 1000,
                        "edge-seconds": 0.01,
                    }
                )
            cum_up += 2 * bytes_up
            cum_down += 2000
        records.append(
            {
                "event": "round",
                "round": r,
                "eval-accuracy": acc,
                "cloud-seconds": 0.001,
                "cum-bytes-up": cum_up,
                "cum-bytes-down": cum_down,
            }
        )
    records.append(
        {
            "event": "summary",
            "final-accuracy": accuracies[-1],
            "bytes-up": cum_up,
            "bytes-down": cum_down,
            "wall-seconds": 1.0,
            **(extra or {}),
        }
    )
    status = RunStatus(f"{variant.label}-{seed}", "finished:completed", "", 1.0)
    return RunRecord(variant, seed, status, records, len(accuracies) - 1)


def test_reference_target_rounds_and_bytes(tmp_path):
    v = {x.label: x for x in SUITE.variants}
    opts = BenchOptions(out=tmp_path, profiles=("variable",), seeds=(0, 1), nodes=2)
    runs = []
    for seed in (0, 1):
        runs += [
            _run(v["fullsync"], seed, [0.1, 0.5, 0.8, 0.9, 0.9], 1000),
            _run(v["fedavg"], seed, [0.1, 0.5, 0.85, 0.9, 0.91], 1100),
            _run(v["topk"], seed, [0.1, 0.3, 0.5, 0.7, 0.8], 300),
            # one round per three of the others'
            _run(v["fedavg-periodic"], seed, [0.1, 0.895], 1100),
            _run(
                v["acesync"],
                seed,
                [0.1, 0.6, 0.89, 0.9, 0.899],
                280,
                {"overhead-share": 0.03 + 0.01 * seed, "encoded-ratio": 0.25},
            ),
        ]
    ran = select_variants(SUITE, sorted({r.variant.label for r in runs}), {})
    results = summarize(ran, opts, runs)
    results["assumptions"] = {"profile_names": ["variable"]}
    assert results["target_accuracy"] == pytest.approx(0.89)  # fullsync - 1 pt
    ref = results["reference"]["methods"]
    assert ref["fullsync"]["rounds_to_target"] == 3
    assert ref["acesync"]["rounds_to_target"] == 2
    assert ref["acesync"]["bytes_up_vs_reference"] == pytest.approx(0.28)
    # total = up + down: 4 rounds x 2 nodes x (280 + 1000) against (1000 + 1000)
    assert results["methods"]["acesync"]["bytes_total"] == 4 * 2 * 1280
    assert results["methods"]["acesync"]["bytes_total_per_seed"] == [10240, 10240]
    assert ref["acesync"]["bytes_total"] == 10240
    assert ref["acesync"]["bytes_total_vs_reference"] == pytest.approx(0.64)
    assert ref["acesync"]["accuracy_minus_reference"] == pytest.approx(-0.001)
    assert ref["acesync"]["overhead_share"] == pytest.approx(0.035)
    assert ref["topk"]["rounds_to_target"] is None  # never reached 0.89
    assert ref["acesync"]["last3_accuracy"] == pytest.approx((0.89 + 0.9 + 0.899) / 3)
    assert ref["acesync"]["last3_minus_reference"] == pytest.approx(
        (0.89 + 0.9 + 0.899 - 0.8 - 0.9 - 0.9) / 3
    )
    # the periodic variant's first sync counts as three rounds' worth of steps
    assert ref["fedavg-periodic"]["rounds_to_target_per_seed"] == [3.0, 3.0]
    table = format_reference_table(results)
    assert "| acesync |" in table and "0.280x" in table and "not reached" in table
    assert "total vs fullsync" in table and "0.640x" in table
    assert "| acesync |" in format_table(
        {**results, "assumptions": {"profile_names": ["variable"]}}
    )
    assert "s to perplexity" not in table  # no run reported perplexity
    # with perplexity: the seconds to the reference's final perplexity
    results["target_perplexity"] = 17.0369
    ref["acesync"]["emulated_seconds_to_target_perplexity"] = {"variable": 76.46}
    ref["topk"]["emulated_seconds_to_target_perplexity"] = {"variable": None}
    rows = {
        line.split(" | ")[0]: line.split(" | ")
        for line in format_reference_table(results).splitlines()
    }
    column = rows["| method"].index("s to perplexity 17.037 (variable)")
    assert rows["| acesync"][column] == "76.5"
    assert rows["| topk"][column] == "not reached"
    assert rows["| fullsync"][column] == "–"  # no figure: none shown
    names = [p.name for p in write_plots(results, tmp_path)]
    assert names == [
        "accuracy_vs_time.png",
        "accuracy_vs_bytes.png",
        "accuracy_vs_uplink.png",
    ]
