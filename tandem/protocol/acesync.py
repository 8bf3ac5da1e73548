"""ACE-Sync's contract between cloud and edge (also ``fullsync`` and ``topk``).

What crosses the wire each round, and how each side builds and reads it:

- down, the train message: the global arrays, a config record carrying an
  :class:`EdgePlan` (:meth:`EdgePlan.to_config` / :meth:`EdgePlan.from_config`),
  and, when the cloud ranks groups with its predictor, the record
  :data:`KEY_PREDICTOR` (:func:`predictor_record` / :func:`read_predictor`);
- up, the reply: the record :data:`KEY_UPDATE` with the codec table and the
  packed payload (:func:`update_record` / :func:`read_update`), the metrics
  :data:`EDGE_METRICS` and the node record.

The run-config keys ``acesync-*`` are :class:`AceSyncOptions`, read once by
the ServerApp; the edges get what they need from each round's message.
Strategies (:mod:`tandem.strategies.compressed`, :mod:`tandem.strategies.acesync`)
and the client (:mod:`tandem.clients.acesync`) import this module, never each
other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from tandem.accounting import KEY_COMPUTE_SECONDS
from tandem.compression.codecs import (
    CodecError,
    Option,
    codec_rule,
    format_codecs,
    parse_codecs,
)
from tandem.importance import (
    ImportancePredictor,
    PredictorError,
    predictor_from_arrays,
    predictor_to_arrays,
)
from tandem.network import link_option_check
from tandem.options import option
from tandem.wire import KEY_LOCAL_STEPS, PayloadError, read_array

__all__ = [
    "EDGE_METRICS",
    "IMPORTANCE_SOURCES",
    "KEY_PREDICTOR",
    "KEY_UPDATE",
    "AceSyncOptions",
    "EdgePlan",
    "pack_predictor",
    "predictor_record",
    "read_predictor",
    "read_update",
    "unpack_predictor",
    "update_record",
]

#: Reply record holding the packed update: ``codecs`` uint8 (n,), ``payload``
#: uint8 (B,) (see :mod:`tandem.compression.packing`).
KEY_UPDATE = "update"
#: Message record holding the importance predictor: ``weights`` float32, the
#: predictor's tensors flattened in ``state_dict`` order.
KEY_PREDICTOR = "predictor"
#: Sources of the per-group importance score.
IMPORTANCE_SOURCES = ("predictor", "magnitude", "uniform")
#: Metric keys of a reply (the cloud checks the set exactly).
EDGE_METRICS = frozenset(
    {
        "train-loss",
        "num-examples",
        "train-seconds",
        KEY_COMPUTE_SECONDS,
        "train-compute-seconds",
        "overhead-seconds",
        "steps",
        "bytes-budget",
        "bytes-encoded",
        "kept-fraction",
        "groups-sent",
        "update-norm",
        "residual-norm",
    }
)

# Train-config keys of an EdgePlan.
_BUDGET = "acesync-budget"
_CODECS = "acesync-codecs"
_CHUNK = "acesync-chunk"
_GAMMA = "acesync-gamma"
_IMPORTANCE = "acesync-importance"
_DECAY = "acesync-fill-decay"
_HISTORY = "acesync-history"
_ROUND = "server-round"


@dataclass(frozen=True)
class EdgePlan:
    """What the cloud asks of an edge this round (the message's config record).

    Attributes
    ----------
    budget : int
        Bytes the encoded groups may take (payload arrays only; eq. 5).
    codecs : tuple[Option, ...]
        The options the knapsack picks from; the reply's codec table indexes
        them.
    chunk : int
        Elements per group.
    gamma : float
        ``γ`` of eq. 7.
    importance : str
        One of :data:`IMPORTANCE_SOURCES`.
    fill_decay : float
        Decay per round of the cloud's stand-in for a deferred group.
    history : int
        Rounds of magnitudes behind the temporal features.
    local_steps : int
        SGD steps before replying.
    server_round : int
        The round (ages of cached stand-ins count from it).
    """

    budget: int
    codecs: tuple[Option, ...]
    chunk: int
    gamma: float
    importance: str
    fill_decay: float
    history: int
    local_steps: int
    server_round: int

    def to_config(self) -> dict[str, int | float | str]:
        """The plan as train-config entries."""
        return {
            _BUDGET: int(self.budget),
            _CODECS: format_codecs(self.codecs),
            _CHUNK: int(self.chunk),
            _GAMMA: float(self.gamma),
            _IMPORTANCE: self.importance,
            _DECAY: float(self.fill_decay),
            _HISTORY: int(self.history),
            KEY_LOCAL_STEPS: int(self.local_steps),
            _ROUND: int(self.server_round),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> EdgePlan:
        """Read and check a plan from a message's config record.

        Raises
        ------
        PayloadError
            Naming the key that is missing or breaks its rule.
        """

        def get(key: str, kind: type, rule: str, ok: object) -> object:
            if key not in config:
                raise PayloadError(f"train config has no '{key}'")
            value = config[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise PayloadError(f"train config '{key}' = {value!r}: {rule}")
            if not ok(value):  # type: ignore[operator]
                raise PayloadError(f"train config '{key}' = {value!r}: {rule}")
            return value

        try:
            codecs = parse_codecs(str(config.get(_CODECS, "")))
        except CodecError as err:
            raise PayloadError(f"train config '{_CODECS}': {err}") from None
        return cls(
            budget=get(_BUDGET, int, "must be an integer >= 0", lambda b: b >= 0),  # type: ignore[arg-type]
            codecs=codecs,
            chunk=get(_CHUNK, int, "must be an integer >= 1", lambda c: c >= 1),  # type: ignore[arg-type]
            gamma=get(_GAMMA, float, "must lie in [0, 1]", lambda g: 0 <= g <= 1),  # type: ignore[arg-type]
            importance=get(  # type: ignore[arg-type]
                _IMPORTANCE,
                str,
                f"must be one of {', '.join(IMPORTANCE_SOURCES)}",
                lambda s: s in IMPORTANCE_SOURCES,
            ),
            fill_decay=get(_DECAY, float, "must lie in [0, 1]", lambda d: 0 <= d <= 1),  # type: ignore[arg-type]
            history=get(
                _HISTORY, int, "must be in [1, 1000]", lambda h: 1 <= h <= 1000
            ),  # type: ignore[arg-type]
            local_steps=get(
                KEY_LOCAL_STEPS, int, "must be in [1, 10**6]", lambda s: 1 <= s <= 10**6
            ),  # type: ignore[arg-type]
            server_round=get(_ROUND, int, "must be >= 0", lambda r: r >= 0),  # type: ignore[arg-type]
        )


def _predictor_shapes() -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in predictor_to_arrays(ImportancePredictor()).items()}


def pack_predictor(predictor: ImportancePredictor) -> np.ndarray:
    """The predictor's tensors as one float32 vector, in ``state_dict`` order."""
    return np.concatenate(
        [a.reshape(-1) for a in predictor_to_arrays(predictor).values()]
    ).astype(np.float32)


def unpack_predictor(flat: np.ndarray) -> ImportancePredictor:
    """Inverse of :func:`pack_predictor`, checked.

    Raises
    ------
    PredictorError
        On a wrong dtype or length, or anything :func:`predictor_from_arrays`
        rejects (non-finite values, ``alpha`` outside ``[0, 1]``).
    """
    shapes = _predictor_shapes()
    total = sum(math.prod(s) for s in shapes.values())
    if not isinstance(flat, np.ndarray) or flat.dtype != np.float32:
        raise PredictorError("weights", "must be a float32 array")
    if flat.shape != (total,):
        raise PredictorError("weights", f"shape {flat.shape}, expected ({total},)")
    arrays, offset = {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape)
        arrays[key] = flat[offset : offset + size].reshape(shape).copy()
        offset += size
    return predictor_from_arrays(arrays)


def predictor_record(predictor: ImportancePredictor) -> ArrayRecord:
    """The :data:`KEY_PREDICTOR` record: the predictor as one float32 array."""
    return ArrayRecord({"weights": Array(pack_predictor(predictor))})


def read_predictor(content: RecordDict) -> ImportancePredictor:
    """The predictor of a train message, checked.

    Raises
    ------
    PayloadError
        If the record is missing, has no ``weights`` or holds a bad predictor.
    """
    record = content.array_records.get(KEY_PREDICTOR)
    if record is None:
        raise PayloadError(f"missing record '{KEY_PREDICTOR}'")
    if "weights" not in record:
        raise PayloadError(f"record '{KEY_PREDICTOR}' has no 'weights'")
    try:
        return unpack_predictor(read_array(record["weights"], "weights"))
    except PredictorError as err:
        raise PayloadError(str(err)) from None


def update_record(codecs: np.ndarray, payload: np.ndarray) -> ArrayRecord:
    """The :data:`KEY_UPDATE` record of a reply: codec table and packed payload."""
    return ArrayRecord({"codecs": Array(codecs), "payload": Array(payload)})


def read_update(content: RecordDict) -> tuple[np.ndarray, np.ndarray]:
    """``(codecs, payload)`` of a reply's :data:`KEY_UPDATE` record.

    Here the record's structure and each array's bytes
    (:func:`~tandem.wire.read_array`) are checked; the arrays are checked
    against the plan by :func:`tandem.compression.packing.unpack_groups`.

    Raises
    ------
    PayloadError
        If the record is missing or holds other arrays.
    """
    record = content.array_records.get(KEY_UPDATE)
    if record is None:
        raise PayloadError(f"missing record '{KEY_UPDATE}'")
    if set(record.keys()) != {"codecs", "payload"}:
        raise PayloadError(
            f"record '{KEY_UPDATE}' has arrays {sorted(record.keys())}, "
            "expected ['codecs', 'payload']"
        )
    return read_array(record["codecs"], "codecs"), read_array(
        record["payload"], "payload"
    )


def _codecs_ok(text: str) -> bool:
    try:
        parse_codecs(text)
    except CodecError:
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
        The options per group, comma-separated: ``full``, ``half``, ``int8``,
        ``topk@<ratio>``, ``sign``, ``defer`` or any other registered codec
        (:data:`tandem.compression.codecs.REGISTRY`; a zero-cost ``defer``
        makes every budget feasible). :attr:`options` holds them parsed.
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
        Rounds of training within each cluster after the global rounds
        (without ``personalize``).
    personalize : bool
        Clusters that shape training (:mod:`tandem.hierarchy`): every round
        aggregates device → cluster → global, and each device trains from
        its cluster's model; the final report compares every device's
        accuracy with its cluster's model and with the global model.
    recluster_every : int
        With ``personalize``: rounds between cluster estimates (the first
        round is one).
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
        codec_rule(),
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
        "acesync-link", "variable", check=link_option_check("acesync-link")
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
    personalize: bool = option("acesync-personalize", False)
    recluster_every: int = option(
        "acesync-recluster-every", 5, "must be >= 1 (rounds)", lambda n: n >= 1
    )
    topk_ratio: float = option(
        "acesync-topk-ratio", 0.15, "must lie in (0, 1]", lambda r: 0 < r <= 1
    )
    period: int = option(
        "acesync-period", 3, "must be >= 1 (rounds per sync)", lambda n: n >= 1
    )

    def __post_init__(self) -> None:
        from tandem.options import ConfigError

        if self.c_min > self.c_max:
            raise ConfigError(
                "acesync-c-max", self.c_max, f"must be >= acesync-c-min ({self.c_min})"
            )
        if not math.isfinite(self.beta):
            raise ConfigError("acesync-beta", self.beta, "must be finite")

    @cached_property
    def options(self) -> tuple[Option, ...]:
        """:attr:`codecs` parsed (once: checked when the run starts, kept)."""
        return parse_codecs(self.codecs)
