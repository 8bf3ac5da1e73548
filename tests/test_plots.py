"""``tandem plot``: failed runs skipped with a note, unique labels, clear errors."""

from __future__ import annotations

import json

import pytest

from tandem.cli import main
from tandem.plots import PlotError, draw_runs, load_run, plot_runs, run_labels

CONFIG = {"method": "fedavg", "dataset": "mnist1d", "partitioner": "iid"}


def _run(folder, *, finished=True, failed=None, rounds=3):
    folder.mkdir(parents=True)
    records = [{"event": "config", "config": CONFIG}]
    for r in range(rounds):
        records.append(
            {
                "event": "round",
                "round": r,
                "eval-accuracy": 0.1 + 0.2 * r,
                "cum-bytes-up": 1000 * r,
                "cum-bytes-down": 1000 * r,
            }
        )
    if failed:
        records.append({"event": "failed", "reason": failed})
    elif finished:
        records.append({"event": "summary", "final-accuracy": 0.5})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return folder


def test_failed_and_unfinished_runs_are_skipped_with_a_note(tmp_path):
    good = _run(tmp_path / "fedavg-1")
    failed = _run(tmp_path / "fedavg-2", failed="round 1: every node (3) failed: x")
    cut = _run(tmp_path / "fedavg-3", finished=False)
    empty = tmp_path / "fedavg-4"
    empty.mkdir()
    notes: list[str] = []
    out = plot_runs([good, failed, cut, empty], tmp_path / "p.png", note=notes.append)
    assert out.is_file()
    assert notes == [
        f"skipped {failed}: failed: round 1: every node (3) failed: x",
        f"skipped {cut}: did not finish (no summary)",
        f"skipped {empty}: no metrics.jsonl in {empty}",
    ]
    with pytest.raises(PlotError, match="no finished run to plot"):
        plot_runs([failed], tmp_path / "q.png")


def test_runs_sharing_a_label_get_their_folder_and_integer_round_ticks(tmp_path):
    runs = [load_run(_run(tmp_path / n)) for n in ("fedavg-11", "fedavg-12")]
    runs.append(load_run(_run(tmp_path / "other", rounds=2)))
    runs[2][1][0]["config"] = {**CONFIG, "method": "acesync"}
    assert run_labels(runs) == [
        "fedavg, mnist1d iid (fedavg-11)",
        "fedavg, mnist1d iid (fedavg-12)",
        "acesync, mnist1d iid",
    ]
    fig = draw_runs(runs)
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) > 0 and all(float(t).is_integer() for t in ticks)


def test_a_bad_path_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["plot", str(tmp_path / "nonexistent")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    missing = tmp_path / "nonexistent"
    assert err == f"tandem plot: error: no such run folder or file: {missing}\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(PlotError, match=r"is not a tandem metrics\.jsonl"):
        load_run(bad)
