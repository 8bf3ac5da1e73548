"""Methods' orders of events, played on the :class:`~tandem.network.VirtualClock`.

A schedule turns what a run recorded (bytes per message, measured compute
seconds) into tasks with dependencies; the clock decides when each runs.

Two schedules, both re-timed after the run (mode ``"retimed"``), so one
run is timed under any number of link profiles:

- **Synchronous rounds** (FedAvg and its relatives, :func:`replay_sync_rounds`):
  the cloud sends to every node, each trains, each replies, the cloud
  aggregates once all replies are in.
- **Pipelined exchanges** (SimulTrain, :func:`replay_pipeline`). On the
  message transport each edge has one message in flight; the cloud answers an
  edge as soon as its reply arrives, sending the next message (with the
  gradients of an *earlier* chunk) before it computes on the chunk just
  received. On the stream an edge has up to W chunks in flight (its credits):
  the gradients of a chunk leave as soon as the cloud has computed them, and
  the edge forwards chunk ``v + W`` once chunk ``v``'s gradients are in, so
  W chunks travel, wait and compute at once. Replies are played in virtual
  arrival order, so the shared cloud serves them first come, first served on
  the emulated timeline. With one chunk in flight (``splitsync``: each
  message carries the gradients of the chunk just received) the replay is
  strictly serial per edge on either transport.

What is replayed is what the run recorded: the bytes of every message and the
measured compute seconds of every step. The learning itself ran in real
arrival order; only the timeline is emulated.

**Steady compute.** One message's compute is a few milliseconds here, and a
single measurement of it carries the host's noise (a first call, a core
shared with other processes: we saw means 3-4 times the median). As
:class:`~tandem.training.TrainStats` does within a message, the rebuilt
schedules replace each measurement by the lower quartile of the same kind of
work (:func:`steady_seconds`): per node and message shape for the edges, per
message shape for the cloud. The raw figures stay in the records.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from tandem.network import LinkProfile, Task, VirtualClock

__all__ = [
    "ClockReport",
    "Exchange",
    "NodeRound",
    "SyncRound",
    "exchanges_from_records",
    "pipeline_window",
    "replay_pipeline",
    "replay_sync_rounds",
    "steady_exchanges",
    "steady_seconds",
    "sync_rounds_from_records",
]


@dataclass(frozen=True)
class NodeRound:
    """One node's part of a synchronous round: bytes down, compute, bytes up."""

    bytes_down: int
    edge_seconds: float
    bytes_up: int


@dataclass(frozen=True)
class SyncRound:
    """A synchronous round as recorded: every node's part, then the cloud's."""

    round: int
    nodes: Mapping[int, NodeRound]
    cloud_seconds: float


@dataclass(frozen=True)
class ClockReport:
    """Emulated time of a run under one set of links and devices.

    Attributes
    ----------
    mode : str
        ``"retimed"``: the recorded schedule played after the run.
    round_end : tuple of float
        Emulated time (s) at which each round's result was available.
    total_seconds : float
        Emulated time of the whole run.
    utilization : dict
        Busy share of the run per resource kind (edge, up, down, cloud).
    tasks : tuple of Task (default: ())
        The emulated timeline: every download, compute and upload in the
        order it was scheduled, with its resource and start/end times (s).
    """

    mode: str
    round_end: tuple[float, ...]
    total_seconds: float
    utilization: dict[str, float]
    tasks: tuple[Task, ...] = ()

    @property
    def efficiency(self) -> float:
        """Bound / achieved: the busiest resource's busy time over the run's.

        No schedule of this work can end before its busiest resource (one
        edge, one link direction, the cloud) has done its share, so 1.0 is a
        perfect pipeline; 0.25 is four stages run one after the other. 0.0
        for an empty timeline.
        """
        if self.total_seconds <= 0:
            return 0.0
        busy: dict[str, float] = {}
        for task in self.tasks:
            busy[task.resource] = busy.get(task.resource, 0.0) + task.busy
        return max(busy.values(), default=0.0) / self.total_seconds


def steady_seconds(samples: Sequence[float]) -> float:
    """The lower quartile of repeated measurements of the same work (seconds).

    Fewer than four samples give their median.
    """
    if not samples:
        raise ValueError("no samples")
    if len(samples) < 4:
        return float(statistics.median(samples))
    return float(statistics.quantiles(samples, n=4, method="inclusive")[0])


