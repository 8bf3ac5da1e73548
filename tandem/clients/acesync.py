"""ACE-Sync, edge side: train, then send the update as compressed as the budget says.

The edge does what the cloud's message says: the message carries the global
weights (as FedAvg's does) and an :class:`EdgePlan` in its ``config`` record
(byte budget, local steps, codec options, group size, ``γ``, importance
source, fill decay), plus the importance predictor's weights when the cloud
uses it. Nothing of ACE-Sync is read from the run config here, so the same
handler serves ``acesync``, ``fullsync`` (options ``full`` only) and ``topk``
(one top-k option), and any strategy wrapped in
:class:`tandem.strategies.compressed.CompressedUpdates`.

Per round (seed 004; :func:`compress_update` holds steps 3-8):

1. Train ``local-steps`` SGD steps from the global weights ``θ``
   (:func:`tandem.training.train_steps`, the loop every method shares).
2. The update ``g = θ_k − θ`` over every float tensor, cut into groups
   (:class:`GroupLayout`, eq. 1).
3. Error feedback, eq. 7: ``g̃ = g + γ·e`` with the residual ``e`` kept in
   ``Context.state``.
4. Importance per group (eqs. 3-4): a score ``s_i`` in ``[0, 1]`` from the
   cloud's predictor on temporal features (RMS of ``g̃`` per group over the
   last rounds) and structural ones, or from the latest RMS alone (the
   magnitude ablation). The knapsack's value of group ``i`` is
   ``I_i = s_i · ‖g̃_i‖²``, so that with the codecs' fidelities (fraction of
   a group's energy kept) it maximizes the importance-weighted update energy
   that reaches the cloud: the score says which groups matter, the energy
   how much there is to lose. (Valuing groups by ``s_i · n_i`` instead ended
   1.4 points lower on the benchmark's workload, mean of seeds 0 and 1.)
5. Knapsack (eq. 2 generalised): one codec per group within the budget
   (:func:`tandem.compression.knapsack.select_options`).
6. Encode (eq. 6 for ``sign``) and pack the groups into two arrays
   (:func:`tandem.compression.packing.encode_packed`, vectorized; the same
   bytes as :func:`~tandem.compression.codecs.encode` per group). ``sent_i``
   is the decoded payload, or for a deferred group the stand-in the cloud
   will use: ``decay^a · u_i``, the last update sent for it ``a`` rounds ago
   (the edge mirrors the cloud's cache, so both compute the same value).
7. New residual ``e ← g̃ − sent`` (as
   :func:`tandem.compression.feedback.feedback_step`): what the cloud did not
   get, or got in excess from the cached stand-in, is carried to the next
   round.
8. Reply with the two arrays, the metrics and the node record.

Time for steps 3-8 is reported as ``overhead-seconds`` next to the training
compute (``train-compute-seconds``); ``compute-seconds`` (what the virtual
clock charges the edge) is their sum.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from tandem.accounting import KEY_COMPUTE_SECONDS
from tandem.clients.fedavg import evaluate_handler
from tandem.clients.node import (
    KEY_NODE,
    NodeConfig,
    load_node_split,
    node_record,
    restore_stream,
    save_stream,
)
from tandem.compression.codecs import CodecError, Option, option_table
from tandem.compression.feedback import compensate
from tandem.compression.groups import ParamGroup, group_sizes, make_groups, unflatten
from tandem.compression.knapsack import select_options
from tandem.compression.packing import encode_packed
from tandem.config import RunConfig
from tandem.datasets import load_dataset
from tandem.importance import (
    STRUCTURAL_FEATURES,
    GroupMeta,
    ImportancePredictor,
    PredictorError,
    layer_kind,
    magnitude_scores,
    predict_importance,
    predictor_from_arrays,
    predictor_to_arrays,
    structural_features,
    temporal_features,
)
from tandem.models import build_model, resolve_device
from tandem.training import capped_steps, make_optimizer, train_steps
from tandem.wire import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_LOCAL_STEPS,
    KEY_METRICS,
    PayloadError,
    arrays_to_state_dict,
    get_record,
)

__all__ = [
    "EDGE_METRICS",
    "HANDLERS",
    "IMPORTANCE_SOURCES",
    "KEY_PREDICTOR",
    "KEY_UPDATE",
    "CompressedUpdate",
    "EdgePlan",
    "EdgeState",
    "GroupLayout",
    "compress_update",
    "format_codecs",
    "pack_predictor",
    "parse_codecs",
    "train_handler",
    "unpack_predictor",
]

#: Reply record holding the packed update: ``codecs`` uint8 (n,), ``payload``
#: uint8 (B,) (see :mod:`tandem.compression.packing`).
KEY_UPDATE = "update"
#: Message record holding the importance predictor: ``weights`` float32, the
#: predictor's tensors flattened in ``state_dict`` order.
KEY_PREDICTOR = "predictor"
#: Where the edge keeps residuals, magnitude history and its mirror of the
#: cloud's cache, in ``Context.state``.
STATE_KEY = "acesync.edge"
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
#: Column of the density feature in :func:`structural_features`.
_DENSITY = STRUCTURAL_FEATURES.index("density")


# --------------------------------------------------------------------------- codecs
def parse_codecs(text: str) -> tuple[Option, ...]:
    """``"full,half,topk@0.1,sign,defer"`` → the :class:`Option` s, in order.

    Raises
    ------
    CodecError
        On an empty list, an unknown codec, a bad ratio, a duplicate, or more
        than 256 options.
    """
    if not isinstance(text, str) or not text.strip():
        raise CodecError(f"codec list must be a non-empty string, got {text!r}")
    options = []
    for item in (part.strip() for part in text.split(",")):
        kind, at, ratio = item.partition("@")
        if at:
            try:
                value = float(ratio)
            except ValueError:
                raise CodecError(f"codec {item!r}: ratio is not a number") from None
            options.append(Option(kind, value))  # type: ignore[arg-type]
        else:
            options.append(Option(kind))  # type: ignore[arg-type]
    if len(set(options)) != len(options):
        raise CodecError(f"codec list {text!r} repeats an option")
    if len(options) > 256:
        raise CodecError(f"at most 256 options, got {len(options)}")
    return tuple(options)


def format_codecs(options: Sequence[Option]) -> str:
    """Inverse of :func:`parse_codecs`."""
    return ",".join(
        o.kind if o.ratio is None else f"{o.kind}@{o.ratio!r}" for o in options
    )


# --------------------------------------------------------------------------- plan
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


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class GroupLayout:
    """The parameter groups of a model, agreed on by edge and cloud (eq. 1).

    Every floating-point tensor of the state dict, in its order, is cut into
    groups of at most ``chunk`` elements (:func:`make_groups`); other tensors
    (e.g. batch-norm counters) are not part of the update and keep the global
    value. Group ``i`` covers ``[starts[i], starts[i] + sizes[i])`` of the
    flat vector that concatenates those tensors.

    Attributes
    ----------
    keys : tuple[str, ...]
        The float tensors, in state-dict order.
    shapes : tuple[tuple[int, ...], ...]
        Their shapes.
    groups : tuple[ParamGroup, ...]
        The ``n`` groups.
    sizes, starts : np.ndarray
        ``(n,)`` int64 elements and flat offsets per group.
    metas : tuple[GroupMeta, ...]
        Structural description of each group (depth, sizes, layer kind).
    num_layers : int
        Distinct layers (module paths) among the tensors.
    dense_structural : np.ndarray
        ``(n, 8)`` structural features with density 1 (see :meth:`structural`).
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[ParamGroup, ...]
    sizes: np.ndarray
    starts: np.ndarray
    metas: tuple[GroupMeta, ...]
    num_layers: int
    dense_structural: np.ndarray

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], chunk: int) -> GroupLayout:
        """The layout of a state dict given as numpy arrays."""
        shapes = {
            key: tuple(int(d) for d in np.shape(a))
            for key, a in arrays.items()
            if np.asarray(a).dtype.kind == "f"
        }
        groups = tuple(make_groups(shapes, chunk))
        sizes = group_sizes(groups)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        layers: dict[str, int] = {}
        for key in shapes:
            layers.setdefault(key.rpartition(".")[0], len(layers))
        metas = tuple(
            GroupMeta(
                name=g.name,
                depth=layers[g.name.rpartition(".")[0]],
                size=max(g.size, 1),
                layer_size=max(math.prod(g.shape), 1),
                kind=layer_kind(g.name, g.shape),
            )
            for g in groups
        )
        num_layers = max(len(layers), 1)
        return cls(
            tuple(shapes),
            tuple(shapes.values()),
            groups,
            sizes,
            starts,
            metas,
            num_layers,
            structural_features(metas, num_layers),
        )

    @property
    def total(self) -> int:
        """Elements in the flat vector, ``N``."""
        return int(self.sizes.sum())

    @property
    def full_bytes(self) -> int:
        """Bytes of the whole update in float32, ``4N``."""
        return 4 * self.total

    @property
    def labels(self) -> list[str]:
        """``ParamGroup.key`` of each group, for messages."""
        return [g.key for g in self.groups]

    def flat(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float tensors of ``arrays`` as one float32 vector ``(N,)``.

        Raises
        ------
        ValueError
            If a tensor is missing or has another shape.
        """
        parts = []
        for key, shape in zip(self.keys, self.shapes, strict=True):
            if key not in arrays:
                raise ValueError(f"arrays has no tensor '{key}'")
            a = np.asarray(arrays[key])
            if a.shape != shape:
                raise ValueError(f"arrays['{key}'] has shape {a.shape}, not {shape}")
            parts.append(a.astype(np.float32, copy=False).reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def unflat(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Inverse of :meth:`flat`: float32 tensors by name."""
        chunks = np.split(np.asarray(vector, dtype=np.float32), self.starts[1:])
        return unflatten(chunks, self.groups)

    def group_rms(self, vector: np.ndarray) -> np.ndarray:
        """Root mean square of each group of a flat vector, ``(n,)`` float64."""
        squares = np.square(vector, dtype=np.float64)
        sums = np.add.reduceat(squares, self.starts) if self.total else squares
        return np.sqrt(sums / np.maximum(self.sizes, 1))

    def group_sq_norms(self, vector: np.ndarray) -> np.ndarray:
        """``‖v_i‖²`` of each group of a flat vector, ``(n,)`` float64."""
        squares = np.square(vector, dtype=np.float64)
        return np.add.reduceat(squares, self.starts) if self.total else squares

    def structural(self, weights: np.ndarray) -> np.ndarray:
        """Structural features ``(n, 8)`` (:func:`structural_features`).

        ``density`` is the fraction of nonzero global weights in each group.
        """
        nonzero = np.add.reduceat((weights != 0).astype(np.float64), self.starts)
        features = self.dense_structural.copy()
        features[:, _DENSITY] = np.clip(nonzero / np.maximum(self.sizes, 1), 0, 1)
        return features


# --------------------------------------------------------------------------- predictor
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


# --------------------------------------------------------------------------- state
@dataclass
class EdgeState:
    """One edge's ACE-Sync memory between rounds (kept in ``Context.state``).

    Attributes
    ----------
    residual : np.ndarray
        ``(N,)`` float32: the error-feedback residual ``e`` (eq. 7).
    history : np.ndarray
        ``(H, n)`` float64: RMS of ``g̃`` per group over the last ``H``
        rounds, oldest first (zeros before the first).
    cache : np.ndarray
        ``(N,)`` float32: the last update sent for each group.
    cache_round : np.ndarray
        ``(n,)`` int64: the round it was sent in, ``-1`` if never.
    """

    residual: np.ndarray
    history: np.ndarray
    cache: np.ndarray
    cache_round: np.ndarray

    @classmethod
    def fresh(cls, layout: GroupLayout, history: int) -> EdgeState:
        """The state before the first round."""
        n = len(layout.groups)
        return cls(
            np.zeros(layout.total, np.float32),
            np.zeros((history, n), np.float64),
            np.zeros(layout.total, np.float32),
            np.full(n, -1, np.int64),
        )

    @classmethod
    def load(cls, context: Context, layout: GroupLayout, history: int) -> EdgeState:
        """The state from ``context.state``; fresh if absent or of another layout."""
        record = context.state.array_records.get(STATE_KEY)
        if record is None:
            return cls.fresh(layout, history)
        arrays = {k: record[k].numpy() for k in record}
        state = cls(
            arrays["residual"],
            arrays["history"],
            arrays["cache"],
            arrays["cache-round"],
        )
        n = len(layout.groups)
        if state.residual.shape != (layout.total,) or state.cache_round.shape != (n,):
            return cls.fresh(layout, history)
        # a changed history length keeps the most recent rows
        rows = state.history[-history:]
        pad = np.zeros((history - rows.shape[0], n), np.float64)
        state.history = np.vstack([pad, rows])
        return state

    def save(self, context: Context) -> None:
        """Store the state in ``context.state``."""
        context.state[STATE_KEY] = ArrayRecord(
            {
                "residual": Array(np.ascontiguousarray(self.residual)),
                "history": Array(np.ascontiguousarray(self.history)),
                "cache": Array(np.ascontiguousarray(self.cache)),
                "cache-round": Array(np.ascontiguousarray(self.cache_round)),
            }
        )


# --------------------------------------------------------------------------- compress
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


def fill_values(
    state: EdgeState, layout: GroupLayout, server_round: int, decay: float
) -> np.ndarray:
    """The cloud's stand-ins for deferred groups, ``decay^age · cached`` ``(N,)``.

    Mirrors :func:`tandem.coordination.fill_from_history` on the cloud: zero
    for a group never sent.
    """
    age = server_round - state.cache_round
    factor = np.where(state.cache_round >= 0, float(decay) ** np.maximum(age, 0), 0.0)
    return (np.repeat(factor, layout.sizes) * state.cache).astype(np.float32)


def compress_update(
    update: np.ndarray,
    weights: np.ndarray,
    state: EdgeState,
    plan: EdgePlan,
    layout: GroupLayout,
    predictor: ImportancePredictor | None = None,
) -> CompressedUpdate:
    """Steps 3-8 of the module docstring on one flat update; updates ``state``.

    Parameters
    ----------
    update : np.ndarray
        ``(N,)`` float32: ``g = θ_k − θ``.
    weights : np.ndarray
        ``(N,)``: the global weights ``θ`` (for the structural features).
    state : EdgeState
        Residuals, history and cache; changed in place.
    plan : EdgePlan
        The round's budget, options and settings.
    layout : GroupLayout
        The model's groups.
    predictor : ImportancePredictor or None
        Needed when ``plan.importance == "predictor"``.

    Raises
    ------
    PayloadError
        If the budget is below the cheapest choice (no zero-cost option).
    """
    # 3. error feedback (eq. 7)
    compensated = compensate(update, state.residual, plan.gamma)
    # 4. importance (eqs. 3-4): the score times the group's energy ‖g̃_i‖²
    energy = layout.group_sq_norms(compensated)
    rms = np.sqrt(energy / np.maximum(layout.sizes, 1))
    state.history = np.vstack([state.history[1:], rms[None, :]])
    if plan.importance == "predictor":
        if predictor is None:
            raise PayloadError(f"the plan asks for the predictor; no '{KEY_PREDICTOR}'")
        score = predict_importance(
            predictor, temporal_features(state.history), layout.structural(weights)
        )
    elif plan.importance == "magnitude":
        score = magnitude_scores(rms)
    else:
        score = np.ones(len(layout.groups))
    importance = np.clip(score, 0.0, None) * energy
    # 5. knapsack within the budget
    costs, fidelity = option_table(plan.codecs, layout.sizes)
    try:
        selection = select_options(importance, costs, fidelity, budget=plan.budget)
    except ValueError as err:
        raise PayloadError(f"budget {plan.budget} bytes: {err}") from None
    # 6. encode and pack (eq. 6 for sign); decoded = what the cloud will see,
    #    and for a deferred group the cloud's stand-in from its cache
    codes, payload, decoded = encode_packed(
        compensated, layout.sizes, selection.choice, plan.codecs
    )
    is_defer = np.array([option.kind == "defer" for option in plan.codecs])
    deferred = is_defer[selection.choice]
    if deferred.any():
        deferred_elements = np.repeat(deferred, layout.sizes)
        fills = fill_values(state, layout, plan.server_round, plan.fill_decay)
        sent = np.where(deferred_elements, fills, decoded)
        state.cache = np.where(deferred_elements, state.cache, decoded)
    else:
        sent = state.cache = decoded
    state.cache_round[~deferred] = plan.server_round
    # 7. error feedback: e ← g̃ − sent (sent + e == g̃, nothing is lost)
    state.residual = compensated - sent
    total = float(energy.sum())
    lost = float(np.dot(state.residual, state.residual))
    return CompressedUpdate(
        codecs=codes,
        payload=payload,
        sent=sent,
        encoded_bytes=int(payload.size),
        kept_fraction=1.0 - lost / total if total > 0 else 1.0,
        groups_sent=float(np.mean(~deferred)) if deferred.size else 1.0,
    )


# --------------------------------------------------------------------------- handler
def _clock() -> float:
    """The clock :func:`tandem.training.train_steps` measures compute with."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def train_handler(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train the received model, then reply with the compressed update."""
    node = NodeConfig.from_node_config(context.node_config)
    conf = get_record(msg.content, KEY_CONFIG, ConfigRecord)
    plan = EdgePlan.from_config(conf)  # type: ignore[arg-type]
    predictor = None
    if plan.importance == "predictor":
        record = get_record(msg.content, KEY_PREDICTOR, ArrayRecord)
        if "weights" not in record:  # type: ignore[operator]
            raise PayloadError(f"record '{KEY_PREDICTOR}' has no 'weights'")
        try:
            predictor = unpack_predictor(record["weights"].numpy())  # type: ignore[index]
        except PredictorError as err:
            raise PayloadError(str(err)) from None
    bundle = load_dataset(cfg.data)
    split = load_node_split(cfg, node, "train")
    device = resolve_device(cfg.train.edge_device, "edge-device")
    model = build_model(
        cfg.train.model, bundle.input_shape, bundle.num_classes, cfg.seed
    )
    record = get_record(msg.content, KEY_ARRAYS, ArrayRecord)
    model.load_state_dict(arrays_to_state_dict(record, model))  # type: ignore[arg-type]
    global_state = _numpy_state(model)
    layout = GroupLayout.from_arrays(global_state, plan.chunk)
    weights = layout.flat(global_state)

    # 1. local training
    model.to(device)
    stream = restore_stream(
        context, split, cfg.train.batch_size, node.stream_seed(cfg.seed)
    )
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.momentum)
    t = cfg.train
    steps = capped_steps(plan.local_steps, t.local_epochs, len(split), t.batch_size)
    stats = train_steps(model, iter(stream), steps, optimizer, device)
    save_stream(context, stream)

    # 2-8. the update, compressed
    tick = _clock()
    update = layout.flat(_numpy_state(model)) - weights
    state = EdgeState.load(context, layout, plan.history)
    out = compress_update(update, weights, state, plan, layout, predictor)
    state.save(context)
    overhead = _clock() - tick

    metrics = {
        "train-loss": stats.mean_loss,
        "num-examples": len(split),
        "train-seconds": stats.seconds,
        KEY_COMPUTE_SECONDS: stats.compute_seconds + overhead,
        "train-compute-seconds": stats.compute_seconds,
        "overhead-seconds": overhead,
        "steps": stats.steps,
        "bytes-budget": plan.budget,
        "bytes-encoded": out.encoded_bytes,
        "kept-fraction": out.kept_fraction,
        "groups-sent": out.groups_sent,
        "update-norm": float(np.linalg.norm(update.astype(np.float64))),
        "residual-norm": float(np.linalg.norm(state.residual.astype(np.float64))),
    }
    reply = RecordDict(
        {
            KEY_UPDATE: ArrayRecord(
                {"codecs": Array(out.codecs), "payload": Array(out.payload)}
            ),
            KEY_METRICS: MetricRecord(metrics),
            KEY_NODE: node_record(node),
        }
    )
    return Message(content=reply, reply_to=msg)


HANDLERS = {"train": train_handler, "evaluate": evaluate_handler}
