"""``tandem bench codecs``: ACE-Sync's codec throughput on one core.

Times, in-process and on one thread, the two halves of an ACE-Sync round's
compression on a transformer-shaped update of 1M or 4M parameters:

- the edge's encode path, :func:`~tandem.compression.pipeline.compress_update`
  as the ACE-Sync client runs it (``in_place``: error feedback, importance
  from the predictor, knapsack, encoding and packing into the two wire
  arrays, ``sent`` and the new residual), with its per-step breakdown;
- the cloud's decode path for one reply: the wire checks of both arrays on
  their ``.npy`` bytes (:func:`~tandem.protocol.acesync.read_update`, i.e.
  :func:`~tandem.wire.read_array`), the checks and decoding of the packed
  groups (:func:`~tandem.compression.packing.unpack_flat`), and the fill of
  deferred groups from the cloud's cache with the cache refresh
  (:func:`~tandem.compression.pipeline.fill_deferred`);
- the cloud's per-round work for ``devices`` replies: decode each and add it,
  weighted, to the aggregate.

The update is synthetic but shaped like a real one: the tensors of
:func:`tandem.transformer.transformer` (width 128 or 256, 5 blocks), each
with Laplace entries (heavy-tailed, as SGD updates are) of its own scale,
log-uniform in ``[1e-4, 1e-2]``, and a fresh draw every round; the global
weights are the model's initialization. The byte budget is eq. 5's at
``bandwidth`` Mbit/s with the default ``acesync-*`` options.

Figures are throughputs in GB/s of float32 input (``4·N`` bytes over the
median of the rounds' thread CPU seconds, ``time.thread_time``), and beside
them the best round's (the least disturbed: on a shared machine the same
round's CPU time moves with the other tenants' use of the caches and memory,
by a third within one run here). CPU time is what one core spends, and it
does not count time lost to other processes. Threads are pinned to one
(torch, and the OpenMP / MKL / OpenBLAS variables for libraries that read
them on import).

Examples::

    tandem bench codecs                       # 1M and 4M, 15 rounds each
    tandem bench codecs --sizes 4m --repeats 31 --out docs/bench/codecs
    tandem bench codecs --quick               # a tiny model, seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

from tandem.compression.budget import byte_budget
from tandem.compression.layout import GroupLayout
from tandem.compression.packing import unpack_flat
from tandem.compression.pipeline import EdgeMemory, compress_update, fill_deferred
from tandem.importance import ImportancePredictor
from tandem.protocol.acesync import (
    KEY_UPDATE,
    AceSyncOptions,
    EdgePlan,
    read_update,
    update_record,
)
from tandem.transformer import transformer

__all__ = [
    "CASES",
    "ModelCase",
    "main",
    "measure_case",
    "memory_probe",
    "synthetic_update",
]

#: Environment variables that cap a library's threads.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: Edge encode steps, in the order compress_update runs them.
ENCODE_STAGES = ("feedback", "importance", "knapsack", "encode", "sent", "residual")
#: Cloud decode steps per reply.
DECODE_STAGES = ("wire", "unpack", "fill")


@dataclass(frozen=True)
class ModelCase:
    """A transformer shape to take the update's tensors from.

    Attributes
    ----------
    name : str
        Its name on the command line and in the results.
    width, layers, context : int
        :func:`tandem.transformer.transformer`'s ``width``, ``layers`` and
        ``context`` (vocabulary 256).
    """

    name: str
    width: int
    layers: int
    context: int = 128


#: The cases: ~1.07M and ~4.11M parameters, and a tiny one for tests.
CASES: dict[str, ModelCase] = {
    "1m": ModelCase("1m", 128, 5),
    "4m": ModelCase("4m", 256, 5),
    "tiny": ModelCase("tiny", 16, 1, 16),
}


def pin_one_thread() -> None:
    """One thread for torch, and for OpenMP / MKL / OpenBLAS users to come."""
    for key in THREAD_VARIABLES:
        os.environ[key] = "1"
    torch.set_num_threads(1)


def model_arrays(case: ModelCase, seed: int) -> dict[str, np.ndarray]:
    """The case's initial weights by tensor name (float32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformer(256, case.context, case.width, case.layers)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def synthetic_update(
    layout: GroupLayout, scales: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A flat float32 update: tensor ``t``'s entries Laplace of scale ``scales[t]``.

    Parameters
    ----------
    layout : GroupLayout
        The model's groups; ``layout.keys`` are the tensors.
    scales : np.ndarray
        ``(len(layout.keys),)`` Laplace scale ``b`` per tensor.
    rng : np.random.Generator
        The draw.
    """
    lengths = [int(np.prod(shape)) for shape in layout.shapes]
    per_element = np.repeat(np.asarray(scales, dtype=np.float64), lengths)
    return (rng.laplace(size=layout.total) * per_element).astype(np.float32)


def memory_probe(megabytes: int = 64, repeats: int = 9) -> float:
    """This machine's one-thread memory copy speed now, GB/s read (median).

    The codecs' passes stream the update through memory, so their figures
    move with this one (a shared machine's other tenants take from the same
    caches and memory bus); it is recorded before and after the cases to
    tell a slow machine from slow code.
    """
    source = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    target = np.empty_like(source)
    seconds = []
    for _ in range(repeats):
        tick = time.thread_time()
        np.copyto(target, source)
        seconds.append(time.thread_time() - tick)
    return source.nbytes / _median(seconds) / 1e9


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _rate(elements: int, seconds: float) -> float:
    """GB/s of float32 input."""
    return 4 * elements / seconds / 1e9 if seconds > 0 else float("inf")


@dataclass
class _Reply:
    """One encoded update as the cloud receives it, and the cloud's cache."""

    record: Any
    budget: int
    server_round: int
    cache: np.ndarray
    cache_round: np.ndarray


