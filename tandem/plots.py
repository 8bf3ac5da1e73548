"""Plots of a run's ``metrics.jsonl``: accuracy against rounds and bytes."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tandem.tracking import read_jsonl

__all__ = ["PlotError", "draw_runs", "load_run", "plot_runs", "run_labels"]


class PlotError(ValueError):
    """A path that is not a run, or nothing left to plot."""


def _label(records: list[dict], fallback: str) -> str:
    """``method, dataset partitioner`` from the run's config record."""
    config = next((r["config"] for r in records if r["event"] == "config"), None)
    if not config:
        return fallback
    split = config.get("partitioner", "")
    if split == "dirichlet":
        split += f" α={config.get('dirichlet-alpha')}"
    return f"{config.get('method')}, {config.get('dataset')} {split}"


def load_run(run: Path) -> tuple[Path, list[dict[str, Any]]]:
    """The ``metrics.jsonl`` of ``run`` (a run folder or the file) and its records.

    Raises
    ------
    PlotError
        If there is no such file, or it is not JSON lines.
    """
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        where = "no metrics.jsonl in" if run.is_dir() else "no such run folder or file:"
        raise PlotError(f"{where} {run}")
    try:
        return path, read_jsonl(path)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as err:
        raise PlotError(f"{path} is not a tandem metrics.jsonl ({err})") from None


def _why_not_plotted(records: list[dict[str, Any]]) -> str | None:
    """Why a run is left out (failed, unfinished, no rounds), else ``None``."""
    failed = next((r for r in records if r.get("event") == "failed"), None)
    if failed is not None:
        return f"failed: {failed.get('reason', '')}"
    if not any(r.get("event") == "summary" for r in records):
        return "did not finish (no summary)"
    if not any(r.get("event") == "round" for r in records):
        return "has no rounds"
    return None


def run_labels(runs: list[tuple[Path, list[dict[str, Any]]]]) -> list[str]:
    """One legend label per run, unique: a shared label gets the run folder."""
    base = [_label(records, path.parent.name) for path, records in runs]
    counts = Counter(base)
    return [
        label if counts[label] == 1 else f"{label} ({path.parent.name})"
        for label, (path, _) in zip(base, runs, strict=True)
    ]


def plot_runs(
    runs: list[Path],
    out: Path,
    title: str = "",
    note: Callable[[str], None] | None = None,
) -> Path:
    """Plot server-side accuracy vs round and vs cumulative bytes for ``runs``.

    Failed and unfinished runs are left out, each with a ``note``; a label
    several runs share gets each run's folder name.

    Parameters
    ----------
    runs : list of Path
        ``metrics.jsonl`` files (or run folders holding one).
    out : Path
        PNG to write.
    title : str (default: "")
        Figure title.
    note : callable, optional
        Gets one line per run left out (default: ignored).

    Raises
    ------
    PlotError
        For a path that is not a run, or when no run is left to plot.
    """
    loaded = []
    for run in runs:
        try:
            path, records = load_run(run)
        except PlotError as err:
            if not run.is_dir():
                raise
            why: str | None = str(err)  # e.g. a folder of a run that never started
        else:
            why = _why_not_plotted(records)
        if why is not None:
            if note is not None:
                note(f"skipped {run}: {why}")
            continue
        loaded.append((path, records))
    if not loaded:
        raise PlotError("no finished run to plot")
    fig = draw_runs(loaded, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def draw_runs(runs: list[tuple[Path, list[dict[str, Any]]]], title: str = "") -> Any:
    """The figure of :func:`plot_runs` for loaded, finished runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    loaded = runs
    fig, (ax_round, ax_bytes) = plt.subplots(1, 2, figsize=(10, 3.8))
    for (_, records), label in zip(loaded, run_labels(loaded), strict=True):
        rounds = [r for r in records if r["event"] == "round"]
        acc = [r["eval-accuracy"] for r in rounds]
        ax_round.plot([r["round"] for r in rounds], acc, marker=".", label=label)
        total_mb = [(r["cum-bytes-up"] + r["cum-bytes-down"]) / 1e6 for r in rounds]
        ax_bytes.plot(total_mb, acc, marker=".", label=label)
    ax_round.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1))
    ax_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_bytes.set(xlabel="bytes up + down (MB)", ylabel="test accuracy", ylim=(0, 1))
    for ax in (ax_round, ax_bytes):
        ax.grid(alpha=0.3)
    ax_round.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
