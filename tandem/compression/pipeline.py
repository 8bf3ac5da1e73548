"""One round of ACE-Sync compression, and the fill of unsent groups (seed 004).

Pure numpy; no Flower imports. The edge runs :func:`compress_update` on its
update; the cloud rebuilds the update from the packed groups and fills the
groups a node did not send with :func:`fill_unsent`, the same function the
edge uses to mirror the cloud's stand-ins, so both ends agree on every value.

Steps of :func:`compress_update` (numbered as in
:mod:`tandem.clients.acesync`):

3. Error feedback, eq. 7: ``g̃ = g + γ·e``.
4. Importance per group (eqs. 3-4): ``I_i = s_i · ‖g̃_i‖²`` with ``s_i`` from
   the cloud's predictor, the latest RMS (magnitude ablation) or 1.
5. Knapsack (eq. 2 generalised): one codec per group within the budget.
6. Encode and pack; ``sent_i`` is the decoded payload or, for a deferred
   group, the cloud's stand-in ``decay^a · u_i`` (:func:`fill_unsent`).
7. New residual ``e ← g̃ − sent``.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tandem.compression.codecs import CodecError, Option, option_table
from tandem.compression.feedback import compensate
from tandem.compression.knapsack import select_options
from tandem.compression.layout import GroupLayout, row_sq_norms
from tandem.compression.packing import _encode_packed, encode_packed
from tandem.compression.rows import exclusive_cumsum, get_rows, put_rows
from tandem.importance import (
    ImportancePredictor,
    magnitude_scores,
    predict_importance,
    temporal_features,
)

__all__ = [
    "CompressedUpdate",
    "EdgeMemory",
    "RoundPlan",
    "compress_update",
    "fill_deferred",
    "fill_unsent",
]


def fill_unsent(
    cache: np.ndarray,
    cache_round: np.ndarray,
    sizes: np.ndarray,
    server_round: int,
    decay: float,
) -> np.ndarray:
    """Stand-ins for the groups a node did not send, ``decay^a · u_i``, ``(N,)``.

    The cloud "reconstructs missing low-importance parameters using cached
    historical values" (seed §3.1): group ``i``'s stand-in is
    ``decay^a · u_i`` with ``u_i`` the last update received for it and
    ``a = server_round − cache_round[i]`` its age in rounds. ``decay = 1``
    repeats the old update as is; ``decay = 0`` fills zeros. A group never
    received (``cache_round[i] < 0``) is filled with zeros: nothing is known
    of it, so it adds nothing to the aggregate. The product is taken in
    float64 and rounded once to float32 (in float32 when every factor is a
    float32 number, e.g. a decay of 0.5 or 1: the same values).

    Parameters
    ----------
    cache : np.ndarray
        ``(N,)`` float32: the last update received for each group, groups
        back to back.
    cache_round : np.ndarray
        ``(n,)`` int: the round each was received in, ``-1`` if never.
    sizes : np.ndarray
        ``(n,)`` elements per group.
    server_round : int
        The current round.
    decay : float
        Per-round decay in ``[0, 1]``.

    Returns
    -------
    np.ndarray
        ``(N,)`` float32, the stand-in of every group (the caller keeps the
        groups not sent).

    Raises
    ------
    ValueError
        If ``decay`` is outside ``[0, 1]``, the shapes disagree, or a cached
        update is newer than ``server_round``.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    cache_round = np.asarray(cache_round, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if cache_round.shape != sizes.shape or np.shape(cache) != (int(sizes.sum()),):
        raise ValueError(
            f"cache {np.shape(cache)}, rounds {cache_round.shape} and sizes "
            f"{sizes.shape} disagree"
        )
    if cache_round.size and int(cache_round.max()) > server_round:
        group = int(np.argmax(cache_round))
        raise ValueError(
            f"cache entry for group {group} is from round {int(cache_round[group])}, "
            f"after the current round {server_round}"
        )
    age = server_round - cache_round
    factor = np.where(cache_round >= 0, float(decay) ** np.maximum(age, 0), 0.0)
    single = factor.astype(np.float32)
    if (
        isinstance(cache, np.ndarray)
        and cache.dtype == np.float32
        and np.array_equal(single, factor)  # e.g. decay 0.5 or 1
    ):
        # float32 times float32: the float64 product is exact, so its
        # rounding to float32 is the float32 product's, in fewer bytes
        return np.multiply(cache, np.repeat(single, sizes))
    return (np.repeat(factor, sizes) * cache).astype(np.float32)


def fill_deferred(
    update: np.ndarray,
    sent: np.ndarray,
    cache: np.ndarray,
    cache_round: np.ndarray,
    sizes: np.ndarray,
    server_round: int,
    decay: float,
) -> None:
    """The cloud's ``û_k`` in place: stand-ins in the groups not sent, and the
    cache refreshed with the groups sent.

    For every group with ``sent[i]`` False, ``update`` gets the value of
    :func:`fill_unsent` (``decay^a · u_i``, zeros if never received); for every
    group sent, ``cache`` takes ``update``'s values and ``cache_round`` the
    round. Only the groups not sent are multiplied, so a round with nothing
    deferred costs one copy into the cache.

    Parameters
    ----------
    update : np.ndarray
        ``(N,)`` float32: the decoded groups (e.g. from
        :func:`~tandem.compression.packing.unpack_flat`); changed in place.
    sent : np.ndarray
        ``(n,)`` bool: the groups the node sent.
    cache, cache_round, sizes, server_round, decay
        As in :func:`fill_unsent`; ``cache`` and ``cache_round`` are changed
        in place.

    Raises
    ------
    ValueError
        As :func:`fill_unsent`, or if ``update`` or ``sent`` has another shape.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    sizes = np.asarray(sizes, dtype=np.int64)
    if np.shape(update) != np.shape(cache) or np.shape(sent) != sizes.shape:
        raise ValueError(
            f"update {np.shape(update)}, sent {np.shape(sent)} and cache "
            f"{np.shape(cache)} disagree with sizes {sizes.shape}"
        )
    unsent = ~np.asarray(sent, dtype=bool)
    if unsent.any():
        rows = np.flatnonzero(unsent)
        starts = exclusive_cumsum(sizes)
        stand_in = fill_unsent(
            _pick(cache, starts, sizes, rows),
            np.asarray(cache_round)[rows],
            sizes[rows],
            server_round,
            decay,
        )
        _place(update, starts, sizes, rows, stand_in)
        fresh = np.flatnonzero(~unsent)
        _place(cache, starts, sizes, fresh, update, starts[fresh])
    else:
        np.copyto(cache, update)
    cache_round[~unsent] = server_round


def _pick(
    flat: np.ndarray, starts: np.ndarray, sizes: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Groups ``rows`` of ``flat``, back to back."""
    out = np.empty(int(sizes[rows].sum()), dtype=flat.dtype)
    _place(out, exclusive_cumsum(sizes[rows]), sizes[rows], None, flat, starts[rows])
    return out


def _place(
    flat: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    rows: np.ndarray | None,
    values: np.ndarray,
    value_starts: np.ndarray | None = None,
) -> None:
    """Copy groups of ``values`` (back to back, or at ``value_starts``) into
    ``flat`` at ``starts[rows]``, once per group size."""
    if rows is not None:
        starts, sizes = starts[rows], sizes[rows]
    if value_starts is None:
        value_starts = exclusive_cumsum(sizes)
    for size in np.unique(sizes).tolist():
        same = sizes == size
        put_rows(flat, starts[same], get_rows(values, value_starts[same], size))


class RoundPlan(Protocol):
    """What :func:`compress_update` reads of a round's plan (an ``EdgePlan``)."""

    @property
    def budget(self) -> int: ...

    @property
    def codecs(self) -> tuple[Option, ...]: ...

    @property
    def gamma(self) -> float: ...

    @property
    def importance(self) -> str: ...

    @property
    def fill_decay(self) -> float: ...

    @property
    def server_round(self) -> int: ...


@dataclass
class EdgeMemory:
    """One edge's ACE-Sync memory between rounds.

    Attributes
    ----------
    residual : np.ndarray
        ``(N,)`` float32: the error-feedback residual ``e`` (eq. 7).
    history : np.ndarray
        ``(H, n)`` float64: RMS of ``g̃`` per group over the last ``H``
        rounds, oldest first (zeros before the first).
    cache : np.ndarray
        ``(N,)`` float32: the last update sent for each group (the edge's
        mirror of the cloud's cache).
    cache_round : np.ndarray
        ``(n,)`` int64: the round it was sent in, ``-1`` if never.
    """

    residual: np.ndarray
    history: np.ndarray
    cache: np.ndarray
    cache_round: np.ndarray

    @classmethod
    def fresh(cls, layout: GroupLayout, history: int) -> EdgeMemory:
        """The memory before the first round."""
        n = len(layout.groups)
        return cls(
            np.zeros(layout.total, np.float32),
            np.zeros((history, n), np.float64),
            np.zeros(layout.total, np.float32),
            np.full(n, -1, np.int64),
        )

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], layout: GroupLayout, history: int
    ) -> EdgeMemory:
        """Inverse of :meth:`to_arrays`; fresh if saved for another layout.

        A changed history length keeps the most recent rows.
        """
        state = cls(
            arrays["residual"],
            arrays["history"],
            arrays["cache"],
            arrays["cache-round"],
        )
        n = len(layout.groups)
        if state.residual.shape != (layout.total,) or state.cache_round.shape != (n,):
            return cls.fresh(layout, history)
        rows = state.history[-history:]
        pad = np.zeros((history - rows.shape[0], n), np.float64)
        state.history = np.vstack([pad, rows])
        return state

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The memory as contiguous arrays by name."""
        return {
            "residual": np.ascontiguousarray(self.residual),
            "history": np.ascontiguousarray(self.history),
            "cache": np.ascontiguousarray(self.cache),
            "cache-round": np.ascontiguousarray(self.cache_round),
        }


@dataclass(frozen=True)
class CompressedUpdate:
    """One round's compressed update, as sent.

    Attributes
    ----------
    codecs : np.ndarray
        ``(n,)`` uint8 option index per group.
    payload : np.ndarray
        ``(B,)`` uint8 packed payloads.
    sent : np.ndarray
        ``(N,)`` float32: the update the cloud will reconstruct.
    encoded_bytes : int
        ``B``, never above the budget.
    kept_fraction : float
        ``1 − ‖g̃ − sent‖² / ‖g̃‖²`` (realized fidelity over the whole update).
    groups_sent : float
        Fraction of groups not deferred.
    """

    codecs: np.ndarray
    payload: np.ndarray
    sent: np.ndarray
    encoded_bytes: int
    kept_fraction: float
    groups_sent: float


class _StageClock:
    """Adds the thread CPU seconds since the last lap to ``stages[name]`` (if given)."""

    def __init__(self, stages: MutableMapping[str, float] | None) -> None:
        self.stages = stages
        self.last = time.thread_time() if stages is not None else 0.0

    def lap(self, name: str) -> None:
        if self.stages is None:
            return
        now = time.thread_time()
        self.stages[name] = self.stages.get(name, 0.0) + now - self.last
        self.last = now


def _feedback(
    update: np.ndarray,
    residual: np.ndarray,
    gamma: float,
    layout: GroupLayout,
    in_place: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3, ``g̃ = g + γ·e`` (:func:`_compensate`), and step 4's
    ``‖g̃_i‖²`` per group (``layout.group_sq_norms(g̃)``), in one pass: each
    piece of the layout is compensated and its rows' energies taken while in
    the CPU cache. The same values as the two steps apart; with
    ``in_place``, ``g̃`` is written over ``residual`` when that is a writable
    array of its own."""
    if not (_plain(update, residual, gamma) and update.shape == (layout.total,)):
        compensated = _compensate(update, residual, gamma)
        return compensated, layout.group_sq_norms(compensated)
    factor = np.float32(gamma)
    # g̃ over e, each element read just before it is written: no fresh 4·N
    # bytes to stream through the cache (a buffer not ours to write: new)
    reuse = (
        in_place
        and residual.flags.writeable
        and residual.flags.c_contiguous
        and not np.may_share_memory(residual, update)
    )
    compensated = residual if reuse else np.empty(layout.total, dtype=np.float32)
    energy = np.empty(layout.starts.size, dtype=np.float64)
    for piece in layout.pieces:
        lo, hi = piece.lo, piece.hi
        part = compensated[lo:hi]
        if gamma == 1.0:  # as compensate: 1·e == e exactly
            np.add(update[lo:hi], residual[lo:hi], out=part)
        else:
            np.multiply(residual[lo:hi], factor, out=part)
            np.add(update[lo:hi], part, out=part)
        energy[piece.g0 : piece.g1] = row_sq_norms(piece.rows(compensated))
    return compensated, energy


