"""Compressed uplink for any Flower FedAvg-family strategy: a wrapper.

:class:`CompressedUpdates` wraps a strategy of Flower's FedAvg family
(``FedAvg``, ``FedAvgM``, ``FedAdam``, ``FedYogi`` ...) the way Flower's own
``DifferentialPrivacyServerSideFixedClipping`` wraps one: it delegates
sampling and aggregation to the inner strategy and only changes what crosses
the wire on the way up.

- ``configure_train``: the inner strategy samples nodes and builds its
  messages (global arrays + config); the wrapper gives each node its own
  :class:`~tandem.protocol.acesync.EdgePlan` in the config record (byte budget,
  local steps, codec options, group size, ``γ``, importance source, fill
  decay) and any broadcast records (e.g. the importance predictor).
- The edge (:mod:`tandem.clients.acesync`) trains, compresses its update
  ``g = θ_k − θ`` within the budget (error feedback, knapsack, codecs) and
  replies with two arrays: a codec table and a packed byte stream.
- ``aggregate_train``: each reply is checked and decoded
  (:meth:`CompressedUpdates.decode_replies`: records, size, codec table,
  exact payload length, bytes within the budget, every group under the
  rules of :func:`~tandem.compression.codecs.decode`
  (:func:`~tandem.compression.packing.unpack_flat`), metrics); a bad reply is
  reported through ``on_reject`` with the reason and dropped, touching
  nothing (no cache, no weight, no model). Groups a node did not send are
  filled from its cached history, ``decay^age · u_i``
  (:func:`~tandem.compression.pipeline.fill_unsent`, the function the edge
  mirrors the cloud with; the edge's error feedback keeps the difference).
  Each good reply is then rewritten as a plain FedAvg reply, ``θ + û_k``
  with weight ``ω_k``, and handed to the inner strategy's own
  ``aggregate_train``: FedAvg computes
  ``Σ_k ω_k (θ + û_k) = θ + Σ_k ω_k û_k`` (seed 004, eq. 8), FedAdam its
  adaptive step on the same pseudo-gradient, and so on.

Subclasses decide the policy through eight hooks, each a no-op or neutral by
default: :meth:`~CompressedUpdates.select` (which of the sampled nodes
train this round; default: all), :meth:`~CompressedUpdates.plan` (budget
and local steps per node;
default: no byte limit, the run's local steps), :meth:`~CompressedUpdates.broadcast`
(extra records for every message), :meth:`~CompressedUpdates.downlink`
(what a node's message carries of the model; default: the whole model),
:meth:`~CompressedUpdates.forget` (a node's model is no longer known: an
error, a missing reply or a digest mismatch), :meth:`~CompressedUpdates.received`
(bookkeeping on the decoded replies), :meth:`~CompressedUpdates.weights`
(``ω``; default: data size, as FedAvg) and :meth:`~CompressedUpdates.observe`
(after aggregation). :class:`tandem.strategies.acesync.AceSync` is ACE-Sync's
policy; ``fullsync`` and ``topk`` use the wrapper as it is.

The weight ``ω_k`` is written into the rewritten reply's metric named by the
inner strategy's ``weighted_by_key`` as ``ω_k · Σ_j n_j`` ("effective
examples"): with data-size weights that is ``n_k`` itself, so a wrapper whose
codecs keep everything (``full`` only) reproduces the inner strategy.

Every reply carries ``model-digest``, the digest of the model the node
trained from (:func:`~tandem.compression.downlink.model_digest`); the cloud
compares it with the digest of what it believes the node holds (the model
sent, or its record of the node's model after a compressed delta). A
mismatch rejects the reply, is counted, and :meth:`~CompressedUpdates.forget`
the node.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log

from tandem.accounting import payload_bytes
from tandem.compression.codecs import CodecError, Option, option_table
from tandem.compression.downlink import model_digest
from tandem.compression.layout import GroupLayout
from tandem.compression.packing import unpack_flat
from tandem.compression.pipeline import fill_unsent
from tandem.coordination import CachedUpdate, cache_arrays, refresh_cache
from tandem.failures import app_errors, stop_if_all_failed
from tandem.network import MAX_SPEC_CHARS
from tandem.protocol.acesync import (
    EDGE_METRICS,
    IMPORTANCE_SOURCES,
    KEY_UPDATE,
    EdgePlan,
    read_update,
)
from tandem.strategies.fedavg import missing_replies
from tandem.wire import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_LOCAL_STEPS,
    KEY_METRICS,
    KEY_NODE,
    PayloadError,
)

__all__ = ["CompressedUpdates", "CompressionStats", "DecodedUpdate"]

#: Bytes a reply may carry beyond its budget and codec table: Flower's
#: framing of two arrays and two small records (about 2 KB measured).
FRAMING_SLACK = 16384
#: Records a reply may carry.
REPLY_RECORDS = frozenset({KEY_UPDATE, KEY_METRICS, KEY_NODE})


@dataclasses.dataclass(frozen=True)
class DecodedUpdate:
    """One node's update as the cloud reconstructed it.

    Attributes
    ----------
    node_id : int
        The sender.
    update : np.ndarray
        ``(N,)`` float32: ``û_k``, decoded groups plus stand-ins for the
        groups not sent (zero where nothing is cached).
    sent : np.ndarray
        ``(n,)`` bool: groups the node sent this round.
    received : dict[int, np.ndarray]
        Group index → decoded update of the groups sent.
    metrics : dict[str, float]
        The reply's metrics (checked).
    bytes_up : int
        Serialized size of the reply.
    plan : EdgePlan
        What the node was asked to do.
    link : str
        The link the node declares in its node record ("" if none).
    transit_seconds : float | None
        Measured seconds from the reply's creation on the node to its pull
        (``MeteredGrid``), when the wrapper was given ``transit``.
    """

    node_id: int
    update: np.ndarray
    sent: np.ndarray
    received: dict[int, np.ndarray]
    metrics: dict[str, float]
    bytes_up: int
    plan: EdgePlan
    link: str = ""
    transit_seconds: float | None = None

    @property
    def num_examples(self) -> int:
        """The node's training examples (``n_k``)."""
        return int(self.metrics["num-examples"])


