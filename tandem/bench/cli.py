"""``tandem bench SUITE``: run a suite and print, save and plot the comparison.

Examples::

    tandem bench fedavg --quick                       # CI-sized, under a minute
    tandem bench fedavg --profile 4g 5g --seeds 0 1 2 --out bench-out/fedavg
    tandem bench acesync --variants fullsync acesync --config acesync-c-min=0.6
    tandem bench simultrain --dataset pysource --model transformer --quick
    tandem bench codecs                               # codec throughput, one core
    tandem bench split-schedule                       # SimulTrain's edge schedule alone
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import shlex
import signal
import statistics
import sys
import tarfile
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tandem.bench.report import (
    format_milestone_table,
    format_paired_table,
    format_reference_table,
    format_sensitivity_table,
    format_table,
    write_plots,
)
from tandem.bench.runner import (
    BenchOptions,
    RunRecord,
    federation_config,
    run_suite,
    summarize,
)
from tandem.bench.suites import SUITES, Suite, per_profile, token_sized
from tandem.config import NATURAL_ID_DATASETS, DataConfig, parse_section
from tandem.datasets import load_dataset
from tandem.launch import RunStatus
from tandem.network import (
    CLOUD_T4,
    EDGE_RPI4,
    DeviceProfile,
    assign_links,
    measure_local_gflops,
    parse_link,
)

__all__ = [
    "check_profiles",
    "describe_profile",
    "main",
    "parse_config_items",
    "select_variants",
    "workload",
]

QUICK = {"nodes": 3, "rounds": 2, "steps": 50, "mnist1d-samples": 1000}
#: ``--quick`` sizes of the text datasets (bytes of text, test windows).
QUICK_TEXT = {"text-max-bytes": 300_000, "text-test-windows": 256}
#: Datasets of token sequences (next-token prediction).
TEXT_DATASETS = ("pysource", "text")


def build_parser() -> argparse.ArgumentParser:
    """The ``tandem bench`` argument parser."""
    p = argparse.ArgumentParser(
        prog="tandem bench",
        description="Run methods side by side as real Flower simulation runs.",
    )
    p.add_argument(
        "suite",
        choices=sorted(SUITES),
        help="what to compare (or 'codecs': tandem bench codecs --help; "
        "'split-schedule': SimulTrain's edge schedule without Flower; 'report "
        "RESULTS.json': its tables; 'rederive FOLDER': results.json from its runs)",
    )
    p.add_argument(
        "--profile",
        nargs="+",
        default=None,
        help="link profiles: 4g 5g lan wifi variable, UP/DOWN/RTT (e.g. "
        "2mbit/8mbit/120ms), trace:<file>, or mix:4g,5g,... "
        "(default: the suite's, else 4g 5g)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seed values")
    p.add_argument(
        "--nodes", type=int, help="simulated SuperNodes (default: the suite's)"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--rounds", type=int, help="rounds per run (default: the suite's)"
    )
    group.add_argument(
        "--steps", type=int, help="SGD steps per node; rounds = steps / local steps"
    )
    p.add_argument(
        "--dataset",
        default="mnist1d",
        help="mnist1d, wisdm, mnist, cifar10, pysource (the stdlib's source, "
        "next-byte), text (data-path: plain text or LEAF Shakespeare JSON)",
    )
    p.add_argument(
        "--model",
        default="auto",
        help="model for every variant: auto (cnn1d, cnn2d, or transformer for "
        "pysource/text), cnn1d, cnn2d, mlp, resnet18, transformer",
    )
    p.add_argument(
        "--data-path",
        default="",
        help="WISDM raw file, torchvision root, or the text dataset's file",
    )
    p.add_argument("--samples", type=int, help="MNIST-1D size (train + test)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI-sized: 3 nodes, 2 rounds (or 50 steps), 1,000 samples",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    p.add_argument(
        "--edge-gflops",
        type=float,
        default=EDGE_RPI4.gflops,
        help=f"edge device GFLOP/s (default {EDGE_RPI4.gflops}: {EDGE_RPI4.source})",
    )
    p.add_argument(
        "--cloud-gflops",
        type=float,
        default=CLOUD_T4.gflops,
        help=f"cloud GFLOP/s (default {CLOUD_T4.gflops}: {CLOUD_T4.source})",
    )
    p.add_argument(
        "--local-gflops",
        type=float,
        help="this machine's GFLOP/s per ClientApp core (default: measured)",
    )
    p.add_argument(
        "--target",
        type=float,
        help="accuracy for the time-to-target column (default: 90%% of "
        "centralized's final accuracy, or of the best method's)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="LABEL",
        help="run only these of the suite's variants (default: all); keep the "
        "suite's reference variant for the table against it",
    )
    p.add_argument(
        "--config",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="run-config values (TOML, as in flwr run -c) for every variant, "
        "e.g. acesync-c-min=0.6; 'method' cannot be changed",
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help="SimulTrain's streams paced to each profile's link and its edges "
        "slowed to the edge device, so each run's wall time is its emulated "
        "time (realtime_seconds_per_step beside the replay's)",
    )
    p.add_argument(
        "--dilation",
        type=float,
        default=1.0,
        metavar="K",
        help="with --realtime: run the streams on a clock K times slower than "
        "the emulated one (every transfer, delay and stretched edge piece "
        "lasts K times as long), so this machine's one cloud stands for a "
        "cloud K times as fast; the real time per step is the wall time / K "
        "(default 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_config_items(items: Sequence[str]) -> dict[str, object]:
    """``["acesync-c-min=0.6", 'dataset="mnist1d"']`` -> run-config values.

    Each value is read as TOML (``0.6``, ``true``, ``"text"``); a bare word
    that is not TOML is taken as a string.

    Raises
    ------
    ValueError
        On an item without ``=``, an empty key, or the key ``method``.
    """
    config: dict[str, object] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--config item {item!r} is not KEY=VALUE")
        if key == "method":
            raise ValueError("--config cannot change 'method': pick --variants")
        try:
            config[key] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            config[key] = text.strip()
    return config


def select_variants(
    suite: Suite, labels: Sequence[str] | None, config: Mapping[str, object]
) -> Suite:
    """``suite`` with only the variants named in ``labels`` (all if None),
    each with ``config`` over its own overrides.

    Raises
    ------
    ValueError
        On a label the suite does not have.
    """
    known = [v.label for v in suite.variants]
    unknown = [label for label in labels or () if label not in known]
    if unknown:
        raise ValueError(
            f"suite {suite.name!r} has no variant {unknown}; it has {known}"
        )
    chosen = [v for v in suite.variants if labels is None or v.label in labels]
    variants = tuple(
        dataclasses.replace(v, overrides={**v.overrides, **config}) for v in chosen
    )
    labels_run = {v.label for v in chosen}
    reference = suite.reference if suite.reference in labels_run else None
    return dataclasses.replace(suite, variants=variants, reference=reference)


def check_profiles(profiles: Sequence[str]) -> None:
    """Parse every ``--profile`` (a link spec or ``mix:``) before any run.

    Raises
    ------
    ValueError
        Naming the first spec that does not parse.
    """
    for spec in profiles:
        assign_links([0], spec)


def describe_profile(spec: str) -> object:
    """A JSON-able description of a profile for ``results.json``."""
    return spec if spec.startswith("mix:") else parse_link(spec, 0).describe()


def workload(
    args: argparse.Namespace, suite: Suite
) -> tuple[int, int | None, int | None, dict[str, object]]:
    """Nodes, rounds, steps and extra run-config values from the arguments."""
    extra: dict[str, object] = {}
    nodes, rounds, steps = args.nodes or suite.nodes, args.rounds, args.steps
    if rounds is None and steps is None:
        rounds, steps = suite.rounds, suite.steps
    if args.quick:
        nodes = args.nodes or QUICK["nodes"]
        if args.rounds is None and args.steps is None:
            rounds = QUICK["rounds"] if suite.steps is None else None
            steps = None if suite.steps is None else QUICK["steps"]
        extra["mnist1d-samples"] = QUICK["mnist1d-samples"]
        if args.dataset in TEXT_DATASETS:
            extra.update(QUICK_TEXT)
    if args.samples:
        extra["mnist1d-samples"] = args.samples
    natural = args.dataset in NATURAL_ID_DATASETS
    if natural and suite.defaults.get("partitioner") == "dirichlet":
        # non-IID by user, module or role, not by a label draw
        extra["partitioner"] = "natural"
    return nodes, rounds, steps, extra


def bench_options(
    args: argparse.Namespace,
    suite: Suite,
    local: tuple[float, float] | None = None,
) -> BenchOptions:
    """The benchmark's options: workload, devices, measured local GFLOP/s.

    ``local``: this machine's GFLOP/s per ClientApp core and for the
    ServerApp as already measured (re-deriving finished runs); by default
    ``--local-gflops`` or measured now.
    """
    nodes, rounds, steps, extra = workload(args, suite)
    probes: dict[str, list[float]] = {}
    if local is not None:
        local_edge, local_cloud = local
    elif args.local_gflops:
        local_edge = local_cloud = args.local_gflops
    else:
        probes = calibration_probes()
        local_edge = calibrated(probes, "edge")
        local_cloud = calibrated(probes, "cloud")
    if any(v.overrides.get("method") == "acesync" for v in suite.variants):
        # ACE-Sync's own clock (budgets, eq. 8 latencies) emulates the same
        # edge device as the benchmark's re-timing
        extra["acesync-edge-factor"] = round(local_edge / args.edge_gflops, 6)
    if any(v.overrides.get("method") == "simultrain" for v in suite.variants):
        # each edge sizes its window on the emulated edge's compute
        extra["simultrain-edge-factor"] = round(local_edge / args.edge_gflops, 6)
        extra["simultrain-cloud-factor"] = round(local_cloud / args.cloud_gflops, 6)
    if args.realtime:
        # the streams run at the emulated devices' speed, as the replay times
        extra["simultrain-realtime"] = True
        extra["simultrain-realtime-dilation"] = args.dilation
    return BenchOptions(
        out=args.out,
        profiles=tuple(args.profile),
        seeds=tuple(args.seeds),
        nodes=nodes,
        rounds=rounds,
        steps=steps,
        target=args.target,
        dataset=args.dataset,
        data_path=args.data_path,
        model=args.model,
        extra=extra,
        edge=DeviceProfile(EDGE_RPI4.name, args.edge_gflops, EDGE_RPI4.source),
        cloud=DeviceProfile(CLOUD_T4.name, args.cloud_gflops, CLOUD_T4.source),
        local_gflops_edge=local_edge,
        local_gflops_cloud=local_cloud,
        calibration=probes,
    )


#: Probes of this machine's GFLOP/s per block of a calibration.
CALIBRATION_ROUNDS = 9
#: Most blocks a calibration takes before it settles for an unsettled machine.
CALIBRATION_BLOCKS = 12
#: A block is steady when its edge probes' interquartile range is at most this
#: fraction of their median; the calibration ends on two steady blocks in a
#: row whose medians differ by at most this fraction.
CALIBRATION_SPREAD = 0.05
#: Drift (after the runs against before) past which the bench warns.
CALIBRATION_DRIFT_WARNING = 0.10


def _steady(block: Sequence[float], spread: float = CALIBRATION_SPREAD) -> bool:
    """Whether a block's probes agree: interquartile range <= ``spread`` x median."""
    q1, median, q3 = statistics.quantiles(block, n=4, method="inclusive")
    return q3 - q1 <= spread * median


