"""Run a suite's variants as real Flower runs and turn them into results.

Each (seed, variant) is one ``flwr run`` on the simulation engine through the
project's ``flwr.toml`` (a private Flower home and SuperLink on free ports,
stopped at the end). Accuracy, bytes and measured compute times come from the
run's own ``metrics.jsonl``; emulated time comes from re-timing the recorded
events on the virtual clock under each link profile.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.bench.flops import (
    RowFlops,
    exchanges_on_device,
    rounds_on_device,
    row_flops_for,
)
from tandem.bench.suites import Suite, Variant
from tandem.launch import (
    RAY_RETRIES,
    RAY_STARTUP_FAILURE,
    FlowerHome,
    RunStatus,
    shared_ray,
)
from tandem.network import CLOUD_T4, EDGE_RPI4, DeviceProfile, assign_links
from tandem.schedules import (
    SyncRound,
    exchanges_from_records,
    replay_pipeline,
    replay_sync_rounds,
    steady_exchanges,
    sync_rounds_from_records,
)
from tandem.tracking import read_jsonl

__all__ = ["BenchOptions", "RunRecord", "federation_config", "run_suite", "summarize"]

#: Multiples of the measured edge factor the sensitivity figures re-time at.
EDGE_FACTOR_SCALES = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class BenchOptions:
    """What the benchmark runs and under which assumptions."""

    out: Path
    profiles: tuple[str, ...] = ("4g", "5g")
    seeds: tuple[int, ...] = (0,)
    nodes: int = 10
    rounds: int | None = 20
    steps: int | None = None
    dataset: str = "mnist1d"
    data_path: str = ""
    model: str = "auto"
    extra: Mapping[str, object] = field(default_factory=dict)
    edge: DeviceProfile = EDGE_RPI4
    cloud: DeviceProfile = CLOUD_T4
    local_gflops_edge: float = 0.0
    local_gflops_cloud: float = 0.0
    timeout: float = 900.0
    target: float | None = None
    #: The GFLOP/s probes the local figures are the medians of ("edge",
    #: "cloud"); empty when given (``--local-gflops``) or re-derived.
    calibration: Mapping[str, Sequence[float]] = field(default_factory=dict)
    #: The one-core GFLOP/s of the same probes after the runs over the
    #: calibration's: the edge factor they would have given, as a multiple of
    #: the one used (None: not probed). The runs are re-timed at it too.
    edge_scale_after: float | None = None

    def rounds_for(self, variant: Variant) -> int:
        """Rounds of a variant: ``--rounds``, or ``--steps`` / its local steps.

        A pipelined variant reports every ``local_steps`` steps per edge and
        once more after its final merges.
        """
        if self.steps is not None:
            rounds = max(1, math.ceil(self.steps / variant.local_steps))
            return rounds + 1 if variant.schedule == "pipeline" else rounds
        return int(self.rounds or 1)

    def steps_for(self, variant: Variant) -> int:
        """SGD steps per edge of a variant's run."""
        if variant.schedule == "pipeline":
            return self.steps if self.steps is not None else variant.local_steps
        return self.rounds_for(variant) * variant.local_steps

    @property
    def edge_factor(self) -> float:
        """Measured-here seconds -> edge-device seconds."""
        return self.local_gflops_edge / self.edge.gflops

    @property
    def cloud_factor(self) -> float:
        """Measured-here seconds -> cloud-device seconds."""
        return self.local_gflops_cloud / self.cloud.gflops


@dataclass
class RunRecord:
    """One finished (or failed) run."""

    variant: Variant
    seed: int
    status: RunStatus
    records: list[dict[str, Any]]
    rounds: int
    #: run ids of earlier attempts that failed before anything ran (Ray)
    retried: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Completed with a summary."""
        return self.status.ok and any(r["event"] == "summary" for r in self.records)

    @property
    def summary(self) -> dict[str, Any]:
        """The run's final summary record."""
        return next(r for r in self.records if r["event"] == "summary")

    @property
    def round_records(self) -> list[dict[str, Any]]:
        """``round`` records in order."""
        return [r for r in self.records if r["event"] == "round"]


def federation_config(nodes: int) -> dict[str, object]:
    """The simulation a bench run gets: ``nodes`` SuperNodes, 1 CPU per ClientApp.

    ``--federation-config`` replaces the federation's options as a whole, so
    the CPUs per ClientApp must be restated: without them Flower gives each
    ClientApp 2 CPUs and trains one node at a time on a 2-core machine.
    """
    return {"num-supernodes": nodes, "client-resources-num-cpus": 1}


def _overrides(opts: BenchOptions, suite: Suite, variant: Variant, seed: int) -> dict:
    workload: dict[str, object] = {"dataset": opts.dataset, "model": opts.model}
    if opts.data_path:
        workload["data-path"] = opts.data_path
    overrides: dict[str, object] = {
        **suite.defaults,
        **workload,
        "min-nodes": opts.nodes,
        **opts.extra,
        **variant.overrides,
        "seed": seed,
        "num-server-rounds": opts.rounds_for(variant),
        "output-dir": str((opts.out / "runs").resolve()),
    }
    if variant.schedule == "pipeline":
        overrides["simultrain-steps"] = opts.steps_for(variant)
        overrides["num-server-rounds"] = 1  # unused: the steps set the length
    return overrides