def _plain(update: np.ndarray, residual: np.ndarray, gamma: float) -> bool:
    """Float32 vectors of one shape and ``0 <= γ <= 1``: what
    :func:`compensate` takes without a conversion, and without an error
    other than a NaN or Inf in ``g``."""
    return (
        isinstance(update, np.ndarray)
        and isinstance(residual, np.ndarray)
        and update.dtype == residual.dtype == np.float32
        and update.ndim == 1
        and update.shape == residual.shape
        and isinstance(gamma, int | float)
        and 0.0 <= gamma <= 1.0
    )


def _compensate(update: np.ndarray, residual: np.ndarray, gamma: float) -> np.ndarray:
    """Step 3, :func:`compensate` without its finiteness pass when ``update``
    and ``residual`` are float32 vectors of one shape and ``0 <= γ <= 1``
    (:func:`compress_update` checks ``g̃`` through its energy); otherwise
    :func:`compensate` itself."""
    if _plain(update, residual, gamma):
        if gamma == 1.0:  # as compensate: 1·e == e exactly
            return update + residual
        return update + np.float32(gamma) * residual
    return compensate(update, residual, gamma)


def _importance(
    compensated: np.ndarray,
    weights: np.ndarray,
    state: EdgeMemory,
    plan: RoundPlan,
    layout: GroupLayout,
    predictor: ImportancePredictor | None,
    *,
    energy: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 4: ``(I, ‖g̃_i‖²)`` per group; appends this round's RMS to history.

    ``energy``, if given, is ``layout.group_sq_norms(compensated)``."""
    if energy is None:
        energy = layout.group_sq_norms(compensated)
    rms = np.sqrt(energy / np.maximum(layout.sizes, 1))
    state.history = np.vstack([state.history[1:], rms[None, :]])
    if plan.importance == "predictor":
        if predictor is None:
            raise CodecError("the plan asks for the predictor; none was given")
        score = predict_importance(
            predictor, temporal_features(state.history), layout.structural(weights)
        )
    elif plan.importance == "magnitude":
        score = magnitude_scores(rms)
    else:
        score = np.ones(len(layout.groups))
    return np.clip(score, 0.0, None) * energy, energy


def _sent_and_cache(
    decoded: np.ndarray,
    deferred: np.ndarray,
    state: EdgeMemory,
    plan: RoundPlan,
    layout: GroupLayout,
) -> np.ndarray:
    """Step 6's ``sent``: decoded groups, and the cloud's stand-ins for deferred
    ones; refreshes the mirror of the cloud's cache.

    ``sent`` is ``decoded`` itself with the stand-ins written into its
    deferred groups (:func:`fill_unsent` of those groups alone: the same
    values, without a pass over the others)."""
    rows = np.flatnonzero(deferred)
    if rows.size:
        if int(state.cache_round.max()) > plan.server_round:  # its error
            fill_unsent(
                state.cache,
                state.cache_round,
                layout.sizes,
                plan.server_round,
                plan.fill_decay,
            )
        starts, sizes = layout.starts, layout.sizes
        stand_in = fill_unsent(
            _pick(state.cache, starts, sizes, rows),
            state.cache_round[rows],
            sizes[rows],
            plan.server_round,
            plan.fill_decay,
        )
        cache = decoded.copy()  # the old cache's values in the deferred groups
        _place(cache, starts, sizes, rows, state.cache, starts[rows])
        _place(decoded, starts, sizes, rows, stand_in)
        state.cache = cache
    else:
        state.cache = decoded
    state.cache_round[~deferred] = plan.server_round
    return decoded


def compress_update(
    update: np.ndarray,
    weights: np.ndarray,
    state: EdgeMemory,
    plan: RoundPlan,
    layout: GroupLayout,
    predictor: ImportancePredictor | None = None,
    *,
    stages: MutableMapping[str, float] | None = None,
    in_place: bool = False,
) -> CompressedUpdate:
    """Steps 3-7 of the module docstring on one flat update; updates ``state``.

    Parameters
    ----------
    update : np.ndarray
        ``(N,)`` float32: ``g = θ_k − θ``.
    weights : np.ndarray
        ``(N,)``: the global weights ``θ`` (for the structural features).
    state : EdgeMemory
        Residuals, history and cache; changed in place.
    plan : RoundPlan
        The round's budget, options and settings.
    layout : GroupLayout
        The model's groups.
    predictor : ImportancePredictor or None
        Needed when ``plan.importance == "predictor"``.
    stages : MutableMapping[str, float] or None (default: None)
        If given, the CPU seconds of the calling thread
        (``time.thread_time``) of each step are added
        under ``feedback``, ``importance``, ``knapsack``, ``encode``, ``sent``
        and ``residual`` (what ``tandem bench codecs`` reports). The groups'
        energies ``‖g̃_i‖²`` are taken in the feedback pass (under
        ``feedback``), and the residual ``g̃ − sent`` of the encoded groups
        as they are packed (under ``encode``).
    in_place : bool (default: False)
        Write ``g̃``, then the new residual, over ``state.residual``'s
        buffer (if writable, C-contiguous and apart from ``update``): a pass
        into fresh memory saved. If this call raises, the old residual is
        then lost: for a caller that keeps the memory elsewhere, as the
        ACE-Sync client does (``context.state``, stored after each round).

    Raises
    ------
    CodecError
        If the budget is below the cheapest choice (no zero-cost option), or
        the plan asks for a predictor and none is given.
    """
    clock = _StageClock(stages)
    # 3. error feedback (eq. 7), with step 4's energies ‖g̃_i‖² in the same
    # pass; g̃ is checked finite through them
    compensated, energy = _feedback(
        update, state.residual, plan.gamma, layout, in_place
    )
    clock.lap("feedback")
    # 4. importance (eqs. 3-4): the score times the group's energy ‖g̃_i‖²
    finite = bool(np.isfinite(energy.sum()))  # a NaN or Inf in g̃ spreads to it
    if not finite:  # compensate's own checks and message first
        compensate(update, state.residual, plan.gamma)
    importance, energy = _importance(
        compensated, weights, state, plan, layout, predictor, energy=energy
    )
    clock.lap("importance")
    # 5. knapsack within the budget
    costs, fidelity = option_table(plan.codecs, layout.sizes)
    try:
        selection = select_options(importance, costs, fidelity, budget=plan.budget)
    except ValueError as err:
        raise CodecError(f"budget {plan.budget} bytes: {err}") from None
    clock.lap("knapsack")
    # 6. encode and pack (eq. 6 for sign); sent = what the cloud will see.
    # 7.  e ← g̃ − sent is written over g̃ (a fresh array) as each encoded
    # group is packed; the deferred groups' below, once sent is known
    if finite:
        codes, payload, decoded = _encode_packed(
            compensated,
            layout.sizes,
            selection.choice,
            plan.codecs,
            costs,
            residual=compensated,
        )
    else:  # encode_packed's checks
        codes, payload, decoded = encode_packed(
            compensated, layout.sizes, selection.choice, plan.codecs
        )
    clock.lap("encode")
    is_defer = np.array([option.kind == "defer" for option in plan.codecs])
    deferred = is_defer[selection.choice]
    sent = _sent_and_cache(decoded, deferred, state, plan, layout)
    clock.lap("sent")
    # 7. error feedback: e ← g̃ − sent (sent + e == g̃, nothing is lost)
    if deferred.any():
        np.subtract(
            compensated,
            sent,
            out=compensated,
            where=np.repeat(deferred, layout.sizes),
        )
    state.residual = compensated
    total = float(energy.sum())
    lost = float(np.dot(state.residual, state.residual))
    clock.lap("residual")
    return CompressedUpdate(
        codecs=codes,
        payload=payload,
        sent=sent,
        encoded_bytes=int(payload.size),
        kept_fraction=1.0 - lost / total if total > 0 else 1.0,
        groups_sent=float(np.mean(~deferred)) if deferred.size else 1.0,
    )