def _settled(
    probes: Sequence[float],
    rounds: int = CALIBRATION_ROUNDS,
    spread: float = CALIBRATION_SPREAD,
) -> bool:
    """Whether the last two blocks of ``rounds`` probes are both steady and
    their medians differ by at most ``spread`` of the last one."""
    if len(probes) < 2 * rounds:
        return False
    last, before = probes[-rounds:], probes[-2 * rounds : -rounds]
    median = statistics.median(last)
    return (
        _steady(last, spread)
        and _steady(before, spread)
        and abs(median - statistics.median(before)) <= spread * median
    )


def calibrated(probes: Mapping[str, Sequence[float]], key: str = "edge") -> float:
    """The GFLOP/s a calibration gives: the median of its last block of probes."""
    return statistics.median(probes[key][-CALIBRATION_ROUNDS:])


def calibration_probes(
    rounds: int = CALIBRATION_ROUNDS,
    max_blocks: int = CALIBRATION_BLOCKS,
    spread: float = CALIBRATION_SPREAD,
    probe: Callable[[int], float] | None = None,
) -> dict[str, list[float]]:
    """Probes of this machine's GFLOP/s on one core (``edge``: a ClientApp's)
    and on every thread (``cloud``: the ServerApp's), interleaved
    (:func:`~tandem.network.measure_local_gflops`), in blocks of ``rounds``
    until the edge probes have settled: two steady blocks in a row
    (:func:`_steady`) whose medians differ by at most ``spread``, or
    ``max_blocks`` blocks. The calibration is the last block's median
    (:func:`calibrated`); every probe is recorded.

    One probe of a few milliseconds read 58.9 GFLOP/s one day and 79.7 the
    next on the same machine, with the same steps timed at the same speed;
    and a calibration taken while the machine settled (probes 38.5-69.1
    GFLOP/s in one block, its median taken) read x5.68 where the probes after
    the runs read x8.8. A block takes well under a second.
    """
    probe = probe or (lambda threads: measure_local_gflops(threads=threads))
    probes: dict[str, list[float]] = {"edge": [], "cloud": []}
    for _ in range(max_blocks):
        for _ in range(rounds):
            probes["edge"].append(probe(1))
            probes["cloud"].append(probe(torch.get_num_threads()))
        if _settled(probes["edge"], rounds, spread):
            break
    return probes