def run_suite(
    suite: Suite,
    opts: BenchOptions,
    progress: Callable[[int], None] | None = None,
) -> list[RunRecord]:
    """Run every (seed, variant) of ``suite``; ``progress(n)`` gets rounds done."""
    results = []
    # One Ray cluster for every run (shared_ray): each run's simulation joins
    # it instead of starting and stopping its own, about 5 s less per run.
    with shared_ray() as ray_address:
        # The Flower home (SuperLink state, installed app copies) lives outside
        # the project: inside it, Flower would package those copies into the
        # next app.
        home = FlowerHome(
            Path(tempfile.mkdtemp(prefix="tandem-bench-flwr-")),
            extra_env={"RAY_ADDRESS": ray_address} if ray_address else {},
        )
        try:
            for seed in opts.seeds:
                for variant in suite.variants:
                    results.append(_run_one(home, opts, suite, variant, seed, progress))
        finally:
            home.stop_superlink()
            shutil.rmtree(home.home, ignore_errors=True)
    return results


def _run_one(
    home: FlowerHome,
    opts: BenchOptions,
    suite: Suite,
    variant: Variant,
    seed: int,
    progress: Callable[[int], None] | None,
) -> RunRecord:
    """Submit one (variant, seed) run and follow it to its end.

    A run whose simulation engine could not start Ray (``RAY_STARTUP_FAILURE``
    in its log: no ClientApp ran, though the ServerApp may have written its
    set-up and round 0) is submitted again, up to ``RAY_RETRIES`` times; each
    failed attempt keeps its log in its own run folder, and the record names
    them (``retried``). Any other failure is the run's result.
    """
    what = f"{variant.label}, seed {seed}"
    overrides = _overrides(opts, suite, variant, seed)
    retried: list[str] = []
    while True:
        run_id = home.submit(overrides, federation_config(opts.nodes))
        folder = opts.out / "runs" / f"{variant.overrides['method']}-{run_id}"
        path = folder / "metrics.jsonl"
        status = _wait(home, run_id, path, opts, progress)
        records = read_jsonl(path) if path.exists() else []
        if status.ok:
            break
        log = _keep_log(home, run_id, folder, what)
        if RAY_STARTUP_FAILURE not in log or len(retried) >= RAY_RETRIES:
            break
        retried.append(run_id)
        print(
            f"run {run_id} ({what}): Ray did not start; submitting it again",
            file=sys.stderr,
        )
    return RunRecord(
        variant, seed, status, records, opts.rounds_for(variant), tuple(retried)
    )


def _keep_log(home: FlowerHome, run_id: str, folder: Path, what: str) -> str:
    """A failed run's Flower log (its traceback) into ``folder/flwr.log``,
    said on stderr: the SuperLink that holds it is removed after the suite.
    Returns the log."""
    try:
        text = home.logs(run_id)
    except (RuntimeError, subprocess.SubprocessError) as err:
        text = f"flwr log failed: {err}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flwr.log").write_text(text)
    print(
        f"run {run_id} ({what}) failed; its log: {folder / 'flwr.log'}", file=sys.stderr
    )
    return text


def _wait(
    home: FlowerHome,
    run_id: str,
    metrics: Path,
    opts: BenchOptions,
    progress: Callable[[int], None] | None,
) -> RunStatus:
    """Follow the run through its metrics file (:meth:`FlowerHome.wait`, which
    asks ``flwr list`` rarely); ``progress`` gets the rounds done."""
    reported = 0

    def follow(records: list[dict[str, Any]]) -> None:
        nonlocal reported
        done = sum(1 for r in records if r["event"] == "round" and r["round"] > 0)
        if progress is not None and done > reported:
            progress(done - reported)
            reported = done

    return home.wait(run_id, opts.timeout, metrics=metrics, on_records=follow)


def _perplexity_figures(per_seed: Sequence[float | None]) -> dict[str, Any]:
    """``final_perplexity`` (mean over seeds), its SD and the per-seed values;
    empty when a run did not report one (a run made before perplexity was)."""
    if not per_seed or any(p is None for p in per_seed):
        return {}
    values = [float(p) for p in per_seed]  # type: ignore[arg-type]
    return {
        "final_perplexity": _mean(values),
        "final_perplexity_sd": _sd(values),
        "final_perplexity_per_seed": values,
    }


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else float("nan")


def _sd(values: Sequence[float]) -> float:
    return float(statistics.stdev(values)) if len(values) > 1 else 0.0


