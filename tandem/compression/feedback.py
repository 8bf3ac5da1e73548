"""Error feedback: what a codec dropped is added back next time (seed 004, eq. 7).

Pure numpy; no Flower imports. Per parameter group ``i``, with residual
``e_i`` (zero at first) and ``0 <= γ <= 1``:

1. compensate: ``g̃_i = g_i + γ·e_i`` (eq. 7);
2. encode ``g̃_i`` with the group's codec and decode it back: ``sent_i``, which
   is exactly what the receiver will apply;
3. keep what was lost: ``e_i ← g̃_i − sent_i``.

So ``sent_i + e_i == g̃_i``: nothing is lost, only delayed. A deferred group
sends nothing and carries all of ``g̃_i`` forward; a full-precision group
leaves no residual. ``γ = 1`` is classic error feedback; ``γ < 1`` decays old
errors; ``γ = 0`` turns feedback off (residuals are still tracked and
reported).

:func:`feedback_step` is the pure form; :class:`ErrorFeedback` keeps the
residuals of one node keyed by group (see ``ParamGroup.key``) as plain float32
arrays, so they can be stored in and restored from a record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tandem.compression.codecs import Codec, _as_vector, _expand, encode

__all__ = ["ErrorFeedback", "FeedbackStep", "compensate", "feedback_step"]


def _check_gamma(gamma: float) -> float:
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must satisfy 0 <= gamma <= 1, got {gamma!r}")
    return float(gamma)


@dataclass(frozen=True)
class FeedbackStep:
    """One group's error-feedback step.

    Attributes
    ----------
    arrays : dict[str, np.ndarray]
        The payload to send (:func:`~tandem.compression.codecs.encode`).
    sent : np.ndarray
        Shape ``(n,)``, float32: the payload decoded, as the receiver sees it.
    residual : np.ndarray
        Shape ``(n,)``, float32: the new ``e = g̃ − sent``.
    """

    arrays: dict[str, np.ndarray]
    sent: np.ndarray
    residual: np.ndarray


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
    return g + np.float32(_check_gamma(gamma)) * e


def feedback_step(
    kind: Codec,
    grad: np.ndarray,
    residual: np.ndarray | None,
    *,
    gamma: float = 1.0,
    ratio: float | None = None,
) -> FeedbackStep:
    """Compensate, encode, and keep what the codec lost (steps 1-3 above).

    Parameters
    ----------
    kind : Codec
        The group's codec this round.
    grad : np.ndarray
        Shape ``(n,)``, the group's update ``g``.
    residual : np.ndarray or None
        Shape ``(n,)``, the group's residual ``e``; None for zero.
    gamma : float (default: 1.0)
        ``γ`` of eq. 7, ``0 <= γ <= 1``.
    ratio : float or None (default: None)
        For ``topk``, the kept fraction.

    Returns
    -------
    FeedbackStep
        ``sent + residual == g̃`` up to float32 rounding (exactly for full,
        topk and defer).
    """
    compensated = compensate(grad, residual, _check_gamma(gamma))
    arrays = encode(kind, compensated, ratio=ratio)
    # 2. the sender decodes its own payload; it is well formed by construction
    sent = _expand(kind, arrays, compensated.size)
    # 3. e ← g̃ − sent
    return FeedbackStep(arrays=arrays, sent=sent, residual=compensated - sent)


class ErrorFeedback:
    """Residuals of one node, per group, for error feedback (eq. 7).

    Parameters
    ----------
    gamma : float (default: 1.0)
        ``γ`` of eq. 7, ``0 <= γ <= 1``: how much of the residual is added back.

    Raises
    ------
    ValueError
        If ``gamma`` is outside ``[0, 1]``.
    """

    def __init__(self, *, gamma: float = 1.0) -> None:
        # hyperparameters
        self.gamma = _check_gamma(gamma)
        # internal state: group key -> float32 residual of shape (n,)
        self._residuals: dict[str, np.ndarray] = {}

    def residual(self, key: str) -> np.ndarray | None:
        """A copy of the residual of group ``key``, or None if it has none."""
        e = self._residuals.get(key)
        return None if e is None else e.copy()

    def step(
        self, key: str, kind: Codec, grad: np.ndarray, *, ratio: float | None = None
    ) -> FeedbackStep:
        """:func:`feedback_step` for group ``key``, storing its new residual.

        Raises
        ------
        ValueError
            If ``grad``'s length differs from the stored residual's.
        """
        out = feedback_step(
            kind, grad, self._residuals.get(key), gamma=self.gamma, ratio=ratio
        )
        self._residuals[key] = out.residual
        return out

    def reset(self) -> None:
        """Forget every residual."""
        self._residuals.clear()

    def residual_energy(self) -> float:
        """``Σ_i ‖e_i‖²`` over all groups: the update mass still owed."""
        return float(
            sum(np.dot(e.astype(np.float64), e) for e in self._residuals.values())
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """Residuals as ``{group key: float32 (n,)}`` copies, for storage."""
        return {k: e.copy() for k, e in self._residuals.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the residuals by ``state`` (as from :meth:`state_dict`).

        Raises
        ------
        ValueError
            If an entry is not a 1-D float32 array of finite values.
        """
        loaded = {}
        for key, e in state.items():
            if not isinstance(e, np.ndarray) or e.dtype != np.float32 or e.ndim != 1:
                raise ValueError(f"state['{key}'] must be a 1-D float32 array")
            if not np.isfinite(e).all():
                raise ValueError(f"state['{key}'] holds NaN or Inf")
            loaded[str(key)] = e.copy()
        self._residuals = loaded
