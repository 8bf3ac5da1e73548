"""Int8 quantization under a per-element (or per-row) scale, shared by every user.

Pure numpy; no Flower imports. One formula each way, used by ACE-Sync's
``int8`` codec (:mod:`.codecs`, one scale per group) and by SimulTrain's
int8 activations (:func:`quantize_rows`, one scale per sample):

- levels ``q_j = clip(rint(127·x_j / a_j), −127, 127)`` (0 where ``a_j = 0``);
- values ``q_j · (a_j / 127)`` in float32.
"""

from __future__ import annotations

import numpy as np

__all__ = ["int8_levels", "int8_values", "quantize_rows"]


def int8_levels(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Int8 levels ``rint(127·x_j / a_j)`` of float32 ``x`` under scales
    ``a_j ≥ |x_j|`` (broadcast against ``x``; 0 where ``a_j = 0``)."""
    safe = np.where(scale > 0, scale, np.float32(1.0))
    levels = np.divide(x, safe)  # one temporary, every later step in place
    np.multiply(levels, np.float32(127.0), out=levels)
    np.rint(levels, out=levels)
    np.clip(levels, -127, 127, out=levels)
    return levels.astype(np.int8)


def int8_values(levels: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What int8 ``levels`` decode to under scales ``a_j`` (broadcast):
    ``level_j · (a_j / 127)`` in float32 (the one formula both ends use)."""
    return levels.astype(np.float32) * (scale.astype(np.float32) / np.float32(127.0))


def quantize_rows(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit rows: :func:`int8_levels` with one scale per row (sample).

    ``s`` is the row's largest magnitude (float32, shape ``(N,)``), so every
    value lands in ``[-127, 127]`` (int8) and the error per value is at most
    ``s / 254``. Bytes per sample: ``prod(shape[1:]) + 4``.
    """
    flat = acts.reshape(len(acts), -1).astype(np.float32, copy=False)
    scale = np.abs(flat).max(axis=1) if flat.size else np.zeros(len(acts), np.float32)
    scale = scale.astype(np.float32, copy=False)
    return int8_levels(flat, scale[:, None]).reshape(acts.shape), scale