def _emulate(
    run: RunRecord,
    profile: str,
    opts: BenchOptions,
    raw_cloud: bool = False,
    flop_model: bool = False,
) -> dict[str, Any]:
    """The run re-timed under ``profile``; with ``raw_cloud`` (a pipelined
    run) the cloud's compute as measured per chunk, not steadied; with
    ``flop_model`` compute on the devices by the FLOP-count model
    (:mod:`tandem.bench.flops`) instead of the measured-time factors."""
    host = (opts.local_gflops_edge, opts.local_gflops_cloud)
    device = (opts.edge.gflops, opts.cloud.gflops)
    # uncalibrated (no GFLOP/s here): compute counts 0 in either model
    flop_model = flop_model and min(host) > 0
    edge_factor, cloud_factor = (
        (1.0, 1.0) if flop_model else (opts.edge_factor, opts.cloud_factor)
    )
    if run.variant.schedule == "pipeline":
        raw, marks = exchanges_from_records(run.records, steady=False)
        exchanges = steady_exchanges(raw)
        if raw_cloud:
            exchanges = [
                dataclasses.replace(ex, cloud_seconds=r.cloud_seconds)
                for ex, r in zip(exchanges, raw, strict=True)
            ]
        if flop_model:
            flops, batch = _row_flops(run)
            exchanges = exchanges_on_device(exchanges, flops, batch, host, device)
        nodes = sorted({ex.node for ex in exchanges})
        links = assign_links(nodes, profile, seed=run.seed)
        report = replay_pipeline(
            exchanges, links, edge_factor, cloud_factor, seed=run.seed, marks=marks
        )
    else:
        rounds = sync_rounds_from_records(run.records)
        if flop_model:
            flops, batch = _row_flops(run)
            steps = _local_steps(run, rounds)
            rounds = rounds_on_device(rounds, flops, batch, steps, host, device)
        nodes = sorted({n for rnd in rounds for n in rnd.nodes})
        links = assign_links(nodes, profile, seed=run.seed)
        report = replay_sync_rounds(
            rounds, links, edge_factor, cloud_factor, seed=run.seed
        )
    return {
        "mode": report.mode,
        "total": report.total_seconds,
        "round_end": list(report.round_end),
        "utilization": report.utilization,
        "efficiency": report.efficiency,
    }


@functools.cache
def _row_flops_cached(config: str) -> tuple[RowFlops, int]:
    return row_flops_for(json.loads(config))


def _row_flops(run: RunRecord) -> tuple[RowFlops, int]:
    """The run's FLOPs per row and batch (one count per configuration: the
    seed changes no shape)."""
    config = next(r["config"] for r in run.records if r["event"] == "config")
    return _row_flops_cached(
        json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)
    )


def _local_steps(
    run: RunRecord, rounds: Sequence[SyncRound]
) -> dict[tuple[int, int], float] | float:
    """Local steps a node trained in each of the run's ``rounds``: the
    ``plan`` events' (dynamic synchronization), else the variant's; 0 for
    ``centralized`` (its nodes only upload: the cloud trains)."""
    if run.variant.overrides.get("method") == "centralized":
        return 0
    plans = {
        (int(r["round"]), int(r["node-id"])): float(r["local-steps"])
        for r in run.records
        if r["event"] == "plan" and "local-steps" in r
    }
    if not plans:
        return run.variant.local_steps
    default = run.variant.local_steps
    for rnd in rounds:
        for node in rnd.nodes:
            plans.setdefault((rnd.round, node), default)
    return plans


def _realtime_figures(
    good: Sequence[RunRecord], variant: Variant, per_edge: int, opts: BenchOptions
) -> dict[str, Any]:
    """``realtime_seconds_per_step`` of a variant's real-time stream runs.

    The ``stream`` event's longest session (its hello to its last frame) /
    steps per edge, under the profile the variant ran on; nothing when its
    runs were not paced (or not streamed). Beside it,
    ``replay_host_cloud_seconds_per_step``: the same runs replayed with the
    cloud at this machine's speed (factor ``max(1, cloud factor)``;
    ``max(1/k, cloud factor)`` on a dilated clock), which is all real time can emulate
    of a faster cloud: the like-for-like check of
    the replay's schedule; and ``replay_host_cloud_raw_seconds_per_step``,
    the same with the cloud's compute per chunk as it ran here, unsteadied
    (the one cloud shares this machine's cores with the edges, and real time
    pays its every delay). On a dilated clock
    (``simultrain-realtime-dilation`` ``k``, the ``stream`` event's
    ``dilation``) the wall seconds are divided by ``k``, and
    ``realtime_dilation`` says ``k``.
    """
    streams = [
        (r, rec)
        for r in good
        for rec in r.records
        if rec["event"] == "stream" and rec.get("realtime")
    ]
    if not streams or variant.profile is None:
        return {}
    # wall seconds on a dilated clock are emulated seconds x k
    paced = [
        (r, rec["session-seconds"] / rec.get("dilation", 1.0)) for r, rec in streams
    ]
    dilation = max(rec.get("dilation", 1.0) for _, rec in streams)
    # on a clock k times slow, this machine's cloud is a cloud k times as
    # fast: factor max(1/k, cloud factor), the T4's when that is faster still
    host_cloud = dataclasses.replace(
        opts,
        local_gflops_cloud=max(opts.local_gflops_cloud, opts.cloud.gflops / dilation),
    )
    replayed = [_emulate(r, variant.profile, host_cloud)["total"] for r, _ in paced]
    raw = [
        _emulate(r, variant.profile, host_cloud, raw_cloud=True)["total"]
        for r, _ in paced
    ]
    seconds = [s for _, s in paced]
    return {
        "realtime_seconds_per_step": {variant.profile: _mean(seconds) / per_edge},
        "realtime_dilation": {variant.profile: dilation},
        "realtime_seconds_per_seed": {variant.profile: seconds},
        "replay_host_cloud_seconds_per_step": {
            variant.profile: _mean(replayed) / per_edge
        },
        "replay_host_cloud_raw_seconds_per_step": {
            variant.profile: _mean(raw) / per_edge
        },
    }


