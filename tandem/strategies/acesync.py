"""ACE-Sync, cloud side (seed 004): budgets, importance, weights, drift control.

:class:`AceSync` is the ACE-Sync policy on top of the compression wrapper
:class:`~tandem.strategies.compressed.CompressedUpdates` (which handles the
wire: plans in messages, checking, decoding, filling, handing rebuilt replies
to the inner Flower strategy). The inner strategy is Flower's ``FedAvg`` for
``method=acesync``; any FedAvg-family strategy works (``FedAdam`` ...).

Per round, for the ``K`` sampled devices:

1. **Budget, eq. 5.** Each device's uplink bandwidth ``B_k(t)`` is a
   :class:`~tandem.network.BandwidthEstimator` (smoothing 0.3) fed with the
   emulated time of its previous uploads; it starts from its link's bandwidth
   at time 0. With ``acesync-bandwidth = measured`` (deployment) it is fed
   instead with each reply's real transit time, from its creation on the
   node to its pull by the ServerApp, and starts empty (smallest budget).
   The link is the one the node declares (``link-profile`` in its
   node config, reported with each reply) or else the run's ``acesync-link``
   spec, assigned with :func:`~tandem.network.assign_links` over the sorted
   node ids and the run's seed (as the benchmark's re-timing does). The
   emulated time comes from the cloud's own
   :class:`~tandem.network.VirtualClock`, which plays each round as it
   happens: download of the message's real bytes, the edge's local steps ×
   the round's median measured seconds per step × ``acesync-edge-factor``
   (the benchmark sets it to its edge-device factor), upload of the reply's
   real bytes. Then
   ``c_k = c_min + (c_max − c_min)·exp(−β·B_k)`` and the budget is
   ``⌊(1 − c_k)·4N⌋`` bytes for ``N`` parameters
   (:func:`~tandem.compression.budget.byte_budget`), times the device's
   budget scale (step 5), capped at the cost of sending every group in full.
2. **Importance, eqs. 3-4.** The predictor's weights travel with every
   message (one float32 array); edges score their groups with it.
3. **Weights, eq. 8.** ``ω_k ∝ n_k · r_k / (1 + L_k / median L)`` with
   ``r_k`` the fraction of requests the device answered with a valid reply
   and ``L_k`` its emulated round latency
   (:func:`~tandem.coordination.aggregation_weights`); ``acesync-weighting =
   examples`` uses ``n_k`` alone.
4. **Predictor training.** Labels are the ranks of each group's RMS in the
   realized aggregated update ``θ_{t+1} − θ_t``
   (:func:`~tandem.importance.importance_labels`); features are what each
   device's updates showed the cloud (per-group RMS of the decoded updates
   over the last ``H`` rounds, groups not sent counted unknown) and the
   structural features of the global model. Rows of all devices train the
   predictor (Adam, ``acesync-predictor-steps`` steps, from the previous
   round's weights); before fitting, its squared error and rank correlation
   on the new labels are logged beside the magnitude score's, so the event
   log says whether it predicts better than the ablation.
5. **Divergence, eq. 9.** ``D_k = ‖θ_k − θ_{t+1}‖₂`` with ``θ_k = θ̂_k + û_k``
   the device's model as the cloud reconstructed it (``θ̂_k`` the model it
   was sent) and ``θ_{t+1}`` the new global model
   (:func:`~tandem.coordination.divergence`). With ``acesync-sync-action =
   interval`` (the default, dynamic synchronization) each device syncs every
   ``r_k`` rounds; a device whose ``D_k / r_k`` exceeds
   ``acesync-divergence-threshold`` × the median gets ``r_k`` halved, one at
   or below ``acesync-stable-ratio`` × the median gets ``r_k + 1``, within
   [``acesync-min-interval``, ``acesync-max-interval``]
   (:func:`~tandem.coordination.adjust_intervals`). With
   ``acesync-interval-mode = continuous`` (the default) a round sends to
   every device, each in its interval's phase
   (:func:`~tandem.coordination.interval_phase`): the model in the first
   round, ``local-steps`` of training in every round, the update in the
   last; the replies in between (``hold``) carry the training metrics alone
   (:meth:`AceSync._take_holds`). With ``batched`` a round sends only to the
   devices that are due (:func:`~tandem.coordination.due_devices`), each
   training ``r_k × local-steps`` steps. The other actions keep every
   device in every round: a device past the threshold gets its budget scale
   doubled (``budget``, not above ``acesync-max-budget-scale``) and/or its
   local steps halved (``steps``, not below ``acesync-min-steps``); others
   relax one step back toward the defaults
   (:func:`~tandem.coordination.adjust_sync`).
6. **Downlink** (``acesync-downlink = compressed``). The cloud keeps a record
   ``θ̂_k`` of each device's model and sends it the delta ``θ_t − θ̂_k``
   selected by the same importance + knapsack machinery
   (:func:`~tandem.compression.downlink.compress_downlink`) within its
   downlink budget: eq. 5 with ``acesync-down-c-min``/``-c-max`` on its
   downlink bandwidth (the emulated link's, or with measured bandwidth the
   uplink estimate), less the bytes of the round's broadcast (the
   predictor). What is not sent stays in ``θ_t − θ̂_k`` for the next sync
   (error feedback with ``γ = 1``). A device that is new (or after a resume),
   last synced more than ``acesync-down-max-age`` rounds ago, failed to
   answer, or whose ``model-digest`` disagreed gets the full model.

After the last round (:func:`personalize`): devices are clustered by their
last updates (k-means on update directions, optionally with their link's
log bandwidth; ``k`` by silhouette or fixed), each cluster gets the model
``θ_T + ū_c`` from its cluster-level aggregate ``ū_c`` (the global update is
``Σ_c W_c ū_c / Σ_c W_c`` with ``W_c`` the cluster's total ``ω``, i.e. eq. 8
again), refined for ``acesync-personalize-rounds`` rounds of training within
the cluster; then every device evaluates the global model and its cluster's
on its own test share, and the summary reports both means. Those rounds'
bytes are reported apart (``personal-bytes-*``), not in the training totals.

With ``acesync-personalize`` the clusters shape training instead
(:mod:`tandem.hierarchy`, hooks in the "clusters" section of :class:`AceSync`):
every ``acesync-recluster-every`` rounds, from the first, devices are
clustered by where their models end up relative to the new global model;
each device then trains from its cluster's model (with continuous
synchronization, the one of the round its interval begins), each round aggregates
device → cluster → global (eq. 8 at both levels), and after the last round
every device evaluates its cluster's model and the global model on its own
test share (no refinement rounds).

Events in ``metrics.jsonl``: ``plan`` (budget, bandwidth, ``c``, steps per
device), ``sync`` (divergence, trigger, next steps and budget scale),
``acesync`` (per-round cloud figures), ``clusters`` (with
``acesync-personalize``: clusters, sizes, labels and the gap between the
hierarchical aggregate and the global model, per round), ``personalize``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from tandem.accounting import KEY_COMPUTE_SECONDS, payload_bytes
from tandem.clustering import (
    choose_n_clusters,
    cluster_average,
    cluster_devices,
    hierarchical_aggregate,
)
from tandem.compression.budget import byte_budget, compression_ratio
from tandem.compression.codecs import CodecError, option_table
from tandem.compression.downlink import (
    DeviceReplica,
    compress_downlink,
    model_digest,
    needs_full,
)
from tandem.compression.layout import GroupLayout
from tandem.coordination import (
    IntervalPolicy,
    Phase,
    SyncPolicy,
    adjust_intervals,
    adjust_sync,
    aggregation_weights,
    divergence,
    due_devices,
    interval_phase,
)
from tandem.hierarchy import ClusterTracker
from tandem.importance import (
    ImportancePredictor,
    importance_labels,
    predict_importance,
    temporal_features,
    train_predictor,
)
from tandem.network import (
    BandwidthEstimator,
    LinkProfile,
    Task,
    VirtualClock,
    assign_links,
    parse_link,
)
from tandem.protocol.acesync import (
    HOLD_METRICS,
    KEY_DOWNLINK,
    KEY_PREDICTOR,
    AceSyncOptions,
    DownlinkHeader,
    EdgePlan,
    downlink_record,
    pack_predictor,
    predictor_record,
    unpack_predictor,
)
from tandem.server_context import ServerRun
from tandem.strategies.compressed import CompressedUpdates, DecodedUpdate
from tandem.strategies.fedavg import missing_replies
from tandem.strategies.fedavg import run as run_fedavg
from tandem.wire import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_METRICS,
    KEY_NODE,
    PayloadError,
    get_record,
)

__all__ = ["AceSync", "personalize", "run"]

#: Smoothing of each device's bandwidth estimate (BandwidthEstimator's β).
BANDWIDTH_SMOOTHING = 0.3


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    from scipy.stats import spearmanr  # a second to import: only when needed

    return float(spearmanr(a, b).statistic)


def _mean_defined(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN; NaN when none is (a rank
    correlation is undefined on a constant vector)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


class AceSync(CompressedUpdates):
    """ACE-Sync's policy around a Flower FedAvg-family strategy (see module).

    Parameters
    ----------
    strategy : FedAvg
        The inner strategy (``FedAvg``, ``FedAdam`` ...).
    options : AceSyncOptions
        The ``acesync-*`` settings.
    local_steps : int
        Local steps of a device in good standing.
    seed : int
        Seed of the link assignment, the predictor's initial weights and the
        clock's jitter.
    on_event : callable, optional
        ``(event, payload) -> None`` for the events listed in the module
        docstring (e.g. ``Tracker.log_event``).
    **kwargs
        Passed to :class:`CompressedUpdates` (``on_reject``, ``max_examples``).
    """

    def __init__(
        self,
        strategy: FedAvg,
        *,
        options: AceSyncOptions,
        local_steps: int,
        seed: int = 0,
        final_round: int | None = None,
        on_event: Callable[[str, Mapping[str, object]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            strategy,
            codecs=options.options,
            chunk=options.chunk,
            gamma=options.gamma,
            importance=options.importance,
            fill_decay=options.fill_decay,
            history=options.history,
            on_event=on_event,
            **kwargs,
        )
        if local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        # hyperparameters
        self.options = options
        self.local_steps = int(local_steps)
        self.seed = int(seed)
        # the run's last round (num-server-rounds): every interval of
        # continuous synchronization ends there, so no training is held back
        self.final_round = final_round
        self.policy = (
            SyncPolicy(
                threshold=options.divergence_threshold,
                relative=True,
                default_steps=self.local_steps,
                min_steps=min(options.min_steps, self.local_steps),
                default_budget=1.0,
                max_budget=options.max_budget_scale,
                factor=2.0,
            )
            if options.divergence_threshold > 0
            else None
        )
        self.interval_policy = (
            IntervalPolicy(
                threshold=options.divergence_threshold,
                stable=options.stable_ratio,
                min_interval=options.min_interval,
                max_interval=options.max_interval,
            )
            if options.divergence_threshold > 0 and options.sync_action == "interval"
            else None
        )
        # internal state: the network as the cloud emulates it
        self.links: dict[int, LinkProfile] = {}
        self.clock = VirtualClock(self.links, options.edge_factor, 1.0, self.seed)
        self.round_start = 0.0
        self.estimators: dict[int, BandwidthEstimator] = {}
        self.latency: dict[int, float] = {}
        # internal state: reliability and sync control per device
        self.asked: dict[int, int] = {}
        self.delivered: dict[int, int] = {}
        self.steps: dict[int, int] = {}
        self.budget_scale: dict[int, float] = {}
        self.intervals: dict[int, int] = {}
        self.last_sync: dict[int, int] = {}
        # continuous synchronization: each device's interval start, this
        # round's phases, and the digest of the model each interval began on
        self.continuous = (
            self.interval_policy is not None and options.interval_mode == "continuous"
        )
        self.interval_start: dict[int, int] = {}
        self._phases: dict[int, Phase] = {}
        self._interval_digest: dict[int, int | None] = {}
        # internal state: the cloud's record of each device's model (downlink)
        self.replicas: dict[int, DeviceReplica] = {}
        self._broadcast_bytes: tuple[int, int] = (-1, 0)  # (round, bytes)
        # internal state: the importance predictor and what it learns from
        self.predictor = ImportancePredictor(alpha=options.alpha, seed=self.seed)
        self.magnitudes: dict[int, np.ndarray] = {}
        # internal state: clusters that shape training (acesync-personalize)
        self.hierarchy = (
            ClusterTracker(
                max_clusters=options.max_clusters,
                clusters=options.clusters,
                every=options.recluster_every,
                seed=self.seed,
            )
            if options.personalize and options.clusters != 1
            else None
        )
        self._bases: dict[int, np.ndarray] = {}  # node -> flat model sent
        # stats
        self.triggered = 0
        self.round_figures: list[dict[str, float]] = []

    # ------------------------------------------------------------------ network
    def _ensure_links(self, node_ids: Sequence[int]) -> None:
        missing = [n for n in node_ids if n not in self.links]
        if not missing:
            return
        fresh = assign_links(
            sorted({*self.links, *node_ids}), self.options.link, seed=self.seed
        )
        for node in missing:
            self.use_link(node, fresh[node])

    def use_link(self, node: int, link: LinkProfile) -> None:
        """Set ``node``'s link; its estimate restarts from the link at time 0.

        With measured bandwidth the estimate starts empty instead: the first
        round gets the smallest budget, later ones follow the measurements.
        """
        self.links[node] = link
        measured = self.options.bandwidth == "measured"
        self.estimators[node] = BandwidthEstimator(
            BANDWIDTH_SMOOTHING, initial_mbps=None if measured else link.up.at(0.0)
        )

    def _declared(self, node: int, link: str) -> None:
        """A node declared a link (any spec, a trace inline): use it."""
        if not link or link == self.links[node].name:
            return
        if link == "variable" and self.links[node].name.startswith("variable-"):
            return
        try:
            index = sorted(self.links).index(node)
            profile = parse_link(link, self.seed + index, index)
        except ValueError:
            return
        self.use_link(node, profile)

    def bandwidth_mbps(self, node: int) -> float:
        """The device's current uplink estimate ``B_k(t)`` in Mbit/s."""
        return float(self.estimators[node].estimate_mbps or 0.0)

    # ------------------------------------------------------------------ hooks
    def plan(
        self, server_round: int, node_ids: Sequence[int], config: ConfigRecord
    ) -> dict[int, EdgePlan]:
        """Eq. 5 budgets times the divergence scale; adaptive local steps."""
        layout = self._require_layout()
        self._ensure_links(node_ids)
        costs, _ = option_table(self.codecs, layout.sizes)
        cap = int(costs.max(axis=1).sum())
        o = self.options
        plans = {}
        for node in node_ids:
            self.asked[node] = self.asked.get(node, 0) + 1
            bps = self.bandwidth_mbps(node) * 1e6
            base = byte_budget(
                layout.full_bytes, bps, c_min=o.c_min, c_max=o.c_max, beta=o.beta
            )
            scale = self.budget_scale.get(node, 1.0)
            budget = min(cap, math.floor(base * scale))
            steps = self.steps.get(node, self.local_steps)
            if not self.continuous:  # batched: r_k rounds of steps at once
                steps *= self.intervals.get(node, 1)
            plans[node] = self.make_plan(server_round, budget, steps)
            phase = self._phases.get(node)
            if phase is not None:
                plans[node] = dataclasses.replace(
                    plans[node], resume=phase.resume, hold=not phase.send
                )
            self.on_event(
                "plan",
                {
                    "round": server_round,
                    "node-id": node,
                    "bandwidth-mbps": bps / 1e6,
                    "compression": compression_ratio(
                        bps, c_min=o.c_min, c_max=o.c_max, beta=o.beta
                    ),
                    "budget": budget,
                    "budget-scale": scale,
                    "local-steps": steps,
                    "interval": self.intervals.get(node, 1),
                    "resume": plans[node].resume,
                    "hold": plans[node].hold,
                },
            )
        return plans

    def select(self, server_round: int, node_ids: Sequence[int]) -> list[int]:
        """With dynamic synchronization, the devices due this round
        (:func:`~tandem.coordination.due_devices`); else all. Continuous
        synchronization trains every device every round: all, each in its
        interval's phase (:func:`~tandem.coordination.interval_phase`; an
        interval starts in the round after the last one ended, and ends at
        the run's last round at the latest)."""
        self._phases = {}
        if self.interval_policy is None:
            return list(node_ids)
        if self.continuous:
            for node in node_ids:
                interval = self.intervals.get(node, 1)
                start = self.interval_start.get(node)
                if start is None or server_round >= start + interval:
                    start = self.interval_start[node] = server_round
                if self.final_round is not None:  # the last round sends
                    interval = max(1, min(interval, self.final_round - start + 1))
                phase = interval_phase(server_round, start, interval)
                self._phases[node] = phase
                if phase.send:
                    self.last_sync[node] = server_round
            return list(node_ids)
        due = due_devices(server_round, node_ids, self.last_sync, self.intervals)
        for node in due:
            self.last_sync[node] = server_round
        return due

    def downlink_budget(self, node: int, broadcast_bytes: int) -> int:
        """Eq. 5 on the device's downlink bandwidth, less the broadcast bytes."""
        layout = self._require_layout()
        o = self.options
        if o.bandwidth == "measured":
            mbps = self.bandwidth_mbps(node)
        else:
            mbps = float(self.links[node].down.at(self.round_start))
        budget = byte_budget(
            layout.full_bytes,
            mbps * 1e6,
            c_min=o.down_c_min,
            c_max=o.down_c_max,
            beta=o.beta,
        )
        return max(0, budget - broadcast_bytes)

    def _round_broadcast_bytes(self, server_round: int, content: RecordDict) -> int:
        if self._broadcast_bytes[0] != server_round:
            records = RecordDict(
                {k: content[k] for k in self.broadcast_keys() if k in content}
            )
            self._broadcast_bytes = (server_round, payload_bytes(records))
        return self._broadcast_bytes[1]

    def broadcast_keys(self) -> tuple[str, ...]:
        """Records :meth:`broadcast` adds."""
        return (KEY_PREDICTOR,) if self.importance == "predictor" else ()

    def downlink(
        self, server_round: int, node: int, content: RecordDict, plan: EdgePlan
    ) -> tuple[RecordDict, int | None]:
        """The whole model, or the compressed delta since the device's version.

        Continuous synchronization: no model for a device that resumes (it
        trains on from its own; the digest expected is the interval's), and
        no predictor for one that holds (it sends no update)."""
        if plan.resume:
            del content[KEY_ARRAYS]
            expected = self._interval_digest.get(node)
        else:  # the budget counts the predictor's bytes, as for every device
            content, expected = self._downlink(server_round, node, content, plan)
            self._interval_digest[node] = expected
        if plan.hold:
            for key in self.broadcast_keys():
                if key in content:
                    del content[key]
        return content, expected

    def _downlink(
        self, server_round: int, node: int, content: RecordDict, plan: EdgePlan
    ) -> tuple[RecordDict, int]:
        layout = self._require_layout()
        current = self._require_current()
        replica = self.replicas.get(node)
        # with clusters in training (acesync-personalize) each device is sent
        # its cluster's model in full (configure_train); not compressed yet
        compressed = self.options.downlink == "compressed" and self.hierarchy is None
        if (
            compressed
            and replica is not None
            and not needs_full(replica, server_round, self.options.down_max_age)
        ):
            base = replica.version
            budget = self.downlink_budget(
                node, self._round_broadcast_bytes(server_round, content)
            )
            try:
                out = compress_downlink(
                    current,
                    replica,
                    budget=budget,
                    codecs=self.codecs,
                    layout=layout,
                    server_round=server_round,
                    importance=self.importance,
                    predictor=self.predictor
                    if self.importance == "predictor"
                    else None,
                )
            except CodecError:
                out = None  # no option fits the budget: send the whole model
            if out is not None and out.kept_fraction < self.options.down_min_kept:
                # the budget cannot keep up with the model: resynchronize
                self.stats.kept_fallbacks += 1
                out = None
            if out is not None:
                header = DownlinkHeader(server_round, base, budget)
                content[KEY_CONFIG] = ConfigRecord(
                    {**dict(content[KEY_CONFIG]), **header.to_config()}  # type: ignore[dict-item]
                )
                content[KEY_ARRAYS] = ArrayRecord(
                    {
                        k: Array(np.require(v, requirements="C"))
                        for k, v in self._current_arrays.items()
                        if k not in layout.keys
                    }
                )
                content[KEY_DOWNLINK] = downlink_record(out.codecs, out.payload)
                self.stats.delta_sends += 1
                self.stats.down_encoded_bytes += out.encoded_bytes
                self.stats.down_full_bytes += layout.full_bytes
                self.on_event(
                    "downlink",
                    {
                        "round": server_round,
                        "node-id": node,
                        "base": base,
                        "budget": budget,
                        "bytes-encoded": out.encoded_bytes,
                        "kept-fraction": out.kept_fraction,
                        "residual-norm": out.residual_norm,
                    },
                )
                return content, model_digest(replica.model)
        if compressed:
            content[KEY_CONFIG] = ConfigRecord(
                {
                    **dict(content[KEY_CONFIG]),  # type: ignore[dict-item]
                    **DownlinkHeader(server_round).to_config(),
                }
            )
            self.replicas[node] = DeviceReplica.full(
                current, server_round, layout, self.history
            )
        return super().downlink(server_round, node, content, plan)

    def forget(self, node: int) -> None:
        """The device gets the full model next time."""
        self.replicas.pop(node, None)

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """The predictor's weights, when the edges score with it."""
        if self.importance != "predictor":
            return {}
        return {KEY_PREDICTOR: predictor_record(self.predictor)}

    def received(self, server_round: int, updates: Sequence[DecodedUpdate]) -> None:
        """Reliability counts, declared links, and the round on the virtual clock.

        The edges emulate one device profile, so an edge's compute on the
        clock is its steps times the round's median measured seconds per step
        (including the compression overhead): the spread between edges'
        measurements is the host's noise (a busy core, a fresh worker's first
        message), which must not reach the eq. 8 weights or the budgets.
        """
        if self.options.bandwidth == "measured":
            self._measured(updates)
            return
        per_step = float(
            np.median(
                [u.metrics["compute-seconds"] / u.metrics["steps"] for u in updates]
            )
        )
        ends = []
        for u in updates:
            node = u.node_id
            self.delivered[node] = self.delivered.get(node, 0) + 1
            self._declared(node, u.link)
            link = self.links[node]
            up = self._on_clock(node, per_step * u.metrics["steps"], u.bytes_up)
            self.latency[node] = up.end - self.round_start
            self.estimators[node].observe(u.bytes_up, up.seconds, link.rtt.at(up.start))
            ends.append(up.end)
        self.round_start = max([self.round_start, *ends])

    def _on_clock(self, node: int, seconds: float, bytes_up: int) -> Task:
        """One device's round on the virtual clock from ``round_start``: the
        message down, ``seconds`` of compute, ``bytes_up`` up; the upload."""
        down = self.clock.transfer(
            node, "down", self.bytes_down.get(node, 0), [self.round_start]
        )
        work = self.clock.compute(f"edge:{node}", seconds, [down.end])
        return self.clock.transfer(node, "up", bytes_up, [work.end])

    def _measured(self, updates: Sequence[DecodedUpdate]) -> None:
        """Reliability counts, and ``B_k`` and ``L_k`` from measured transit.

        Each reply's bytes over its transit seconds (creation on the node to
        pull by the ServerApp) feed the node's estimator; its latency is its
        reported wall time plus that transit. A transit that is missing or not
        positive (clocks out of step) leaves the estimate as it was.
        """
        for u in updates:
            node = u.node_id
            self.delivered[node] = self.delivered.get(node, 0) + 1
            transit = u.transit_seconds
            if transit is not None and math.isfinite(transit) and transit > 0:
                self.estimators[node].observe(u.bytes_up, transit)
            self.latency[node] = u.metrics["train-seconds"] + max(transit or 0.0, 0.0)

    def weights(
        self, server_round: int, updates: Sequence[DecodedUpdate]
    ) -> np.ndarray:
        """Eq. 8: data size × reliability × latency discount (or data size)."""
        if self.options.weighting == "examples":
            return super().weights(server_round, updates)
        nodes = [u.node_id for u in updates]
        return aggregation_weights(
            np.array([u.num_examples for u in updates], dtype=np.float64),
            np.array([self.delivered[n] / self.asked[n] for n in nodes]),
            np.array([self.latency.get(n, 0.0) for n in nodes]),
        )

    def observe(
        self,
        server_round: int,
        updates: Sequence[DecodedUpdate],
        previous: np.ndarray,
        current: np.ndarray,
    ) -> None:
        """Divergence control (eq. 9) and predictor training (eqs. 3-4)."""
        self._fold_clusters(server_round, updates, previous, current)
        layout = self._require_layout()
        nodes = [u.node_id for u in updates]
        figures: dict[str, float] = {"round": server_round}
        # 1. eq. 9 and the sync decision
        d = np.array(
            [
                divergence(
                    (
                        self.replicas[u.node_id].model
                        if u.node_id in self.replicas
                        else previous
                    )
                    + u.update,
                    current,
                )
                for u in updates
            ]
        )
        steps = np.array([self.steps.get(n, self.local_steps) for n in nodes])
        scale = np.array([self.budget_scale.get(n, 1.0) for n in nodes])
        triggered = np.zeros(len(nodes), dtype=bool)
        threshold = float("nan")
        if self.interval_policy is not None and len(nodes) >= 2:
            intervals = np.array([self.intervals.get(n, 1) for n in nodes])
            chosen = adjust_intervals(d, intervals, self.interval_policy)
            triggered, threshold = chosen.triggered, chosen.threshold
            for i, node in enumerate(nodes):
                self.intervals[node] = int(chosen.intervals[i])
        elif self.policy is not None and len(nodes) >= 2:
            decision = adjust_sync(d, steps, scale, self.policy)
            triggered, threshold = decision.triggered, decision.threshold
            action = self.options.sync_action
            for i, node in enumerate(nodes):
                if action in ("both", "steps"):
                    self.steps[node] = int(decision.local_steps[i])
                if action in ("both", "budget"):
                    self.budget_scale[node] = float(decision.budget_scale[i])
        self.triggered += int(triggered.sum())
        for i, node in enumerate(nodes):
            self.on_event(
                "sync",
                {
                    "round": server_round,
                    "node-id": node,
                    "divergence": float(d[i]),
                    "threshold": threshold,
                    "triggered": bool(triggered[i]),
                    "next-local-steps": self.steps.get(node, self.local_steps),
                    "next-budget-scale": self.budget_scale.get(node, 1.0),
                    "next-interval": self.intervals.get(node, 1),
                },
            )
        figures["divergence-median"] = float(np.median(d))
        figures["triggered"] = int(triggered.sum())
        # 2. importance: labels from the realized global update, features
        #    from what each device's decoded updates showed
        labels = importance_labels(layout.group_rms(current - previous))
        structural = layout.structural(previous)
        temporal = []
        for u in updates:
            rms = layout.group_rms(u.update) * u.sent
            history = self.magnitudes.get(u.node_id)
            if history is None:
                history = np.zeros((self.history, len(layout.groups)))
            history = np.vstack([history[1:], rms[None, :]])
            self.magnitudes[u.node_id] = history
            temporal.append(temporal_features(history))
        features = np.vstack(temporal)
        stacked = np.vstack([structural] * len(updates))
        y = np.tile(labels, len(updates))
        figures["magnitude-rank-corr"] = _mean_defined(
            [_spearman(t[:, 0], labels) for t in temporal]
        )
        if self.importance == "predictor":
            predicted = predict_importance(self.predictor, features, stacked)
            figures["predictor-mse-before"] = float(np.mean((predicted - y) ** 2))
            size = labels.size
            figures["predictor-rank-corr"] = _mean_defined(
                [
                    _spearman(predicted[i * size : (i + 1) * size], labels)
                    for i in range(len(updates))
                ]
            )
            if self.options.predictor_steps > 0:
                figures["predictor-mse-after"] = train_predictor(
                    self.predictor,
                    features,
                    stacked,
                    y,
                    steps=self.options.predictor_steps,
                    seed=self.seed + server_round,
                )
        self.round_figures.append(figures)
        self.on_event("acesync", figures)

    # ------------------------------------------------------ continuous sync
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapper's aggregate over the syncs; with continuous
        synchronization the replies of devices that hold are checked and
        counted first (:meth:`_take_holds`), and every device that synced,
        or failed to, starts a new interval next round."""
        if not self.continuous:
            return super().aggregate_train(server_round, replies)
        replies = list(replies)
        plans = self._plans
        holding = {node for node, plan in plans.items() if plan.hold}
        hold_ends = self._take_holds(server_round + self.round_offset, replies, holding)
        self._plans = {n: p for n, p in plans.items() if n not in holding}
        try:
            return super().aggregate_train(
                server_round,
                [m for m in replies if m.metadata.src_node_id not in holding],
            )
        finally:
            self._plans = plans
            for node in plans:
                if node not in holding:
                    self.interval_start.pop(node, None)
            self.round_start = max([self.round_start, *hold_ends])

    def _take_holds(
        self, server_round: int, replies: Sequence[Message], holding: set[int]
    ) -> list[float]:
        """Check and count the replies (among ``replies``) of the devices that
        hold (metrics
        :data:`~tandem.protocol.acesync.HOLD_METRICS` exactly, finite, ``>=
        0``); put their round on the virtual clock and return when each
        ends there (with emulated bandwidth). A device that failed or
        sent no reply (a dropout, as :func:`missing_replies` says why) or a
        bad one (rejected) gets the full model and a new interval next
        round."""
        missing = missing_replies(holding, replies)
        if self.on_dropout is not None:
            for node, why in missing.items():
                self.on_dropout(server_round, node, why)
        good: dict[int, tuple[Mapping[str, float], int]] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in holding or node in missing:
                continue
            try:
                good[node] = (_hold_metrics(msg.content), payload_bytes(msg.content))
            except PayloadError as err:
                self.stats.rejected += 1
                self.on_reject(server_round, node, str(err))
        for node in holding - set(good):
            self.forget(node)
            self.interval_start.pop(node, None)
        for node, (metrics, _) in good.items():
            self.delivered[node] = self.delivered.get(node, 0) + 1
            self.stats.train_compute_seconds += metrics[KEY_COMPUTE_SECONDS]
            self.stats.steps += int(metrics["steps"])
        if self.options.bandwidth == "measured" or not good:
            return []
        # on the virtual clock as received() places the syncs: the round's
        # median seconds per step (the edges emulate one device)
        per_step = float(
            np.median([m[KEY_COMPUTE_SECONDS] / m["steps"] for m, _ in good.values()])
        )
        self._ensure_links(sorted(good))
        return [
            self._on_clock(node, per_step * metrics["steps"], nbytes).end
            for node, (metrics, nbytes) in sorted(good.items())
        ]

    # ------------------------------------------------------------------ clusters
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The wrapper's messages; with clusters, each node gets its cluster's model.

        With continuous synchronization a node gets it when its interval
        begins and trains on from its own until it syncs; its update then
        counts from its cluster's model of the round it syncs in, as a
        device's update without clusters counts from the global model of
        that round."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._bases = {}
        if self.hierarchy is None:
            return messages
        layout = self._require_layout()
        for msg in messages:
            node = msg.metadata.dst_node_id
            base = self.hierarchy.base(node)
            if base is None:
                continue
            self._bases[node] = base.astype(np.float32)
            if self._plans[node].resume:  # no model in the message
                continue
            msg.content[KEY_ARRAYS] = _record_of(
                layout, self._current_arrays, self._bases[node]
            )
            self._expected[node] = model_digest(self._bases[node])
            self._interval_digest[node] = self._expected[node]
            self.bytes_down[node] = payload_bytes(msg.content)
        return messages

    def rebuild(
        self, decoded: DecodedUpdate, weight: float, base: np.ndarray
    ) -> RecordDict:
        """The device's model ``b_k + û_k`` for the inner strategy's average.

        A device that trained from its cluster's model ``b_k`` is handed on
        as ``θ + ((b_k − θ) + û_k)``, so the inner FedAvg's weighted mean is
        the hierarchical aggregate (:func:`tandem.hierarchy.hierarchical_round`).
        """
        own = self._bases.get(decoded.node_id)
        if own is not None:
            decoded = dataclasses.replace(decoded, update=(own - base) + decoded.update)
        return super().rebuild(decoded, weight, base)

    def _fold_clusters(
        self,
        server_round: int,
        updates: Sequence[DecodedUpdate],
        previous: np.ndarray,
        current: np.ndarray,
    ) -> None:
        """Cluster models from this round's replies; re-cluster when due."""
        if self.hierarchy is None:
            return
        nodes = [u.node_id for u in updates]
        done = self.hierarchy.step(
            server_round,
            nodes,
            np.stack([self._bases.get(n, previous) for n in nodes]),
            np.stack([u.update for u in updates]),
            np.array([self.last_weights[n] for n in nodes]),
        )
        gap = np.max(np.abs(np.asarray(done["global"]) - current.astype(np.float64)))
        self.on_event(
            "clusters",
            {
                "round": server_round,
                "clusters": done["clusters"],
                "reclustered": done["reclustered"],
                "cluster-sizes": done["cluster-sizes"],
                "labels": {str(n): c for n, c in self.hierarchy.labels.items()},
                "hierarchical-gap": float(gap),
            },
        )

    # ------------------------------------------------------------------ checkpoint
    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The wrapper's state plus the policy's: what a resumed run needs.

        Kept: the predictor's weights, each device's magnitude history,
        reliability counts, latency, local steps, budget scale, bandwidth
        estimate and link, the cloud clock (per-resource free times and its
        jitter generator's state), sync intervals and last syncs, and the
        trigger count. The edges'
        error-feedback residuals live on the edges (in the run's
        ``Context``) and are not part of it: a resumed run's edges start
        with empty residuals. Nor is the record of each device's model: a
        resumed cloud sends every device the full model first. Nor are the
        devices' last models that a cluster re-estimate uses for a device
        that did not reply in its round: after a resume a re-estimate places
        the devices seen since.
        """
        arrays, state = super().checkpoint_state()
        arrays["predictor"] = pack_predictor(self.predictor)
        for node, history in self.magnitudes.items():
            arrays[f"magnitudes/{node}"] = history.astype(np.float64)

        def per_node(values: Mapping[int, Any]) -> dict[str, Any]:
            return {str(n): v for n, v in values.items()}

        state.update(
            {
                "links": per_node({n: link.name for n, link in self.links.items()}),
                "asked": per_node(self.asked),
                "delivered": per_node(self.delivered),
                "steps": per_node(self.steps),
                "budget-scale": per_node(self.budget_scale),
                "intervals": per_node(self.intervals),
                "last-sync": per_node(self.last_sync),
                "latency": per_node(self.latency),
                "estimators": per_node(
                    {
                        n: [e.estimate_mbps, e.observations]
                        for n, e in self.estimators.items()
                    }
                ),
                "round-start": self.round_start,
                "clock-free": dict(self.clock._free),
                "clock-rng": self.clock._rng.bit_generator.state,
                "triggered": self.triggered,
            }
        )
        if self.hierarchy is not None:
            for c, model in self.hierarchy.models.items():
                arrays[f"cluster-model/{c}"] = model
            state["cluster-labels"] = per_node(self.hierarchy.labels)
        return arrays, state

    def restore_state(
        self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]
    ) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        super().restore_state(arrays, state)

        def per_node(key: str, kind: Callable[[Any], Any]) -> dict[int, Any]:
            return {int(n): kind(v) for n, v in state[key].items()}

        self.predictor = unpack_predictor(np.asarray(arrays["predictor"]))
        self.magnitudes = {
            int(k.split("/")[1]): np.array(v, dtype=np.float64)
            for k, v in arrays.items()
            if k.startswith("magnitudes/")
        }
        links: dict[int, str] = per_node("links", str)
        self.links.clear()
        self._ensure_links(sorted(links))
        for node, name in links.items():
            self._declared(node, name)
        for node, (mbps, seen) in per_node("estimators", list).items():
            estimator = self.estimators[node]
            estimator.estimate_mbps = None if mbps is None else float(mbps)
            estimator.observations = int(seen)
        self.asked = per_node("asked", int)
        self.delivered = per_node("delivered", int)
        self.steps = per_node("steps", int)
        self.budget_scale = per_node("budget-scale", float)
        # older checkpoints have no intervals: every device is due at once
        self.intervals = per_node("intervals", int) if "intervals" in state else {}
        self.last_sync = per_node("last-sync", int) if "last-sync" in state else {}
        self.replicas = {}  # a resumed cloud sends every device the full model
        self.latency = per_node("latency", float)
        self.round_start = float(state["round-start"])
        self.clock._free = {k: float(v) for k, v in state["clock-free"].items()}
        self.clock._rng.bit_generator.state = state["clock-rng"]
        self.triggered = int(state["triggered"])
        if self.hierarchy is not None and "cluster-labels" in state:
            self.hierarchy.restore(
                per_node("cluster-labels", int),
                {
                    int(k.split("/")[1]): v
                    for k, v in arrays.items()
                    if k.startswith("cluster-model/")
                },
            )

    # ------------------------------------------------------------------ stats
    def acesync_stats(self) -> dict[str, float | int]:
        """Run-summary entries of the policy (means over rounds)."""
        out: dict[str, float | int] = {"divergence-triggers": self.triggered}
        for key in (
            "predictor-mse-before",
            "predictor-rank-corr",
            "magnitude-rank-corr",
        ):
            values = [f[key] for f in self.round_figures if key in f]
            if values:
                out[key] = _mean_defined(values)
                out[f"{key}-last"] = float(values[-1])
        return out


def _hold_metrics(content: RecordDict) -> dict[str, float]:
    """The metrics of a reply to a hold message, checked: exactly
    :data:`~tandem.protocol.acesync.HOLD_METRICS`, finite numbers ``>= 0``,
    ``steps`` at least 1; no other record than the metrics and the node's.

    Raises
    ------
    PayloadError
        Naming what is wrong.
    """
    extra = sorted(set(content.keys()) - {KEY_METRICS, KEY_NODE})
    if extra:
        raise PayloadError(f"a hold reply carries records {extra}")
    record = get_record(content, KEY_METRICS, MetricRecord)
    keys = set(record.keys())  # type: ignore[union-attr]
    if keys != HOLD_METRICS:
        raise PayloadError(
            f"a hold reply's metrics are {sorted(keys)}, expected "
            f"{sorted(HOLD_METRICS)}"
        )
    metrics: dict[str, float] = {}
    for key in sorted(keys):
        value = record[key]  # type: ignore[index]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PayloadError(f"hold metric '{key}' = {value!r} is not a number")
        if not math.isfinite(value) or value < 0:
            raise PayloadError(f"hold metric '{key}' = {value!r}: must be finite, >= 0")
        metrics[key] = float(value)
    if metrics["steps"] < 1:
        raise PayloadError(f"hold metric 'steps' = {metrics['steps']}: must be >= 1")
    return metrics


# ------------------------------------------------------------ personalization
def _evaluate(
    srv: ServerRun, models: Mapping[int, ArrayRecord], server_round: int
) -> dict[int, float]:
    """Each node's accuracy on its own test share with the model given for it."""
    messages = [
        Message(
            content=RecordDict(
                {
                    KEY_ARRAYS: arrays,
                    KEY_CONFIG: ConfigRecord({"server-round": server_round}),
                }
            ),
            message_type=MessageType.EVALUATE,
            dst_node_id=node,
        )
        for node, arrays in models.items()
    ]
    out = {}
    for reply in srv.grid.send_and_receive(messages, timeout=srv.cfg.reply_timeout):
        if reply.has_error():
            continue
        metrics = reply.content.metric_records.get(KEY_METRICS)
        accuracy = None if metrics is None else metrics.get("eval-accuracy")
        if isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0:
            out[reply.metadata.src_node_id] = accuracy
    return out


def _cluster_labels(
    strategy: AceSync, nodes: Sequence[int], matrix: np.ndarray
) -> np.ndarray:
    """Steps 1-2 of :func:`personalize`: the cluster of each node."""
    opts: AceSyncOptions = strategy.options
    profiles = None
    if opts.cluster_profile_weight > 0:
        profiles = np.log([max(strategy.bandwidth_mbps(n), 1e-3) for n in nodes])
    k = opts.clusters
    if k == 0:
        k = choose_n_clusters(
            matrix,
            opts.max_clusters,
            seed=strategy.seed,
            profiles=profiles,
            profile_weight=opts.cluster_profile_weight,
        )
    return cluster_devices(
        matrix,
        k,
        seed=strategy.seed,
        profiles=profiles,
        profile_weight=opts.cluster_profile_weight,
    )


def _cluster_models(
    strategy: AceSync,
    layout: GroupLayout,
    nodes: Sequence[int],
    matrix: np.ndarray,
    labels: np.ndarray,
    final: ArrayRecord,
) -> tuple[dict[int, np.ndarray], float]:
    """Step 3 of :func:`personalize`: ``θ_T + ū_c`` per cluster, and the gap
    between the hierarchical aggregate and the final global model.

    ``nodes`` are the devices with a recent update (a device on a longer sync
    interval brings the one from its last sync). The gap is the identity
    check of eq. 8 over the devices of the last round only: their weighted
    updates, aggregated cluster by cluster, rebuild the final model.
    """
    count = int(labels.max()) + 1
    omega = np.array([strategy.recent_updates[n][1] for n in nodes])
    averages = cluster_average(matrix, omega, labels, count)
    base = strategy.current.astype(np.float64)  # θ the last round started from
    final_flat = layout.flat({key: a.numpy() for key, a in final.items()})
    # node ids are unsigned 64-bit: kept as Python ints, never a numpy array
    last = np.array([n in strategy.last_updates for n in nodes])
    gap = 0.0
    if last.any():
        in_last = cluster_average(
            matrix[last],
            np.array(
                [strategy.last_weights[n] for n in nodes if n in strategy.last_updates]
            ),
            labels[last],
            count,
        )
        rebuilt = base + hierarchical_aggregate(in_last.means, in_last.weights)
        gap = float(np.max(np.abs(rebuilt - final_flat)))
    models = {c: (base + averages.means[c]).astype(np.float32) for c in range(count)}
    return models, gap


def _record_of(
    layout: GroupLayout, template: Mapping[str, np.ndarray], flat: np.ndarray
) -> ArrayRecord:
    """A model record: the float tensors from ``flat``, the rest from ``template``."""
    tensors = layout.unflat(flat)
    return ArrayRecord(
        {
            k: Array(np.require(tensors.get(k, v), requirements="C"))
            for k, v in template.items()
        }
    )


def _refine_round(
    srv: ServerRun,
    strategy: AceSync,
    server_round: int,
    cluster_of: Mapping[int, int],
    models: dict[int, np.ndarray],
    record_of: Callable[[np.ndarray], ArrayRecord],
) -> int:
    """One round of step 4 of :func:`personalize`; the replies accepted.

    Each node trains from its cluster's model (a flat vector, sent as
    ``record_of(flat)``) and sends a compressed update (checked as in
    training); each cluster model moves by its cluster's mean update weighted
    by data size.
    """
    nodes = sorted(cluster_of)
    plans = strategy.prepare(server_round, nodes, ConfigRecord())
    messages = [
        Message(
            content=strategy.content(
                server_round,
                plans[node],
                record_of(models[cluster_of[node]]),
                {"server-round": server_round},
            ),
            message_type=MessageType.TRAIN,
            dst_node_id=node,
        )
        for node in nodes
    ]
    decoded, _ = strategy.decode_replies(
        server_round,
        srv.grid.send_and_receive(messages, timeout=srv.cfg.reply_timeout),
    )
    if not decoded:
        return 0
    count = len(models)
    got = [d.node_id for d in decoded]
    sizes = np.array([d.num_examples for d in decoded], dtype=np.float64)
    round_avg = cluster_average(
        np.stack([d.update for d in decoded]).astype(np.float64),
        sizes,
        np.array([cluster_of[n] for n in got]),
        count,
    )
    for c in range(count):
        if round_avg.weights[c] > 0:
            models[c] = (models[c] + round_avg.means[c]).astype(np.float32)
    srv.tracker.log_event(
        "personalize",
        {"round": server_round, "replies": len(decoded), "clusters": count},
    )
    return len(decoded)


def _mean_over(accuracy: Mapping[int, float], nodes: Sequence[int]) -> float:
    return float(np.mean([accuracy[n] for n in nodes])) if nodes else float("nan")


def _per_device(
    global_acc: Mapping[int, float],
    cluster_acc: Mapping[int, float],
    nodes: Sequence[int],
) -> dict[str, object]:
    """Each device's accuracy with the global and with its cluster's model."""
    return {
        "personal-device-accuracy-global": {str(n): global_acc[n] for n in nodes},
        "personal-device-accuracy-cluster": {str(n): cluster_acc[n] for n in nodes},
    }


def _trained_clusters(
    srv: ServerRun, strategy: AceSync, final: ArrayRecord
) -> dict[str, object]:
    """With ``acesync-personalize``: evaluate the clusters training shaped.

    Every device that has a cluster evaluates the final global model and its
    cluster's model on its own test share (a device of a single cluster
    uses the global model for both).
    """
    tracker, layout = strategy.hierarchy, strategy.layout
    if tracker is None or layout is None:
        return {}
    nodes = sorted(tracker.labels)
    if not nodes:
        return {}
    ledger = srv.ledger
    eval_round = ledger.current_round
    template = {key: a.numpy() for key, a in final.items()}
    own = {
        n: _record_of(layout, template, base.astype(np.float32))
        for n in nodes
        if (base := tracker.base(n)) is not None
    }
    global_acc = _evaluate(srv, dict.fromkeys(nodes, final), eval_round)
    cluster_acc = {**global_acc, **(_evaluate(srv, own, eval_round) if own else {})}
    both = sorted(set(global_acc) & set(cluster_acc))
    count = max(tracker.count, 1)
    return {
        "personal-in-training": True,
        "personal-clusters": count,
        "personal-cluster-estimates": tracker.estimates,
        "personal-cluster-sizes": np.bincount(
            list(tracker.labels.values()), minlength=count
        ).tolist(),
        "personal-cluster-labels": {str(n): c for n, c in tracker.labels.items()},
        "personal-rounds": 0,
        "personal-devices": len(both),
        "personal-accuracy-global": _mean_over(global_acc, both),
        "personal-accuracy-cluster": _mean_over(cluster_acc, both),
        "personal-devices-improved": int(
            sum(cluster_acc[n] > global_acc[n] for n in both)
        ),
        **_per_device(global_acc, cluster_acc, both),
        "personal-bytes-up": ledger.totals(eval_round)["bytes-up"],
        "personal-bytes-down": ledger.totals(eval_round)["bytes-down"],
    }


def personalize(
    srv: ServerRun, strategy: AceSync, final: ArrayRecord
) -> dict[str, object]:
    """Cluster the devices, refine one model per cluster, evaluate on each device.

    Steps (the module docstring has the why):

    1. Each device's most recent update ``û_k`` (from the last round it
       synced in: dynamic sync lets a device skip rounds), one row per
       device; optionally the
       log of each device's bandwidth estimate as a profile column.
    2. ``k`` by silhouette (``acesync-clusters = 0``) or as given; k-means
       (:func:`_cluster_labels`).
    3. Cluster models ``θ_T + ū_c`` from the cluster-level aggregates
       (:func:`~tandem.clustering.cluster_average` with the round's ``ω``;
       :func:`_cluster_models`).
    4. ``acesync-personalize-rounds`` rounds (:func:`_refine_round`): each
       device trains from its cluster's model and sends a compressed update
       (checked as in training); each cluster model moves by its cluster's
       weighted mean.
    5. Every device evaluates the global model and its cluster's on its own
       test share.

    Returns
    -------
    dict[str, object]
        Summary entries ``personal-*`` (empty with ``acesync-clusters = 1``
        or fewer than two devices).
    """
    opts: AceSyncOptions = strategy.options
    if strategy.hierarchy is not None and strategy.layout is not None:
        return _trained_clusters(srv, strategy, final)
    recent = strategy.recent_updates
    if opts.clusters == 1 or len(recent) < 2 or strategy.layout is None:
        return {}
    layout = strategy.layout
    nodes = sorted(recent)
    # 1-3. clusters and their models (each device's most recent update)
    matrix = np.stack([recent[n][0].update for n in nodes]).astype(np.float64)
    labels = _cluster_labels(strategy, nodes, matrix)
    count = int(labels.max()) + 1
    models, global_gap = _cluster_models(strategy, layout, nodes, matrix, labels, final)
    cluster_of = dict(zip(nodes, labels.tolist(), strict=True))
    # 4. refine within clusters; one cluster: its model is the global one
    ledger = srv.ledger
    start_round = ledger.current_round
    template = {key: a.numpy() for key, a in final.items()}
    record_of = functools.partial(_record_of, layout, template)
    rounds = opts.personalize_rounds if count > 1 else 0
    for step in range(rounds):
        if not _refine_round(
            srv, strategy, start_round + step, cluster_of, models, record_of
        ):
            break
    # 5. evaluate on each device's own data
    eval_round = start_round + rounds
    global_acc = _evaluate(srv, dict.fromkeys(nodes, final), eval_round)
    cluster_acc = (
        _evaluate(
            srv,
            {n: record_of(models[cluster_of[n]]) for n in nodes},
            eval_round,
        )
        if count > 1
        else global_acc
    )
    both = sorted(set(global_acc) & set(cluster_acc))
    after = {
        key: sum(ledger.totals(r)[key] for r in range(start_round, eval_round + 1))
        for key in ("bytes-up", "bytes-down")
    }
    return {
        "personal-clusters": count,
        "personal-cluster-sizes": np.bincount(labels, minlength=count).tolist(),
        "personal-cluster-labels": {str(n): int(cluster_of[n]) for n in nodes},
        "personal-rounds": rounds,
        "personal-devices": len(both),
        "personal-accuracy-global": _mean_over(global_acc, both),
        "personal-accuracy-cluster": _mean_over(cluster_acc, both),
        "personal-devices-improved": int(
            sum(cluster_acc[n] > global_acc[n] for n in both)
        ),
        **_per_device(global_acc, cluster_acc, both),
        "personal-hierarchical-gap": global_gap,
        "personal-bytes-up": after["bytes-up"],
        "personal-bytes-down": after["bytes-down"],
    }


# --------------------------------------------------------------------------- run
def run(srv: ServerRun) -> None:
    """``method=acesync``: ACE-Sync around Flower's FedAvg, then personalization."""
    options = srv.options_as(AceSyncOptions)
    cfg = srv.cfg
    built: list[AceSync] = []

    def build(
        *,
        on_reject: Callable[[int, int, str], None],
        on_dropout: Callable[[int, int, str], None],
        max_examples: int,
        **kwargs: Any,
    ) -> AceSync:
        strategy = AceSync(
            FedAvg(**kwargs),
            options=options,
            local_steps=cfg.train.local_steps,
            seed=cfg.seed,
            final_round=cfg.num_server_rounds,
            on_event=srv.tracker.log_event,
            on_reject=on_reject,
            on_dropout=on_dropout,
            max_examples=max_examples,
            transit=srv.ledger.transit_seconds,
        )
        built.append(strategy)
        return strategy

    def finish(final: ArrayRecord) -> dict[str, object]:
        strategy = built[0]
        nodes = max(len(strategy.asked), 1)
        summary: dict[str, object] = {
            **strategy.compression_stats(),
            **strategy.acesync_stats(),
            "steps-per-edge": strategy.stats.steps / nodes,
            "emulated-seconds-cloud-clock": strategy.round_start,
        }
        summary.update(personalize(srv, strategy, final))
        return summary

    run_fedavg(srv, build, local_steps=cfg.train.local_steps, on_finish=finish)
