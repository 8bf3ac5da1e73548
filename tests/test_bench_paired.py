"""Time to target paired by seed: each seed against its own reference run."""

from __future__ import annotations

import pytest

from tandem.bench.report import format_milestone_table, format_paired_table
from tandem.bench.runner import FLOP_CLOCK, milestone_targets, paired_targets


def _curve(seed, accuracy, perplexity, seconds, profile="p"):
    return {
        "seed": seed,
        "accuracy": accuracy,
        "perplexity": perplexity,
        "emulated_seconds": {profile: seconds},
    }


def _methods():
    ref = {
        "emulated_seconds": {"p": 0.0},
        "curves": [
            _curve(0, [0.1, 0.5, 0.8, 0.9], [9, 5, 3, 2], [0, 10, 20, 30]),
            _curve(1, [0.1, 0.6, 0.7, 0.7], [9, 4, 3.5, 3.5], [0, 5, 10, 15]),
        ],
    }
    x = {
        "emulated_seconds": {"p": 0.0},
        "curves": [
            _curve(0, [0.1, 0.86, 0.8, 0.84], [9, 2.5, 1.9, 2.2], [0, 12, 24, 36]),
            _curve(1, [0.1, 0.6, 0.62, 0.64], [9, 3.6, 3.5, 3.0], [0, 5, 10, 15]),
            _curve(7, [0.9] * 4, [1.0] * 4, [0, 1, 2, 3]),  # no reference run
        ],
    }
    return {"ref": ref, "x": x, "broken": {"failed": True}}


def test_each_seed_is_timed_to_its_own_reference_runs_targets():
    paired = paired_targets(_methods(), "ref", margin=0.05)
    # seed 0: accuracy 0.9 - 0.05 = 0.85, perplexity 2; seed 1: 0.65 and 3.5
    assert paired["targets"]["accuracy"] == pytest.approx({"0": 0.85, "1": 0.65})
    assert paired["targets"]["perplexity"] == {"0": 2, "1": 3.5}
    assert "broken" not in paired["methods"]
    x = paired["methods"]["x"]
    assert x["seeds"] == [0, 1]
    acc = x["accuracy"]["p"]
    # the reference: 30 s (0.9 >= 0.85) and 10 s (0.7 >= 0.65); x: 12 s, never
    assert acc["reference_seconds_per_seed"] == [30.0, 10.0]
    assert acc["seconds_per_seed"] == [12.0, None]
    assert (acc["reached"], acc["no_later"]) == (1, 1)
    assert acc["time_vs_reference"] == pytest.approx(12 / 30)
    ppl = x["perplexity"]["p"]
    # perplexity at or below: x 24 s (1.9 <= 2) and 10 s (3.5, a tie with the
    # reference's 10 s counts as no later)
    assert ppl["seconds_per_seed"] == [24.0, 10.0]
    assert (ppl["reached"], ppl["no_later"]) == (2, 2)
    assert ppl["time_vs_reference"] == pytest.approx((24 / 30 + 10 / 10) / 2)
    ref = paired["methods"]["ref"]["accuracy"]["p"]
    assert (ref["reached"], ref["no_later"], ref["time_vs_reference"]) == (2, 2, 1.0)


def test_no_paired_figures_without_a_reference_run():
    methods = _methods()
    assert paired_targets(methods, "broken", 0.01) == {}
    assert paired_targets(methods, "missing", 0.01) == {}
    # a reference without perplexity gives accuracy targets only
    for c in methods["ref"]["curves"]:
        c["perplexity"] = [None] * 4
    assert list(paired_targets(methods, "ref", 0.05)["targets"]) == ["accuracy"]


def test_the_paired_table_prints_every_method_target_and_profile():
    results = {"reference": {"label": "ref"}}
    results["reference"]["paired"] = paired_targets(_methods(), "ref", margin=0.05)
    table = format_paired_table(results).splitlines()
    assert len(table) == 2 + 2 * 2  # header, rule; 2 methods x 2 targets
    assert table[0].startswith("| method | target (each seed's own) | profile |")
    row = "| x | ref's final accuracy − 5 pt | p | 1 / 2 | 1 / 2 | 0.400x |"
    assert table[4] == row + " 12.0, not reached |"
    assert format_paired_table({"reference": {"label": "ref"}}) == ""


def test_a_target_is_reached_on_it_not_only_past_it():
    ref = {"emulated_seconds": {"p": 0.0}}
    ref["curves"] = [_curve(0, [0.0, 0.5, 0.75], [9.0, 4.0, 2.0], [0, 10, 20])]
    x = {"emulated_seconds": {"p": 0.0}}
    x["curves"] = [_curve(0, [0.0, 0.75, 0.5], [9.0, 2.0, 4.0], [0, 4, 8])]
    paired = paired_targets({"ref": ref, "x": x}, "ref", margin=0.0)
    for key in ("accuracy", "perplexity"):
        assert paired["methods"]["x"][key]["p"]["seconds_per_seed"] == [4.0]