@dataclasses.dataclass
class CompressionStats:
    """What compression saved and cost, over a run (``compression_stats()``).

    Attributes
    ----------
    replies : int
        Replies accepted.
    rejected : int
        Replies rejected as malformed.
    budget_bytes, encoded_bytes, full_bytes : int
        Sums over accepted replies of the budget, of the payload bytes sent,
        and of the float32 size of the update.
    reply_bytes : int
        Sum of the accepted replies' serialized sizes.
    train_compute_seconds, overhead_seconds : float
        Edge training compute and edge selection + encoding time (reported).
    decode_seconds : float
        Cloud time spent checking and decoding replies.
    steps : int
        SGD steps of all accepted replies.
    full_sends, delta_sends : int
        Train messages that carried the whole model, and a compressed delta.
    down_encoded_bytes, down_full_bytes : int
        Sums over delta sends of the payload bytes and of the float32 size
        of the model.
    digest_mismatches : int
        Replies whose ``model-digest`` differed from the cloud's record of
        the device's model (rejected; the device gets the full model next).
    kept_fallbacks : int
        Compressed downlinks replaced by the full model because they would
        have delivered less than ``acesync-down-min-kept`` of the gap.
    """

    replies: int = 0
    rejected: int = 0
    budget_bytes: int = 0
    encoded_bytes: int = 0
    full_bytes: int = 0
    reply_bytes: int = 0
    train_compute_seconds: float = 0.0
    overhead_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    full_sends: int = 0
    delta_sends: int = 0
    down_encoded_bytes: int = 0
    down_full_bytes: int = 0
    digest_mismatches: int = 0
    kept_fallbacks: int = 0

    def as_summary(self) -> dict[str, float | int]:
        """Run-summary entries (bytes, ratios, seconds, shares)."""
        compute = self.train_compute_seconds
        return {
            "accepted-replies": self.replies,
            "bytes-encoded": self.encoded_bytes,
            "bytes-budget": self.budget_bytes,
            "encoded-ratio": self.encoded_bytes / self.full_bytes
            if self.full_bytes
            else float("nan"),
            "train-compute-seconds": compute,
            "overhead-seconds": self.overhead_seconds,
            "decode-seconds": self.decode_seconds,
            "overhead-share": self.overhead_seconds / compute
            if compute
            else float("nan"),
            "overhead-share-with-decode": (self.overhead_seconds + self.decode_seconds)
            / compute
            if compute
            else float("nan"),
            "edge-steps": self.steps,
            "downlink-full-sends": self.full_sends,
            "downlink-delta-sends": self.delta_sends,
            "downlink-encoded-ratio": self.down_encoded_bytes / self.down_full_bytes
            if self.down_full_bytes
            else float("nan"),
            "downlink-digest-mismatches": self.digest_mismatches,
            "downlink-kept-fallbacks": self.kept_fallbacks,
        }


