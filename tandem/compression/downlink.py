"""ACE-Sync's compressed downlink: the cloud's record of each device's model.

Pure numpy; no Flower imports. The seed counts all traffic (seed 004,
Table 1), so the cloud compresses what it sends as the edges compress what
they send. Per device ``k`` the cloud keeps a :class:`DeviceReplica`: the
model ``θ̂_k`` the device holds (the cloud's record of it) and the round it
was last synchronized in. Each sync:

1. The delta since then, ``δ_k = θ_t − θ̂_k``. Whatever earlier syncs left
   out is still in it: this is the cloud-side error feedback of eq. 7 with
   ``γ = 1`` (the residual ``e_k = θ_t − θ̂_k`` is carried in full), so
   nothing is lost for good.
2. Importance per group (eqs. 3-4), as on the uplink: ``I_i = s_i·‖δ_i‖²``
   with ``s_i`` from the cloud's predictor (temporal features from the RMS
   of the deltas this device was sent, structural ones from ``θ_t``), the
   latest RMS (magnitude ablation) or 1.
3. Knapsack (eq. 2 generalised) within the device's downlink budget (eq. 5
   on its downlink bandwidth, less what the round's broadcast records cost).
4. Encode and pack with the uplink's format
   (:func:`~tandem.compression.packing.encode_packed`); the device decodes
   with :func:`~tandem.compression.packing.unpack_groups` and adds the
   decoded delta. Deferred groups add nothing (their delta stays in ``e_k``).
5. The record moves by exactly what the device will add:
   ``θ̂_k ← θ̂_k + decode(δ_k)`` (float32 on both ends).

Edge and cloud check that they agree with :func:`model_digest` of the model
after applying; a device that is new, resumed, or too stale gets the full
model instead (the caller decides; :func:`needs_full`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from tandem.compression.codecs import CodecError, Option, option_table
from tandem.compression.knapsack import select_options
from tandem.compression.layout import GroupLayout
from tandem.compression.packing import encode_packed, unpack_groups
from tandem.importance import (
    ImportancePredictor,
    magnitude_scores,
    predict_importance,
    temporal_features,
)

__all__ = [
    "DIGEST_BITS",
    "DeviceReplica",
    "DownlinkUpdate",
    "apply_downlink",
    "compress_downlink",
    "model_digest",
    "needs_full",
]

#: Bits of SHA-256 kept by :func:`model_digest`: 48, so the digest is an
#: integer a float64 metric carries exactly (a chance mismatch goes unseen
#: with probability 2⁻⁴⁸).
DIGEST_BITS = 48


def model_digest(flat: np.ndarray) -> int:
    """The first 48 bits of SHA-256 over a flat model's float32 bytes.

    ``flat`` is the ``(N,)`` float vector of a model
    (:meth:`~tandem.compression.layout.GroupLayout.flat`); it is hashed as
    little-endian float32, all of it (about 1 ms per million parameters
    here), so edge and cloud agree on every bit or the digests differ.
    """
    data = np.ascontiguousarray(flat, dtype="<f4").tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[: DIGEST_BITS // 8], "big")


@dataclass
class DeviceReplica:
    """The cloud's record of one device's model.

    Attributes
    ----------
    model : np.ndarray
        ``(N,)`` float32: ``θ̂_k``, the model the device holds.
    version : int
        The round in which the device last received (part of) the model.
    history : np.ndarray
        ``(H, n)`` float64: RMS per group of the deltas sent to it, oldest
        first (the predictor's temporal features).
    """

    model: np.ndarray
    version: int
    history: np.ndarray

    @classmethod
    def full(
        cls, model: np.ndarray, version: int, layout: GroupLayout, history: int
    ) -> DeviceReplica:
        """The record after a full-model send of ``model`` in round ``version``."""
        return cls(
            np.array(model, dtype=np.float32, copy=True),
            int(version),
            np.zeros((history, len(layout.groups)), np.float64),
        )


@dataclass(frozen=True)
class DownlinkUpdate:
    """One compressed downlink message's arrays and what it achieves.

    Attributes
    ----------
    codecs : np.ndarray
        ``(n,)`` uint8 option index per group.
    payload : np.ndarray
        ``(B,)`` uint8 packed payloads.
    encoded_bytes : int
        ``B``, never above the budget.
    kept_fraction : float
        ``1 − ‖δ − decode(δ)‖² / ‖δ‖²`` (1 when ``δ = 0``).
    residual_norm : float
        ``‖θ_t − θ̂_k‖₂`` after the send: what the device still lacks.
    """

    codecs: np.ndarray
    payload: np.ndarray
    encoded_bytes: int
    kept_fraction: float
    residual_norm: float


def needs_full(replica: DeviceReplica | None, server_round: int, max_age: int) -> bool:
    """Whether a device gets the full model: no record (new, resumed, reset
    after a failure or mismatch) or last synced more than ``max_age`` rounds
    ago."""
    return replica is None or server_round - replica.version > max_age


def _importance(
    delta: np.ndarray,
    target: np.ndarray,
    replica: DeviceReplica,
    layout: GroupLayout,
    importance: str,
    predictor: ImportancePredictor | None,
) -> np.ndarray:
    """Step 2: ``I_i`` per group; appends this send's RMS to the history."""
    energy = layout.group_sq_norms(delta)
    rms = np.sqrt(energy / np.maximum(layout.sizes, 1))
    replica.history = np.vstack([replica.history[1:], rms[None, :]])
    if importance == "predictor":
        if predictor is None:
            raise CodecError("importance 'predictor' needs a predictor")
        score = predict_importance(
            predictor, temporal_features(replica.history), layout.structural(target)
        )
    elif importance == "magnitude":
        score = magnitude_scores(rms)
    else:
        score = np.ones(len(layout.groups))
    return np.clip(score, 0.0, None) * energy


def compress_downlink(
    target: np.ndarray,
    replica: DeviceReplica,
    *,
    budget: int,
    codecs: tuple[Option, ...],
    layout: GroupLayout,
    server_round: int,
    importance: str = "uniform",
    predictor: ImportancePredictor | None = None,
) -> DownlinkUpdate:
    """Steps 1-5 of the module docstring; moves ``replica`` by what is sent.

    Parameters
    ----------
    target : np.ndarray
        ``(N,)`` float32: the global model ``θ_t`` the device should hold.
    replica : DeviceReplica
        The cloud's record of the device; changed in place (model, version,
        history) only once the message is encoded.
    budget : int
        Payload bytes allowed (eq. 5 on the downlink, less broadcasts).
    codecs : tuple[Option, ...]
        The options per group (the uplink's).
    layout : GroupLayout
        The model's groups.
    server_round : int
        The round of this send (the new version).
    importance : str
        ``predictor``, ``magnitude`` or ``uniform``.
    predictor : ImportancePredictor or None
        Needed for ``importance = "predictor"``.

    Raises
    ------
    CodecError
        If the budget is below the cheapest choice (no zero-cost option) or
        the predictor is missing; the replica is then unchanged.
    """
    if server_round < replica.version:
        raise CodecError(
            f"round {server_round} is before the device's version {replica.version}"
        )
    # 1. the delta since the device's version (error feedback with γ = 1)
    delta = (np.asarray(target, np.float32) - replica.model).astype(np.float32)
    history = replica.history
    # 2. importance
    value = _importance(delta, target, replica, layout, importance, predictor)
    # 3. knapsack within the budget
    costs, fidelity = option_table(codecs, layout.sizes)
    try:
        selection = select_options(value, costs, fidelity, budget=int(budget))
    except ValueError as err:
        replica.history = history
        raise CodecError(f"downlink budget {budget} bytes: {err}") from None
    # 4. encode and pack; deferred groups decode to zero
    codes, payload, decoded = encode_packed(
        delta, layout.sizes, selection.choice, codecs
    )
    is_defer = np.array([not option.codec.layout for option in codecs])
    deferred = np.repeat(is_defer[selection.choice], layout.sizes)
    decoded = np.where(deferred, np.float32(0), decoded).astype(np.float32)
    # 5. the record moves by exactly what the device adds
    replica.model = (replica.model + decoded).astype(np.float32)
    replica.version = int(server_round)
    rest = np.asarray(target, np.float32) - replica.model
    total = float(np.dot(delta.astype(np.float64), delta))
    lost = float(np.dot(rest.astype(np.float64), rest))
    return DownlinkUpdate(
        codecs=codes,
        payload=payload,
        encoded_bytes=int(payload.size),
        kept_fraction=1.0 - lost / total if total > 0 else 1.0,
        residual_norm=float(np.sqrt(lost)),
    )


def apply_downlink(
    held: np.ndarray,
    codecs: np.ndarray,
    payload: np.ndarray,
    *,
    options: tuple[Option, ...],
    layout: GroupLayout,
    max_bytes: int,
) -> np.ndarray:
    """The edge's side: ``θ̂_k + decode(δ_k)``, checked before anything is added.

    Every group is checked and decoded first
    (:func:`~tandem.compression.packing.unpack_groups`: codec table, exact
    payload length, at most ``max_bytes``, values); only then is the sum
    formed, in a new array (``held`` is not changed), so a bad message is
    never partly applied.

    Raises
    ------
    CodecError
        Naming the group or array that is wrong.
    """
    if held.shape != (layout.total,) or held.dtype != np.float32:
        raise CodecError(
            f"held model {held.dtype}{held.shape}, expected float32 ({layout.total},)"
        )
    chunks = unpack_groups(
        codecs,
        payload,
        layout.sizes,
        options,
        max_bytes=max_bytes,
        labels=layout.labels,
    )
    delta = np.zeros(layout.total, np.float32)
    for i, chunk in enumerate(chunks):
        if chunk is not None:
            start = layout.starts[i]
            delta[start : start + layout.sizes[i]] = chunk
    return (held + delta).astype(np.float32)
