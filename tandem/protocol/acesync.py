"""ACE-Sync's contract between cloud and edge (also ``fullsync`` and ``topk``).

What crosses the wire each round, and how each side builds and reads it:

- down, the train message: the global arrays, a config record carrying an
  :class:`EdgePlan` (:meth:`EdgePlan.to_config` / :meth:`EdgePlan.from_config`)
  and a :class:`DownlinkHeader`, and, when the cloud ranks groups with its
  predictor, the record :data:`KEY_PREDICTOR` (:func:`predictor_record` /
  :func:`read_predictor`). With a compressed downlink the arrays record holds
  only the tensors outside the groups (integers), and the record
  :data:`KEY_DOWNLINK` the packed delta since the version the edge holds
  (:func:`downlink_record` / :func:`read_downlink`);
- up, the reply: the record :data:`KEY_UPDATE` with the codec table and the
  packed payload (:func:`update_record` / :func:`read_update`), the metrics
  :data:`EDGE_METRICS` (``model-digest``: the
  :func:`~tandem.compression.downlink.model_digest` of the model the edge
  trained from) and the node record.

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
    "HOLD_METRICS",
    "IMPORTANCE_SOURCES",
    "KEY_DOWNLINK",
    "KEY_PREDICTOR",
    "KEY_UPDATE",
    "AceSyncOptions",
    "DownlinkHeader",
    "EdgePlan",
    "downlink_record",
    "pack_predictor",
    "predictor_record",
    "read_downlink",
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
#: Message record holding a compressed downlink delta: ``codecs`` uint8 (n,),
#: ``payload`` uint8 (B,), the uplink's packed format.
KEY_DOWNLINK = "downlink"
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
        "model-digest",
    }
)

#: Metric keys of a reply to a ``hold`` plan (the cloud checks the set
#: exactly): the training's, no update.
HOLD_METRICS = frozenset(
    {
        "train-loss",
        "num-examples",
        "train-seconds",
        KEY_COMPUTE_SECONDS,
        "train-compute-seconds",
        "steps",
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
_RESUME = "acesync-resume"
_HOLD = "acesync-hold"
# Train-config keys of a DownlinkHeader.
_DOWN_VERSION = "acesync-down-version"
_DOWN_BASE = "acesync-down-base"
_DOWN_BUDGET = "acesync-down-budget"


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
    resume : bool
        Continuous synchronization: train on from the model in progress
        (kept on the edge since the interval's first round); the message
        carries no model.
    hold : bool
        Continuous synchronization: keep the trained model in progress and
        reply with the training metrics alone (:data:`HOLD_METRICS`), no
        update.
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
    resume: bool = False
    hold: bool = False

    @classmethod
    def from_options(
        cls,
        options: AceSyncOptions,
        *,
        budget: int,
        local_steps: int,
        server_round: int,
        importance: str = "predictor",
    ) -> EdgePlan:
        """A plan with the codec settings of ``options``."""
        return cls(
            budget=int(budget),
            codecs=options.options,
            chunk=options.chunk,
            gamma=options.gamma,
            importance=importance,
            fill_decay=options.fill_decay,
            history=options.history,
            local_steps=int(local_steps),
            server_round=int(server_round),
        )

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
            _RESUME: bool(self.resume),
            _HOLD: bool(self.hold),
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

        def flag(key: str) -> bool:  # optional; False if absent
            value = config.get(key, False)
            if not isinstance(value, bool):
                raise PayloadError(f"train config '{key}' = {value!r}: must be a bool")
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
            resume=flag(_RESUME),
            hold=flag(_HOLD),
        )


@dataclass(frozen=True)
class DownlinkHeader:
    """What a train message says about the model it carries (config record).

    Attributes
    ----------
    version : int
        The model version the edge holds once it has applied the message
        (the round the cloud sent it in).
    base : int
        ``-1`` for a full model; else the version the delta in
        :data:`KEY_DOWNLINK` applies to (the edge must hold exactly it).
    budget : int
        Most payload bytes the delta may take (0 for a full model).
    """

    version: int
    base: int = -1
    budget: int = 0

    @property
    def full(self) -> bool:
        """Whether the message carries the whole model."""
        return self.base < 0

    def to_config(self) -> dict[str, int]:
        """The header as train-config entries."""
        return {
            _DOWN_VERSION: int(self.version),
            _DOWN_BASE: int(self.base),
            _DOWN_BUDGET: int(self.budget),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> DownlinkHeader:
        """Read and check a header; a message without one carries a full model
        of version ``server-round`` (a plain FedAvg message).

        Raises
        ------
        PayloadError
            Naming the key that breaks its rule.
        """
        if _DOWN_VERSION not in config:
            round_ = config.get(_ROUND, 0)
            return cls(version=round_ if isinstance(round_, int) else 0)
        values = {}
        for key, low in ((_DOWN_VERSION, 0), (_DOWN_BASE, -1), (_DOWN_BUDGET, 0)):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PayloadError(
                    f"train config '{key}' = {value!r}: must be an integer >= {low}"
                )
            values[key] = value
        header = cls(values[_DOWN_VERSION], values[_DOWN_BASE], values[_DOWN_BUDGET])
        if header.base > header.version:
            raise PayloadError(
                f"train config '{_DOWN_BASE}' = {header.base} is after "
                f"'{_DOWN_VERSION}' = {header.version}"
            )
        return header


def downlink_record(codecs: np.ndarray, payload: np.ndarray) -> ArrayRecord:
    """The :data:`KEY_DOWNLINK` record: codec table and packed delta."""
    return ArrayRecord({"codecs": Array(codecs), "payload": Array(payload)})


def read_downlink(
    content: RecordDict, *, groups: int | None = None, max_bytes: int | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(codecs, payload)`` of a message's :data:`KEY_DOWNLINK` record, or
    ``None`` if it has none; each array's bytes checked by
    :func:`~tandem.wire.read_array` (at most ``groups`` codec entries and
    ``max_bytes`` payload bytes, before either is read; the values by
    :func:`~tandem.compression.downlink.apply_downlink`).

    Raises
    ------
    PayloadError
        If the record holds other arrays or an array's bytes are malformed.
    """
    record = content.array_records.get(KEY_DOWNLINK)
    if record is None:
        return None
    if set(record.keys()) != {"codecs", "payload"}:
        raise PayloadError(
            f"record '{KEY_DOWNLINK}' has arrays {sorted(record.keys())}, "
            "expected ['codecs', 'payload']"
        )
    return read_array(record["codecs"], "codecs", max_bytes=groups), read_array(
        record["payload"], "payload", max_bytes=max_bytes
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
        Seed eq. 9: a device whose divergence (per round of local steps
        with ``interval``) exceeds this multiple of the median is synced
        more often; 0 turns divergence control off (every device syncs every
        round).
    sync_action : str
        What "sync more often" means. ``interval`` (the default, dynamic
        synchronization): each device syncs every ``r_k`` rounds and trains
        ``r_k`` rounds' worth of local steps in between; a drifting device's
        ``r_k`` halves, a stable one's grows by one, within
        [``min_interval``, ``max_interval``]
        (:func:`~tandem.coordination.adjust_intervals`), and a round sends
        only to the devices that are due. ``budget`` (double the byte
        budget: the device's next update loses less), ``steps`` (halve its
        local steps) or ``both``: every device syncs every round. In
        synchronous rounds fewer steps also shrink a drifting device's share
        of the progress, which on label-skewed data biases the model (on the
        benchmark's workload, in-process, 3 seeds: 91.6% final accuracy with
        ``budget``, 89.1% with ``both``, 92.0% for FullSync; noise is about
        ±1 point); ``interval`` keeps every device's share of the steps.
    stable_ratio : float
        ``interval``: a device whose divergence per round is at most this
        multiple of the median syncs less often.
    min_interval, max_interval : int
        ``interval``: bounds on a device's sync interval (rounds).
    interval_mode : str
        ``interval``: how a device spends an interval of ``r_k`` rounds.
        ``continuous`` (the default): it is sent a message every round and
        trains ``local-steps`` each time (the model comes in the interval's
        first round, the update goes up in its last:
        :func:`~tandem.coordination.interval_phase`), so every round lasts
        one round of steps and only the syncs are fewer. ``batched``: it is
        sent nothing until the interval's last round, then trains
        ``r_k × local-steps`` steps in that round, so the round lasts as long
        as its slowest device's ``r_k`` rounds of steps.
    min_steps : int
        Floor on a tightened device's local steps (``steps``, ``both``).
    max_budget_scale : float
        Cap on a tightened device's budget multiplier (``budget``, ``both``).
    downlink : str
        ``compressed``: each device is sent the delta since the model it
        holds, chosen by importance and knapsack within its downlink budget
        (:mod:`tandem.compression.downlink`); ``full``: the whole model every
        time.
    down_c_min, down_c_max : float
        Eq. 5 on the device's downlink bandwidth: the downlink budget is
        ``(1 − c)·4N`` bytes, less the round's broadcast records (the
        predictor).
    down_max_age : int
        A device last synced more than this many rounds ago gets the full
        model.
    down_min_kept : float
        A compressed downlink must deliver at least this share of the gap's
        energy (``kept_fraction``, ``1 − ‖δ − decode(δ)‖² / ‖δ‖²``); below it
        the device gets the full model. On links too slow for the budget to
        keep up, a device's model would otherwise drift from the cloud's, and
        updates trained from it pull the global model apart (measured: 3
        devices on 0.1 Mbit/s links diverged to an eval-loss of 10 in 8
        rounds without it).
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
        "acesync-sync-action",
        "interval",
        choices=("interval", "budget", "both", "steps"),
    )
    stable_ratio: float = option(
        "acesync-stable-ratio",
        0.75,
        "must be >= 0 (multiple of the median divergence per round)",
        lambda r: r >= 0,
    )
    min_interval: int = option(
        "acesync-min-interval", 1, "must be >= 1 (rounds)", lambda n: n >= 1
    )
    max_interval: int = option(
        "acesync-max-interval", 2, "must be >= 1 (rounds)", lambda n: n >= 1
    )
    interval_mode: str = option(
        "acesync-interval-mode", "continuous", choices=("continuous", "batched")
    )
    min_steps: int = option("acesync-min-steps", 10, "must be >= 1", lambda n: n >= 1)
    max_budget_scale: float = option(
        "acesync-max-budget-scale", 2.0, "must be >= 1", lambda f: f >= 1
    )
    downlink: str = option(
        "acesync-downlink", "compressed", choices=("compressed", "full")
    )
    down_c_min: float = option(
        "acesync-down-c-min", 0.70, "must lie in [0, 1]", _fraction
    )
    down_c_max: float = option(
        "acesync-down-c-max", 0.95, "must lie in [0, 1]", _fraction
    )
    down_max_age: int = option(
        "acesync-down-max-age", 4, "must be >= 1 (rounds)", lambda n: n >= 1
    )
    down_min_kept: float = option(
        "acesync-down-min-kept",
        0.6,
        "must be in [0, 1] (share of the gap's energy)",
        lambda f: 0.0 <= f <= 1.0,
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
        if self.down_c_min > self.down_c_max:
            raise ConfigError(
                "acesync-down-c-max",
                self.down_c_max,
                f"must be >= acesync-down-c-min ({self.down_c_min})",
            )
        if self.min_interval > self.max_interval:
            raise ConfigError(
                "acesync-max-interval",
                self.max_interval,
                f"must be >= acesync-min-interval ({self.min_interval})",
            )
        if self.divergence_threshold > 0 and self.stable_ratio > (
            self.divergence_threshold
        ):
            raise ConfigError(
                "acesync-stable-ratio",
                self.stable_ratio,
                "must not exceed acesync-divergence-threshold "
                f"({self.divergence_threshold})",
            )
        if self.down_max_age < self.max_interval:
            raise ConfigError(
                "acesync-down-max-age",
                self.down_max_age,
                f"must be >= acesync-max-interval ({self.max_interval}): a device "
                "that syncs on schedule must not be too stale",
            )
        if not math.isfinite(self.beta):
            raise ConfigError("acesync-beta", self.beta, "must be finite")

    @cached_property
    def options(self) -> tuple[Option, ...]:
        """:attr:`codecs` parsed (once: checked when the run starts, kept)."""
        return parse_codecs(self.codecs)
