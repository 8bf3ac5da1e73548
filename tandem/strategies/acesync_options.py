"""ACE-Sync's run-config keys (``acesync-*``), shared by its baselines.

One frozen dataclass, read once by the ServerApp; the edges get what they
need from each round's message (see :class:`tandem.clients.acesync.EdgePlan`),
so the keys below matter on the cloud side only. The baselines ``fullsync``,
``topk`` and ``fedavg-periodic`` read the few keys they use from the same
section (``acesync-chunk``, ``acesync-gamma``, ``acesync-topk-ratio``,
``acesync-period``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tandem.clients.acesync import parse_codecs
from tandem.compression.codecs import CodecError, Option
from tandem.config import option
from tandem.network import assign_links

__all__ = ["AceSyncOptions"]


def _codecs_ok(text: str) -> bool:
    try:
        parse_codecs(text)
    except CodecError:
        return False
    return True


def _link_ok(spec: str) -> bool:
    try:
        assign_links([0], spec)
    except ValueError:
        return False
    return True


def _fraction(x: float) -> bool:
    return 0.0 <= x <= 1.0


@dataclass(frozen=True)
class AceSyncOptions:
    """ACE-Sync settings (keys ``acesync-*``), validated when the run starts.

    Attributes
    ----------
    chunk : int
        Elements per parameter group (seed eq. 1): a tensor of at most this
        many elements is one group, a larger one is cut into chunks.
    codecs : str
        The options per group, comma-separated: ``full``, ``half``,
        ``topk@<ratio>``, ``sign``, ``defer`` (a zero-cost ``defer`` makes
        every budget feasible).
    c_min, c_max, beta : float
        Eq. 5, ``c = c_min + (c_max − c_min)·exp(−β·B)`` with ``B`` in Mbit/s:
        the fraction of the float32 update *not* sent; budget ``(1 − c)·4N``
        bytes for ``N`` parameters.
    gamma : float
        Error-feedback weight ``γ`` of eq. 7.
    importance : str
        ``predictor`` (the cloud-trained two-branch model, eqs. 3-4) or
        ``magnitude`` (the ablation: latest update RMS per group).
    alpha : float
        ``α`` of eq. 3, the temporal branch's weight.
    history : int
        Rounds of per-group update magnitudes behind the temporal features.
    predictor_steps : int
        Adam steps per round when the cloud refits the predictor.
    fill_decay : float
        Decay per round of the cached update the cloud uses for a group a
        device did not send (the device's error feedback keeps the difference).
    weighting : str
        ``eq8`` (data size × reliability × latency discount, seed eq. 8) or
        ``examples`` (data size alone, as FedAvg).
    divergence_threshold : float
        Seed eq. 9: a device whose ``D_k`` exceeds this multiple of the median
        is synced more often next round; 0 turns divergence control off.
    sync_action : str
        What "sync more often" means: ``budget`` (double the byte budget:
        the device's next update loses less), ``steps`` (halve its local
        steps) or ``both``. ``budget`` is the default: in synchronous rounds
        fewer steps also shrink a drifting device's share of the progress,
        which on label-skewed data biases the model (on the benchmark's
        workload, in-process, 3 seeds: 91.6% final accuracy with ``budget``,
        89.1% with ``both``, 92.0% for FullSync; noise is about ±1 point).
    min_steps : int
        Floor on a tightened device's local steps.
    max_budget_scale : float
        Cap on a tightened device's budget multiplier.
    link : str
        Link spec for nodes that declare none (``assign_links``: a preset,
        ``variable``, or ``mix:4g,5g,...``), seeded with the run's seed.
    edge_factor : float
        Measured edge seconds → emulated device seconds on the cloud's clock.
    bandwidth : str
        Where ``B_k(t)`` of eq. 5 comes from: ``emulated`` (each node's link,
        declared or from ``acesync-link``, played on the cloud's virtual
        clock: simulation and loopback trials) or ``measured`` (the real
        transit time of each node's replies, from their creation on the
        node to their pull by the ServerApp: deployment on real networks;
        assumes NTP-synchronized clocks). Eq. 8's latency follows the same
        source.
    clusters : int
        Device clusters for personalization: 0 = chosen by silhouette, 1 =
        off, ``k >= 2`` = exactly ``k``.
    max_clusters : int
        Largest ``k`` tried when ``clusters = 0``.
    cluster_profile_weight : float
        Weight of the link profile (log bandwidth) beside the update direction
        when clustering; 0 clusters by updates alone.
    personalize_rounds : int
        Rounds of training within each cluster after the global rounds.
    topk_ratio : float
        Kept fraction of the ``topk`` baseline.
    period : int
        ``fedavg-periodic``: rounds' worth of local steps per sync.
    """

    chunk: int = option(
        "acesync-chunk", 256, "must be >= 1 (elements per group)", lambda n: n >= 1
    )
    codecs: str = option(
        "acesync-codecs",
        "full,half,int8,topk@0.1,topk@0.01,sign,defer",
        "must be a comma-separated list of full, half, int8, "
        "topk@<ratio in (0, 1]>, sign, defer",
        _codecs_ok,
    )
    c_min: float = option("acesync-c-min", 0.55, "must lie in [0, 1]", _fraction)
    c_max: float = option("acesync-c-max", 0.95, "must lie in [0, 1]", _fraction)
    beta: float = option(
        "acesync-beta", 0.02, "must be > 0 (per Mbit/s)", lambda b: b > 0
    )
    gamma: float = option("acesync-gamma", 1.0, "must lie in [0, 1]", _fraction)
    importance: str = option(
        "acesync-importance", "predictor", choices=("predictor", "magnitude")
    )
    alpha: float = option("acesync-alpha", 0.5, "must lie in [0, 1]", _fraction)
    history: int = option(
        "acesync-history", 5, "must be >= 1 (rounds)", lambda n: n >= 1
    )
    predictor_steps: int = option(
        "acesync-predictor-steps", 100, "must be >= 0", lambda n: n >= 0
    )
    fill_decay: float = option(
        "acesync-fill-decay", 0.5, "must lie in [0, 1]", _fraction
    )
    weighting: str = option("acesync-weighting", "eq8", choices=("eq8", "examples"))
    divergence_threshold: float = option(
        "acesync-divergence-threshold",
        1.5,
        "must be >= 0 (multiple of the median divergence; 0 = off)",
        lambda t: t >= 0,
    )
    sync_action: str = option(
        "acesync-sync-action", "budget", choices=("budget", "both", "steps")
    )
    min_steps: int = option("acesync-min-steps", 10, "must be >= 1", lambda n: n >= 1)
    max_budget_scale: float = option(
        "acesync-max-budget-scale", 2.0, "must be >= 1", lambda f: f >= 1
    )
    link: str = option(
        "acesync-link",
        "variable",
        "must be a link preset (4g, 5g, lan, wifi, variable) or mix:a,b,...",
        _link_ok,
    )
    edge_factor: float = option(
        "acesync-edge-factor", 1.0, "must be > 0", lambda f: f > 0
    )
    bandwidth: str = option(
        "acesync-bandwidth", "emulated", choices=("emulated", "measured")
    )
    clusters: int = option(
        "acesync-clusters",
        0,
        "must be >= 0 (0 = by silhouette, 1 = off, k >= 2 = exactly k)",
        lambda n: n >= 0,
    )
    max_clusters: int = option(
        "acesync-max-clusters", 4, "must be >= 2", lambda n: n >= 2
    )
    cluster_profile_weight: float = option(
        "acesync-cluster-profile-weight", 0.0, "must be >= 0", lambda w: w >= 0
    )
    personalize_rounds: int = option(
        "acesync-personalize-rounds", 2, "must be >= 0", lambda n: n >= 0
    )
    topk_ratio: float = option(
        "acesync-topk-ratio", 0.15, "must lie in (0, 1]", lambda r: 0 < r <= 1
    )
    period: int = option(
        "acesync-period", 3, "must be >= 1 (rounds per sync)", lambda n: n >= 1
    )

    def __post_init__(self) -> None:
        from tandem.config import ConfigError

        if self.c_min > self.c_max:
            raise ConfigError(
                "acesync-c-max", self.c_max, f"must be >= acesync-c-min ({self.c_min})"
            )
        if not math.isfinite(self.beta):
            raise ConfigError("acesync-beta", self.beta, "must be finite")

    @property
    def options(self) -> tuple[Option, ...]:
        """:attr:`codecs` parsed."""
        return parse_codecs(self.codecs)