def _steadied(values: Sequence[float], kinds: Sequence[Hashable]) -> list[float]:
    """Each value replaced by :func:`steady_seconds` of the values of its kind."""
    groups: dict[Hashable, list[float]] = {}
    for value, kind in zip(values, kinds, strict=True):
        groups.setdefault(kind, []).append(value)
    steady = {kind: steady_seconds(v) for kind, v in groups.items()}
    return [steady[kind] for kind in kinds]


def replay_sync_rounds(
    rounds: Iterable[SyncRound],
    links: Mapping[int, LinkProfile],
    edge_factor: float = 1.0,
    cloud_factor: float = 1.0,
    seed: int = 0,
) -> ClockReport:
    """Re-time synchronous rounds (FedAvg) on the virtual clock.

    Per round ``r`` and node ``k``: download ``k`` starts when round ``r-1``
    has been aggregated; training starts when the download has arrived;
    the upload follows training; the cloud aggregates once every upload has
    arrived. Nodes overlap each other (separate links and devices); within a
    node nothing overlaps, as in FedAvg.
    """
    clock = VirtualClock(links, edge_factor, cloud_factor, seed)
    previous = 0.0
    ends = []
    for rnd in rounds:
        arrivals = []
        for node, part in sorted(rnd.nodes.items()):
            down = clock.transfer(node, "down", part.bytes_down, [previous], "model")
            train = clock.compute(
                f"edge:{node}", part.edge_seconds, [down.end], "train"
            )
            up = clock.transfer(node, "up", part.bytes_up, [train.end], "update")
            arrivals.append(up.end)
        agg = clock.compute("cloud", rnd.cloud_seconds, arrivals, "aggregate")
        previous = agg.end
        ends.append(agg.end)
    return ClockReport(
        "retimed", tuple(ends), clock.now, clock.utilization(), tuple(clock.tasks)
    )


def _number(rec: Mapping[str, object], key: str, default: float | None = None) -> float:
    """A numeric field of a ``metrics.jsonl`` record (``default`` if absent)."""
    value = rec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"record field {key!r} = {value!r} is not a number")
    return value


def sync_rounds_from_records(
    records: Iterable[Mapping[str, object]], steady: bool = True
) -> list[SyncRound]:
    """Rebuild :class:`SyncRound` s from a run's ``metrics.jsonl`` records.

    With ``steady``, compute times are steadied (:func:`steady_seconds`): per
    node and local-step count for the edges (a run whose ``plan`` events give
    each node's ``local-steps`` per round, e.g. ACE-Sync's dynamic
    synchronization, where a device trains one or several rounds' worth of
    steps per sync; else per node), over all rounds for the cloud.
    """
    parts: list[tuple[int, int, int, float, int]] = []  # round, node, down, s, up
    cloud: dict[int, float] = {}
    steps: dict[tuple[int, int], float] = {}  # (round, node) -> local steps
    for rec in records:
        if rec.get("event") == "plan" and "local-steps" in rec:
            key = (int(_number(rec, "round")), int(_number(rec, "node-id")))
            steps[key] = _number(rec, "local-steps")
        elif rec.get("event") == "bytes":
            parts.append(
                (
                    int(_number(rec, "round")),
                    int(_number(rec, "node-id")),
                    int(_number(rec, "bytes-down")),
                    float(_number(rec, "edge-seconds", 0.0)),
                    int(_number(rec, "bytes-up")),
                )
            )
        elif rec.get("event") == "round" and int(_number(rec, "round")) > 0:
            cloud[int(_number(rec, "round"))] = float(
                _number(rec, "cloud-seconds", 0.0)
            )
    edge = [p[3] for p in parts]
    if steady and parts:
        edge = _steadied(edge, [(p[1], steps.get((p[0], p[1]))) for p in parts])
    if steady and cloud:
        cloud = dict(
            zip(cloud, _steadied(list(cloud.values()), [0] * len(cloud)), strict=True)
        )
    per_node: dict[int, dict[int, NodeRound]] = {}
    for (rnd, node, down, _, up), seconds in zip(parts, edge, strict=True):
        per_node.setdefault(rnd, {})[node] = NodeRound(down, seconds, up)
    rounds = sorted(set(per_node) | set(cloud))
    return [SyncRound(r, per_node.get(r, {}), cloud.get(r, 0.0)) for r in rounds]