def calibration_check(
    before: Mapping[str, Sequence[float]], after: Mapping[str, Sequence[float]]
) -> dict[str, Any]:
    """How the calibration held: whether it settled, and how far this
    machine's one-core speed moved between the probes before the runs and the
    same probes after them (``drift``: after / before - 1)."""
    return {
        "blocks": len(before["edge"]) // CALIBRATION_ROUNDS,
        "settled": _settled(before["edge"]),
        "edge_gflops_before": calibrated(before),
        "edge_gflops_after": calibrated(after),
        "drift": calibrated(after) / calibrated(before) - 1.0,
    }


def suite_for(args: argparse.Namespace) -> Suite:
    """The suite ``args`` ask for: at its token size on a token dataset
    (:func:`~tandem.bench.suites.token_sized`), its variants (``--variants``,
    with ``--config``), once per profile where they read the link; ``--profile``
    defaults to the suite's (else 4g and 5g) and is set on ``args``.

    Raises
    ------
    ValueError
        On a bad link spec, variant label or config item.
    """
    if args.profile is None:
        args.profile = list(SUITES[args.suite].profiles or ("4g", "5g"))
    check_profiles(args.profile)
    suite = SUITES[args.suite]
    if args.dataset in TEXT_DATASETS:
        suite = token_sized(suite)
    suite = select_variants(suite, args.variants, parse_config_items(args.config))
    return per_profile(suite, args.profile)