def _decode(
    reply: _Reply,
    plan: EdgePlan,
    layout: GroupLayout,
    out: np.ndarray,
    stages: dict[str, float],
) -> np.ndarray:
    """The cloud's decode path for one reply, each step's CPU seconds added."""
    tick = time.thread_time()
    codes, payload = read_update(RecordDict({KEY_UPDATE: reply.record}))
    now = time.thread_time()
    stages["wire"] += now - tick
    tick = now
    update, sent = unpack_flat(
        codes,
        payload,
        layout.sizes,
        plan.codecs,
        max_bytes=reply.budget,
        labels=layout.labels,
        out=out,
    )
    now = time.thread_time()
    stages["unpack"] += now - tick
    tick = now
    fill_deferred(
        update,
        sent,
        reply.cache,
        reply.cache_round,
        layout.sizes,
        reply.server_round,
        plan.fill_decay,
    )
    stages["fill"] += time.thread_time() - tick
    return update


def measure_case(
    case: ModelCase,
    *,
    repeats: int = 15,
    bandwidth_mbps: float = 32.0,
    devices: int = 64,
    round_repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Encode, decode and a cloud round on ``case``, timed on one thread.

    Parameters
    ----------
    case : ModelCase
        The update's shape.
    repeats : int (default: 15)
        Edge rounds timed (after one untimed warm-up round); each reply is
        then decoded and timed once. Medians are reported.
    bandwidth_mbps : float (default: 32.0)
        Uplink for eq. 5's budget.
    devices : int (default: 64)
        Replies in the cloud round; device ``d`` sends the ``d mod repeats``-th
        encoded update (their decoding does not depend on who sent them), with
        weight ``(d + 1) / Σ``.
    round_repeats : int (default: 3)
        Cloud rounds timed; the median is reported.
    seed : int (default: 0)
        Weights, tensor scales and draws.

    Returns
    -------
    dict
        ``parameters``, ``groups``, ``budget_bytes``, codec mix, median
        seconds and GB/s of encode and decode with per-step seconds, and the
        cloud round's seconds.
    """
    if repeats < 1 or devices < 1 or round_repeats < 1:
        raise ValueError("repeats, devices and round_repeats must be >= 1")
    options = AceSyncOptions()
    arrays = model_arrays(case, seed)
    layout = GroupLayout.from_arrays(arrays, options.chunk)
    weights = layout.flat(arrays)
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-4.0, -2.0, size=len(layout.keys))
    budget = byte_budget(
        layout.full_bytes,
        bandwidth_mbps * 1e6,
        c_min=options.c_min,
        c_max=options.c_max,
        beta=options.beta,
    )
    predictor = ImportancePredictor(alpha=options.alpha, seed=seed)
    memory = EdgeMemory.fresh(layout, options.history)
    n = len(layout.groups)

    def plan_for(server_round: int) -> EdgePlan:
        return EdgePlan.from_options(
            options,
            budget=budget,
            local_steps=1,
            server_round=server_round,
        )

    # edge: one warm-up round, then `repeats` timed ones
    encode_total: list[float] = []
    encode_stages: dict[str, list[float]] = {s: [] for s in ENCODE_STAGES}
    replies: list[_Reply] = []
    mix = np.zeros(len(options.options), dtype=np.int64)
    for server_round in range(1, repeats + 2):
        update = synthetic_update(layout, scales, rng)
        plan = plan_for(server_round)
        stages: dict[str, float] = {}
        tick = time.thread_time()
        out = compress_update(
            update,
            weights,
            memory,
            plan,
            layout,
            predictor,
            stages=stages,
            in_place=True,  # as the client calls it
        )
        seconds = time.thread_time() - tick
        if server_round == 1:
            continue
        encode_total.append(seconds)
        for stage in ENCODE_STAGES:
            encode_stages[stage].append(stages.get(stage, 0.0))
        mix += np.bincount(out.codecs, minlength=len(options.options))
        replies.append(
            _Reply(
                update_record(out.codecs, out.payload),
                budget,
                server_round,
                memory.cache.copy(),  # the cloud's cache: the edge's mirror
                memory.cache_round.copy(),
            )
        )

    # cloud: each reply decoded once
    buffer = np.empty(layout.total, dtype=np.float32)
    decode_total: list[float] = []
    decode_stages: dict[str, list[float]] = {s: [] for s in DECODE_STAGES}
    for reply in replies:
        stages = dict.fromkeys(DECODE_STAGES, 0.0)
        tick = time.thread_time()
        _decode(reply, plan_for(reply.server_round), layout, buffer, stages)
        decode_total.append(time.thread_time() - tick)
        for stage in DECODE_STAGES:
            decode_stages[stage].append(stages[stage])

    # cloud round: `devices` replies decoded and aggregated
    omega = np.arange(1, devices + 1, dtype=np.float64)
    omega /= omega.sum()
    aggregate = np.empty(layout.total, dtype=np.float32)
    total = torch.from_numpy(aggregate)  # Σ ω_d û_d in one fused pass per reply
    round_seconds: list[float] = []
    per_round: list[dict[str, float]] = []
    for _ in range(round_repeats):
        stages = dict.fromkeys((*DECODE_STAGES, "aggregate"), 0.0)
        tick = time.thread_time()
        aggregate.fill(0.0)
        for device in range(devices):
            reply = replies[device % len(replies)]
            update = _decode(
                reply, plan_for(reply.server_round), layout, buffer, stages
            )
            lap = time.thread_time()
            total.add_(torch.from_numpy(update), alpha=float(omega[device]))
            stages["aggregate"] += time.thread_time() - lap
        round_seconds.append(time.thread_time() - tick)
        per_round.append(stages)
    middle = sorted(range(round_repeats), key=round_seconds.__getitem__)[
        (round_repeats - 1) // 2
    ]

    encode_s, decode_s = _median(encode_total), _median(decode_total)
    return {
        "model": f"transformer(vocab=256, context={case.context}, "
        f"width={case.width}, layers={case.layers})",
        "parameters": layout.total,
        "float32_bytes": layout.full_bytes,
        "groups": n,
        "chunk": options.chunk,
        "budget_bytes": budget,
        "bandwidth_mbps": bandwidth_mbps,
        "codec_mix": {
            o.label: int(c) for o, c in zip(options.options, mix, strict=True) if c
        },
        "encode": {
            "seconds": encode_s,
            "gb_per_s": _rate(layout.total, encode_s),
            "best_seconds": min(encode_total),
            "best_gb_per_s": _rate(layout.total, min(encode_total)),
            "seconds_per_round": encode_total,
            "stages_seconds": {s: _median(v) for s, v in encode_stages.items()},
            "rounds": len(encode_total),
        },
        "decode": {
            "seconds": decode_s,
            "gb_per_s": _rate(layout.total, decode_s),
            "best_seconds": min(decode_total),
            "best_gb_per_s": _rate(layout.total, min(decode_total)),
            "seconds_per_reply": decode_total,
            "stages_seconds": {s: _median(v) for s, v in decode_stages.items()},
            "replies": len(decode_total),
        },
        "cloud_round": {
            "devices": devices,
            "seconds": _median(round_seconds),
            "stages_seconds": per_round[middle],  # of the (lower) median round
            "rounds": round_repeats,
            "distinct_replies": len(replies),
        },
    }


def format_report(results: dict[str, Any]) -> str:
    """The throughput table and the per-step breakdown, as Markdown."""
    lines = [
        "| case | parameters | groups | encode GB/s (best) | decode GB/s (best) | "
        "encode ms | decode ms | cloud round s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["cases"].items():
        lines.append(
            f"| {name} | {r['parameters']:,} | {r['groups']:,} | "
            f"{r['encode']['gb_per_s']:.3f} ({r['encode']['best_gb_per_s']:.3f}) | "
            f"{r['decode']['gb_per_s']:.3f} ({r['decode']['best_gb_per_s']:.3f}) | "
            f"{1000 * r['encode']['seconds']:.1f} | "
            f"{1000 * r['decode']['seconds']:.1f} | "
            f"{r['cloud_round']['seconds']:.2f} ({r['cloud_round']['devices']}) |"
        )
    for name, r in results["cases"].items():
        enc = ", ".join(
            f"{s} {1000 * v:.1f}" for s, v in r["encode"]["stages_seconds"].items()
        )
        dec = ", ".join(
            f"{s} {1000 * v:.1f}" for s, v in r["decode"]["stages_seconds"].items()
        )
        lines.append(f"\n{name} encode ms: {enc}")
        lines.append(f"{name} decode ms: {dec}")
        lines.append(f"{name} codecs chosen: {r['codec_mix']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``tandem bench codecs`` argument parser."""
    p = argparse.ArgumentParser(
        prog="tandem bench codecs",
        description="ACE-Sync codec throughput on one core (edge encode, "
        "cloud decode, a cloud round).",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        choices=sorted(CASES),
        default=["1m", "4m"],
        help="update shapes (default: 1m 4m)",
    )
    p.add_argument("--repeats", type=int, default=15, help="edge rounds timed")
    p.add_argument("--devices", type=int, default=64, help="replies per cloud round")
    p.add_argument("--round-repeats", type=int, default=3, help="cloud rounds timed")
    p.add_argument(
        "--bandwidth", type=float, default=32.0, help="uplink Mbit/s for the budget"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="the tiny case, 2 rounds, 4 devices (a smoke test, not a figure)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("docs/bench/codecs"),
        help="output folder for results.json",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tandem bench codecs``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.devices, args.round_repeats = (
            ["tiny"],
            2,
            4,
            1,
        )
    if min(args.repeats, args.devices, args.round_repeats) < 1:
        parser.error("--repeats, --devices and --round-repeats must be >= 1")
    if not args.bandwidth >= 0:
        parser.error(f"--bandwidth must be >= 0 Mbit/s, got {args.bandwidth}")
    pin_one_thread()
    copy_before = memory_probe()
    cases = {
        name: measure_case(
            CASES[name],
            repeats=args.repeats,
            bandwidth_mbps=args.bandwidth,
            devices=args.devices,
            round_repeats=args.round_repeats,
            seed=args.seed,
        )
        for name in args.sizes
    }
    copy_after = memory_probe()
    results = {
        "cases": cases,
        "assumptions": {
            "clock": "thread CPU time (time.thread_time), one thread; medians",
            "threads": {
                "torch": torch.get_num_threads(),
                **{k: os.environ[k] for k in THREAD_VARIABLES},
            },
            "update": "transformer tensors, Laplace entries, per-tensor scale "
            "log-uniform in [1e-4, 1e-2], a fresh draw per round",
            "importance": "predictor (untrained, as in round 1 of a run)",
            "load_average": list(os.getloadavg()),
            "memory_copy_gb_per_s": {"before": copy_before, "after": copy_after},
            "machine": platform.processor() or platform.machine(),
            "numpy": np.__version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": shlex.join(
                ["tandem", "bench", "codecs", *(sys.argv[3:] if argv is None else argv)]
            ),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    path.write_text(json.dumps(results, indent=2))
    print(format_report(results))
    print(
        f"\nmemory copy, one thread: {copy_before:.1f} GB/s before, "
        f"{copy_after:.1f} GB/s after"
    )
    print(f"results: {path}")
    return 0
