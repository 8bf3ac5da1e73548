"""SimulTrain, cloud side: train ``θ_c`` on streamed activations, edges unbarriered.

The cloud holds the upper layers ``θ_c`` and its copy ``θ_e^c`` of the edge
layers (version ``v_c`` = cloud steps taken). Every edge has one message in
flight (``train.simultrain``): in simulation, two messages in flight to one
node can run at once and lose each other's state updates. Replies
are handled in the order they really arrive; no edge waits for another. On a
reply carrying the activations of chunk ``v`` from edge ``k``, the cloud:

1. checks it (:func:`check_activations`: version, shapes, dtypes, NaN/Inf,
   labels, size); a bad reply is counted and that edge stops, nothing else
   changes;
2. first sends edge ``k`` its next message, with the cut-layer gradients of
   chunk ``v − 1`` (computed earlier), ``θ_e^c`` when reconciliation is due
   (every ``R`` steps), and the size of the next chunk, so the edge works
   while the cloud does;
3. merges the edge's delta, if the reply carries one, into ``θ_e^c``
   weighted by staleness ``s(τ) = 1/(1 + τ)`` (τ = merges since the edge last
   reconciled; beyond ``simultrain-staleness-bound × edges`` the delta is
   dropped and counted);
4. runs ``f_c`` forward and backward on each micro-batch of chunk ``v``,
   steps ``θ_c`` at once (one momentum-SGD step per micro-batch), and keeps
   the gradients at the cut for edge ``k``'s next message.

**Chunk size.** ``simultrain-chunk = 0`` adapts it per edge to the measured
exchange (:func:`adapt_chunk`), up to ``simultrain-max-chunk``; a positive
value fixes it.

**Emulated time.** Every exchange is recorded (``exchange`` events: bytes
down and up, the edge's and the cloud's measured compute, which earlier
exchange's gradients the message carried). The timeline under a link profile
is that record replayed by :func:`tandem.schedules.replay_pipeline`, which
serves replies in *virtual* arrival order; the summary gives it for
``simultrain-link`` and the benchmark for every profile it compares.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from tandem.accounting import payload_bytes
from tandem.clients.simultrain import (
    KEY_ACTS,
    KEY_DELTA,
    KEY_EDGE_PARAMS,
    KEY_GRADS,
    KEY_META,
    MESSAGE_TYPE,
    edge_model,
)
from tandem.failures import app_error, stop_if_all_failed
from tandem.network import assign_links
from tandem.schedules import ClockReport, exchanges_from_records, replay_pipeline
from tandem.server_context import ServerRun
from tandem.split import (
    cut_keys,
    decode_cut,
    encode_cut,
    merge_delta,
    staleness_weight,
)
from tandem.strategies.simultrain_options import SimulTrainOptions
from tandem.tracking import read_jsonl
from tandem.training import evaluate
from tandem.wire import KEY_CONFIG, KEY_METRICS, PayloadError, check_arrays, get_record

__all__ = ["adapt_chunk", "check_activations", "run"]

#: Seconds between looks for SuperNodes that connected after the start.
JOIN_SCAN = 2.0


@dataclass(frozen=True)
class InFlight:
    """A message sent to an edge: its place, size and the gradients it held."""

    seq: int
    bytes_down: int
    grads_from: int
    want: int


@dataclass
class EdgeTrack:
    """The cloud's view of one edge."""

    node_id: int
    seq: int = -1  # index of the message in flight (0, 1, ...)
    next_version: int = 0  # chunk version the next activations must carry
    steps_requested: int = 0
    steps_since_reconcile: int = 0
    base_merges: int = 0  # merge count when the edge last reconciled
    grads: dict[int, np.ndarray] = field(default_factory=dict)
    grads_seq: dict[int, int] = field(default_factory=dict)  # chunk -> exchange
    message_id: str | None = None
    want_inflight: int = 0  # micro-batches the in-flight message asks for
    bytes_down: int = 0  # size of the message in flight
    grads_from: int = -1  # exchange whose gradients the message in flight holds
    final_sent: bool = False
    edge_seconds: float = 0.0  # measured compute of the last reply
    chunk: int = 1  # adaptive chunk size (simultrain-chunk = 0)
    catch_up: bool = False  # joined late: its first message carries θ_e^c
    trained: int = 0  # micro-batches of this edge the cloud has trained on
    sent_at: float = 0.0  # wall clock when the message in flight left