def _run_id(folder: str) -> str:
    """The run id of a run folder, ``<method>-<run id>``."""
    return folder.rsplit("-", 1)[-1]


def run_with_progress(suite: Suite, opts: BenchOptions, show: bool) -> list[RunRecord]:
    """Run every (seed, variant), with a progress bar of rounds when ``show``."""
    total_rounds = len(opts.seeds) * sum(opts.rounds_for(v) for v in suite.variants)
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total_rounds, desc=f"bench {suite.name}", unit="round")
    try:
        return run_suite(suite, opts, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()


def overhead_probe(suite: Suite) -> dict[str, Any]:
    """ACE-Sync's edge overhead timed in-process on the suite's probe model."""
    from tandem.bench.overhead import measure_overhead

    local_steps = next(
        (v.local_steps for v in suite.variants if v.overrides["method"] == "acesync"),
        50,
    )
    return measure_overhead(suite.overhead_width, local_steps)


def assumptions(
    opts: BenchOptions, suite: Suite, results: Mapping[str, Any], argv: Sequence[str]
) -> dict[str, Any]:
    """What the results rest on: links, devices, data, sizes, clock, command."""
    # the keys every variant shares (e.g. a token size's test windows)
    shared = [dict(v.overrides) for v in suite.variants]
    flat = {
        **suite.defaults,
        **opts.extra,
        **{k: x for k, x in shared[0].items() if all(o.get(k) == x for o in shared)},
        "dataset": opts.dataset,
        "data-path": opts.data_path,
    }
    bundle = load_dataset(parse_section(DataConfig, flat))
    # the source's scalar figures (e.g. the interpreter and corpus hash)
    source = {
        k: v for k, v in bundle.report.items() if isinstance(v, str | int | float)
    }
    return {
        "profile_names": list(opts.profiles),
        "profiles": {p: describe_profile(p) for p in opts.profiles},
        "devices": {
            "edge": {
                "name": opts.edge.name,
                "gflops": opts.edge.gflops,
                "source": opts.edge.source,
                "time_factor": opts.edge_factor,
            },
            "cloud": {
                "name": opts.cloud.name,
                "gflops": opts.cloud.gflops,
                "source": opts.cloud.source,
                "time_factor": opts.cloud_factor,
            },
            "local_gflops_per_clientapp_core": opts.local_gflops_edge,
            "local_gflops_serverapp": opts.local_gflops_cloud,
            "calibration_probes": dict(opts.calibration),
        },
        "dataset": {
            "name": opts.dataset,
            "train": len(bundle.train),
            "test": len(bundle.test),
            **source,
        },
        "model": opts.model,
        "nodes": opts.nodes,
        "federation_config": federation_config(opts.nodes),
        "seeds": list(opts.seeds),
        "rounds": {v.label: opts.rounds_for(v) for v in suite.variants},
        "steps_per_edge": {v.label: opts.steps_for(v) for v in suite.variants},
        "clock": (
            "retimed: each run's recorded messages and measured compute re-timed "
            "after the run under every profile (synchronous rounds, or "
            "SimulTrain's pipelined exchanges served in virtual arrival order); "
            "messages take RTT/2 + bytes*8/bandwidth along the trace; compute = "
            "measured seconds x device factor. A method whose policy reads the "
            "link (ACE-Sync) runs once per profile, under that profile, and is "
            "timed under it only"
        ),
        "bytes_per_step": "total bytes / (nodes x SGD steps per edge)",
        "emulated_seconds_per_step": "emulated run time / SGD steps per edge",
        "emulated_seconds_per_step_flop_model": (
            "the same runs re-timed under the FLOP-count device model: each "
            "piece of compute = max(measured - F / local GFLOP/s, 0) + F / device "
            "GFLOP/s, F its FLOPs by torch's FLOP counter (matrix products and "
            "convolutions, forward and backward); the overhead is charged as "
            "measured here (tandem/bench/flops.py)"
        ),
        "emulated_seconds_per_step_by_edge_factor": (
            "the same runs re-timed with the measured edge factor x0.5, x1 and "
            "x2, and at the factor the calibration probes after the runs give "
            "(devices.calibration_check; cloud factor and links unchanged); "
            "'sensitivity' gives the suite's headline ratios from them"
        ),
        "bandwidth_time_product_per_step": (
            "(bytes up + down per step) x emulated seconds per step, in byte-seconds"
        ),
        "realtime_seconds_per_step": (
            "real-time mode (--realtime): the longest stream's wall time, from "
            "its hello to its last frame, / the dilation K (--dilation, "
            "realtime_dilation) / SGD steps per edge; frames "
            "paced to the profile's link, each piece of edge work stretched to "
            "edge factor x its steady CPU time, as the replay charges it, all "
            "of it K times slower (a cloud more than K times faster than this "
            "machine cannot be emulated: its compute counts at K times this "
            "machine's speed)"
        ),
        "replay_host_cloud_seconds_per_step": (
            "the real-time runs replayed with the cloud at this machine's speed "
            "(factor max(1, cloud factor); max(1/K, cloud factor) on a clock "
            "dilated K times): what real time is compared with"
        ),
        "replay_host_cloud_raw_seconds_per_step": (
            "the same, with the cloud's compute per chunk as measured (not "
            "steadied): the one cloud shares this machine's cores with the "
            "edges, and real time pays its every delay"
        ),
        "pipeline_efficiency": (
            "bound / achieved: the busiest resource's (one edge, one link "
            "direction, the cloud) busy time / the emulated run time; 1 = a "
            "perfect pipeline"
        ),
        "target_accuracy": results["target_accuracy"],
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["tandem", "bench", *argv]),
    }


