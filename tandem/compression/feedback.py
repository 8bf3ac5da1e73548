"""Error feedback: what a codec dropped is added back next time (seed 004, eq. 7).

Pure numpy; no Flower imports. Per parameter group ``i``, with residual
``e_i`` (zero at first) and ``0 <= γ <= 1``:

1. compensate: ``g̃_i = g_i + γ·e_i`` (eq. 7, :func:`compensate`);
2. encode ``g̃_i`` with the group's codec and decode it back: ``sent_i``, which
   is exactly what the receiver will apply;
3. keep what was lost: ``e_i ← g̃_i − sent_i``.

So ``sent_i + e_i == g̃_i``: nothing is lost, only delayed. A deferred group
sends nothing and carries all of ``g̃_i`` forward; a full-precision group
leaves no residual. ``γ = 1`` is classic error feedback; ``γ < 1`` decays old
errors; ``γ = 0`` turns feedback off (residuals are still tracked and
reported). Steps 2-3 run over the whole flat update in
:func:`tandem.compression.pipeline.compress_update`.
"""

from __future__ import annotations

import numpy as np

from tandem.compression.codecs import _as_vector

__all__ = ["compensate"]


def _check_gamma(gamma: float) -> float:
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must satisfy 0 <= gamma <= 1, got {gamma!r}")
    return float(gamma)


def compensate(
    grad: np.ndarray, residual: np.ndarray | None, gamma: float
) -> np.ndarray:
    """``g̃ = g + γ·e`` (eq. 7), float32; ``g`` itself when ``e`` is None."""
    g = _as_vector(grad)
    if residual is None:
        return g.copy()
    e = np.asarray(residual, dtype=np.float32)
    if e.shape != g.shape:
        raise ValueError(f"residual has shape {e.shape}, the update {g.shape}")
    gamma = _check_gamma(gamma)
    if gamma == 1.0:  # 1·e == e exactly: one pass instead of two
        return g + e
    return g + np.float32(gamma) * e