@dataclass(frozen=True)
class Exchange:
    """One cloud -> edge message and the edge's reply, as a pipelined run saw it.

    The run keeps these in memory and replays them; :meth:`to_record` and
    :meth:`from_record` are its ``exchange`` event in ``metrics.jsonl``.

    Attributes
    ----------
    node : int
        The edge.
    seq : int
        The message's place in that edge's sequence (0, 1, ...).
    bytes_down, bytes_up : int
        Serialized sizes of the message and of the reply (bytes).
    edge_seconds : float
        Measured compute of the edge for this message (s, before scaling).
    cloud_seconds : float
        Measured compute of the cloud on the reply (s, before scaling).
    grads_from : int
        ``seq`` of this edge's earlier exchange whose cloud computation
        produced the gradients this message carries (-1: none); the message
        cannot leave before that computation ends.
    micro_batches : int
        Micro-batches the message asked the edge to forward (0: none).
    window : int
        0: the message transport (message ``seq`` leaves when reply
        ``seq − 1`` has arrived); W ≥ 1: the stream with W credits (the
        gradients of ``grads_from`` leave as soon as the cloud has computed
        them, and the edge forwards chunk ``seq`` once they are in).
    """

    node: int
    seq: int
    bytes_down: int
    edge_seconds: float
    bytes_up: int
    cloud_seconds: float
    grads_from: int = -1
    micro_batches: int = 0
    window: int = 0

    def to_record(self) -> dict[str, int | float]:
        """The ``exchange`` event's fields."""
        return {
            "node-id": self.node,
            "seq": self.seq,
            "bytes-down": self.bytes_down,
            "edge-seconds": self.edge_seconds,
            "bytes-up": self.bytes_up,
            "cloud-seconds": self.cloud_seconds,
            "grads-from": self.grads_from,
            "micro-batches": self.micro_batches,
            "window": self.window,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, object]) -> Exchange:
        """Inverse of :meth:`to_record` (absent ``micro-batches``, ``window``: 0).

        Raises
        ------
        ValueError
            If a field is missing or not a number.
        """
        return cls(
            node=int(_number(rec, "node-id")),
            seq=int(_number(rec, "seq")),
            bytes_down=int(_number(rec, "bytes-down")),
            edge_seconds=float(_number(rec, "edge-seconds")),
            bytes_up=int(_number(rec, "bytes-up")),
            cloud_seconds=float(_number(rec, "cloud-seconds")),
            grads_from=int(_number(rec, "grads-from")),
            micro_batches=int(_number(rec, "micro-batches", 0)),
            window=int(_number(rec, "window", 0)),
        )


