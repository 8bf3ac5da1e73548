"""From bandwidth to a byte budget (seed 004, eq. 5).

Pure numpy; no Flower imports. Eq. 5 maps a node's bandwidth estimate
``B_k(t)`` to a compression ratio::

    c_k(t) = c_min + (c_max − c_min)·exp(−β·B_k(t))

"Under low bandwidth, the framework increases compression": ``c`` falls from
``c_max`` at ``B = 0`` toward ``c_min`` as ``B`` grows. We read ``c`` as the
fraction of the full-precision (float32) update that is *not* sent, so the
node may send ``(1 − c)`` of it::

    budget = ⌊(1 − c)·full_bytes⌋   bytes,  within
             [⌊(1 − c_max)·full_bytes⌋, ⌊(1 − c_min)·full_bytes⌋]

and more bandwidth never gives a smaller budget. Units: ``B`` in bits per
second; ``β`` per Mbit/s, i.e. the exponent is ``β·B/10⁶`` (``β = 0.02``
gives ``exp(−1)`` at 50 Mbit/s, the seeds' 4G link). ``c_min = 0`` lets a fast
link send everything; ``c_max = 1`` lets a dead link send nothing.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["byte_budget", "compression_ratio"]


def _check_args(c_min: float, c_max: float, beta: float) -> None:
    if not 0.0 <= c_min <= 1.0:
        raise ValueError(f"c_min must satisfy 0 <= c_min <= 1, got {c_min!r}")
    if not c_min <= c_max <= 1.0:
        raise ValueError(f"c_max must satisfy c_min <= c_max <= 1, got {c_max!r}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be finite and > 0, got {beta!r}")


def _check_bandwidth(bandwidth_bps: float | np.ndarray) -> np.ndarray:
    b = np.asarray(bandwidth_bps, dtype=np.float64)
    if not (np.isfinite(b).all() and (b >= 0).all()):
        raise ValueError(
            f"bandwidth_bps must be finite and >= 0, got {bandwidth_bps!r}"
        )
    return b


def compression_ratio(
    bandwidth_bps: float | np.ndarray, *, c_min: float, c_max: float, beta: float
) -> float | np.ndarray:
    """``c = c_min + (c_max − c_min)·exp(−β·B)`` (eq. 5): the fraction not sent.

    Parameters
    ----------
    bandwidth_bps : float or np.ndarray
        Bandwidth estimate ``B`` in bits per second, ``>= 0``; any shape.
    c_min : float
        Compression on an infinitely fast link, ``0 <= c_min <= c_max``.
    c_max : float
        Compression on a dead link (``B = 0``), ``c_max <= 1``.
    beta : float
        Decay ``β`` per Mbit/s, ``> 0``.

    Returns
    -------
    float or np.ndarray
        ``c`` in ``[c_min, c_max]``, non-increasing in ``B``; a float for a
        scalar ``B``, else an array of ``B``'s shape.

    Raises
    ------
    ValueError
        If an argument breaks the rule named above.
    """
    _check_args(c_min, c_max, beta)
    b = _check_bandwidth(bandwidth_bps)
    c = c_min + (c_max - c_min) * np.exp(-beta * (b / 1e6))
    c = np.clip(c, c_min, c_max)
    return float(c) if c.ndim == 0 else c


def byte_budget(
    full_bytes: int,
    bandwidth_bps: float,
    *,
    c_min: float,
    c_max: float,
    beta: float,
    deadline_s: float | None = None,
) -> int:
    """Bytes a node may send this round: ``⌊(1 − c)·full_bytes⌋`` (eq. 5).

    Parameters
    ----------
    full_bytes : int
        Size of the whole update at full precision (float32), bytes.
    bandwidth_bps : float
        Bandwidth estimate in bits per second, ``>= 0``.
    c_min, c_max, beta : float
        As in :func:`compression_ratio`.
    deadline_s : float or None (default: None)
        If given, also cap the budget at what the link carries in that many
        seconds, ``⌊B·deadline_s / 8⌋``.

    Returns
    -------
    int
        Non-decreasing in ``bandwidth_bps``; in ``[⌊(1 − c_max)·full_bytes⌋,
        ⌊(1 − c_min)·full_bytes⌋]`` without a deadline, in ``[0,
        ⌊(1 − c_min)·full_bytes⌋]`` with one.

    Raises
    ------
    ValueError
        If ``full_bytes`` is not an integer ``>= 0``, ``deadline_s`` is not
        finite and ``>= 0``, or an argument of :func:`compression_ratio` breaks
        its rule.
    """
    if isinstance(full_bytes, bool) or not isinstance(full_bytes, int | np.integer):
        raise ValueError(f"full_bytes must be an integer, got {full_bytes!r}")
    if full_bytes < 0:
        raise ValueError(f"full_bytes must be >= 0, got {full_bytes}")
    if np.ndim(bandwidth_bps) != 0:
        raise ValueError(f"bandwidth_bps must be a scalar, got {bandwidth_bps!r}")
    c = compression_ratio(bandwidth_bps, c_min=c_min, c_max=c_max, beta=beta)
    budget = math.floor((1.0 - c) * int(full_bytes))
    if deadline_s is not None:
        if not (math.isfinite(deadline_s) and deadline_s >= 0):
            raise ValueError(f"deadline_s must be finite and >= 0, got {deadline_s!r}")
        budget = min(budget, math.floor(float(bandwidth_bps) * deadline_s / 8))
    return max(0, min(int(full_bytes), budget))
