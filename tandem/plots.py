"""Plots of a run's ``metrics.jsonl``: accuracy against rounds and bytes."""

from __future__ import annotations

from pathlib import Path

from tandem.tracking import read_jsonl

__all__ = ["plot_runs"]


def _label(records: list[dict], fallback: str) -> str:
    """``method, partitioner`` from the run's config record."""
    config = next((r["config"] for r in records if r["event"] == "config"), None)
    if not config:
        return fallback
    split = config.get("partitioner", "")
    if split == "dirichlet":
        split += f" α={config.get('dirichlet-alpha')}"
    return f"{config.get('method')}, {config.get('dataset')} {split}"


def plot_runs(runs: list[Path], out: Path, title: str = "") -> Path:
    """Plot server-side accuracy vs round and vs cumulative bytes for ``runs``.

    Parameters
    ----------
    runs : list of Path
        ``metrics.jsonl`` files (or run folders holding one).
    out : Path
        PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_round, ax_bytes) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        path = run / "metrics.jsonl" if run.is_dir() else run
        records = read_jsonl(path)
        rounds = [r for r in records if r["event"] == "round"]
        label = _label(records, path.parent.name)
        acc = [r["eval-accuracy"] for r in rounds]
        ax_round.plot([r["round"] for r in rounds], acc, marker=".", label=label)
        total_mb = [(r["cum-bytes-up"] + r["cum-bytes-down"]) / 1e6 for r in rounds]
        ax_bytes.plot(total_mb, acc, marker=".", label=label)
    ax_round.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1))
    ax_bytes.set(xlabel="bytes up + down (MB)", ylabel="test accuracy", ylim=(0, 1))
    for ax in (ax_round, ax_bytes):
        ax.grid(alpha=0.3)
    ax_round.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
