"""SimulTrain, cloud side: train ``θ_c`` on streamed activations, edges unbarriered.

The cloud holds the upper layers ``θ_c`` and its copy ``θ_e^c`` of the edge
layers (version ``v_c`` = cloud steps taken). Every edge has one message in
flight (``train.simultrain``): in simulation, two messages in flight to one
node can run at once and lose each other's state updates. Replies
are handled in the order they really arrive; no edge waits for another. On a
reply carrying the activations of chunk ``v`` from edge ``k``, the cloud:

1. merges the edge's delta, if the reply carries one (checked against the
   edge layers; a bad one is counted and skipped), into ``θ_e^c`` weighted
   by staleness ``s(τ) = 1/(1 + τ)`` (τ = merges since the edge last
   reconciled; beyond ``simultrain-staleness-bound × edges`` the delta is
   dropped and counted);
2. checks the activations
   (:func:`~tandem.protocol.simultrain.read_activations`: version, shapes,
   dtypes, NaN/Inf, labels, size); a bad reply is counted and that edge
   stops, nothing else changes;
3. first sends edge ``k`` its next message, with the cut-layer gradients of
   chunk ``v − 1`` (computed earlier), ``θ_e^c`` when reconciliation is due
   (every ``R`` steps), and the size of the next chunk, so the edge works
   while the cloud does;
4. runs ``f_c`` forward and backward on each micro-batch of chunk ``v``,
   steps ``θ_c`` at once (one momentum-SGD step per micro-batch), and keeps
   the gradients at the cut for edge ``k``'s next message.

With one chunk in flight (``simultrain-window = 1``, the ``splitsync``
baseline) steps 3 and 4 swap: the next message carries the gradients of
chunk ``v`` itself, so the edge waits for them (no overlap).

**Chunk size.** ``simultrain-chunk = 0`` adapts it per edge to the measured
exchange (:func:`adapt_chunk`), up to ``simultrain-max-chunk``; a positive
value fixes it.

**Emulated time.** Every exchange is recorded (``exchange`` events: bytes
down and up, the edge's and the cloud's measured compute, which earlier
exchange's gradients the message carried). The timeline under a link profile
is that record replayed by :func:`tandem.schedules.replay_pipeline`, which
serves replies in *virtual* arrival order; the summary gives it for
``simultrain-link`` and the benchmark for every profile it compares. The run
keeps the exchanges in memory (:class:`~tandem.schedules.Exchange`) and
replays them from there.

**Shape.** :class:`SimulTrainCloud` holds the state and does the steps above;
its methods take and give SimulTrain's protocol messages
(:mod:`tandem.protocol.simultrain`) and do not depend on how they travel.
:class:`FlowerLoop` carries them as Flower messages over the Grid (timeouts,
dropouts, late joiners), :class:`~tandem.strategies.simultrain_stream.StreamLoop`
on one gRPC stream per edge (``simultrain-transport = "stream"``, with
:meth:`SimulTrainCloud.on_chunk`), and
:func:`tandem.strategies.simultrain_run.run` wires them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Message, RecordDict

from tandem.accounting import payload_bytes
from tandem.failures import app_error, stop_if_all_failed
from tandem.network import assign_links
from tandem.optim import Adam
from tandem.protocol.simultrain import (
    KEY_ACTS,
    MESSAGE_TYPE,
    Activations,
    CloudMessage,
    EdgeReply,
    SimulTrainOptions,
    check_activations,
    compute_seconds_of,
    edge_model,
    read_activations,
    read_compute_seconds,
    read_delta,
)
from tandem.schedules import ClockReport, Exchange, replay_pipeline, steady_exchanges
from tandem.server_context import ServerRun
from tandem.split import encode_cut, merge_delta, staleness_weight
from tandem.training import (
    EvalStats,
    evaluate,
    make_optimizer,
    token_cross_entropy,
)
from tandem.wire import PayloadError, check_values

__all__ = ["FlowerLoop", "SimulTrainCloud", "adapt_chunk"]

#: Seconds between looks for SuperNodes that connected after the start.
JOIN_SCAN = 2.0

#: Adaptive chunks aim to keep transport at most this share of an exchange.
OVERHEAD_SHARE = 0.1


def adapt_chunk(
    exchange_seconds: float, edge_seconds: float, micro_batches: int, max_chunk: int
) -> int:
    """Micro-batches per message so that transport stays a small share of work.

    An exchange of ``C`` micro-batches costs ``o + C·c``: a fixed overhead
    ``o`` (the measured wall time of the exchange minus the edge's compute)
    and ``c`` compute seconds per micro-batch. Overhead is at most a share
    ``p`` (:data:`OVERHEAD_SHARE`) of it when ``C ≥ o·(1 − p) / (p·c)``; the
    result is clamped to ``[1, max_chunk]``, since every micro-batch of a
    chunk is forwarded at the same weights (staleness grows with ``C``).
    """
    per_batch = max(edge_seconds, 1e-6) / max(micro_batches, 1)
    overhead = max(exchange_seconds - edge_seconds, 0.0)
    need = overhead * (1 - OVERHEAD_SHARE) / (OVERHEAD_SHARE * per_batch)
    return int(min(max(math.ceil(need), 1), max_chunk))


@dataclass(frozen=True)
class InFlight:
    """A message sent to an edge: its place, size and what it held."""

    seq: int
    bytes_down: int
    grads_from: int  # exchange whose gradients it carries (-1: none)
    want: int  # micro-batches it asks for
    final: bool  # the last message: it delivers the last chunk's gradients
    window: int = 0  # the stream's W (0: a Flower message, one in flight)


@dataclass(frozen=True)
class ChunkAnswer:
    """The cloud's answer to a streamed chunk (the stream loop times the
    cloud's work on it, frames included)."""

    message: CloudMessage  # the chunk's gradients (and θ_e^c when due)
    micro_batches: int


@dataclass
class EdgeTrack:
    """The cloud's view of one edge."""

    node_id: int
    seq: int = -1  # index of the message in flight (0, 1, ...)
    next_version: int = 0  # chunk version the next activations must carry
    steps_requested: int = 0
    steps_since_reconcile: int = 0
    base_merges: int = 0  # merge count when the edge last reconciled
    grads: dict[int, np.ndarray] = field(default_factory=dict)  # chunk -> ∂ℓ/∂a
    grads_seq: dict[int, int] = field(default_factory=dict)  # chunk -> exchange
    in_flight: InFlight | None = None  # the message the edge is working on
    edge_seconds: float = 0.0  # measured compute of the last reply
    chunk: int = 1  # adaptive chunk size (simultrain-chunk = 0)
    catch_up: bool = False  # joined late: its first message carries θ_e^c
    trained: int = 0  # micro-batches of this edge the cloud has trained on
    sent_at: float = 0.0  # wall clock when the message in flight left


@dataclass(frozen=True)
class PeriodState:
    """What a period's evaluation reads, as it was when the period ended:
    ``θ_e^c``, ``θ_c`` (None: the live model), the train losses since the
    last evaluation and the exchanges handled."""

    period: int
    theta_ec: dict[str, torch.Tensor]
    cloud: dict[str, torch.Tensor] | None
    losses: list[float]
    exchanges: int


class SimulTrainCloud:
    """SimulTrain's cloud: ``θ_c``, ``θ_e^c`` and every edge's exchange state.

    The methods speak SimulTrain's protocol (:mod:`tandem.protocol.simultrain`):
    :meth:`next_message` makes an edge's next :class:`CloudMessage` and
    :meth:`on_reply` handles its answer's records, whatever carried them; the
    caller says how many bytes each message took (:meth:`sent`) and supplies
    the function that sends. :class:`FlowerLoop` drives it with Flower messages.

    One reply is handled (:meth:`on_reply`) in the steps of the module
    docstring: :meth:`merge` its delta, check its activations, send the edge
    its next message, :meth:`train_chunk` on the activations, :meth:`record`
    the exchange, then :meth:`end_period_if_due` (evaluate, checkpoint).
    """

    def __init__(self, srv: ServerRun, opts: SimulTrainOptions) -> None:
        cfg = srv.cfg
        data = srv.data()
        # --- hyperparameters: fixed for the run
        self.srv = srv  # where metrics, rejections and bytes are reported
        self.cfg = cfg
        self.opts = opts
        self.device = srv.device
        self.test = data.test
        self.num_classes = data.num_classes
        self.label_shape = tuple(data.train.y.shape[1:])  # (T,) for token data
        edge, cloud = edge_model(cfg, opts)  # θ_e^c on CPU, θ_c on the device
        cloud.to(self.device)
        example = torch.zeros((1, *data.input_shape), dtype=torch.float32)
        if data.tokens:
            example = example.long()
        self.cut_shape = tuple(edge(example).shape[1:])
        self.max_rows = (opts.chunk or opts.max_chunk) * cfg.train.batch_size

        # --- state
        self.cloud = cloud  # θ_c
        self.optimizer = make_optimizer(
            cloud, cfg.train.lr, cfg.train.momentum, cfg.train.optimizer
        )
        self.theta_ec = {k: v.clone() for k, v in edge.state_dict().items()}
        self.edge_layout = {
            k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in self.theta_ec.items()
        }
        self.full = torch.nn.Sequential(edge, cloud)  # θ_e^c ∘ θ_c, to evaluate
        self.tracks: dict[int, EdgeTrack] = {}  # the edges taking part
        self.retired: list[EdgeTrack] = []  # the dropped edges
        self.errors: dict[int, str] = {}  # the dropped edges' ClientApp errors
        self.merges = 0  # deltas merged into θ_e^c
        self.cloud_steps = 0  # v_c: steps of θ_c
        self.period = 0  # evaluations after the start
        self.resumed_steps: int | None = None  # steps per edge done before a resume

        # --- stats
        self.exchanges: list[Exchange] = []  # in the order they were handled
        self.marks: list[int] = []  # exchanges handled at each evaluation
        self.losses: list[float] = []  # train losses since the last evaluation
        # real-time mode: each period's evaluation taken on a copy of the
        # models when the period ends and run after the streams (the replay
        # leaves evaluation out; done at the mark, it stalled every stream)
        self.defer_evaluations = False
        self.deferred: list[PeriodState] = []
        self.chunks_sent: list[int] = []
        self.staleness_seen: list[int] = []
        self.dropped_deltas = 0
        self.joined: list[int] = []

    # ------------------------------------------------------------ edges
    def start(self, nodes: list[int]) -> None:
        """Take ``nodes`` as the run's edges; evaluate the starting model.

        After a resume every edge starts from ``θ_e^c`` and does the steps left.
        """
        done = self.resumed_steps or 0
        resumed = self.resumed_steps is not None
        for n in nodes:
            self.tracks[n] = EdgeTrack(
                n, steps_requested=done, trained=done, catch_up=resumed
            )
        self.srv.ledger.current_round = 1
        # one report every eval_every steps per edge, and one after the final merges
        self.srv.tracker.set_total_rounds(
            self.opts.steps // self.opts.eval_every + 1, unit="period"
        )
        self.evaluate()

    def join(self, node: int) -> EdgeTrack:
        """A node that connected late: it catches up from ``θ_e^c``."""
        track = self.tracks[node] = EdgeTrack(node, catch_up=True)
        self.joined.append(node)
        self.srv.tracker.log_event("joined", {"node-id": node, "period": self.period})
        return track

    def drop(self, track: EdgeTrack, reason: str, error: str | None = None) -> None:
        """Stop using an edge (silent, failed or gone); the others go on.

        ``error`` is its ClientApp's error, if it failed: when no edge is left
        and all failed alike, the run stops with that error
        (:class:`~tandem.failures.RunFailedError`).
        """
        if error is not None:
            self.errors[track.node_id] = error
        self.retired.append(self.tracks.pop(track.node_id))
        if not self.tracks:  # no edge left: stop if all failed alike
            stop_if_all_failed(
                self.period + 1, [t.node_id for t in self.retired], self.errors
            )
        self.reject(track, f"{reason}: edge dropped")
        self.srv.tracker.log_event(
            "dropped",
            {"node-id": track.node_id, "period": self.period, "reason": reason},
        )

    def reject(self, track: EdgeTrack, reason: str) -> None:
        """Count and log a rejected reply; nothing else changes."""
        self.srv.reject(self.period + 1, track.node_id, reason)

    # ------------------------------------------------------------ messages
    def next_message(self, track: EdgeTrack) -> CloudMessage:
        """The edge's next message (step 3 of the module docstring).

        The gradients of the oldest chunk computed and not yet sent, ``θ_e^c``
        when reconciliation is due (or the edge must catch up, or it is the
        last message), and the size of the next chunk.
        """
        opts = self.opts
        want = min(opts.chunk or track.chunk, opts.steps - track.steps_requested)
        grad_for = min(track.grads, default=-1)
        grads = None
        if grad_for >= 0:
            grads = encode_cut(track.grads.pop(grad_for), opts.precision, "g")
        # the last message delivers the last chunk's gradients
        final = want == 0 and grad_for == track.next_version - 1
        due = opts.reconcile_every > 0 and (
            track.steps_since_reconcile >= opts.reconcile_every
        )
        params = None
        if due or final or track.catch_up:
            track.catch_up = False
            params = {k: v.numpy() for k, v in self.theta_ec.items()}
            track.steps_since_reconcile = 0
            track.base_merges = self.merges
        track.in_flight = InFlight(
            seq=track.seq + 1,
            bytes_down=0,
            grads_from=track.grads_seq.pop(grad_for) if grads is not None else -1,
            want=want,
            final=final,
        )
        track.seq += 1
        track.steps_requested += want
        track.steps_since_reconcile += want
        if want:
            self.chunks_sent.append(want)
        return CloudMessage(self.cloud_steps, want, grad_for, grads, params)

    def sent(self, track: EdgeTrack, nbytes: int) -> None:
        """The message made by :meth:`next_message` left, ``nbytes`` long."""
        if track.in_flight is None:
            raise RuntimeError(f"no message for node {track.node_id} to send")
        track.in_flight = dataclasses.replace(track.in_flight, bytes_down=nbytes)
        track.sent_at = time.monotonic()

    def on_reply(
        self,
        track: EdgeTrack,
        content: RecordDict,
        bytes_up: int,
        send: Callable[[EdgeTrack], None],
    ) -> None:
        """Handle an edge's reply (the steps of the module docstring).

        ``send(track)`` sends the edge its next message; it is called before
        the cloud computes on the chunk, so the edge works meanwhile. A reply
        that fails its checks is rejected and that edge gets no further
        message (its stash no longer matches the cloud's state).
        """
        answered = track.in_flight
        if answered is None:
            raise RuntimeError(f"a reply from node {track.node_id}, none asked")
        try:
            track.edge_seconds = read_compute_seconds(content)
        except PayloadError as err:
            self.reject(track, str(err))
            return
        self.merge(track, content)
        if KEY_ACTS not in content:  # a reply to gradients only
            self.record(track, answered, bytes_up, 0.0)
            if not answered.final:
                send(track)
            return
        try:
            chunk = read_activations(
                content,
                track.next_version,
                answered.want,
                self.cut_shape,
                self.opts.precision,
                self.num_classes,
                self.max_rows,
                label_shape=self.label_shape,
            )
        except PayloadError as err:
            self.reject(track, str(err))
            return
        version = track.next_version
        track.next_version += 1
        if not self.opts.chunk:
            track.chunk = adapt_chunk(
                time.monotonic() - track.sent_at,
                track.edge_seconds,
                answered.want,
                self.opts.max_chunk,
            )
        serial = self.opts.in_flight == 1  # splitsync: this chunk's gradients next
        if not serial:
            send(track)  # the edge works while the cloud computes
        tick = time.perf_counter()
        track.grads[version] = self.train_chunk(chunk)
        track.grads_seq[version] = answered.seq
        track.trained += len(chunk.sizes)
        self.record(track, answered, bytes_up, time.perf_counter() - tick)
        if serial:
            send(track)
        self.end_period_if_due()

    # ------------------------------------------------------------ the stream
    def open_session(self, track: EdgeTrack) -> dict[str, np.ndarray]:
        """``θ_e^c`` for an edge's stream session: it reconciles on it first."""
        track.catch_up = False
        track.steps_since_reconcile = 0
        track.base_merges = self.merges
        track.seq = track.next_version - 1
        return {k: v.numpy() for k, v in self.theta_ec.items()}

    def on_chunk(self, track: EdgeTrack, reply: EdgeReply) -> ChunkAnswer | None:
        """Handle a chunk frame's reply (a stream's steps 1, 2 and 4).

        Everything is checked before anything changes: the compute seconds,
        the activations (version, ``want`` = the chunk size or the steps
        left, shapes, dtypes, NaN/Inf, int8 scales, labels, rows:
        :func:`~tandem.protocol.simultrain.check_activations`) and the
        delta (:func:`~tandem.wire.check_values`), as a Flower reply's are.
        Then the delta is merged, ``θ_c`` trained on the chunk, and the
        answer is the chunk's gradients at once (with ``θ_e^c`` when
        reconciliation is due or it was the last chunk); ``None`` for a frame
        that only carried a delta (:class:`ChunkAnswer` otherwise).

        Raises
        ------
        PayloadError
            On any failed check; the cloud's state is unchanged then.
        """
        opts = self.opts
        seconds = compute_seconds_of(reply.compute_seconds)
        want = min(opts.stream_chunk, opts.steps - track.steps_requested)
        chunk = None
        if reply.acts is not None:
            if want <= 0:
                raise PayloadError("a chunk after the session's last one")
            arrays = dict(reply.acts)
            for key, values in (("y", reply.labels), ("sizes", reply.sizes)):
                if values is not None:  # else refused as a missing key
                    arrays[key] = values
            chunk = check_activations(
                reply.version,
                arrays,
                track.next_version,
                want,
                self.cut_shape,
                opts.precision,
                self.num_classes,
                self.max_rows,
                label_shape=self.label_shape,
            )
        delta = None
        if reply.delta is not None:
            delta = check_values(reply.delta, self.edge_layout)
        # --- checked: from here on the state changes
        track.edge_seconds = seconds
        if delta is not None:
            self.merge_checked(track, delta)
        if chunk is None:
            return None
        version = track.next_version
        track.next_version += 1
        track.seq = version
        track.steps_requested += want
        track.steps_since_reconcile += want
        self.chunks_sent.append(want)
        grads = self.train_chunk(chunk)
        track.trained += want
        final = track.steps_requested >= opts.steps
        due = opts.reconcile_every > 0 and (
            track.steps_since_reconcile >= opts.reconcile_every
        )
        params = None
        if due or final:
            params = {k: v.numpy() for k, v in self.theta_ec.items()}
            track.steps_since_reconcile = 0
            track.base_merges = self.merges
        message = CloudMessage(
            self.cloud_steps, 0, version, encode_cut(grads, opts.precision, "g"), params
        )
        return ChunkAnswer(message, want)

    # ------------------------------------------------------------ maths
    def merge(self, track: EdgeTrack, content: RecordDict) -> None:
        """Merge the reply's delta into ``θ_e^c``, weighted by staleness (step 1).

        ``θ_e^c ← θ_e^c + s(τ)·Δ / K`` (:func:`~tandem.split.merge_delta`),
        ``τ`` = merges since the edge last reconciled, ``K`` = edges taking
        part; beyond ``simultrain-staleness-bound × K`` the delta is dropped
        and counted. A malformed delta is rejected; the rest of the reply is
        still used.
        """
        try:
            checked = read_delta(content, self.edge_layout)
        except PayloadError as err:
            self.reject(track, f"delta: {err}")
            return
        if checked is not None:
            self.merge_checked(track, checked)

    def merge_checked(self, track: EdgeTrack, checked: dict[str, np.ndarray]) -> None:
        """Merge a delta already checked against the edge layers (step 1)."""
        delta = {k: torch.from_numpy(np.array(v)) for k, v in checked.items()}
        gap = self.merges - track.base_merges
        edges = len(self.tracks)
        weight = staleness_weight(gap, self.opts.staleness_bound * edges)
        self.staleness_seen.append(gap)
        if weight == 0.0:
            self.dropped_deltas += 1
        else:
            self.theta_ec = merge_delta(self.theta_ec, delta, weight, edges)
            self.merges += 1

    def train_chunk(self, chunk: Activations) -> np.ndarray:
        """``f_c`` forward and backward per micro-batch, ``θ_c`` steps at once.

        One momentum-SGD step per micro-batch (step 4). Returns the gradients
        at the cut, float32 of the activations' shape.
        """
        self.cloud.train()
        grads = []
        start = 0
        for size in chunk.sizes:
            a = (
                torch.from_numpy(chunk.acts[start : start + size])
                .to(self.device)
                .requires_grad_(True)
            )
            y = torch.from_numpy(chunk.labels[start : start + size]).to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            loss = token_cross_entropy(self.cloud(a), y)
            loss.backward()
            self.optimizer.step()
            grads.append(a.grad.detach().cpu().numpy().astype(np.float32))
            self.losses.append(float(loss.detach()))
            self.cloud_steps += 1
            start += size
        return np.concatenate(grads)

    # ------------------------------------------------------------ bookkeeping
    def record(
        self,
        track: EdgeTrack,
        answered: InFlight,
        bytes_up: int,
        cloud_seconds: float,
    ) -> None:
        """Keep the exchange for the replay and log it (``exchange`` event)."""
        exchange = Exchange(
            node=track.node_id,
            seq=answered.seq,
            bytes_down=answered.bytes_down,
            edge_seconds=track.edge_seconds,
            bytes_up=bytes_up,
            cloud_seconds=cloud_seconds,
            grads_from=answered.grads_from,
            micro_batches=answered.want,
            window=answered.window,
        )
        self.exchanges.append(exchange)
        self.srv.tracker.log_event("exchange", exchange.to_record())

    def end_period_if_due(self) -> None:
        """Evaluate every ``eval_every`` steps per edge (on average); checkpoint.

        With :attr:`defer_evaluations` the evaluation is of a copy of the
        models taken now, run by :meth:`evaluate_deferred`.
        """
        if self.cloud_steps < (self.period + 1) * self.opts.eval_every * len(
            self.tracks
        ):
            return
        self.period += 1
        self.marks.append(len(self.exchanges))
        if self.defer_evaluations:
            self.deferred.append(self._period_state(copy=True))
            self.losses = []
        else:
            self.evaluate()
        self.srv.ledger.current_round = self.period + 1
        every = self.cfg.checkpoint_every
        if every and self.period % every == 0:
            self.checkpoint()

    def evaluate(self) -> EvalStats:
        """Evaluate ``θ_e^c ∘ θ_c`` on the test split and report the period."""
        stats = self._evaluate(self._period_state(copy=False))
        self.losses = []
        return stats

    def evaluate_deferred(self) -> None:
        """The deferred periods' evaluations, in order (then the live models
        are back)."""
        for state in self.deferred:
            self._evaluate(state)
        self.deferred = []

    def _period_state(self, *, copy: bool) -> PeriodState:
        clone = (lambda t: t.detach().clone()) if copy else (lambda t: t)
        return PeriodState(
            period=self.period,
            theta_ec={k: clone(v) for k, v in self.theta_ec.items()},
            cloud={k: clone(v) for k, v in self.cloud.state_dict().items()}
            if copy
            else None,
            losses=list(self.losses),
            exchanges=len(self.exchanges),
        )

    def _evaluate(self, state: PeriodState) -> EvalStats:
        """Evaluate ``θ_e^c ∘ θ_c`` as ``state`` holds them and report its
        period (its cloud copy loaded for the evaluation only)."""
        live = None
        if state.cloud is not None:
            live = {k: v.detach().clone() for k, v in self.cloud.state_dict().items()}
            self.cloud.load_state_dict(state.cloud)
        self.full[0].load_state_dict(state.theta_ec)
        self.full[0].to(self.device)
        stats = evaluate(self.full, self.test, self.device)
        self.full[0].cpu()
        if live is not None:
            self.cloud.load_state_dict(live)
        metrics: dict[str, float] = stats.as_metrics()
        if state.losses:
            metrics["train-loss"] = float(np.mean(state.losses))
        metrics["exchanges"] = state.exchanges
        self.srv.report_round(state.period, metrics)
        return stats

    def checkpoint(self) -> None:
        """Save ``θ_c``, ``θ_e^c``, the cloud optimizer's state and the counters.

        What the edges learned since their last reconciliation is not in
        ``θ_e^c`` and is not saved: a resumed run starts every edge from
        ``θ_e^c`` (nothing is applied twice; that edge-side progress is lost).
        """
        arrays = {
            f"cloud/{k}": v.detach().cpu().numpy()
            for k, v in self.cloud.state_dict().items()
        }
        arrays.update({f"edge/{k}": v.numpy() for k, v in self.theta_ec.items()})
        for i, p in enumerate(self.cloud.parameters()):  # momentum, or Adam's
            for name, value in self.optimizer.state.get(p, {}).items():
                arrays[f"optimizer/{i}/{name}"] = value.detach().cpu().numpy()
        counters = {
            "period": self.period,
            "cloud-steps": self.cloud_steps,
            "merges": self.merges,
            "steps-done": min((t.trained for t in self.tracks.values()), default=0),
        }
        self.srv.save_checkpoint(arrays, counters)

    def resume(self) -> None:
        """Load the ``resume`` checkpoint, if any: weights, optimizer state, counters.

        Raises
        ------
        ConfigError
            If it is not a SimulTrain checkpoint of this model.
        """
        checkpoint = self.srv.resumed()
        if checkpoint is None:
            return
        arrays, state = checkpoint
        part = {
            k[6:]: torch.from_numpy(v)
            for k, v in arrays.items()
            if k.startswith("cloud/")
        }
        try:
            self.cloud.load_state_dict(part)
        except RuntimeError as err:
            raise self.srv.resume_mismatch(err) from None
        self._restore_optimizer(arrays)
        self.theta_ec = {
            k[5:]: torch.from_numpy(v)
            for k, v in arrays.items()
            if k.startswith("edge/")
        }
        self.period = int(state["period"])
        self.cloud_steps = int(state["cloud-steps"])
        self.merges = int(state["merges"])
        self.resumed_steps = int(state["steps-done"])

    def _restore_optimizer(self, arrays: Mapping[str, np.ndarray]) -> None:
        """The cloud optimizer's state from a checkpoint's ``optimizer/i/name``
        arrays (``momentum_buffer``, or Adam's ``step``, ``exp_avg`` and
        ``exp_avg_sq``; Adam's step stays on the CPU, as torch keeps it).

        Raises
        ------
        ConfigError
            If the checkpoint holds another optimizer's state.
        """
        names = (
            {"step", "exp_avg", "exp_avg_sq"}
            if isinstance(self.optimizer, Adam)
            else {"momentum_buffer"}
        )
        params = list(self.cloud.parameters())
        for key, value in arrays.items():
            if not key.startswith("optimizer/"):
                continue
            _, index, name = key.split("/", 2)
            if name not in names or not 0 <= int(index) < len(params):
                raise self.srv.resume_mismatch(
                    ValueError(f"optimizer state '{key}' is not this run's optimizer's")
                )
            p = params[int(index)]
            tensor = torch.from_numpy(np.array(value))
            if name != "step":
                tensor = tensor.to(p.device)
            self.optimizer.state[p][name] = tensor

    def finish(self) -> None:
        """Final evaluation, the replay under ``simultrain-link``, the summary."""
        self.evaluate_deferred()
        self.period += 1
        self.marks.append(len(self.exchanges))
        final = self.evaluate()
        every_track = [*self.retired, *self.tracks.values()]
        timeline = self.replay(sorted({t.node_id for t in every_track}))
        total_steps = sum(t.steps_requested for t in every_track) or 1
        cum = self.srv.cumulative_bytes
        opts = self.opts
        self.srv.tracker.finish(
            {
                "method": self.cfg.method,
                "periods": self.period,
                "final-accuracy": final.accuracy,
                "final-perplexity": final.perplexity,
                "bytes-up": cum["bytes-up"],
                "bytes-down": cum["bytes-down"],
                "steps-per-edge": opts.steps,
                "edges": len({t.node_id for t in every_track}),
                "exchanges": len(self.exchanges),
                "emulated-seconds": timeline.total_seconds,
                "emulated-seconds-per-step": timeline.total_seconds / opts.steps,
                "emulated-seconds-per-period": list(timeline.round_end),
                "bytes-up-per-step": cum["bytes-up"] / total_steps,
                "bytes-down-per-step": cum["bytes-down"] / total_steps,
                "clock-mode": timeline.mode,
                "link": opts.link,
                "mean-chunk": float(np.mean(self.chunks_sent))
                if self.chunks_sent
                else 0.0,
                "dropped-edges": len(self.retired),
                "joined-edges": len(self.joined),
                "max-staleness": max(self.staleness_seen, default=0),
                "dropped-deltas": self.dropped_deltas,
                "rejected-replies": self.srv.rejected(),
                **{f"utilization-{k}": v for k, v in timeline.utilization.items()},
            }
        )

    def replay(self, nodes: list[int]) -> ClockReport:
        """This run's exchanges re-timed under ``simultrain-link``."""
        links = assign_links(nodes, self.opts.link, self.cfg.seed)
        return replay_pipeline(
            steady_exchanges(self.exchanges),
            links,
            self.opts.edge_factor,
            self.opts.cloud_factor,
            seed=self.cfg.seed,
            marks=self.marks,
        )


class FlowerLoop:
    """The I/O loop: SimulTrain's messages as Flower messages on the Grid.

    Replies are handled as they really arrive: no edge waits for another. An
    edge silent for ``reply-timeout`` seconds, or one the SuperLink reports
    unavailable, is dropped (the others go on). A SuperNode that connects
    later joins and catches up from ``θ_e^c``; so does a dropped one that went
    offline and came back under the same node id.
    """

    def __init__(self, srv: ServerRun, cloud: SimulTrainCloud) -> None:
        self.srv = srv
        self.cloud = cloud
        self.waiting: dict[str, EdgeTrack] = {}  # message id -> its edge
        self.lost: set[int] = set()  # dropped, and still listed by the SuperLink
        self.next_scan = 0.0

    def send(self, track: EdgeTrack) -> None:
        """Push the edge's next message."""
        content = self.cloud.next_message(track).to_content()
        msg = Message(
            content=content,
            dst_node_id=track.node_id,
            message_type=MESSAGE_TYPE,
            ttl=self.srv.cfg.reply_timeout,
        )
        (message_id,) = list(self.srv.grid.push_messages([msg]))
        self.cloud.sent(track, payload_bytes(content))
        self.waiting[message_id] = track

    def serve(self) -> None:
        """Send every edge its first message; run until no reply is awaited."""
        for track in list(self.cloud.tracks.values()):
            self.send(track)
        self.next_scan = time.monotonic() + JOIN_SCAN
        while self.waiting:
            replies = list(self.srv.grid.pull_messages(list(self.waiting)))
            now = time.monotonic()
            self._drop_silent(now, {r.metadata.reply_to_message_id for r in replies})
            if now >= self.next_scan:
                self._admit_newcomers()
                self.next_scan = now + JOIN_SCAN
            if not replies:
                time.sleep(0.02)
                continue
            for reply in replies:
                track = self.waiting.pop(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    reason = f"error reply: {reply.error.reason}"
                    self._drop(track, reason, app_error(reply))
                    continue
                self.cloud.on_reply(
                    track, reply.content, payload_bytes(reply.content), self.send
                )

    def _drop(self, track: EdgeTrack, reason: str, error: str | None = None) -> None:
        self.lost.add(track.node_id)
        self.cloud.drop(track, reason, error)

    def _drop_silent(self, now: float, answered: set[str]) -> None:
        timeout = self.srv.cfg.reply_timeout
        for msg_id, track in list(self.waiting.items()):
            if now - track.sent_at > timeout and msg_id not in answered:
                del self.waiting[msg_id]
                self._drop(track, f"no reply within {timeout:g} s")

    def _admit_newcomers(self) -> None:
        online = set(self.srv.grid.get_node_ids())
        self.lost &= online  # a lost node no longer listed may come back
        for node in sorted(online - set(self.cloud.tracks) - self.lost):
            self.send(self.cloud.join(node))