def summarize(suite: Suite, opts: BenchOptions, runs: list[RunRecord]) -> dict:
    """Aggregate runs over seeds into the ``results.json`` structure."""
    methods: dict[str, Any] = {}
    for variant in suite.variants:
        mine = [r for r in runs if r.variant.label == variant.label]
        good = [r for r in mine if r.ok]
        entry: dict[str, Any] = {
            "method": variant.overrides["method"],
            "overrides": dict(variant.overrides),
            "rounds": opts.rounds_for(variant),
            "local_steps": variant.local_steps,
            "runs": [
                {
                    "seed": r.seed,
                    "run_id": r.status.run_id,
                    "status": r.status.status,
                    "details": r.status.details,
                    **({"retried": list(r.retried)} if r.retried else {}),
                }
                for r in mine
            ],
        }
        if not good:
            entry["failed"] = True
            methods[variant.label] = entry
            continue
        acc = [r.summary["final-accuracy"] for r in good]
        ppl = [r.summary.get("final-perplexity") for r in good]
        up = [r.summary["bytes-up"] for r in good]
        down = [r.summary["bytes-down"] for r in good]
        per_edge = opts.steps_for(variant)
        steps = opts.nodes * per_edge  # SGD steps of all edges together
        # a variant run under one profile is timed under that profile only
        profiles = (variant.profile,) if variant.profile else opts.profiles
        emulated = {p: [_emulate(r, p, opts) for r in good] for p in profiles}
        per_step = {
            p: _mean([e["total"] for e in v]) / per_edge for p, v in emulated.items()
        }
        by_factor = {
            p: {
                f"{k:g}": per_step[p]
                if k == 1.0
                else _per_step_at(good, p, opts, k, per_edge)
                for k in _edge_scales(opts)
            }
            for p in profiles
        }
        emulated_flop = {
            p: [_emulate(r, p, opts, flop_model=True) for r in good] for p in profiles
        }
        flop_model = {
            p: _mean([e["total"] for e in v]) / per_edge
            for p, v in emulated_flop.items()
        }
        traffic = (_mean(up) + _mean(down)) / steps
        entry.update(
            {
                "final_accuracy": _mean(acc),
                "final_accuracy_sd": _sd(acc),
                "final_accuracy_per_seed": acc,
                **_perplexity_figures(ppl),
                "bytes_up": _mean(up),
                "bytes_down": _mean(down),
                "bytes_total": _mean(up) + _mean(down),
                "bytes_total_per_seed": [u + d for u, d in zip(up, down, strict=True)],
                "bytes_up_per_step": _mean(up) / steps,
                "bytes_down_per_step": _mean(down) / steps,
                "emulated_seconds": {
                    p: _mean([e["total"] for e in v]) for p, v in emulated.items()
                },
                "emulated_seconds_per_round": {
                    p: _mean([e["total"] for e in v]) / opts.rounds_for(variant)
                    for p, v in emulated.items()
                },
                "steps_per_edge": per_edge,
                "emulated_seconds_per_step": per_step,
                "emulated_seconds_per_step_by_edge_factor": by_factor,
                "emulated_seconds_per_step_flop_model": flop_model,
                **_realtime_figures(good, variant, per_edge, opts),
                "pipeline_efficiency": {
                    p: _mean([e["efficiency"] for e in v]) for p, v in emulated.items()
                },
                "pipeline_efficiency_flop_model": {
                    p: _mean([e["efficiency"] for e in v])
                    for p, v in emulated_flop.items()
                },
                "bandwidth_time_product_per_step": {
                    p: traffic * t for p, t in per_step.items()
                },
                "emulated_seconds_per_seed": {
                    p: [e["total"] for e in v] for p, v in emulated.items()
                },
                "utilization": {
                    p: {
                        k: _mean([e["utilization"].get(k, 0.0) for e in v])
                        for k in ("edge", "up", "down", "cloud")
                    }
                    for p, v in emulated.items()
                },
                "clock_mode": "retimed",
                "profile": variant.profile,
                "schedule": variant.schedule,
                "wall_seconds": _mean([r.summary["wall-seconds"] for r in good]),
                "wall_seconds_per_seed": [r.summary["wall-seconds"] for r in good],
                "curves": [
                    {
                        "seed": r.seed,
                        "accuracy": [x["eval-accuracy"] for x in r.round_records],
                        "perplexity": [
                            x.get("eval-perplexity") for x in r.round_records
                        ],
                        "bytes": [
                            x["cum-bytes-up"] + x["cum-bytes-down"]
                            for x in r.round_records
                        ],
                        "bytes_up": [x["cum-bytes-up"] for x in r.round_records],
                        "emulated_seconds": {
                            p: [0.0, *emulated[p][i]["round_end"]] for p in profiles
                        },
                        FLOP_CLOCK: {
                            p: [0.0, *emulated_flop[p][i]["round_end"]]
                            for p in profiles
                        },
                    }
                    for i, r in enumerate(good)
                ],
            }
        )
        personal = _personal_figures(good)
        if personal:
            entry["personalization"] = personal
        methods[variant.label] = entry
    target = _target_accuracy(methods, opts.target, suite)
    for entry in methods.values():
        if not entry.get("failed"):
            entry["emulated_seconds_to_target"] = _time_to_target(entry, target)
    out = {
        "suite": suite.name,
        "description": suite.description,
        "target_accuracy": target,
        "methods": methods,
        "sensitivity": sensitivity(suite, methods, opts.edge_scale_after),
    }
    if suite.reference is not None:
        out["reference"] = _against_reference(suite, methods, runs, target)
        paired = paired_targets(methods, suite.reference, suite.reference_margin)
        if paired:
            out["reference"]["paired"] = paired
        paired = paired_targets(
            methods, suite.reference, suite.reference_margin, FLOP_CLOCK
        )
        if paired:
            out["reference"]["paired_flop_model"] = paired
        ref = methods.get(suite.reference, {})
        if "final_perplexity" in ref:
            # the time to the reference's own final perplexity (issue targets)
            out["target_perplexity"] = ref["final_perplexity"]
            for label, entry in methods.items():
                if "final_perplexity" in entry:
                    seconds = _time_to_target(
                        entry, ref["final_perplexity"], "perplexity"
                    )
                    entry["emulated_seconds_to_target_perplexity"] = seconds
                    row = out["reference"]["methods"].get(label)
                    if row is not None:
                        row["emulated_seconds_to_target_perplexity"] = seconds
    along = suite.milestones or suite.reference
    if along is not None:
        for key, clock in (
            ("milestones", "emulated_seconds"),
            ("milestones_flop_model", FLOP_CLOCK),
        ):
            milestones = milestone_targets(methods, along, clock=clock)
            if milestones:
                out[key] = milestones
    return out