def replay_pipeline(
    exchanges: Sequence[Exchange],
    links: Mapping[int, LinkProfile],
    edge_factor: float = 1.0,
    cloud_factor: float = 1.0,
    seed: int = 0,
    marks: Sequence[int] = (),
) -> ClockReport:
    """Re-time a pipelined run (SimulTrain) on the virtual clock.

    Each exchange is: its message down (after what it depends on), the
    edge's compute once it has arrived, the reply up; the cloud computes on
    each reply in virtual arrival order (FIFO on the one cloud). What an
    exchange ``i`` of an edge depends on:

    - **message transport** (``window = 0``): reply ``i − 1`` has arrived (at
      once, ``i = 0``) and the gradients it carries are computed. On each
      reply the cloud first sends message ``i + 1`` and then computes on
      reply ``i``: one message in flight per edge.
    - **stream** (``window = W ≥ 1``): only the gradients it carries
      (``grads_from``, chunk ``i − W``) are computed, at once for the first W
      chunks; so W chunks are in flight and the next ones wait for credits.
      The edge's, the links' and the cloud's tasks each run in order on their
      resource.

    When exchange ``i`` carries the gradients of exchange ``i − 1`` itself
    (one chunk in flight: the ``splitsync`` baseline), the cloud computes on
    reply ``i − 1`` first and the message leaves when that ends: per chunk,
    strictly in series, uplink, cloud, downlink, edge, with nothing of that
    edge overlapping (T_seq = T_send + T_forward + T_backward + T_recv, the
    sequential round-trip time of seed 000).

    Parameters
    ----------
    exchanges : sequence of Exchange
        In the order the cloud processed them in the real run.
    marks : sequence of int (default: ())
        Exchange counts (prefixes of ``exchanges``) at which the run
        reported; ``round_end[j]`` is the emulated time by which the cloud had
        finished every exchange of the first ``marks[j]``.

    Raises
    ------
    ValueError
        If an exchange carries the gradients of one that is not computed
        before it.
    """
    clock = VirtualClock(links, edge_factor, cloud_factor, seed)
    chains: dict[int, dict[int, Exchange]] = {}
    for ex in exchanges:
        chains.setdefault(ex.node, {})[ex.seq] = ex
    waiting: dict[tuple[int, int], list[Exchange]] = {}  # stream: on its gradients
    for node in sorted(chains):
        for seq in sorted(chains[node]):
            ex = chains[node][seq]
            if ex.window and ex.grads_from >= 0:
                waiting.setdefault((node, ex.grads_from), []).append(ex)
    cloud_end: dict[tuple[int, int], float] = {}
    pending: list[tuple[float, int, int, int]] = []
    order = itertools.count()
    launched: set[tuple[int, int]] = set()

    def launch(ex: Exchange, ready: float) -> None:
        after = [ready]
        if ex.grads_from >= 0:
            computed = cloud_end.get((ex.node, ex.grads_from))
            if computed is None:
                raise ValueError(
                    f"exchange {ex.seq} of node {ex.node} carries the gradients "
                    f"of exchange {ex.grads_from}, which is not computed before it"
                )
            after.append(computed)
        down = clock.transfer(ex.node, "down", ex.bytes_down, after, "grads")
        work = clock.compute(f"edge:{ex.node}", ex.edge_seconds, [down.end], "edge")
        up = clock.transfer(ex.node, "up", ex.bytes_up, [work.end], "acts")
        heapq.heappush(pending, (up.end, next(order), ex.node, ex.seq))
        launched.add((ex.node, ex.seq))

    for node in sorted(chains):
        for seq in sorted(chains[node]):
            ex = chains[node][seq]
            if ex.window and ex.grads_from < 0:
                launch(ex, 0.0)  # a stream's first W chunks
            elif not ex.window and seq == min(chains[node]):
                launch(ex, 0.0)
    while pending:
        at, _, node, seq = heapq.heappop(pending)
        this = chains[node][seq]
        following = chains[node].get(seq + 1)
        if this.window:
            work = clock.compute("cloud", this.cloud_seconds, [at], "cloud")
            cloud_end[(node, seq)] = work.end
            for ex in waiting.pop((node, seq), ()):
                launch(ex, work.end)
            continue
        serial = following is not None and following.grads_from == seq
        if following is not None and not following.window and not serial:
            launch(following, at)  # the edge works while the cloud computes
        work = clock.compute("cloud", this.cloud_seconds, [at], "cloud")
        cloud_end[(node, seq)] = work.end
        if serial and not following.window:  # one chunk in flight
            launch(following, at)
    for ex in exchanges:
        if (ex.node, ex.seq) not in launched:
            raise ValueError(
                f"exchange {ex.seq} of node {ex.node} never leaves: it waits for "
                f"exchange {ex.seq - 1 if not ex.window else ex.grads_from}, "
                "which is not in the run"
            )
    ends = [cloud_end[(ex.node, ex.seq)] for ex in exchanges]
    prefix = list(itertools.accumulate(ends, max))
    round_end = tuple(prefix[m - 1] if m > 0 else 0.0 for m in marks)
    return ClockReport(
        "retimed", round_end, clock.now, clock.utilization(), tuple(clock.tasks)
    )