def format_tables(results: dict[str, Any], suite: Suite) -> str:
    """A suite's tables: per method, against its reference, and the headline
    ratios' sensitivity to the edge factor (each when the results have it)."""
    parts = [format_table(results)]
    reference = format_reference_table(results)
    if reference:
        parts.append(
            f"against {suite.reference} (target: its final accuracy - "
            f"{100 * suite.reference_margin:g} pt):\n{reference}"
        )
    for flop_model, model in ((False, ""), (True, ", FLOP-count device model")):
        paired = format_paired_table(results, flop_model)
        if paired:
            parts.append(f"time to target paired by seed{model}:\n{paired}")
        milestones = format_milestone_table(results, flop_model)
        if milestones:
            parts.append(
                "time to the best the reference had reached by 25/50/75/100% "
                "of its run, paired by seed (mean time / the reference's; "
                f"seeds reached){model}:\n{milestones}"
            )
    sensitivity = format_sensitivity_table(results)
    if sensitivity:
        parts.append(
            "headline ratios with the measured edge factor scaled (the same "
            f"runs re-timed):\n{sensitivity}"
        )
    return "\n\n".join(parts)


def print_report(results: Mapping[str, Any], suite: Suite, out: Path) -> None:
    """The tables, the overhead probe, and where the results and plots are."""
    plots = write_plots(dict(results), out)
    print(format_tables(dict(results), suite))
    probe = results.get("overhead_probe")
    if probe:
        print(
            f"\nedge overhead on {probe['model']} ({probe['parameters']:,} "
            f"parameters, {probe['groups']} groups): selection + encoding "
            f"{probe['overhead_seconds'] * 1000:.1f} ms = {probe['share']:.1%} of "
            f"{probe['local_steps']} local steps "
            f"({probe['train_compute_seconds'] * 1000:.0f} ms); "
            f"with the cloud's decoding {probe['share_with_decode']:.1%}"
        )
    print(f"\nresults: {out / 'results.json'}")
    for path in plots:
        print(f"plot:    {path}")


