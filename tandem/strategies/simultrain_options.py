"""SimulTrain's run-config keys (shared by its cloud and edge sides)."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.config import option

__all__ = ["SimulTrainOptions"]


@dataclass(frozen=True)
class SimulTrainOptions:
    """SimulTrain settings (keys ``simultrain-*``)."""

    cut: str = option("simultrain-cut", "default")
    steps: int = option(
        "simultrain-steps", 300, "must be >= 1 (SGD steps per edge)", lambda n: n >= 1
    )
    chunk: int = option(
        "simultrain-chunk",
        0,
        "must be >= 0 (micro-batches per message; 0 = adapt to the exchange cost)",
        lambda n: n >= 0,
    )
    max_chunk: int = option(
        "simultrain-max-chunk",
        4,
        "must be >= 1 (largest adaptive chunk)",
        lambda n: n >= 1,
    )
    alpha: float = option(
        "simultrain-alpha", 0.5, "must lie in [0, 1] (forecast)", lambda a: 0 <= a <= 1
    )
    edge_lr_scale: float = option(
        "simultrain-edge-lr-scale",
        0.5,
        "must be > 0 (edge learning rate = lr x this)",
        lambda f: f > 0,
    )
    forecast: str = option(
        "simultrain-forecast", "stash", choices=("stash", "cloud-copy")
    )
    lam: float = option(
        "simultrain-lambda", 0.8, "must lie in [0, 1]", lambda x: 0 <= x <= 1
    )
    reconcile_every: int = option(
        "simultrain-reconcile-every",
        4,
        "must be >= 0 (steps between reconciliations; 0 = never)",
        lambda n: n >= 0,
    )
    staleness_bound: int = option(
        "simultrain-staleness-bound", 8, "must be >= 0", lambda n: n >= 0
    )
    precision: str = option(
        "simultrain-precision", "int8", choices=("float32", "float16", "int8")
    )
    eval_every: int = option(
        "simultrain-eval-every", 50, "must be >= 1 (steps per edge)", lambda n: n >= 1
    )
    link: str = option("simultrain-link", "4g")
    edge_factor: float = option(
        "simultrain-edge-factor", 1.0, "must be > 0", lambda f: f > 0
    )
    cloud_factor: float = option(
        "simultrain-cloud-factor", 1.0, "must be > 0", lambda f: f > 0
    )