def pipeline_window(
    link: LinkProfile,
    bytes_up: int,
    bytes_down: int,
    cap: int,
    edge_seconds: float | None = None,
) -> int:
    """W: the chunks an edge keeps in flight to fill ``link`` (its credits).

    One chunk goes around the loop in ``L + c_e + c_c``: ``L = d_up + d_down``
    (the one-way times of its activations up and its gradients down, each
    RTT/2 plus the transfer, at the link's rate and RTT at t = 0) and the
    edge's and the cloud's compute. A full pipeline finishes one chunk per
    ``B``, its slowest stage, so it needs ``W ≥ (L + c_e + c_c) / B`` chunks in
    flight (Little's law: the bandwidth-delay product counted in chunks).

    - **Compute unknown** (the cloud, when a session opens): ``B ≥ max(b,
      c_e, c_c)`` with ``b = max(transfer up, transfer down)``, so
      ``W = ⌈L / b⌉ + 2`` is always enough. It is the session's cap.
    - **The edge's compute known** (``edge_seconds``: the edge's time per
      chunk on the emulated device, measured before its stream opens):
      ``W = ⌈(L + c_e) / max(b, c_e)⌉``. The cloud's ``c_c`` is left out (the
      edge cannot know it; the cloud is the fast side, and its queue shows
      up as a longer loop, not a missing credit). Where the edge is the
      slowest stage this is ``1 + ⌈L / c_e⌉``, often far below the first
      rule: every credit beyond it only adds staleness (chunks forwarded on
      older weights), not speed.

    Either is clipped to ``[1, cap]`` (``cap``: the staleness bound, which W
    chunks in flight must respect, or the cloud's W).

    Parameters
    ----------
    link : LinkProfile
        The edge's link.
    bytes_up, bytes_down : int
        One chunk's activations and gradients on the wire (bytes).
    cap : int
        The largest W allowed (>= 1).
    edge_seconds : float, optional
        The edge's compute per chunk (seconds, >= 0), when known.

    Raises
    ------
    ValueError
        If ``cap < 1`` or ``edge_seconds < 0``.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, not {cap}")
    up = link.one_way_seconds("up", bytes_up, 0.0)
    down = link.one_way_seconds("down", bytes_down, 0.0)
    half_rtt = link.rtt.at(0.0) / 2
    busy = max(up, down) - half_rtt
    if edge_seconds is None:
        if busy <= 0:  # nothing to send: the delay alone, no chunk fills it
            return cap
        return max(1, min(cap, math.ceil((up + down) / busy) + 2))
    if not edge_seconds >= 0:
        raise ValueError(f"edge_seconds must be >= 0, not {edge_seconds}")
    stage = max(busy, edge_seconds)
    if stage <= 0:  # neither compute nor transfer: the delay alone
        return cap
    return max(1, min(cap, math.ceil((up + down + edge_seconds) / stage)))


def steady_exchanges(exchanges: Sequence[Exchange]) -> list[Exchange]:
    """``exchanges`` with compute times steadied (:func:`steady_seconds`).

    The edge's per node and message shape (micro-batches forwarded, gradients
    applied or not), the cloud's per message shape (micro-batches).
    """
    if not exchanges:
        return []
    edge = _steadied(
        [ex.edge_seconds for ex in exchanges],
        [(ex.node, ex.micro_batches, ex.grads_from >= 0) for ex in exchanges],
    )
    cloud = _steadied(
        [ex.cloud_seconds for ex in exchanges],
        [ex.micro_batches for ex in exchanges],
    )
    return [
        dataclasses.replace(ex, edge_seconds=e, cloud_seconds=c)
        for ex, e, c in zip(exchanges, edge, cloud, strict=True)
    ]


def exchanges_from_records(
    records: Iterable[Mapping[str, object]], steady: bool = True
) -> tuple[list[Exchange], list[int]]:
    """Rebuild a pipelined run's exchanges and report marks from its records.

    Exchanges come from ``exchange`` events (in file order, which is the
    cloud's processing order); marks from the ``exchanges`` field of
    ``round`` events after the start. With ``steady``, compute times are
    steadied (:func:`steady_exchanges`).
    """
    exchanges = []
    marks = []
    for rec in records:
        if rec.get("event") == "exchange":
            exchanges.append(Exchange.from_record(rec))
        elif rec.get("event") == "round" and rec.get("round") and "exchanges" in rec:
            marks.append(int(_number(rec, "exchanges")))
    return (steady_exchanges(exchanges) if steady else exchanges), marks
