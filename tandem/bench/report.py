"""The benchmark's outputs: a side-by-side table and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "format_milestone_table",
    "format_paired_table",
    "format_reference_table",
    "format_sensitivity_table",
    "format_table",
    "write_plots",
]


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f} KB" if n < 1e6 else f"{n / 1e6:,.2f} MB"


def _opt(value: float | None, fmt: str) -> str:
    return "not reached" if value is None else format(value, fmt)


def _per(figures: dict[str, Any], profile: str, fmt: str) -> str:
    """A per-profile figure; "–" for a profile the variant was not run under."""
    if profile not in figures:
        return "–"
    return _opt(figures[profile], fmt)


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per method, per-profile time columns.

    Columns mirror the seeds' two tables: accuracy (and perplexity, when the
    runs report it), bytes per step up and down, emulated time per step and
    to the target accuracy, the bandwidth-time product per step, the
    pipeline efficiency (bound / achieved) and edge/cloud utilization.
    """
    profiles = results["assumptions"]["profile_names"]
    first = profiles[0]
    ppl = _has_perplexity(results["methods"].values())
    head = [
        "method",
        "final accuracy",
        *(["final perplexity"] if ppl else []),
        "up / step",
        "down / step",
        *[f"s / step ({p})" for p in profiles],
        *[f"s to {results['target_accuracy']:.0%} ({p})" for p in profiles],
        f"BTP / step ({first})",
        *[f"pipeline eff. ({p})" for p in profiles],
        f"edge / cloud busy ({first})",
        "wall s",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in results["methods"].items():
        if m.get("failed"):
            rows.append(f"| {label} | failed: {m['runs'][0]['details']} |")
            continue
        n = len(m["final_accuracy_per_seed"])
        acc = f"{m['final_accuracy']:.2%} ± {m['final_accuracy_sd']:.2%} (n={n})"
        # a variant run under one profile has figures for that profile only
        util = m["utilization"].get(first)
        btp = m["bandwidth_time_product_per_step"].get(first)
        cells = [
            label,
            acc,
            *([_perplexity(m)] if ppl else []),
            _kb(m["bytes_up_per_step"]),
            _kb(m["bytes_down_per_step"]),
            *[_per(m["emulated_seconds_per_step"], p, ".4f") for p in profiles],
            *[_per(m["emulated_seconds_to_target"], p, ".2f") for p in profiles],
            "–" if btp is None else f"{btp / 1000:,.1f} KB·s",
            *[_per(m.get("pipeline_efficiency", {}), p, ".2f") for p in profiles],
            "–" if util is None else f"{util['edge']:.0%} / {util['cloud']:.0%}",
            f"{m['wall_seconds']:.1f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _has_perplexity(methods: Any) -> bool:
    return any("final_perplexity" in m for m in methods)


def _perplexity(m: dict[str, Any]) -> str:
    """``mean ± SD`` of the final perplexity, "–" when not reported."""
    if "final_perplexity" not in m:
        return "–"
    return f"{m['final_perplexity']:.3f} ± {m['final_perplexity_sd']:.3f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def format_reference_table(results: dict[str, Any]) -> str:
    """A Markdown table of every method against the suite's reference method.

    Columns: final accuracy and its gap to the reference (points), the mean
    of the last three rounds and its gap, total
    uplink, downlink and total bytes and the uplink and total ratios to the
    reference's, rounds
    (in the reference's rounds) and emulated seconds to reach the target
    (the reference's final accuracy minus the margin), with a reference
    that reports perplexity the emulated seconds to its final perplexity,
    and the edge overhead
    of selection + encoding as a share of local training compute. Empty when
    the results have no reference.
    """
    ref = results.get("reference")
    if not ref:
        return ""
    profiles = results["assumptions"]["profile_names"]
    first = profiles[0]
    ppl = _has_perplexity(ref["methods"].values())
    target_ppl = results.get("target_perplexity")
    head = [
        "method",
        "final accuracy",
        f"Δ vs {ref['label']} (pt)",
        *(["final perplexity", f"perplexity vs {ref['label']}"] if ppl else []),
        "last-3-rounds mean (Δ pt)",
        "uplink total",
        "downlink total",
        "total bytes",
        f"uplink vs {ref['label']}",
        f"total vs {ref['label']}",
        f"rounds to {ref['target_accuracy']:.2%}",
        f"s to {ref['target_accuracy']:.2%} ({first})",
        *([f"s to perplexity {target_ppl:.3f} ({first})"] if target_ppl else []),
        "overhead / training",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in ref["methods"].items():
        n = len(m["rounds_to_target_per_seed"])
        gap = m.get("accuracy_minus_reference")
        rounds = m["rounds_to_target"]
        seconds = m["emulated_seconds_to_target"].get(first)
        share = m.get("overhead_share")
        cells = [
            label,
            f"{m['final_accuracy']:.2%} ± {m['final_accuracy_sd']:.2%} (n={n})",
            "–" if gap is None else f"{100 * gap:+.2f}",
            *(
                [
                    _perplexity(m),
                    "–"
                    if "perplexity_vs_reference" not in m
                    else f"{m['perplexity_vs_reference']:.4f}x",
                ]
                if ppl
                else []
            ),
            f"{m['last3_accuracy']:.2%}"
            + (
                f" ({100 * m['last3_minus_reference']:+.2f})"
                if "last3_minus_reference" in m
                else ""
            ),
            _kb(m["bytes_up"]),
            _kb(m["bytes_down"]),
            _kb(m["bytes_total"]),
            "–"
            if "bytes_up_vs_reference" not in m
            else f"{m['bytes_up_vs_reference']:.3f}x",
            "–"
            if "bytes_total_vs_reference" not in m
            else f"{m['bytes_total_vs_reference']:.3f}x",
            "not reached" if rounds is None else f"{rounds:.1f}",
            _opt(seconds, ".1f"),
            *(
                [_per(m.get("emulated_seconds_to_target_perplexity", {}), first, ".1f")]
                if target_ppl
                else []
            ),
            _pct(share),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_paired_table(results: dict[str, Any], flop_model: bool = False) -> str:
    """A Markdown table of the time to target paired by seed.

    Per method, target kind (the reference's final accuracy minus the
    margin, or its final perplexity, on each seed) and profile: seeds that
    reached their own target, seeds on which the method got there no later
    than the reference, the mean ratio of its time to the reference's over
    the seeds both reached, and the seconds per seed. With ``flop_model``,
    the same timed under the FLOP-count device model. Empty when the results
    have no such figures (:func:`tandem.bench.runner.paired_targets`).
    """
    key = "paired_flop_model" if flop_model else "paired"
    paired = (results.get("reference") or {}).get(key)
    if not paired:
        return ""
    label = results["reference"]["label"]
    head = [
        "method",
        "target (each seed's own)",
        "profile",
        "seeds reached",
        f"no later than {label}",
        f"time vs {label} (paired mean)",
        "s per seed",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    goal = {
        "accuracy": f"{label}'s final accuracy − {100 * paired['margin']:g} pt",
        "perplexity": f"{label}'s final perplexity",
    }
    for method, row in paired["methods"].items():
        n = len(row["seeds"])
        for key in paired["targets"]:
            for profile, f in row.get(key, {}).items():
                ratio = f["time_vs_reference"]
                cells = [
                    method,
                    goal[key],
                    profile,
                    f"{f['reached']} / {n}",
                    f"{f['no_later']} / {n}",
                    "–" if ratio is None else f"{ratio:.3f}x",
                    ", ".join(_opt(t, ".1f") for t in f["seconds_per_seed"]),
                ]
                rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_milestone_table(results: dict[str, Any], flop_model: bool = False) -> str:
    """A Markdown table of the time to several targets along the reference's
    curve, paired by seed (:func:`tandem.bench.runner.milestone_targets`).

    Per method, target kind and profile, one column per fraction ``f`` of
    the reference's run: the mean over seeds of the method's time / the
    reference's to the best the reference had reached by then, and in
    brackets the seeds that reached it. With ``flop_model``, the same timed
    under the FLOP-count device model. Empty when the results have none.
    """
    ms = results.get("milestones_flop_model" if flop_model else "milestones")
    if not ms:
        return ""
    label = ms["reference"]
    fractions = [f"{f:g}" for f in ms["fractions"]]
    head = ["method", "target", "profile"]
    head += [f"{100 * float(f):g}% of its run" for f in fractions]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in ms["methods"].items():
        n = len(row["seeds"])
        for key in ms["targets"]:
            profiles = list(row[key][fractions[0]])
            for profile in profiles:
                cells = [method, f"{label}'s {key}", profile]
                for f in fractions:
                    fig = row[key][f][profile]
                    ratio = fig["time_vs_reference"]
                    cells.append(
                        ("–" if ratio is None else f"{ratio:.3f}x")
                        + f" ({fig['reached']}/{n})"
                    )
                rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_sensitivity_table(results: dict[str, Any]) -> str:
    """A Markdown table of the suite's headline time ratios (seconds per
    step, numerator / denominator) with the measured edge factor x0.5, x1 and
    x2 (and at the factor of the probes after the runs, when taken), and
    under the FLOP-count device model; empty when the results have none."""
    rows_in = results.get("sensitivity") or []
    if not rows_in:
        return ""
    scales = list(rows_in[0]["ratio_by_edge_factor"])
    after = rows_in[0].get("after_probes_scale")
    head = [
        "ratio (s / step)",
        "profile",
        *[
            f"edge factor x{k}" + (" (probes after the runs)" if k == after else "")
            for k in scales
        ],
        "FLOP-count model",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows_in:
        ratios = r["ratio_by_edge_factor"]
        cells = [
            f"{r['numerator']} / {r['denominator']}",
            r["profile"],
            *[f"{ratios[k]:.3f}x" for k in scales],
            f"{r['ratio_flop_model']:.3f}x" if "ratio_flop_model" in r else "–",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Write ``accuracy_vs_time.png`` and ``accuracy_vs_bytes.png`` into ``out``
    (with a reference, ``accuracy_vs_uplink.png``; when every run reported
    perplexity, ``perplexity.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = results["assumptions"]["profile_names"]
    methods = {k: v for k, v in results["methods"].items() if not v.get("failed")}
    paths = []

    fig, axes = plt.subplots(
        1, len(profiles), figsize=(5 * len(profiles), 3.8), squeeze=False
    )
    for ax, profile in zip(axes[0], profiles, strict=True):
        for label, m in methods.items():
            for i, curve in enumerate(m["curves"]):
                if profile not in curve["emulated_seconds"]:
                    continue  # run under another profile
                ax.plot(
                    curve["emulated_seconds"][profile],
                    curve["accuracy"],
                    color=f"C{list(methods).index(label)}",
                    alpha=0.9 if i == 0 else 0.35,
                    label=label if i == 0 else None,
                )
        ax.set(
            title=profile,
            xlabel="emulated seconds",
            ylabel="test accuracy",
            ylim=(0, 1),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['suite']}: accuracy vs emulated time (each seed a line)")
    fig.tight_layout()
    paths.append(out / "accuracy_vs_time.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, m in methods.items():
        for i, curve in enumerate(m["curves"]):
            ax.plot(
                [b / 1e6 for b in curve["bytes"]],
                curve["accuracy"],
                color=f"C{list(methods).index(label)}",
                alpha=0.9 if i == 0 else 0.35,
                label=label if i == 0 else None,
            )
    ax.set(xlabel="bytes up + down (MB)", ylabel="test accuracy", ylim=(0, 1))
    ax.set_title(f"{results['suite']}: accuracy vs bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_bytes.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if results.get("reference"):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for label, m in methods.items():
            for i, curve in enumerate(m["curves"]):
                ax.plot(
                    [b / 1e6 for b in curve["bytes_up"]],
                    curve["accuracy"],
                    color=f"C{list(methods).index(label)}",
                    alpha=0.9 if i == 0 else 0.35,
                    label=label if i == 0 else None,
                )
        target = results["reference"]["target_accuracy"]
        ax.axhline(target, color="grey", lw=0.8, ls="--", label=f"target {target:.1%}")
        ax.set(xlabel="uplink bytes (MB)", ylabel="test accuracy", ylim=(0, 1))
        ax.set_title(f"{results['suite']}: accuracy vs uplink bytes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "accuracy_vs_uplink.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    curves = [c for m in methods.values() for c in m["curves"]]
    if curves and all(
        c.get("perplexity") and None not in c["perplexity"] for c in curves
    ):
        paths.append(_perplexity_plot(results, methods, out))
    return paths


def _perplexity_plot(
    results: dict[str, Any], methods: dict[str, Any], out: Path
) -> Path:
    """``perplexity.png``: test perplexity (log scale) against emulated time
    under the first profile a run was timed under, and against bytes."""
    import matplotlib.pyplot as plt

    fig, (by_time, by_bytes) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, m in methods.items():
        color = f"C{list(methods).index(label)}"
        for i, curve in enumerate(m["curves"]):
            style = {
                "color": color,
                "alpha": 0.9 if i == 0 else 0.35,
                "label": label if i == 0 else None,
            }
            profile = next(iter(curve["emulated_seconds"]))
            by_time.plot(
                curve["emulated_seconds"][profile], curve["perplexity"], **style
            )
            by_bytes.plot(
                [b / 1e6 for b in curve["bytes"]], curve["perplexity"], **style
            )
    by_time.set(xlabel="emulated seconds", ylabel="test perplexity", yscale="log")
    by_bytes.set(xlabel="bytes up + down (MB)", ylabel="test perplexity")
    by_bytes.set_yscale("log")
    for ax in (by_time, by_bytes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['suite']}: perplexity vs emulated time and bytes")
    fig.tight_layout()
    path = out / "perplexity.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