def _edge_scales(opts: BenchOptions) -> tuple[float, ...]:
    """The edge-factor multiples the runs are re-timed at:
    :data:`EDGE_FACTOR_SCALES`, and the probes after the runs' (to 3 decimals)."""
    after = opts.edge_scale_after
    if after is None or round(after, 3) in EDGE_FACTOR_SCALES:
        return EDGE_FACTOR_SCALES
    return tuple(sorted({*EDGE_FACTOR_SCALES, round(after, 3)}))


def _scaled_edge(opts: BenchOptions, scale: float) -> BenchOptions:
    """``opts`` with the edge factor times ``scale`` (an edge device
    ``1 / scale`` times as fast as the one assumed)."""
    return dataclasses.replace(opts, local_gflops_edge=opts.local_gflops_edge * scale)


def _per_step_at(
    good: Sequence[RunRecord],
    profile: str,
    opts: BenchOptions,
    scale: float,
    steps: int,
) -> float:
    """Emulated seconds per step of ``good`` with the edge factor x ``scale``."""
    scaled = _scaled_edge(opts, scale)
    return _mean([_emulate(r, profile, scaled)["total"] for r in good]) / steps


def _at_profile(methods: Mapping[str, Any], label: str, profile: str) -> Any:
    """The entry of ``label`` under ``profile``: ``label@profile`` for a
    variant run once per profile, else ``label`` (re-timed under each)."""
    return methods.get(f"{label}@{profile}", methods.get(label))


def _profiles_of(methods: Mapping[str, Any], label: str) -> set[str]:
    """The profiles ``label`` was timed under (as itself or ``label@<p>``)."""
    found: set[str] = set()
    for name, entry in methods.items():
        if entry.get("failed") or name.split("@")[0] != label:
            continue
        found |= set(entry.get("emulated_seconds_per_step_by_edge_factor", {}))
    return found


def sensitivity(
    suite: Suite, methods: Mapping[str, Any], after: float | None = None
) -> list[dict[str, Any]]:
    """The suite's headline time ratios at edge factor x0.5, x1 and x2, and
    under the FLOP-count device model (:mod:`tandem.bench.flops`).

    One row per ``(numerator, denominator)`` of ``suite.headline`` and
    profile both were timed under: the ratio of their emulated seconds per
    step with the measured edge factor scaled by each of
    :data:`EDGE_FACTOR_SCALES` (the same recorded runs re-timed; the
    cloud's factor and the links unchanged). It shows how much of a ratio
    rests on the assumed edge device: x2 is an edge twice as slow as the
    calibration says. A pipelined run's window W was chosen for x1. With
    the probes after the runs (``after``: their edge factor over the one
    used), the ratios at their factor too, its key in ``after_probes_scale``.
    """
    rows = []
    for num, den in suite.headline:
        for profile in sorted(_profiles_of(methods, num) & _profiles_of(methods, den)):
            fa = _at_profile(methods, num, profile)
            fb = _at_profile(methods, den, profile)
            a = fa["emulated_seconds_per_step_by_edge_factor"][profile]
            b = fb["emulated_seconds_per_step_by_edge_factor"][profile]
            rows.append(
                {
                    "numerator": num,
                    "denominator": den,
                    "profile": profile,
                    "ratio_by_edge_factor": {k: a[k] / b[k] for k in a},
                    **(
                        {"after_probes_scale": f"{round(after, 3):g}"}
                        if after is not None
                        else {}
                    ),
                    "ratio_flop_model": (
                        fa["emulated_seconds_per_step_flop_model"][profile]
                        / fb["emulated_seconds_per_step_flop_model"][profile]
                    ),
                }
            )
    return rows