def test_milestones_time_each_seed_to_the_references_best_so_far():
    ms = milestone_targets(_methods(), "ref", fractions=(0.25, 0.5, 1.0))
    # seed 0's reference: accuracy 0.5, 0.8, 0.9 after evaluations 1-3, so
    # ceil(0.25 * 3) = 1 -> 0.5, ceil(0.5 * 3) = 2 -> 0.8, 3 -> 0.9;
    # seed 1: 0.6, 0.7, 0.7; perplexity is the lowest so far
    assert ms["targets"]["accuracy"] == {
        "0.25": {"0": 0.5, "1": 0.6},
        "0.5": {"0": 0.8, "1": 0.7},
        "1": {"0": 0.9, "1": 0.7},
    }
    assert ms["targets"]["perplexity"]["0.5"] == {"0": 3.0, "1": 3.5}
    x = ms["methods"]["x"]
    assert x["seeds"] == [0, 1]
    quarter = x["accuracy"]["0.25"]["p"]
    # seed 0: x 12 s (0.86), the reference 10 s (0.5); seed 1: both 5 s
    assert quarter["seconds_per_seed"] == [12.0, 5.0]
    assert quarter["reference_seconds_per_seed"] == [10.0, 5.0]
    assert (quarter["reached"], quarter["no_later"]) == (2, 1)
    assert quarter["time_vs_reference"] == pytest.approx((1.2 + 1.0) / 2)
    half = x["accuracy"]["0.5"]["p"]
    # seed 0: 0.8 at 12 s against the reference's 20 s; seed 1 never 0.7
    assert half["seconds_per_seed"] == [12.0, None]
    assert half["time_vs_reference"] == pytest.approx(0.6)
    assert x["accuracy"]["1"]["p"]["reached"] == 0
    assert x["accuracy"]["1"]["p"]["time_vs_reference"] is None
    ppl = x["perplexity"]["0.25"]["p"]  # 5 and 4: x at 12 s and 5 s
    assert ppl["seconds_per_seed"] == [12.0, 5.0]
    assert ppl["time_vs_reference"] == pytest.approx((12 / 10 + 5 / 5) / 2)
    assert "broken" not in ms["methods"]
    ref = ms["methods"]["ref"]["accuracy"]
    assert all(ref[f]["p"]["time_vs_reference"] == 1.0 for f in ("0.25", "0.5", "1"))


def test_milestones_need_a_reference_with_evaluations():
    methods = _methods()
    # the best so far, not the value then: x's seed 0 dips from 0.86 to 0.8
    dips = milestone_targets(methods, "x", fractions=(0.5,))["targets"]
    assert dips["accuracy"]["0.5"] == {"0": 0.86, "1": 0.62, "7": 0.9}
    assert dips["perplexity"]["0.5"] == {"0": 1.9, "1": 3.5, "7": 1.0}
    assert milestone_targets(methods, "broken") == {}
    assert milestone_targets(methods, "missing") == {}
    with pytest.raises(ValueError, match="fractions"):
        milestone_targets(methods, "ref", fractions=(0.0,))
    for c in methods["ref"]["curves"]:
        c["accuracy"], c["perplexity"] = c["accuracy"][:1], c["perplexity"][:1]
    assert milestone_targets(methods, "ref") == {}


def test_the_milestone_table_gives_each_share_of_the_run():
    results = {"milestones": milestone_targets(_methods(), "ref", (0.25, 0.5, 1.0))}
    table = format_milestone_table(results).splitlines()
    assert len(table) == 2 + 2 * 2  # header, rule; 2 methods x 2 targets
    assert table[0] == (
        "| method | target | profile | 25% of its run | 50% of its run "
        "| 100% of its run |"
    )
    assert table[4] == (
        "| x | ref's accuracy | p | 1.100x (2/2) | 0.600x (1/2) | – (0/2) |"
    )
    assert format_milestone_table({}) == ""


def test_paired_figures_on_the_flop_model_clock():
    methods = _methods()
    assert paired_targets(methods, "ref", 0.05, FLOP_CLOCK) == {}  # no such times
    for c in methods["ref"]["curves"]:  # the reference twice as slow there
        c[FLOP_CLOCK] = {"p": [2 * t for t in c["emulated_seconds"]["p"]]}
    for c in methods["x"]["curves"]:  # x twice as fast
        c[FLOP_CLOCK] = {"p": [t / 2 for t in c["emulated_seconds"]["p"]]}
    paired = paired_targets(methods, "ref", 0.05, FLOP_CLOCK)
    acc = paired["methods"]["x"]["accuracy"]["p"]
    assert acc["seconds_per_seed"] == [6.0, None]
    assert acc["reference_seconds_per_seed"] == [60.0, 20.0]
    assert acc["time_vs_reference"] == pytest.approx(6 / 60)
    ms = milestone_targets(methods, "ref", (0.25,), clock=FLOP_CLOCK)
    quarter = ms["methods"]["x"]["accuracy"]["0.25"]["p"]
    assert quarter["seconds_per_seed"] == [6.0, 2.5]
    assert quarter["reference_seconds_per_seed"] == [20.0, 10.0]
    results = {"reference": {"label": "ref", "paired_flop_model": paired}}
    assert "| x | ref's final accuracy − 5 pt | p | 1 / 2 | 1 / 2 | 0.100x |" in (
        format_paired_table(results, flop_model=True)
    )
    assert format_paired_table(results) == ""  # no measured-time figures here