def _finite_metrics(record: MetricRecord) -> dict[str, float]:
    keys = set(record.keys())
    if keys != EDGE_METRICS:
        raise PayloadError(
            f"metric keys differ: missing {sorted(EDGE_METRICS - keys)}, "
            f"unknown {sorted(keys - EDGE_METRICS)}"
        )
    out = {}
    for key in sorted(keys):
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PayloadError(f"metric '{key}' = {value!r} is not a number")
        if not math.isfinite(value):
            raise PayloadError(f"metric '{key}' = {value!r} is not finite")
        out[key] = float(value)
    return out


def _contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` C-contiguous, of any shape (``np.ascontiguousarray`` makes a 0-d
    array 1-d)."""
    return np.require(a, requirements="C")


def _plus(value: np.ndarray, update: np.ndarray | None) -> np.ndarray:
    """``θ + û`` for one tensor, in ``θ``'s float dtype if float32 or wider."""
    if update is None:
        return _contiguous(value)
    dtype = np.result_type(value.dtype, np.float32)
    return _contiguous(np.asarray(value, dtype=dtype) + update.astype(dtype))


def _like(a: np.ndarray, sent: np.ndarray) -> np.ndarray:
    """``a`` in the dtype and shape of ``sent``; integers rounded, not cut."""
    if np.issubdtype(sent.dtype, np.integer) and not np.issubdtype(a.dtype, np.integer):
        a = np.rint(a)
    return _contiguous(a.astype(sent.dtype, copy=False).reshape(sent.shape))


def _declared_link(content: RecordDict) -> str:
    """The link a reply's node record declares ("" if none or too long)."""
    node_info = content.config_records.get(KEY_NODE)
    link = node_info.get("link", "") if node_info is not None else ""
    return link if isinstance(link, str) and len(link) <= MAX_SPEC_CHARS else ""


class CompressedUpdates(Strategy):
    """Compressed uplink around a Flower FedAvg-family strategy.

    Parameters
    ----------
    strategy : FedAvg
        The inner strategy (``FedAvg`` or a subclass: ``FedAvgM``,
        ``FedAdam`` ...); it samples nodes and aggregates.
    codecs : Sequence[Option]
        The options every group chooses from (e.g. ``(Option("full"),)`` for
        full precision, ``(Option("topk", 0.1),)`` for top-k).
    chunk : int (default: 256)
        Elements per parameter group.
    gamma : float (default: 1.0)
        Error-feedback weight ``γ`` of eq. 7, in ``[0, 1]``.
    importance : str (default: "uniform")
        Score the edges rank groups by: ``uniform``, ``magnitude`` or
        ``predictor`` (needs :meth:`broadcast` to send one).
    fill_decay : float (default: 0.0)
        Per-round decay of the cached stand-in for a group not sent; 0 fills
        nothing.
    history : int (default: 5)
        Rounds of magnitudes behind the edges' temporal features.
    on_reject : callable, optional
        ``(server_round, node_id, reason) -> None`` for every rejected reply;
        by default a warning in Flower's log.
    max_examples : int, optional
        Largest credible ``num-examples`` (the training set's size).
    on_event : callable, optional
        ``(event, payload) -> None`` for run events (e.g.
        ``Tracker.log_event``).
    on_dropout : callable, optional
        ``(server_round, node_id, reason) -> None`` for each node sent a
        train message that answered with an error or not at all
        (:func:`~tandem.strategies.fedavg.missing_replies`).
    transit : callable, optional
        ``reply -> seconds | None``: the measured transit time of a reply
        (e.g. ``ByteLedger.transit_seconds``), kept in its
        :class:`DecodedUpdate`.

    Raises
    ------
    ValueError
        If ``strategy`` is not of the FedAvg family, ``codecs`` is empty,
        ``chunk < 1``, ``gamma`` or ``fill_decay`` is outside ``[0, 1]``,
        ``importance`` is unknown or ``history < 1``.
    """

    def __init__(
        self,
        strategy: FedAvg,
        *,
        codecs: Sequence[Option],
        chunk: int = 256,
        gamma: float = 1.0,
        importance: str = "uniform",
        fill_decay: float = 0.0,
        history: int = 5,
        on_reject: Callable[[int, int, str], None] | None = None,
        max_examples: int | None = None,
        on_event: Callable[[str, Mapping[str, object]], None] | None = None,
        on_dropout: Callable[[int, int, str], None] | None = None,
        transit: Callable[[Message], float | None] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, FedAvg):
            raise ValueError(
                "strategy must be Flower's FedAvg or a subclass (FedAvgM, FedAdam "
                f"...), got {type(strategy).__name__}"
            )
        if not codecs:
            raise ValueError("codecs must offer at least one option")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        if not 0.0 <= fill_decay <= 1.0:
            raise ValueError(f"fill_decay must lie in [0, 1], got {fill_decay}")
        if importance not in IMPORTANCE_SOURCES:
            raise ValueError(
                f"importance must be one of {', '.join(IMPORTANCE_SOURCES)}, "
                f"got {importance!r}"
            )
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        # hyperparameters
        self.strategy = strategy
        self.codecs = tuple(codecs)
        self.chunk = int(chunk)
        self.gamma = float(gamma)
        self.importance = importance
        self.fill_decay = float(fill_decay)
        self.history = int(history)
        self.on_reject = on_reject or self._log_reject
        self.max_examples = max_examples
        self.on_event = on_event or (lambda _event, _payload: None)
        self.on_dropout = on_dropout
        self.transit = transit
        # internal state
        self.layout: GroupLayout | None = None
        self.current: np.ndarray | None = None  # flat θ sent this round
        self._current_arrays: dict[str, np.ndarray] = {}
        self._plans: dict[int, EdgePlan] = {}
        self._expected: dict[int, int | None] = {}  # node -> digest of its model
        self._caches: dict[int, dict[int, CachedUpdate]] = {}
        self.bytes_down: dict[int, int] = {}
        self.last_updates: dict[int, DecodedUpdate] = {}
        self.last_weights: dict[int, float] = {}
        #: Each device's most recent accepted update and its ``ω`` (a device on
        #: a longer sync interval keeps the one from its last sync; a device
        #: that missed a reply is dropped).
        self.recent_updates: dict[int, tuple[DecodedUpdate, float]] = {}
        #: Rounds done before this strategy started (a resumed run): Flower
        #: counts its rounds from 1, plans and caches use the run's rounds.
        self.round_offset = 0
        self.last_round = 0
        # stats
        self.stats = CompressionStats()

    # ------------------------------------------------------------------ hooks
    def plan(
        self, server_round: int, node_ids: Sequence[int], config: ConfigRecord
    ) -> dict[int, EdgePlan]:
        """Each node's plan this round.

        Default: no byte limit beyond every group at its costliest option,
        and the ``local-steps`` of ``config`` (else 1).
        """
        layout = self._require_layout()
        costs, _ = option_table(self.codecs, layout.sizes)
        budget = int(costs.max(axis=1).sum())
        steps = config.get(KEY_LOCAL_STEPS, 1)
        return {
            node: self.make_plan(server_round, budget, int(steps))  # type: ignore[arg-type]
            for node in node_ids
        }

    def select(self, server_round: int, node_ids: Sequence[int]) -> list[int]:
        """The sampled nodes that train this round (default: all of them)."""
        return list(node_ids)

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """Records added to every train message this round (default: none)."""
        return {}

    def downlink(
        self, server_round: int, node: int, content: RecordDict, plan: EdgePlan
    ) -> tuple[RecordDict, int | None]:
        """A node's message content as sent, and the digest of the model the
        node will hold after applying it (default: the whole model, as built;
        None: not checked)."""
        self.stats.full_sends += 1
        return content, model_digest(self._require_current())

    def forget(self, node: int) -> None:
        """The node's model is no longer known (default: nothing to do)."""

    def received(self, server_round: int, updates: Sequence[DecodedUpdate]) -> None:
        """Bookkeeping on the accepted replies before aggregation (default: none)."""

    def weights(
        self, server_round: int, updates: Sequence[DecodedUpdate]
    ) -> np.ndarray:
        """``ω_k`` per update, summing to 1 (default: ``n_k / Σ n``, as FedAvg)."""
        n = np.array([u.num_examples for u in updates], dtype=np.float64)
        return n / n.sum()

    def observe(
        self,
        server_round: int,
        updates: Sequence[DecodedUpdate],
        previous: np.ndarray,
        current: np.ndarray,
    ) -> None:
        """After aggregation, with the flat ``θ`` before and after (default: none)."""

    # ------------------------------------------------------------------ helpers
    def make_plan(self, server_round: int, budget: int, local_steps: int) -> EdgePlan:
        """An :class:`EdgePlan` with this wrapper's codec settings."""
        return EdgePlan(
            budget=int(budget),
            codecs=self.codecs,
            chunk=self.chunk,
            gamma=self.gamma,
            importance=self.importance,
            fill_decay=self.fill_decay,
            history=self.history,
            local_steps=int(local_steps),
            server_round=int(server_round),
        )

    def _require_current(self) -> np.ndarray:
        if self.current is None:
            raise RuntimeError("configure_train must run before the model is known")
        return self.current

    def _require_layout(self) -> GroupLayout:
        if self.layout is None:
            raise RuntimeError("configure_train must run before the layout is known")
        return self.layout

    def _log_reject(self, server_round: int, node_id: int, reason: str) -> None:
        log(
            WARNING,
            "round %s: rejected reply from node %s: %s",
            server_round,
            node_id,
            reason,
        )

    def set_arrays(self, arrays: ArrayRecord) -> None:
        """Remember the global arrays sent this round (and their group layout)."""
        self._current_arrays = {k: a.numpy() for k, a in arrays.items()}
        if self.layout is None:
            self.layout = GroupLayout.from_arrays(self._current_arrays, self.chunk)
        self.current = self.layout.flat(self._current_arrays)

    def prepare(
        self, server_round: int, node_ids: Sequence[int], config: ConfigRecord
    ) -> dict[int, EdgePlan]:
        """Plan the round for ``node_ids`` and remember the plans for decoding."""
        self._plans = dict(self.plan(server_round, list(node_ids), config))
        self._expected = {}
        return self._plans

    def content(
        self,
        server_round: int,
        plan: EdgePlan,
        arrays: ArrayRecord,
        config: Mapping[str, object],
    ) -> RecordDict:
        """One node's train message content: arrays, config + plan, broadcasts.

        The records travel under the protocol's keys (``arrays``, ``config``),
        whatever keys the inner strategy uses: the edge reads those.
        """
        record = RecordDict(
            {
                KEY_ARRAYS: arrays,
                KEY_CONFIG: ConfigRecord(
                    {**dict(config), **plan.to_config()}  # type: ignore[dict-item]
                ),
            }
        )
        for key, value in self.broadcast(server_round).items():
            record[key] = value
        return record

    # ------------------------------------------------------------------ Strategy
    def summary(self) -> None:
        """Log the wrapper's settings, then the inner strategy's."""
        log(
            INFO,
            "\t├──> Compressed updates: codecs %s, groups of %s, γ %s",
            [o.label for o in self.codecs],
            self.chunk,
            self.gamma,
        )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages, each with its node's plan."""
        server_round += self.round_offset
        self.set_arrays(arrays)
        messages = list(
            self.strategy.configure_train(server_round, arrays, config, grid)
        )
        chosen = set(
            self.select(server_round, [m.metadata.dst_node_id for m in messages])
        )
        messages = [m for m in messages if m.metadata.dst_node_id in chosen]
        plans = self.prepare(
            server_round, [m.metadata.dst_node_id for m in messages], config
        )
        for msg in messages:
            node = msg.metadata.dst_node_id
            inner_config = msg.content[self.strategy.configrecord_key]
            content = self.content(server_round, plans[node], arrays, inner_config)
            msg.content, self._expected[node] = self.downlink(
                server_round, node, content, plans[node]
            )
            self.bytes_down[node] = payload_bytes(msg.content)
        return messages

    def decode_reply(self, server_round: int, msg: Message) -> DecodedUpdate:
        """Check one reply against the plan its node was sent; decode it.

        Three steps: validate the records and metrics (:meth:`_validate`),
        decode the groups sent (:meth:`_decode_groups`), fill the others from
        the node's cache (:meth:`_fill`).

        Raises
        ------
        PayloadError
            Naming what is wrong (see the module docstring); nothing is
            changed.
        """
        layout = self._require_layout()
        node = msg.metadata.src_node_id
        plan = self._plans.get(node)
        if plan is None:
            raise PayloadError(f"no train message was sent to node {node} this round")
        nbytes, metrics = self._validate(msg.content, plan, layout)
        expected = self._expected.get(node)
        if expected is not None and metrics["model-digest"] != expected:
            self.stats.digest_mismatches += 1
            self.forget(node)
            raise PayloadError(
                f"metric 'model-digest' = {metrics['model-digest']:.0f}: the node "
                f"trained from another model than the cloud's record of it "
                f"(digest {expected}); it gets the full model next"
            )
        codes, payload = read_update(msg.content)
        decoded, received = self._decode_groups(codes, payload, plan, layout, metrics)
        update, sent = self._fill(node, decoded, received, layout, server_round)
        return DecodedUpdate(
            node,
            update,
            sent,
            received,
            metrics,
            nbytes,
            plan,
            _declared_link(msg.content),
            None if self.transit is None else self.transit(msg),
        )

    def _validate(
        self, content: RecordDict, plan: EdgePlan, layout: GroupLayout
    ) -> tuple[int, dict[str, float]]:
        """Records, size and metrics of a reply: ``(its bytes, its metrics)``."""
        unknown = sorted(set(content.keys()) - REPLY_RECORDS)
        if unknown:
            raise PayloadError(f"unknown records {unknown}")
        nbytes = payload_bytes(content)
        limit = plan.budget + len(layout.groups) + FRAMING_SLACK
        if nbytes > limit:
            raise PayloadError(f"reply of {nbytes} bytes exceeds the {limit} limit")
        read_update(content)  # the update record's structure, before the metrics
        metrics_record = content.metric_records.get(KEY_METRICS)
        if metrics_record is None:
            raise PayloadError(f"missing record '{KEY_METRICS}'")
        metrics = _finite_metrics(metrics_record)
        self._check_examples(metrics["num-examples"])
        for key, planned in (
            ("bytes-budget", plan.budget),
            ("steps", plan.local_steps),
        ):
            if metrics[key] != planned:
                raise PayloadError(
                    f"metric '{key}' = {metrics[key]:g}, the plan said {planned}"
                )
        return nbytes, metrics

    def _check_examples(self, examples: float) -> None:
        """``num-examples`` must be a whole number in ``[1, max_examples]``."""
        if examples != int(examples):
            raise PayloadError(
                f"metric 'num-examples' = {examples:g} is not a whole number "
                "(the wrapper weights by whole examples)"
            )
        top = self.max_examples if self.max_examples is not None else math.inf
        if not 1 <= examples <= top:
            raise PayloadError(
                f"metric 'num-examples' = {examples:g} outside [1, {top}]"
            )

    def _decode_groups(
        self,
        codes: np.ndarray,
        payload: np.ndarray,
        plan: EdgePlan,
        layout: GroupLayout,
        metrics: Mapping[str, float],
    ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """``(decoded (N,) float32, group index → decoded update)``, for the
        groups sent (views of ``decoded``; zeros in the others)."""
        try:
            decoded, sent = unpack_flat(
                codes,
                payload,
                layout.sizes,
                plan.codecs,
                max_bytes=plan.budget,
                labels=layout.labels,
            )
        except CodecError as err:
            raise PayloadError(str(err)) from None
        if metrics["bytes-encoded"] != payload.size:
            raise PayloadError(
                f"metric 'bytes-encoded' = {metrics['bytes-encoded']:g}, "
                f"the payload has {payload.size}"
            )
        chunks = np.split(decoded, layout.starts[1:])
        return decoded, {i: chunks[i] for i in np.flatnonzero(sent).tolist()}

    def _fill(
        self,
        node: int,
        decoded: np.ndarray,
        received: Mapping[int, np.ndarray],
        layout: GroupLayout,
        server_round: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(û_k (N,) float32, sent (n,) bool)``: the received groups, and
        for the others the stand-ins of :func:`fill_unsent` from the node's
        cache (what the edge mirrored when it chose to defer). With every
        group received, ``û_k`` is ``decoded`` and the cache is not read."""
        sent = np.zeros(len(layout.groups), dtype=bool)
        sent[list(received)] = True
        if sent.all():
            return decoded, sent
        cache, rounds = cache_arrays(self._caches.get(node, {}), layout.sizes)
        update = fill_unsent(cache, rounds, layout.sizes, server_round, self.fill_decay)
        return np.where(np.repeat(sent, layout.sizes), decoded, update), sent

    def decode_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[DecodedUpdate], list[Message]]:
        """Decode every reply; reject the bad ones (``on_reject``), cache the good.

        Returns the decoded updates and their messages, in node order; error
        replies are left out (the inner strategy is shown them).
        """
        good: list[tuple[DecodedUpdate, Message]] = []
        for msg in replies:
            if msg.has_error():
                continue
            tick = time.perf_counter()
            try:
                decoded = self.decode_reply(server_round, msg)
            except PayloadError as err:
                self.stats.rejected += 1
                self.on_reject(server_round, msg.metadata.src_node_id, str(err))
                continue
            finally:
                self.stats.decode_seconds += time.perf_counter() - tick
            good.append((decoded, msg))
        good.sort(key=lambda pair: pair[0].node_id)
        layout = self._require_layout()
        for decoded, _ in good:
            node = decoded.node_id
            self._caches[node] = refresh_cache(
                self._caches.get(node, {}), decoded.received, server_round
            )
            m = decoded.metrics
            self.stats.replies += 1
            self.stats.budget_bytes += decoded.plan.budget
            self.stats.encoded_bytes += int(m["bytes-encoded"])
            self.stats.full_bytes += layout.full_bytes
            self.stats.reply_bytes += decoded.bytes_up
            self.stats.train_compute_seconds += m["train-compute-seconds"]
            self.stats.overhead_seconds += m["overhead-seconds"]
            self.stats.steps += int(m["steps"])
        return [d for d, _ in good], [m for _, m in good]

    def rebuild(
        self, decoded: DecodedUpdate, weight: float, base: np.ndarray
    ) -> RecordDict:
        """A plain FedAvg reply: the arrays ``θ + û_k`` and weight ``weight``.

        ``θ`` is each tensor as sent, in its own dtype (float32 or wider: a
        float64 model is not rounded to float32; float16 and other narrower
        floats are added in float32) and shape (0-d stays 0-d); tensors
        outside the layout (integers) keep the value sent. ``base`` (the flat
        float32 ``θ``) is accepted for subclasses and unused here.
        """
        layout = self._require_layout()
        updates = layout.unflat(decoded.update)
        arrays = {
            key: Array(_plus(value, updates.get(key)))
            for key, value in self._current_arrays.items()
        }
        metrics = dict(decoded.metrics)
        metrics["num-examples"] = int(decoded.num_examples)
        metrics[self.strategy.weighted_by_key] = float(weight)
        return RecordDict(
            {
                self.strategy.arrayrecord_key: ArrayRecord(arrays),
                KEY_METRICS: MetricRecord(metrics),
            }
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check, weight, rebuild, and let the inner strategy aggregate."""
        server_round += self.round_offset
        self.last_round = server_round
        replies = list(replies)
        errors = [m for m in replies if m.has_error()]
        if self.on_dropout is not None:
            for node, why in missing_replies(self._plans, replies).items():
                self.on_dropout(server_round, node, why)
        for node in missing_replies(self._plans, replies):
            self.forget(node)
            self.recent_updates.pop(node, None)
        stop_if_all_failed(server_round, self._plans, app_errors(self._plans, replies))
        updates, messages = self.decode_replies(server_round, replies)
        if not updates:
            return self.strategy.aggregate_train(server_round, errors)
        self.received(server_round, updates)
        omega = np.asarray(self.weights(server_round, updates), dtype=np.float64)
        total = sum(u.num_examples for u in updates)
        base = self.current
        if base is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        for msg, decoded, w in zip(messages, updates, omega, strict=True):
            msg.content = self.rebuild(decoded, w * total, base)
        arrays, metrics = self.strategy.aggregate_train(
            server_round, [*messages, *errors]
        )
        if arrays is not None:
            arrays = self._same_dtypes(arrays)
        self.last_updates = {u.node_id: u for u in updates}
        self.last_weights = {
            u.node_id: float(w) for u, w in zip(updates, omega, strict=True)
        }
        self.recent_updates.update(
            (u.node_id, (u, float(w))) for u, w in zip(updates, omega, strict=True)
        )
        if arrays is not None:
            current = self._require_layout().flat(
                {k: a.numpy() for k, a in arrays.items()}
            )
            self.observe(server_round, updates, base, current)
        return arrays, metrics

    def _same_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` in the dtypes and shapes of the arrays sent (FedAdam
        returns float64; Flower's averaging turns integers into floats, which
        are rounded back, not truncated)."""
        if all(
            k in self._current_arrays
            and a.dtype == str(self._current_arrays[k].dtype)
            and tuple(a.shape) == self._current_arrays[k].shape
            for k, a in arrays.items()
        ):
            return arrays
        return ArrayRecord(
            {
                k: Array(_like(a.numpy(), self._current_arrays[k]))
                if k in self._current_arrays
                else a
                for k, a in arrays.items()
            }
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's, unchanged (in the run's rounds)."""
        return self.strategy.configure_evaluate(
            server_round + self.round_offset, arrays, config, grid
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner strategy's, unchanged (in the run's rounds)."""
        return self.strategy.aggregate_evaluate(
            server_round + self.round_offset, replies
        )

    # ------------------------------------------------------------------ checkpoint
    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What a checkpoint keeps: the fill caches, bytes sent down, the stats.

        Arrays are per node (``cache/<node>/...``: group indices, rounds,
        sizes and the concatenated cached updates); counters are JSON. The
        round's plans and the last replies are not kept: a resumed run plans
        its next round afresh, numbering its rounds on from the last one.
        """
        arrays: dict[str, np.ndarray] = {}
        for node, cache in self._caches.items():
            indices = sorted(cache)
            arrays[f"cache/{node}/index"] = np.array(indices, dtype=np.int64)
            arrays[f"cache/{node}/round"] = np.array(
                [cache[i].round for i in indices], dtype=np.int64
            )
            arrays[f"cache/{node}/size"] = np.array(
                [cache[i].update.size for i in indices], dtype=np.int64
            )
            arrays[f"cache/{node}/values"] = (
                np.concatenate([cache[i].update.reshape(-1) for i in indices])
                if indices
                else np.zeros(0, dtype=np.float32)
            ).astype(np.float32)
        state = {
            "round": self.last_round,
            "bytes-down": {str(n): int(b) for n, b in self.bytes_down.items()},
            "stats": dataclasses.asdict(self.stats),
        }
        return arrays, state

    def restore_state(
        self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]
    ) -> None:
        """Inverse of :meth:`checkpoint_state` (the file was checked on load)."""
        self._caches = {}
        nodes = {k.split("/")[1] for k in arrays if k.startswith("cache/")}
        for node in sorted(nodes, key=int):
            index, rounds, sizes, values = (
                arrays[f"cache/{node}/{part}"]
                for part in ("index", "round", "size", "values")
            )
            if not len(index) == len(rounds) == len(sizes) or sizes.sum() != len(
                values
            ):
                raise ValueError(f"checkpoint cache of node {node} is inconsistent")
            pieces = np.split(values, np.cumsum(sizes)[:-1]) if len(sizes) else []
            self._caches[int(node)] = {
                int(i): CachedUpdate(np.array(v, dtype=np.float32), int(r))
                for i, r, v in zip(index, rounds, pieces, strict=True)
            }
        self.bytes_down = {int(n): int(b) for n, b in state["bytes-down"].items()}
        self.stats = CompressionStats(**state["stats"])
        self.round_offset = self.last_round = int(state["round"])

    def compression_stats(self) -> dict[str, float | int]:
        """What compression saved and cost so far (see :class:`CompressionStats`)."""
        return {**self.stats.as_summary(), "rejected-replies": self.stats.rejected}