def check_activations(
    content: RecordDict,
    expected_version: int,
    want: int,
    cut_shape: tuple[int, ...],
    dtype: str,
    num_classes: int,
    max_rows: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate an activations reply; return ``(acts float32, labels, sizes)``.

    Raises
    ------
    PayloadError
        On a missing record, a version that is not the expected one (replayed
        or from the future), wrong shapes or dtypes, NaN/Inf, labels out of
        range, or more rows than were asked for.
    """
    meta = get_record(content, KEY_META, ConfigRecord)
    version = meta.get("v-e")  # type: ignore[attr-defined]
    if version != expected_version:
        raise PayloadError(f"chunk version {version!r}, expected {expected_version}")
    record = get_record(content, KEY_ACTS, ArrayRecord)
    keys = {"y", "sizes"} | cut_keys(dtype, "a")
    if set(record) != keys:  # type: ignore[arg-type]
        raise PayloadError(
            f"activation keys {sorted(record)}, expected {', '.join(sorted(keys))}"  # type: ignore[arg-type]
        )
    y, sizes = record["y"], record["sizes"]  # type: ignore[index]
    if y.dtype != "int64" or sizes.dtype != "int64":
        raise PayloadError(f"dtypes y={y.dtype} sizes={sizes.dtype}")
    rows = y.shape[0] if y.shape else 0
    if rows > max_rows or tuple(y.shape) != (rows,):
        raise PayloadError(
            f"labels of shape {tuple(y.shape)}, expected (<= {max_rows},)"
        )
    sizes_np = sizes.numpy()
    if sizes_np.ndim != 1 or len(sizes_np) != want or (sizes_np <= 0).any():
        raise PayloadError(f"micro-batch sizes {sizes_np.tolist()} for {want} asked")
    if int(sizes_np.sum()) != rows:
        raise PayloadError("sizes and label rows disagree")
    try:
        acts = decode_cut(
            {k: record[k].numpy() for k in cut_keys(dtype, "a")},  # type: ignore[index]
            dtype,
            "a",
            (rows, *cut_shape),
        )
    except ValueError as err:
        raise PayloadError(f"activations: {err}") from None
    labels = y.numpy()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise PayloadError(f"labels outside [0, {num_classes})")
    return acts, labels, sizes_np


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


def _compute_seconds(content: RecordDict) -> float:
    metrics = get_record(content, KEY_METRICS, MetricRecord)
    value = metrics.get("compute-seconds")  # type: ignore[attr-defined]
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise PayloadError(f"metric 'compute-seconds' = {value!r}")
    return float(value)


def run(srv: ServerRun) -> None:
    """Run SimulTrain until every edge has taken ``simultrain-steps`` steps."""
    cfg, opts = srv.cfg, srv.options
    if not isinstance(opts, SimulTrainOptions):
        raise TypeError(
            f"SimulTrain needs SimulTrainOptions, got {type(opts).__name__}"
        )
    data = srv.data()
    device = srv.device
    edge_c, cloud = edge_model(cfg, opts)  # θ_e^c on CPU, θ_c on the device
    cloud.to(device)
    cut_shape = tuple(edge_c(torch.zeros(1, *data.input_shape)).shape[1:])
    optimizer = torch.optim.SGD(
        cloud.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum
    )
    theta_ec = {k: v.clone() for k, v in edge_c.state_dict().items()}
    edge_layout = {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in theta_ec.items()
    }
    full = torch.nn.Sequential(edge_c, cloud)

    resumed = _resume(srv, cloud, optimizer)
    if resumed is not None:
        theta_ec = resumed["edge"]
    done = 0 if resumed is None else int(resumed["steps-done"])
    nodes = srv.wait_for_nodes(timeout=120.0)
    # after a resume every edge starts from θ_e^c and does the steps left
    tracks = {
        n: EdgeTrack(
            n, steps_requested=done, trained=done, catch_up=resumed is not None
        )
        for n in nodes
    }
    dtype = opts.precision
    max_rows = (opts.chunk or opts.max_chunk) * cfg.train.batch_size
    chunks_sent: list[int] = []
    merges = 0 if resumed is None else int(resumed["merges"])
    cloud_steps = 0 if resumed is None else int(resumed["cloud-steps"])
    exchanges = 0
    losses: list[float] = []
    period = 0 if resumed is None else int(resumed["period"])
    dropped_deltas = 0
    staleness_seen: list[int] = []
    marks: list[int] = []
    srv.ledger.current_round = 1
    # one report every eval_every steps per edge, and one after the final merges
    srv.tracker.set_total_rounds(opts.steps // opts.eval_every + 1, unit="period")

    def send(track: EdgeTrack) -> None:
        # the next message: gradients of the chunk before the one just
        # received (if computed), reconciliation when due, the next chunk size
        want = min(opts.chunk or track.chunk, opts.steps - track.steps_requested)
        content = RecordDict()
        grad_for = min(track.grads, default=-1)
        track.grads_from = -1
        if grad_for >= 0:
            encoded = encode_cut(track.grads.pop(grad_for), opts.precision, "g")
            content[KEY_GRADS] = ArrayRecord({k: Array(v) for k, v in encoded.items()})
            track.grads_from = track.grads_seq.pop(grad_for)
        # the last message delivers the last chunk's gradients
        final = want == 0 and grad_for == track.next_version - 1
        due = opts.reconcile_every > 0 and (
            track.steps_since_reconcile >= opts.reconcile_every
        )
        if due or final or track.catch_up:
            track.catch_up = False
            content[KEY_EDGE_PARAMS] = ArrayRecord(
                {k: Array(v.numpy()) for k, v in theta_ec.items()}
            )
            track.steps_since_reconcile = 0
            track.base_merges = merges
        content[KEY_CONFIG] = ConfigRecord(
            {"v-c": cloud_steps, "want": want, "grad-for": grad_for}
        )
        msg = Message(
            content=content,
            dst_node_id=track.node_id,
            message_type=MESSAGE_TYPE,
            ttl=cfg.reply_timeout,
        )
        (track.message_id,) = list(srv.grid.push_messages([msg]))
        track.seq += 1
        track.bytes_down = payload_bytes(content)
        track.steps_requested += want
        track.steps_since_reconcile += want
        track.want_inflight = want
        track.final_sent = final
        track.sent_at = time.monotonic()
        if want:
            chunks_sent.append(want)
        waiting[track.message_id] = track

    def record_exchange(
        track: EdgeTrack, exchange: InFlight, reply: Message, cloud_seconds: float
    ) -> None:
        nonlocal exchanges
        exchanges += 1
        srv.tracker.log_event(
            "exchange",
            {
                "node-id": track.node_id,
                "seq": exchange.seq,
                "bytes-down": exchange.bytes_down,
                "edge-seconds": track.edge_seconds,
                "bytes-up": payload_bytes(reply.content),
                "cloud-seconds": cloud_seconds,
                "grads-from": exchange.grads_from,
                "micro-batches": exchange.want,
            },
        )

    _report(srv, full, theta_ec, data.test, device, period, [], 0)  # the start
    waiting: dict[str | None, EdgeTrack] = {}
    for track in tracks.values():
        send(track)

    # Replies are handled as they really arrive: no edge waits for another. An
    # edge silent for reply-timeout seconds, or one the SuperLink reports
    # unavailable, is dropped (the others go on). A SuperNode that connects
    # later joins and catches up from θ_e^c; so does a dropped one that went
    # offline and came back under the same node id.
    joined: list[int] = []
    lost: set[int] = set()  # dropped, and still listed by the SuperLink
    retired: list[EdgeTrack] = []  # the dropped edges' tracks
    errors: dict[int, str] = {}  # the dropped edges' ClientApp errors

    def drop(track: EdgeTrack, reason: str) -> None:
        lost.add(track.node_id)
        retired.append(tracks.pop(track.node_id))
        if not tracks:  # no edge left: stop if all failed alike
            stop_if_all_failed(period + 1, [t.node_id for t in retired], errors)
        srv.reject(period + 1, track.node_id, f"{reason}: edge dropped")
        srv.tracker.log_event(
            "dropped", {"node-id": track.node_id, "period": period, "reason": reason}
        )

    next_scan = time.monotonic() + JOIN_SCAN
    while waiting:
        replies = list(srv.grid.pull_messages(list(waiting)))
        now = time.monotonic()
        for msg_id, track in list(waiting.items()):
            if now - track.sent_at > cfg.reply_timeout and all(
                r.metadata.reply_to_message_id != msg_id for r in replies
            ):
                del waiting[msg_id]
                drop(track, f"no reply within {cfg.reply_timeout:g} s")
        if now >= next_scan:
            online = set(srv.grid.get_node_ids())
            lost &= online  # a lost node no longer listed may come back
            for node in sorted(online - set(tracks) - lost):
                tracks[node] = EdgeTrack(node, catch_up=True)
                joined.append(node)
                srv.tracker.log_event("joined", {"node-id": node, "period": period})
                send(tracks[node])
            next_scan = now + JOIN_SCAN
        if not replies:
            time.sleep(0.02)
            continue
        for reply in replies:
            track = waiting.pop(reply.metadata.reply_to_message_id)
            # what the answered message was, for the exchange record
            done = InFlight(
                track.seq, track.bytes_down, track.grads_from, track.want_inflight
            )
            if reply.has_error():
                if (why := app_error(reply)) is not None:
                    errors[track.node_id] = why
                drop(track, f"error reply: {reply.error.reason}")
                continue
            try:
                track.edge_seconds = _compute_seconds(reply.content)
            except PayloadError as err:
                srv.reject(period + 1, track.node_id, str(err))
                continue

            # merge the edge's delta, weighted by staleness
            if KEY_DELTA in reply.content:
                try:
                    delta_rec = get_record(reply.content, KEY_DELTA, ArrayRecord)
                    checked = check_arrays(delta_rec, edge_layout)  # type: ignore[arg-type]
                    delta = {
                        k: torch.from_numpy(np.array(v)) for k, v in checked.items()
                    }
                except PayloadError as err:
                    srv.reject(period + 1, track.node_id, f"delta: {err}")
                else:
                    gap = merges - track.base_merges
                    weight = staleness_weight(gap, opts.staleness_bound * len(tracks))
                    staleness_seen.append(gap)
                    if weight == 0.0:
                        dropped_deltas += 1
                    else:
                        theta_ec = merge_delta(theta_ec, delta, weight, len(tracks))
                        merges += 1

            if KEY_ACTS not in reply.content:  # a reply to gradients only
                record_exchange(track, done, reply, 0.0)
                if not track.final_sent:
                    send(track)
                continue

            try:
                acts, labels, sizes = check_activations(
                    reply.content,
                    track.next_version,
                    track.want_inflight,
                    cut_shape,
                    dtype,
                    data.num_classes,
                    max_rows,
                )
            except PayloadError as err:
                srv.reject(period + 1, track.node_id, str(err))
                continue  # its stash no longer matches ours: the edge stops
            version = track.next_version
            track.next_version += 1
            if not opts.chunk:
                track.chunk = adapt_chunk(
                    time.monotonic() - track.sent_at,
                    track.edge_seconds,
                    track.want_inflight,
                    opts.max_chunk,
                )
            send(track)  # the edge works while the cloud computes

            # f_c forward/backward per micro-batch; θ_c steps at once
            tick = time.perf_counter()
            cloud.train()
            grads = []
            start = 0
            for size in sizes:
                a = (
                    torch.from_numpy(acts[start : start + size])
                    .to(device)
                    .requires_grad_(True)
                )
                y = torch.from_numpy(labels[start : start + size]).to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(cloud(a), y)
                loss.backward()
                optimizer.step()
                grads.append(a.grad.detach().cpu().numpy().astype(np.float32))
                losses.append(float(loss.detach()))
                cloud_steps += 1
                track.trained += 1
                start += size
            track.grads[version] = np.concatenate(grads)
            track.grads_seq[version] = done.seq
            record_exchange(track, done, reply, time.perf_counter() - tick)

            # evaluate every eval_every steps per edge (on average)
            if cloud_steps >= (period + 1) * opts.eval_every * len(tracks):
                period += 1
                marks.append(exchanges)
                _report(
                    srv, full, theta_ec, data.test, device, period, losses, exchanges
                )
                losses = []
                srv.ledger.current_round = period + 1
                if cfg.checkpoint_every and period % cfg.checkpoint_every == 0:
                    _checkpoint(
                        srv,
                        cloud,
                        theta_ec,
                        optimizer,
                        {
                            "period": period,
                            "cloud-steps": cloud_steps,
                            "merges": merges,
                            "steps-done": min(
                                (t.trained for t in tracks.values()), default=0
                            ),
                        },
                    )

    period += 1
    marks.append(exchanges)
    final = _report(srv, full, theta_ec, data.test, device, period, losses, exchanges)
    every_track = [*retired, *tracks.values()]
    timeline = _replay(srv, sorted({t.node_id for t in every_track}), opts, marks)
    total_steps = sum(t.steps_requested for t in every_track) or 1
    srv.tracker.finish(
        {
            "method": cfg.method,
            "periods": period,
            "final-accuracy": final,
            "bytes-up": srv.cumulative_bytes["bytes-up"],
            "bytes-down": srv.cumulative_bytes["bytes-down"],
            "steps-per-edge": opts.steps,
            "edges": len({t.node_id for t in every_track}),
            "exchanges": exchanges,
            "emulated-seconds": timeline.total_seconds,
            "emulated-seconds-per-step": timeline.total_seconds / opts.steps,
            "emulated-seconds-per-period": list(timeline.round_end),
            "bytes-up-per-step": srv.cumulative_bytes["bytes-up"] / total_steps,
            "bytes-down-per-step": srv.cumulative_bytes["bytes-down"] / total_steps,
            "clock-mode": timeline.mode,
            "link": opts.link,
            "mean-chunk": float(np.mean(chunks_sent)) if chunks_sent else 0.0,
            "dropped-edges": len(retired),
            "joined-edges": len(joined),
            "max-staleness": max(staleness_seen, default=0),
            "dropped-deltas": dropped_deltas,
            "rejected-replies": srv.rejected(),
            **{f"utilization-{k}": v for k, v in timeline.utilization.items()},
        }
    )


def _checkpoint(
    srv: ServerRun,
    cloud: torch.nn.Module,
    theta_ec: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    counters: dict[str, int],
) -> None:
    """Save ``θ_c``, ``θ_e^c``, the cloud's momentum and the counters.

    What the edges learned since their last reconciliation is not in
    ``θ_e^c`` and is not saved: a resumed run starts every edge from
    ``θ_e^c`` (nothing is applied twice; that edge-side progress is lost).
    """
    arrays = {
        f"cloud/{k}": v.detach().cpu().numpy() for k, v in cloud.state_dict().items()
    }
    arrays.update({f"edge/{k}": v.numpy() for k, v in theta_ec.items()})
    for i, p in enumerate(cloud.parameters()):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            arrays[f"momentum/{i}"] = buf.detach().cpu().numpy()
    srv.save_checkpoint(arrays, counters)


def _resume(
    srv: ServerRun, cloud: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Load ``resume`` into ``cloud`` and ``optimizer``; return θ_e^c and counters."""
    checkpoint = srv.resumed()
    if checkpoint is None:
        return None
    arrays, state = checkpoint
    part = {
        k[6:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("cloud/")
    }
    try:
        cloud.load_state_dict(part)
    except RuntimeError as err:
        raise srv.resume_mismatch(err) from None
    for i, p in enumerate(cloud.parameters()):
        if f"momentum/{i}" in arrays:
            optimizer.state[p]["momentum_buffer"] = torch.from_numpy(
                arrays[f"momentum/{i}"]
            ).to(p.device)
    edge = {
        k[5:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("edge/")
    }
    return {**state, "edge": edge}


def _replay(
    srv: ServerRun, nodes: list[int], opts: SimulTrainOptions, marks: list[int]
) -> ClockReport:
    """This run's exchanges re-timed under ``simultrain-link``."""
    exchanges, _ = exchanges_from_records(read_jsonl(srv.tracker.path))
    links = assign_links(nodes, opts.link, srv.cfg.seed)
    return replay_pipeline(
        exchanges,
        links,
        opts.edge_factor,
        opts.cloud_factor,
        seed=srv.cfg.seed,
        marks=marks,
    )


def _report(
    srv: ServerRun,
    full: torch.nn.Sequential,
    theta_ec: dict[str, torch.Tensor],
    test: object,
    device: torch.device,
    period: int,
    losses: list[float],
    exchanges: int,
) -> float:
    """Evaluate ``θ_e^c ∘ θ_c`` on the test split and log the period."""
    full[0].load_state_dict(theta_ec)
    full[0].to(device)
    stats = evaluate(full, test, device)  # type: ignore[arg-type]
    full[0].cpu()
    metrics = {"eval-loss": stats.loss, "eval-accuracy": stats.accuracy}
    if losses:
        metrics["train-loss"] = float(np.mean(losses))
    metrics["exchanges"] = exchanges
    srv.report_round(period, metrics)
    return stats.accuracy
