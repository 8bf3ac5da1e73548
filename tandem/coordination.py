"""ACE-Sync coordination at the cloud: weights, divergence, sync control, filling.

Pure numpy; no Flower imports. Notation of the ACE-Sync seed (004): ``K``
devices, device ``k`` sends a compensated update ``g̃_k`` (seed eq. 7) for the
parameter groups it chose.

- Aggregation (seed eq. 8): ``G = Σ_k ω_k·g̃_k`` with ``ω`` from data size,
  reliability and latency (:func:`aggregation_weights`).
- Divergence (seed eq. 9): ``D_k(t) = ‖θ_k(t) − θ(t)‖₂`` (:func:`divergence`);
  past a threshold the cloud raises the device's sync frequency
  (:func:`adjust_sync`): by its local steps and byte budget, or by how many
  rounds pass between its syncs (:func:`adjust_intervals`, :func:`due_devices`).
- Untransmitted groups are filled from cached history: the cloud keeps the
  last update of each group per device (:func:`refresh_cache`) and fills with
  :func:`~tandem.compression.pipeline.fill_unsent` on :func:`cache_arrays`,
  the same function the edge mirrors the cloud with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CachedUpdate",
    "IntervalDecision",
    "IntervalPolicy",
    "Phase",
    "SyncDecision",
    "SyncPolicy",
    "adjust_intervals",
    "adjust_sync",
    "aggregation_weights",
    "cache_arrays",
    "divergence",
    "due_devices",
    "interval_phase",
    "refresh_cache",
]


def _vector(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return values


def aggregation_weights(
    num_examples: np.ndarray,
    reliability: np.ndarray,
    latency_s: np.ndarray,
    *,
    reference_latency_s: float | None = None,
) -> np.ndarray:
    """Aggregation weights ``ω`` of seed eq. 8, ``ω_k ≥ 0`` and ``Σ ω_k = 1``.

    ``ω_k ∝ n_k · r_k · 1 / (1 + L_k / L_ref)``: data size times reliability
    times a latency discount. The discount is 1 at zero latency, 1/2 at the
    reference latency and falls like ``L_ref / L_k`` beyond, so a slow device
    counts less but never nothing. ``L_ref`` is the median latency of the
    devices by default; with every latency zero there is no discount.

    Parameters
    ----------
    num_examples : np.ndarray
        Shape ``(K,)``: training examples behind each device's update.
    reliability : np.ndarray
        Shape ``(K,)`` in ``[0, 1]``: fraction of rounds the device delivered.
    latency_s : np.ndarray
        Shape ``(K,)``: each device's round latency, in seconds.
    reference_latency_s : float, optional
        ``L_ref`` in seconds (``> 0``); by default the median of ``latency_s``.

    Raises
    ------
    ValueError
        If the inputs differ in length, are empty, negative or non-finite, a
        reliability exceeds 1, or every product is zero.
    """
    n = _vector("num_examples", num_examples)
    r = _vector("reliability", reliability)
    latency = _vector("latency_s", latency_s)
    if not n.size == r.size == latency.size:
        raise ValueError(
            "num_examples, reliability and latency_s must have one entry per "
            f"device, got {n.size}, {r.size} and {latency.size}"
        )
    if np.any(r > 1):
        raise ValueError("reliability must lie in [0, 1]")
    if reference_latency_s is None:
        reference = float(np.median(latency))
    elif np.isfinite(reference_latency_s) and reference_latency_s > 0:
        reference = float(reference_latency_s)
    else:
        raise ValueError(f"reference_latency_s must be > 0, got {reference_latency_s}")
    discount = 1.0 / (1.0 + latency / reference) if reference > 0 else np.ones_like(n)
    raw = n * r * discount
    total = raw.sum()
    if total <= 0:
        raise ValueError(
            "every device has zero weight (no examples or zero reliability): "
            "nothing to aggregate"
        )
    return raw / total


def divergence(
    local: Mapping[str, np.ndarray] | np.ndarray,
    global_: Mapping[str, np.ndarray] | np.ndarray,
) -> float:
    """``D_k = ‖θ_k − θ‖₂`` over all parameters (seed eq. 9), in float64.

    Both sides are flat vectors of the same shape, or mappings with the same
    keys and per-key shapes (the norm runs over every tensor together).

    Raises
    ------
    ValueError
        If the keys or shapes differ, or a value is not finite.
    """
    if isinstance(local, Mapping) != isinstance(global_, Mapping):
        raise ValueError("local and global_ must both be mappings or both arrays")
    if isinstance(local, Mapping):
        if set(local) != set(global_):
            raise ValueError(
                f"local and global_ keys differ: {sorted(set(local) ^ set(global_))}"
            )
        pairs = [(key, local[key], global_[key]) for key in sorted(local)]
    else:
        pairs = [("vector", local, global_)]
    total = 0.0
    for key, a, b in pairs:
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"'{key}': shapes differ, {a.shape} vs {b.shape}")
        diff = a - b
        if not np.all(np.isfinite(diff)):
            raise ValueError(f"'{key}': non-finite values")
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


@dataclass(frozen=True)
class SyncPolicy:
    """When and how far the cloud tightens a drifting device's sync (seed eq. 9).

    Attributes
    ----------
    threshold : float (default: 1.5)
        A device is past the threshold when ``D_k > threshold · median_j D_j``
        (``relative``), or ``D_k > threshold`` (absolute, same units as ``D``).
        Relative is the default: the scale of ``D`` follows the model size,
        learning rate and local steps, its spread across devices does not. A
        relative rule cannot flag everyone at once; an absolute one can.
    relative : bool (default: True)
        Whether ``threshold`` is a multiple of the median divergence.
    default_steps : int (default: 50)
        Local steps between syncs of a device in good standing.
    min_steps : int (default: 1)
        Floor on local steps when tightening.
    default_budget : float (default: 1.0)
        Byte-budget scale of a device in good standing (multiplies its budget
        from the link; larger means less compression).
    max_budget : float (default: 4.0)
        Cap on the budget scale when tightening.
    factor : float (default: 2.0)
        Each tightening divides steps and multiplies the budget scale by
        ``factor``; each relaxation moves both back by the same factor, never
        past the defaults.
    """

    threshold: float = 1.5
    relative: bool = True
    default_steps: int = 50
    min_steps: int = 1
    default_budget: float = 1.0
    max_budget: float = 4.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if not 1 <= self.min_steps <= self.default_steps:
            raise ValueError(
                "need 1 <= min_steps <= default_steps, got "
                f"{self.min_steps} and {self.default_steps}"
            )
        if not 0 < self.default_budget <= self.max_budget:
            raise ValueError(
                "need 0 < default_budget <= max_budget, got "
                f"{self.default_budget} and {self.max_budget}"
            )
        if not self.factor > 1:
            raise ValueError(f"factor must be > 1, got {self.factor}")


@dataclass(frozen=True)
class SyncDecision:
    """Next round's settings per device, from :func:`adjust_sync`.

    Attributes
    ----------
    local_steps : np.ndarray
        Shape ``(K,)``, int64: local steps before the next sync.
    budget_scale : np.ndarray
        Shape ``(K,)``, float64: multiplier on each device's byte budget.
    triggered : np.ndarray
        Shape ``(K,)``, bool: devices past the threshold.
    threshold : float
        The absolute divergence threshold that was applied.
    """

    local_steps: np.ndarray
    budget_scale: np.ndarray
    triggered: np.ndarray
    threshold: float


def adjust_sync(
    divergences: np.ndarray,
    local_steps: np.ndarray,
    budget_scale: np.ndarray,
    policy: SyncPolicy,
) -> SyncDecision:
    """Raise the sync frequency of drifting devices, relax the others (seed eq. 9).

    Steps:

    1. ``τ = policy.threshold · median(D)`` if relative, else the threshold.
    2. Past it (``D_k > τ``): ``steps ← max(min_steps, ⌊steps / factor⌋)`` and
       ``budget ← min(max_budget, budget · factor)``, i.e. sync sooner and
       send more of the update.
    3. Otherwise each moves one ``factor`` back toward its default and stops
       there: ``steps ← min(default, ⌈steps · factor⌉)`` from below (or
       ``max(default, ⌊steps / factor⌋)`` from above), likewise the budget.

    Parameters
    ----------
    divergences : np.ndarray
        Shape ``(K,)``: ``D_k`` of seed eq. 9 (:func:`divergence`).
    local_steps : np.ndarray
        Shape ``(K,)``: each device's current local steps (``>= 1``).
    budget_scale : np.ndarray
        Shape ``(K,)``: each device's current budget scale (``> 0``).
    policy : SyncPolicy
        Threshold, defaults, limits and factor.
    """
    d = _vector("divergences", divergences)
    steps = np.asarray(local_steps)
    budget = np.asarray(budget_scale, dtype=np.float64)
    if steps.shape != d.shape or budget.shape != d.shape:
        raise ValueError(
            "divergences, local_steps and budget_scale must have one entry per "
            f"device, got {d.shape}, {steps.shape} and {budget.shape}"
        )
    if not np.issubdtype(steps.dtype, np.integer) or np.any(steps < 1):
        raise ValueError("local_steps must be integers >= 1")
    if not np.all(np.isfinite(budget)) or np.any(budget <= 0):
        raise ValueError("budget_scale must be finite and > 0")
    steps = steps.astype(np.int64)
    # 1. the absolute threshold
    tau = (
        policy.threshold * float(np.median(d)) if policy.relative else policy.threshold
    )
    triggered = d > tau
    f = policy.factor
    # 2. tighten the drifting devices
    tight_steps = np.maximum(policy.min_steps, np.floor(steps / f).astype(np.int64))
    tight_budget = np.minimum(policy.max_budget, budget * f)
    # 3. relax the others one factor toward the defaults
    relaxed_steps = np.where(
        steps < policy.default_steps,
        np.minimum(policy.default_steps, np.ceil(steps * f).astype(np.int64)),
        np.maximum(policy.default_steps, np.floor(steps / f).astype(np.int64)),
    )
    relaxed_budget = np.where(
        budget > policy.default_budget,
        np.maximum(policy.default_budget, budget / f),
        np.minimum(policy.default_budget, budget * f),
    )
    return SyncDecision(
        local_steps=np.where(triggered, tight_steps, relaxed_steps),
        budget_scale=np.where(triggered, tight_budget, relaxed_budget),
        triggered=triggered,
        threshold=tau,
    )


@dataclass(frozen=True)
class IntervalPolicy:
    """Dynamic synchronization (seed eq. 9): how many rounds pass between a
    device's syncs.

    A device with interval ``r`` is sent the model every ``r`` rounds and
    trains ``r`` rounds' worth of local steps in between, so every device
    keeps its share of the training while stable ones exchange less often.

    Attributes
    ----------
    threshold : float (default: 1.5)
        A device drifts when its divergence per round,
        ``D_k / r_k``, exceeds ``threshold · median_j (D_j / r_j)``.
    stable : float (default: 0.75)
        A device is stable when ``D_k / r_k <= stable · median_j (D_j / r_j)``
        (must not exceed ``threshold``).
    min_interval : int (default: 1)
        Shortest interval (rounds): every round.
    max_interval : int (default: 2)
        Longest interval (rounds).
    """

    threshold: float = 1.5
    stable: float = 0.75
    min_interval: int = 1
    max_interval: int = 2

    def __post_init__(self) -> None:
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if not 0 <= self.stable <= self.threshold:
            raise ValueError(
                f"need 0 <= stable <= threshold, got {self.stable} and {self.threshold}"
            )
        if not 1 <= self.min_interval <= self.max_interval:
            raise ValueError(
                "need 1 <= min_interval <= max_interval, got "
                f"{self.min_interval} and {self.max_interval}"
            )


@dataclass(frozen=True)
class IntervalDecision:
    """Next sync interval per device, from :func:`adjust_intervals`.

    Attributes
    ----------
    intervals : np.ndarray
        Shape ``(K,)``, int64: rounds until each device's next sync.
    triggered : np.ndarray
        Shape ``(K,)``, bool: devices past the threshold (sync sooner).
    stable : np.ndarray
        Shape ``(K,)``, bool: devices at or below the stable line (sync later).
    threshold : float
        The absolute threshold on ``D_k / r_k`` that was applied.
    """

    intervals: np.ndarray
    triggered: np.ndarray
    stable: np.ndarray
    threshold: float


def adjust_intervals(
    divergences: np.ndarray, intervals: np.ndarray, policy: IntervalPolicy
) -> IntervalDecision:
    """Shorten the sync interval of drifting devices, lengthen stable ones' (eq. 9).

    Steps:

    1. Divergence per round of each device, ``ρ_k = D_k / r_k``: a device
       that trained ``r_k`` rounds' worth of steps since its last sync has
       drifted about ``r_k`` times as far, which must not count against it.
    2. ``τ = threshold · median(ρ)``; drifting: ``ρ_k > τ``; stable:
       ``ρ_k <= stable · median(ρ)``.
    3. Drifting: ``r_k ← max(min_interval, ⌊r_k / 2⌋)`` (sync sooner,
       multiplicative decrease). Stable: ``r_k ← min(max_interval, r_k + 1)``
       (additive increase). Others keep ``r_k`` (within the bounds).

    Parameters
    ----------
    divergences : np.ndarray
        Shape ``(K,)``: ``D_k`` of seed eq. 9 (:func:`divergence`), of the
        devices that synced this round.
    intervals : np.ndarray
        Shape ``(K,)``: the interval each of them had (integers ``>= 1``).
    policy : IntervalPolicy
        Thresholds and bounds.
    """
    d = _vector("divergences", divergences)
    r = np.asarray(intervals)
    if r.shape != d.shape:
        raise ValueError(
            "divergences and intervals must have one entry per device, got "
            f"{d.shape} and {r.shape}"
        )
    if not np.issubdtype(r.dtype, np.integer) or np.any(r < 1):
        raise ValueError("intervals must be integers >= 1")
    r = r.astype(np.int64)
    # 1. divergence per round
    rho = d / r
    # 2. thresholds
    median = float(np.median(rho))
    tau = policy.threshold * median
    triggered = rho > tau
    stable = (rho <= policy.stable * median) & ~triggered
    # 3. AIMD within the bounds
    shorter = np.maximum(policy.min_interval, r // 2)
    longer = np.minimum(policy.max_interval, r + 1)
    kept = np.clip(r, policy.min_interval, policy.max_interval)
    return IntervalDecision(
        intervals=np.where(triggered, shorter, np.where(stable, longer, kept)),
        triggered=triggered,
        stable=stable,
        threshold=tau,
    )


def due_devices(
    server_round: int,
    nodes: Sequence[int],
    last_sync: Mapping[int, int],
    intervals: Mapping[int, int],
) -> list[int]:
    """The devices due to sync in ``server_round``, in the order of ``nodes``.

    Device ``k`` is due when ``server_round − last_sync[k] >= intervals[k]``;
    one that never synced (not in ``last_sync``) is always due, and an
    interval not given is 1. If no device is due, those that will be due
    soonest are (a round never stands empty).
    """
    if not nodes:
        return []
    wait = {
        n: last_sync[n] + intervals.get(n, 1) - server_round if n in last_sync else 0
        for n in nodes
    }
    soonest = min(max(w, 0) for w in wait.values())
    return [n for n in nodes if wait[n] <= soonest]


@dataclass(frozen=True)
class Phase:
    """One device's part in a round of continuous synchronization.

    Attributes
    ----------
    resume : bool
        Train on from the model in progress (the message carries no model);
        else start from the model the message brings.
    send : bool
        Reply with the update since the interval's model (a sync); else
        reply with the training metrics alone and keep the model in progress.
    """

    resume: bool
    send: bool


def interval_phase(server_round: int, start: int, interval: int) -> Phase:
    """A device's :class:`Phase` in ``server_round`` of an interval that
    started in round ``start`` and lasts ``interval`` rounds.

    The device trains ``local-steps`` in every round of the interval: from
    the model sent in round ``start``, on from its own model in the rounds
    after, and sends the update of all those steps in the interval's last
    round, ``start + interval − 1``. With ``interval = 1`` every round is a
    whole interval (a plain synchronous round).

    Raises
    ------
    ValueError
        If ``interval < 1`` or ``server_round`` is outside the interval.
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    if not start <= server_round < start + interval:
        raise ValueError(
            f"round {server_round} is outside the interval of rounds "
            f"{start}..{start + interval - 1}"
        )
    return Phase(resume=server_round > start, send=server_round == start + interval - 1)