#: Run-summary entries averaged over seeds into ``results.json`` when present.
def _personal_figures(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """Per-device accuracy of the global and the cluster models, per seed.

    Empty unless every run reports it (ACE-Sync's ``personal-*`` summary).
    """
    keys = ("personal-accuracy-global", "personal-accuracy-cluster")
    if not runs or not all(k in r.summary for r in runs for k in keys):
        return {}
    per_seed = {
        k: [float(r.summary[k]) for r in runs] for k in (*keys, "personal-clusters")
    }
    gain = [
        c - g
        for g, c in zip(
            per_seed["personal-accuracy-global"],
            per_seed["personal-accuracy-cluster"],
            strict=True,
        )
    ]
    return {
        "seeds": [r.seed for r in runs],
        "clusters_per_seed": [int(c) for c in per_seed["personal-clusters"]],
        "global_accuracy": _mean(per_seed["personal-accuracy-global"]),
        "global_accuracy_per_seed": per_seed["personal-accuracy-global"],
        "cluster_accuracy": _mean(per_seed["personal-accuracy-cluster"]),
        "cluster_accuracy_per_seed": per_seed["personal-accuracy-cluster"],
        "cluster_minus_global": _mean(gain),
        "cluster_minus_global_sd": _sd(gain),
        "per_device": [
            {
                "seed": r.seed,
                "global": r.summary.get("personal-device-accuracy-global"),
                "cluster": r.summary.get("personal-device-accuracy-cluster"),
                "labels": r.summary.get("personal-cluster-labels"),
            }
            for r in runs
        ],
    }


SUMMARY_FIGURES = (
    "overhead-share",
    "overhead-share-with-decode",
    "encoded-ratio",
    "divergence-triggers",
    "predictor-rank-corr",
    "magnitude-rank-corr",
    "personal-clusters",
    "personal-accuracy-global",
    "personal-accuracy-cluster",
)


def _against_reference(
    suite: Suite, methods: Mapping[str, Any], runs: list[RunRecord], target: float
) -> dict[str, Any]:
    """Each variant against ``suite.reference``: bytes ratios, rounds to target.

    ``last3_accuracy`` is the mean test accuracy of the last three rounds
    (a steadier figure than the last round alone when accuracy oscillates
    from round to round). Rounds to target count the first round whose test
    accuracy reaches ``target``, in the reference's rounds (a round of a
    variant that syncs every ``period`` rounds' worth of steps counts
    ``period``); a variant's mean is ``None`` unless every seed reached the
    target.
    """
    ref = methods.get(suite.reference or "")
    ref_steps = next(
        (v.local_steps for v in suite.variants if v.label == suite.reference), 1
    )
    table: dict[str, Any] = {
        "label": suite.reference,
        "margin": suite.reference_margin,
        "target_accuracy": target,
        "methods": {},
    }
    for variant in suite.variants:
        entry = methods.get(variant.label)
        if entry is None or entry.get("failed"):
            continue
        good = [r for r in runs if r.variant.label == variant.label and r.ok]
        per_seed = []
        for r in good:
            hit = next(
                (
                    x["round"]
                    for x in r.round_records
                    if x["round"] > 0 and x["eval-accuracy"] >= target
                ),
                None,
            )
            per_seed.append(
                None if hit is None else hit * variant.local_steps / ref_steps
            )
        reached = [x for x in per_seed if x is not None]
        tail = [
            _mean([x["eval-accuracy"] for x in r.round_records[1:][-3:]]) for r in good
        ]
        row: dict[str, Any] = {
            "final_accuracy": entry["final_accuracy"],
            "final_accuracy_sd": entry["final_accuracy_sd"],
            **{
                k: entry[k]
                for k in ("final_perplexity", "final_perplexity_sd")
                if k in entry
            },
            "last3_accuracy": _mean(tail),
            "last3_accuracy_per_seed": tail,
            "bytes_up": entry["bytes_up"],
            "bytes_down": entry["bytes_down"],
            "bytes_total": entry["bytes_total"],
            "rounds_to_target": _mean(reached)
            if len(reached) == len(per_seed)
            else None,
            "rounds_to_target_per_seed": per_seed,
            "emulated_seconds_to_target": entry["emulated_seconds_to_target"],
        }
        if ref is not None and not ref.get("failed"):
            row["accuracy_minus_reference"] = (
                entry["final_accuracy"] - ref["final_accuracy"]
            )
            if "final_perplexity" in entry and "final_perplexity" in ref:
                row["perplexity_vs_reference"] = (
                    entry["final_perplexity"] / ref["final_perplexity"]
                )
            row["bytes_up_vs_reference"] = entry["bytes_up"] / ref["bytes_up"]
            row["bytes_down_vs_reference"] = entry["bytes_down"] / ref["bytes_down"]
            row["bytes_total_vs_reference"] = entry["bytes_total"] / ref["bytes_total"]
        for key in SUMMARY_FIGURES:
            values = [r.summary[key] for r in good if r.summary.get(key) is not None]
            if values:
                row[key.replace("-", "_")] = _mean([float(v) for v in values])
        table["methods"][variant.label] = row
    reference = table["methods"].get(suite.reference)
    if reference is not None:
        for row in table["methods"].values():
            row["last3_minus_reference"] = (
                row["last3_accuracy"] - reference["last3_accuracy"]
            )
    return table


def _target_accuracy(
    methods: Mapping[str, Any], given: float | None, suite: Suite | None = None
) -> float:
    """``--target``; else the reference's final accuracy minus the suite's margin;
    else 90% of centralized's final accuracy (or the best's)."""
    if given is not None:
        return given
    done = {k: m for k, m in methods.items() if not m.get("failed")}
    if not done:
        return float("nan")
    if suite is not None and suite.reference in done:
        return done[suite.reference]["final_accuracy"] - suite.reference_margin
    central = [m for m in done.values() if m["method"] == "centralized"]
    ceiling = central[0] if central else max(done.values(), key=_final)
    return 0.9 * ceiling["final_accuracy"]


def _final(entry: Mapping[str, Any]) -> float:
    return float(entry["final_accuracy"])


def _first_reach(
    curve: Mapping[str, Any],
    profile: str,
    target: float,
    curve_key: str,
    clock: str = "emulated_seconds",
) -> float | None:
    """Emulated seconds (on the ``clock`` curve) until ``curve`` first reached
    ``target`` on ``profile`` (accuracy at or above it; perplexity at or
    below it), or ``None``."""
    for t, a in zip(curve[clock][profile][1:], curve[curve_key][1:], strict=False):
        if a is not None and (
            a <= target if curve_key == "perplexity" else a >= target
        ):
            return float(t)
    return None


def paired_targets(
    methods: Mapping[str, Any],
    reference: str,
    margin: float,
    clock: str = "emulated_seconds",
) -> dict[str, Any]:
    """Time to target paired by seed: each seed against its own reference run.

    Seed ``s``'s targets are the reference's final accuracy on ``s`` minus
    ``margin`` and (when it reports one) its final perplexity on ``s``. Per
    method, profile and target: the emulated seconds each seed's run took
    to reach its seed's target (``None``: not reached), how many seeds
    reached it, on how many the method was no later than the reference (it
    reached the target and the reference did not, or did so later or at the
    same time), and the mean over the seeds both reached of the ratio of the
    method's time to the reference's. Unlike the one target of
    :func:`_time_to_target` (the mean over seeds, which a seed that ends
    below the mean never reaches), every seed's reference run reaches its
    own perplexity target; an accuracy target is reached unless its
    ``margin`` is negative. ``clock`` names the curves' times: the
    measured-time model's ``emulated_seconds`` or the FLOP-count model's
    (:data:`FLOP_CLOCK`). Empty when the reference failed or has no curves
    on that clock.
    """
    ref = methods.get(reference)
    if not _has_clock(ref, clock):
        return {}
    ref_curves = {c["seed"]: c for c in ref["curves"]}
    keys = ["accuracy"]
    if all(c["perplexity"][-1] is not None for c in ref_curves.values()):
        keys.append("perplexity")
    targets = {
        "accuracy": {s: c["accuracy"][-1] - margin for s, c in ref_curves.items()},
        "perplexity": {s: c["perplexity"][-1] for s, c in ref_curves.items()},
    }
    out: dict[str, Any] = {
        "margin": margin,
        "targets": {k: {str(s): v for s, v in targets[k].items()} for k in keys},
    }
    out["methods"] = _paired_rows(
        methods,
        ref_curves,
        keys,
        clock,
        lambda entry, key: _paired_figures(entry, ref, key, targets[key], clock),
    )
    return out


def _paired_rows(
    methods: Mapping[str, Any],
    ref_curves: Mapping[int, Any],
    keys: Sequence[str],
    clock: str,
    figures: Callable[[Mapping[str, Any], str], Any],
) -> dict[str, Any]:
    """Per method with curves on ``clock``: the seeds it shares with the
    reference and ``figures(entry, key)`` for each target kind ``key``."""
    rows: dict[str, Any] = {}
    for label, entry in methods.items():
        if not _has_clock(entry, clock):
            continue
        row: dict[str, Any] = {"seeds": _paired_seeds(entry, ref_curves)}
        for key in keys:
            row[key] = figures(entry, key)
        rows[label] = row
    return rows


#: The curves' times under the FLOP-count device model (:mod:`tandem.bench.flops`).
FLOP_CLOCK = "emulated_seconds_flop_model"


def _has_clock(entry: Mapping[str, Any] | None, clock: str) -> bool:
    """Whether ``entry`` ran and every curve of it has times on ``clock``."""
    if not entry or entry.get("failed") or not entry.get("curves"):
        return False
    return all(clock in c for c in entry["curves"])


def _paired_seeds(entry: Mapping[str, Any], ref_curves: Mapping[int, Any]) -> list[int]:
    """The seeds of ``entry``'s curves that have a reference run."""
    return [c["seed"] for c in entry["curves"] if c["seed"] in ref_curves]


def _paired_figures(
    entry: Mapping[str, Any],
    ref: Mapping[str, Any],
    key: str,
    goals: Mapping[int, float],
    clock: str = "emulated_seconds",
) -> dict[str, Any]:
    """Per profile both ran: each seed's emulated seconds to its own goal
    (``goals[seed]``, on the ``key`` curve) for ``entry`` and the reference,
    how many seeds reached it, on how many ``entry`` was no later, and the
    mean over the seeds both reached of the ratio of the times."""
    ref_curves = {c["seed"]: c for c in ref["curves"]}
    curves = [c for c in entry["curves"] if c["seed"] in ref_curves]
    figures: dict[str, Any] = {}
    for profile in entry["emulated_seconds"]:
        if profile not in ref["emulated_seconds"]:
            continue
        mine, theirs = [], []
        for c in curves:
            goal = goals[c["seed"]]
            mine.append(_first_reach(c, profile, goal, key, clock))
            theirs.append(
                _first_reach(ref_curves[c["seed"]], profile, goal, key, clock)
            )
        both = [
            m / r
            for m, r in zip(mine, theirs, strict=True)
            if m is not None and r is not None and r > 0
        ]
        figures[profile] = {
            "seconds_per_seed": mine,
            "reference_seconds_per_seed": theirs,
            "reached": sum(m is not None for m in mine),
            "no_later": sum(
                m is not None and (r is None or m <= r)
                for m, r in zip(mine, theirs, strict=True)
            ),
            "time_vs_reference": _mean(both) if both else None,
        }
    return figures


#: Points along the reference's run that :func:`milestone_targets` times.
MILESTONE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def milestone_targets(
    methods: Mapping[str, Any],
    reference: str,
    fractions: Sequence[float] = MILESTONE_FRACTIONS,
    clock: str = "emulated_seconds",
) -> dict[str, Any]:
    """Time to several targets along the reference's curve, paired by seed.

    For seed ``s`` and fraction ``f``, the target is the best the
    reference's run on ``s`` had reached by its evaluation ``⌈f·N⌉`` of
    ``N`` (the highest accuracy, and the lowest perplexity when it reports
    one): where the reference had got to after a quarter, half, ... of its
    run, so a budget that ends before a plateau is still compared along the
    way. Per method, fraction, target kind and profile, the figures of
    :func:`paired_targets` (seconds per seed, seeds reached, no later than
    the reference, paired mean ratio), timed on ``clock`` (as there). Empty
    when the reference failed or has no curves on that clock.
    """
    ref = methods.get(reference)
    if not _has_clock(ref, clock):
        return {}
    ref_curves = {c["seed"]: c for c in ref["curves"]}
    keys = ["accuracy"]
    if all(None not in c["perplexity"][1:] for c in ref_curves.values()):
        keys.append("perplexity")
    best = {"accuracy": max, "perplexity": min}
    targets: dict[str, dict[str, dict[int, float]]] = {k: {} for k in keys}
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"milestone fractions lie in (0, 1], got {f}")
        for key in keys:
            goals = {}
            for seed, c in ref_curves.items():
                n = len(c[key]) - 1  # evaluations after the initial one
                if n < 1:
                    return {}
                upto = max(1, math.ceil(f * n - 1e-9))
                goals[seed] = float(best[key](c[key][1 : upto + 1]))
            targets[key][f"{f:g}"] = goals
    out: dict[str, Any] = {
        "reference": reference,
        "fractions": [float(f) for f in fractions],
        "targets": {
            k: {f: {str(s): v for s, v in g.items()} for f, g in t.items()}
            for k, t in targets.items()
        },
    }
    out["methods"] = _paired_rows(
        methods,
        ref_curves,
        keys,
        clock,
        lambda entry, key: {
            f: _paired_figures(entry, ref, key, goals, clock)
            for f, goals in targets[key].items()
        },
    )
    return out


def _time_to_target(
    entry: Mapping[str, Any], target: float, curve_key: str = "accuracy"
) -> dict[str, Any]:
    """Per profile: mean emulated seconds until the test accuracy first reached
    ``target`` (``None`` unless every seed reached it); with ``curve_key =
    "perplexity"``, until the test perplexity first fell to ``target`` or
    below."""
    out: dict[str, Any] = {}
    for profile in entry["emulated_seconds"]:
        times = [
            _first_reach(curve, profile, target, curve_key) for curve in entry["curves"]
        ]
        reached = [t for t in times if t is not None]
        out[profile] = _mean(reached) if len(reached) == len(times) else None
    return out
