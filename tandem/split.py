"""Split training maths: cutting a model, forecast and soft reconciliation.

Pure torch; no Flower imports. Notation of the SimulTrain seeds (000-003):
the model is cut into an edge part ``f_e(·; θ_e)`` and a cloud part
``f_c(·; θ_c)``; the cloud keeps its own copy ``θ_e^c`` of the edge layers.

- Forecast step (seed 002): ``∇̃ = ∇ℓ(w^(e); x) + α·(w^(c) − w^(e))``, α = 0.5
  in the seeds: a first-order correction of a gradient computed at an older
  version ``w^(e)`` toward the newer version ``w^(c)``, which cancels the
  first-order staleness bias without recomputing a forward pass.
- Soft reconciliation every R micro-batches: seed 002 names "a soft
  reconciliation step every R iterations" and its fragment breaks off
  before the formula; the convex pull ``θ_e ← (1 − λ)·θ_e + λ·θ_e^c``,
  λ = 0.8 and R = 4 are our choices.
- Staleness-weighted merge of edge deltas into ``θ_e^c`` (our choice; the
  seeds leave it open):
  ``θ_e^c ← θ_e^c + s(τ_k)·Δ_k / K`` with ``s(τ) = 1 / (1 + τ)`` for a gap
  of ``τ`` merges since the edge last reconciled, and ``s = 0`` beyond the
  bound (the delta is dropped and counted).
- Cut-layer tensors on the wire (:func:`encode_cut`): float32, float16, or
  int8 with one scale per sample (:func:`quantize_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from tandem.compression import int8
from tandem.config import ConfigError

__all__ = [
    "forecast_gradients",
    "merge_delta",
    "predicted_weights",
    "soft_reconcile",
    "split_model",
    "staleness_weight",
    "warmed_up",
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


def predicted_weights(theta: Params, momentum: Params, ahead: float) -> dict:
    """``θ_e − ahead · v`` per parameter with a momentum buffer ``v`` (the
    others as they are): SpecTrain's weight prediction (Chen et al., 2018,
    "Efficient and Robust Parallel DNN Training through Model Parallelism on
    Multi-GPU Platform", eq. 6), ``ŵ = w − s·η·v`` with ``ahead = s·η``: the
    smoothed gradient ``v`` stands for the ``s`` edge steps to come before a
    chunk forwarded now gets its gradients, so the chunk is forwarded, and
    its gradients taken, at about the weights they are applied to."""
    return {
        k: (w - ahead * momentum[k]) if k in momentum else w for k, w in theta.items()
    }


def warmed_up(rate: float, done: int, span: int) -> float:
    """``rate × min(1, done / span)``: a linear warm-up over the first
    ``span`` steps or micro-batches (Goyal et al., 2017, §2.2, gradual
    warm-up); ``rate`` itself with ``span = 0`` or once ``done >= span``."""
    return rate if span == 0 or done >= span else rate * (done / span)


def soft_reconcile(
    theta_e: Params, theta_e_cloud: Params, lam: float
) -> dict[str, torch.Tensor]:
    """``θ_e ← (1 − λ)·θ_e + λ·θ_e^c`` per tensor (our form of seed 002's
    soft reconciliation, whose formula the fragment does not give)."""
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


def quantize_rows(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit activations: ``q = round(a / s · 127)`` with one scale per sample.

    ``s`` is the row's largest magnitude (float32, shape ``(N,)``), so every
    value lands in ``[-127, 127]`` (int8) and the error per value is at most
    ``s / 254``. Bytes per sample: ``prod(shape[1:]) + 4``.
    """
    return int8.quantize_rows(acts)


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_rows` (float32, the shape of ``q``)."""
    flat = q.reshape(len(q), -1).astype(np.float32) * (scale[:, None] / 127.0)
    return flat.reshape(q.shape)


#: Wire precisions of cut-layer tensors (activations up, gradients down).
CUT_PRECISIONS = ("float32", "float16", "int8")


def encode_cut(x: np.ndarray, precision: str, key: str) -> dict[str, np.ndarray]:
    """A cut-layer tensor as plain arrays: ``{key}`` (and ``{key}-scale`` for int8).

    Bytes per sample: 4·d (float32), 2·d (float16), d + 4 (int8, see
    :func:`quantize_rows`), for ``d`` numbers per sample.
    """
    if precision == "int8":
        q, scale = quantize_rows(x)
        return {key: q, f"{key}-scale": scale}
    if precision not in CUT_PRECISIONS:
        raise ValueError(
            f"precision must be one of {CUT_PRECISIONS}, not {precision!r}"
        )
    return {key: x.astype(precision)}


def cut_bytes(sample_shape: tuple[int, ...], rows: int, precision: str) -> int:
    """Bytes of :func:`encode_cut`'s arrays for ``rows`` samples of ``sample_shape``.

    ``rows · 4·d``, ``rows · 2·d`` or ``rows · (d + 4)`` for float32, float16
    and int8, ``d`` the numbers per sample (array headers not counted).
    """
    d = math.prod(sample_shape)
    per_row = {"float32": 4 * d, "float16": 2 * d, "int8": d + 4}.get(precision)
    if per_row is None:
        raise ValueError(
            f"precision must be one of {CUT_PRECISIONS}, not {precision!r}"
        )
    return rows * per_row


def cut_keys(precision: str, key: str) -> set[str]:
    """The array names :func:`encode_cut` produces."""
    return {key, f"{key}-scale"} if precision == "int8" else {key}


def decode_cut(
    arrays: Mapping[str, np.ndarray],
    precision: str,
    key: str,
    shape: tuple[int, ...],
) -> np.ndarray:
    """Validate and decode :func:`encode_cut`'s arrays to float32 of ``shape``.

    Raises
    ------
    ValueError
        Naming what is wrong: the dtype, the shape, a scale of the wrong
        dtype, shape or sign, or NaN/Inf.
    """
    x = arrays[key]
    want = "int8" if precision == "int8" else precision
    if str(x.dtype) != want or tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"'{key}' is {x.dtype} {tuple(x.shape)}, expected {want} {tuple(shape)}"
        )
    if precision == "int8":
        scale = arrays[f"{key}-scale"]
        if str(scale.dtype) != "float32" or tuple(scale.shape) != (shape[0],):
            raise ValueError(
                f"'{key}-scale' is {scale.dtype} {tuple(scale.shape)}, expected "
                f"float32 ({shape[0]},)"
            )
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise ValueError(f"'{key}-scale' must be finite and >= 0")
        out = dequantize_rows(x, scale)
    else:
        out = x.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"'{key}' holds NaN or Inf")
    return out