@dataclass(frozen=True)
class CachedUpdate:
    """The last update received for one parameter group, and when.

    Attributes
    ----------
    update : np.ndarray
        The group's update as last received (any shape).
    round : int
        Server round in which it was received.
    """

    update: np.ndarray
    round: int


def refresh_cache(
    cache: Mapping[int, CachedUpdate],
    received: Mapping[int, np.ndarray],
    server_round: int,
) -> dict[int, CachedUpdate]:
    """A new cache: ``cache`` with every received group replaced (copied)."""
    fresh = dict(cache)
    for index, update in received.items():
        fresh[index] = CachedUpdate(np.array(update, copy=True), server_round)
    return fresh


def cache_arrays(
    cache: Mapping[int, CachedUpdate], sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A cache as the flat arrays :func:`~tandem.compression.pipeline.fill_unsent`
    takes: ``(values (N,) float32, rounds (n,) int64)``.

    Groups not in ``cache`` get zeros and round ``-1`` (never received).

    Raises
    ------
    ValueError
        If a group index is outside ``[0, n)`` or a cached update has another
        size than its group.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    values = np.zeros(int(sizes.sum()), dtype=np.float32)
    rounds = np.full(sizes.size, -1, dtype=np.int64)
    for index, entry in cache.items():
        if not 0 <= index < sizes.size:
            raise ValueError(f"cache has group index {index} outside [0, {sizes.size})")
        update = np.asarray(entry.update, dtype=np.float32).reshape(-1)
        if update.size != sizes[index]:
            raise ValueError(
                f"cache entry for group {index} has {update.size} values, "
                f"the group {int(sizes[index])}"
            )
        values[starts[index] : starts[index] + update.size] = update
        rounds[index] = entry.round
    return values, rounds