def report_main(argv: list[str]) -> int:
    """``tandem bench report RESULTS.json``: print a finished suite's tables.

    The README's tables are this output, so each can be regenerated from
    the committed ``results.json`` without running anything.
    """
    parser = argparse.ArgumentParser(
        prog="tandem bench report",
        description="Print a finished suite's tables from its results.json.",
    )
    parser.add_argument("results", type=Path, help="a suite's results.json")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
        suite = SUITES[results["suite"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        parser.error(f"{args.results}: not a suite's results.json ({err!r})")
    print(format_tables(results, suite))
    return 0


def rederive_main(argv: list[str]) -> int:
    """``tandem bench rederive FOLDER``: a suite's results again from its runs.

    Reads ``FOLDER/results.json`` (the command and the device calibration
    the runs were made under) and every run's ``metrics.jsonl`` from
    ``FOLDER/runs-metrics.tar.gz``, summarizes the runs as the suite did,
    writes ``FOLDER/results.json`` again (the ``created`` time and the
    in-process overhead probe kept, ``rederived`` added) and prints the
    tables. A figure the summary gained after the runs were made is so
    derived from the same runs, without running anything.
    """
    parser = argparse.ArgumentParser(
        prog="tandem bench rederive",
        description="Re-summarize a finished suite from its committed metrics.",
    )
    parser.add_argument("folder", type=Path, help="a suite's output folder")
    args = parser.parse_args(argv)
    try:
        old = json.loads((args.folder / "results.json").read_text())
        command = shlex.split(old["assumptions"]["command"])[2:]
        devices = old["assumptions"]["devices"]
        local = (
            float(devices["local_gflops_per_clientapp_core"]),
            float(devices["local_gflops_serverapp"]),
        )
        records = _archived_records(args.folder / "runs-metrics.tar.gz")
    except (OSError, ValueError, KeyError, TypeError, tarfile.TarError) as err:
        parser.error(f"{args.folder}: not a finished suite's folder ({err!r})")
    bench_args = build_parser().parse_args(command)
    bench_args.out = args.folder
    suite = suite_for(bench_args)
    # each variant as it ran (a suite's definition may have changed since)
    suite = dataclasses.replace(
        suite,
        variants=tuple(
            dataclasses.replace(v, overrides=old["methods"][v.label]["overrides"])
            for v in suite.variants
        ),
    )
    opts = bench_options(bench_args, suite, local)
    if "calibration_probes_after" in devices and devices.get("calibration_probes"):
        drift = calibration_check(
            devices["calibration_probes"], devices["calibration_probes_after"]
        )["drift"]
        opts = dataclasses.replace(opts, edge_scale_after=drift + 1.0)
    runs = [
        RunRecord(
            variant,
            int(run["seed"]),
            RunStatus(run["run_id"], run["status"], run["details"], 0.0),
            records.get(run["run_id"], []),
            opts.rounds_for(variant),
            tuple(run.get("retried", ())),
        )
        for variant in suite.variants
        for run in old["methods"][variant.label]["runs"]
    ]
    results = summarize(suite, opts, runs)
    if "overhead_probe" in old:
        results["overhead_probe"] = old["overhead_probe"]
    results["assumptions"] = {
        **assumptions(opts, suite, results, command),
        "created": old["assumptions"].get("created"),
        "rederived": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    results["assumptions"]["devices"].update(
        {k: v for k, v in devices.items() if k.startswith("calibration")}
    )
    (args.folder / "results.json").write_text(
        json.dumps(results, indent=2, default=_json)
    )
    print(format_tables(results, suite))
    print(f"\nresults: {args.folder / 'results.json'}")
    return 0


def _archived_records(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Each run's records in an :func:`archive_metrics` file, by run id (its
    folder is ``runs/<method>-<run id>``)."""
    found: dict[str, list[dict[str, Any]]] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) != 3 or parts[2] != "metrics.jsonl" or not member.isfile():
                continue
            data = tar.extractfile(member)
            if data is None:
                continue
            lines = data.read().decode("utf-8").splitlines()
            found[_run_id(parts[1])] = [json.loads(x) for x in lines if x.strip()]
    return found


def archive_metrics(out: Path, run_ids: Iterable[str] | None = None) -> Path | None:
    """Every run's ``metrics.jsonl`` (and a failed run's ``flwr.log``) under
    ``out/runs`` in one gzipped tar, ``out/runs-metrics.tar.gz``, small enough
    to commit beside ``results.json`` so each figure can be re-derived from
    its runs (the run folders themselves, with checkpoints, are not kept).
    ``run_ids``: only these runs' folders (``runs/<method>-<run id>``), not
    those an earlier suite left in the same folder. ``None`` when there is
    no run folder."""
    runs = out / "runs"
    wanted = None if run_ids is None else set(run_ids)
    files = sorted(
        p
        for p in runs.glob("*/*")
        if p.name in ("metrics.jsonl", "flwr.log")
        and (wanted is None or _run_id(p.parent.name) in wanted)
    )
    if not files:
        return None

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    path = out / "runs-metrics.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for file in files:
            tar.add(file, arcname=str(file.relative_to(out)), filter=plain)
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tandem bench`` and ``python -m tandem.bench``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["codecs"]:  # not a suite of runs: in-process timings
        from tandem.bench.codecs import main as codecs_main

        return codecs_main(argv[1:])
    if argv[:1] == ["split-schedule"]:  # SimulTrain's edge schedule alone
        from tandem.bench.split_schedule import main as schedule_main

        return schedule_main(argv[1:])
    if argv[:1] == ["report"]:  # the tables again, from a results.json
        return report_main(argv[1:])
    if argv[:1] == ["rederive"]:  # results.json again, from the runs' metrics
        return rederive_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.dilation >= 1.0:
        parser.error(f"--dilation must be >= 1, got {args.dilation}")
    if args.dilation != 1.0 and not args.realtime:
        parser.error("--dilation needs --realtime")
    # a terminated benchmark still stops its SuperLink (the runner's finally)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:  # bad specs fail here, before any run
        suite = suite_for(args)
    except ValueError as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    opts = bench_options(args, suite)
    runs = run_with_progress(suite, opts, show=not args.no_progress)
    after: dict[str, list[float]] = {}
    check: dict[str, Any] = {}
    if opts.calibration:
        # the same probes after the runs: how far the calibration drifted;
        # the runs are re-timed at what they read too
        after = calibration_probes()
        check = calibration_check(opts.calibration, after)
        opts = dataclasses.replace(opts, edge_scale_after=check["drift"] + 1.0)
    results = summarize(suite, opts, runs)
    if suite.overhead_width:
        results["overhead_probe"] = overhead_probe(suite)
    results["assumptions"] = assumptions(
        opts, suite, results, sys.argv[2:] if argv is None else argv
    )
    if check:
        devices = results["assumptions"]["devices"]
        devices["calibration_probes_after"] = after
        devices["calibration_check"] = check
        if not check["settled"] or abs(check["drift"]) > CALIBRATION_DRIFT_WARNING:
            print(
                "warning: this machine's speed did not hold: calibration "
                f"{'settled' if check['settled'] else 'never settled'}, "
                f"{check['edge_gflops_before']:.1f} GFLOP/s per core before the "
                f"runs and {check['edge_gflops_after']:.1f} after "
                f"({check['drift']:+.0%}); emulated times carry that error",
                file=sys.stderr,
            )
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=_json))
    print_report(results, suite, args.out)
    archive = archive_metrics(args.out, [r.status.run_id for r in runs])
    if archive is not None:
        print(f"metrics: {archive}")
    failed = [k for k, m in results["methods"].items() if m.get("failed")]
    return 1 if failed else 0


def _json(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
