"""Split training maths: cutting a model, forecast and soft reconciliation.

Pure torch; no Flower imports. Notation of the SimulTrain seeds (000-003):
the model is cut into an edge part ``f_e(·; θ_e)`` and a cloud part
``f_c(·; θ_c)``; the cloud keeps its own copy ``θ_e^c`` of the edge layers.

- Forecast step (seed 002): ``∇̃ = ∇ℓ(θ_e; x) + α·(θ_e^c − θ_e)``, α = 0.5 in
  the seeds: a linear correction toward the cloud's version that cancels
  first-order staleness bias without recomputing a forward pass.
- Soft reconciliation every R steps (seed 002):
  ``θ_e ← (1 − λ)·θ_e + λ·θ_e^c``.
- Staleness-weighted merge of edge deltas into ``θ_e^c`` (DESIGN.md):
  ``θ_e^c ← θ_e^c + s(τ_k)·Δ_k / K`` with ``s(τ) = 1 / (1 + τ)`` for a gap
  of ``τ`` merges since the edge last reconciled, and ``s = 0`` beyond the
  bound (the delta is dropped and counted).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from tandem.config import ConfigError

__all__ = [
    "forecast_gradients",
    "merge_delta",
    "soft_reconcile",
    "split_model",
    "staleness_weight",
]

Params = Mapping[str, torch.Tensor]


def split_model(
    model: nn.Sequential, cut: int | str, key: str = "simultrain-cut"
) -> tuple[nn.Sequential, nn.Sequential]:
    """Cut ``model`` after stage ``cut`` (index or name) into edge and cloud parts.

    The two parts share the original modules (no copy): ``cloud(edge(x))`` is
    ``model(x)``.

    Raises
    ------
    ConfigError
        If the cut is out of range, names no stage, or leaves a part empty.
    """
    names = [name for name, _ in model.named_children()]
    if isinstance(cut, str) and not cut.lstrip("-").isdigit():
        if cut not in names:
            raise ConfigError(key, cut, f"must name a stage: {', '.join(names)}")
        index = names.index(cut)
    else:
        index = int(cut)
    if not 0 <= index < len(names) - 1:
        raise ConfigError(
            key, cut, f"must leave both parts non-empty: 0 <= cut < {len(names) - 1}"
        )
    return model[: index + 1], model[index + 1 :]


def forecast_gradients(
    grads: Params, theta_at: Params, theta_newest: Params, alpha: float
) -> dict[str, torch.Tensor]:
    """Forecast of the gradient at a newer version (seed 002, α = 0.5 there).

    ``∇̃ = ∇ℓ(w^(e); x) + α·(w^(c) − w^(e))``: a first-order Taylor step from
    the version ``w^(e)`` the gradient was computed at (``theta_at``) to the
    newer version ``w^(c)`` it will be applied to (``theta_newest``), with the
    Hessian taken as ``α·I``. The seed says the term "approximates the
    gradient at the cloud's version without recomputing the forward pass".

    Which pair of versions is used is the caller's choice; SimulTrain's edge
    uses the stashed version and its current weights by default (see
    ``simultrain-forecast``).
    """
    return {k: grads[k] + alpha * (theta_newest[k] - theta_at[k]) for k in grads}


def soft_reconcile(
    theta_e: Params, theta_e_cloud: Params, lam: float
) -> dict[str, torch.Tensor]:
    """``θ_e ← (1 − λ)·θ_e + λ·θ_e^c`` per tensor (seed 002)."""
    return {k: (1 - lam) * theta_e[k] + lam * theta_e_cloud[k] for k in theta_e}


def staleness_weight(gap: int, bound: int) -> float:
    """``s(τ) = 1 / (1 + τ)`` for ``0 <= τ <= bound``, else 0 (dropped)."""
    if gap < 0:
        raise ValueError(f"a staleness gap cannot be negative, got {gap}")
    return 0.0 if gap > bound else 1.0 / (1 + gap)


def merge_delta(
    theta_e_cloud: Params, delta: Params, weight: float, num_edges: int
) -> dict[str, torch.Tensor]:
    """``θ_e^c + weight·Δ / K``: one edge's update into the cloud's copy."""
    scale = weight / max(num_edges, 1)
    return {k: theta_e_cloud[k] + scale * delta[k] for k in theta_e_cloud}
