"""Methods' orders of events, played on the :class:`~tandem.network.VirtualClock`.

A schedule turns what a run recorded (bytes per message, measured compute
seconds) into tasks with dependencies; the clock decides when each runs.

**Re-timing vs live.** A synchronous round (FedAvg and its relatives) has the
same order of events whatever the timing: the cloud sends to every node, each
trains, each replies, the cloud aggregates once all replies are in. Its
recorded trace can therefore be re-timed under any link profile after the run
(:func:`replay_sync_rounds`, mode ``"retimed"``). A method whose order depends
on timing (asynchronous replies, staleness) must instead consult the clock
while it runs, releasing replies in virtual arrival order
(:class:`VirtualArrivals`); its report says ``"live"``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tandem.network import LinkProfile, VirtualClock

__all__ = [
    "ClockReport",
    "NodeRound",
    "SyncRound",
    "VirtualArrivals",
    "replay_sync_rounds",
    "sync_rounds_from_records",
]

T = TypeVar("T")


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
        ``"retimed"`` (a recorded, timing-independent schedule played after
        the run) or ``"live"`` (the run consulted the clock as it went).
    round_end : tuple of float
        Emulated time (s) at which each round's result was available.
    total_seconds : float
        Emulated time of the whole run.
    utilization : dict
        Busy share of the run per resource kind (edge, up, down, cloud).
    """

    mode: str
    round_end: tuple[float, ...]
    total_seconds: float
    utilization: dict[str, float]


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
    return ClockReport("retimed", tuple(ends), clock.now, clock.utilization())


def sync_rounds_from_records(
    records: Iterable[Mapping[str, object]],
) -> list[SyncRound]:
    """Rebuild :class:`SyncRound` s from a run's ``metrics.jsonl`` records."""
    per_node: dict[int, dict[int, NodeRound]] = {}
    cloud: dict[int, float] = {}
    for rec in records:
        if rec.get("event") == "bytes":
            rnd, node = int(rec["round"]), int(rec["node-id"])  # type: ignore[arg-type]
            per_node.setdefault(rnd, {})[node] = NodeRound(
                int(rec["bytes-down"]),  # type: ignore[arg-type]
                float(rec.get("edge-seconds", 0.0)),  # type: ignore[arg-type]
                int(rec["bytes-up"]),  # type: ignore[arg-type]
            )
        elif rec.get("event") == "round" and int(rec["round"]) > 0:  # type: ignore[arg-type]
            cloud[int(rec["round"])] = float(rec.get("cloud-seconds", 0.0))  # type: ignore[arg-type]
    return [SyncRound(r, per_node[r], cloud.get(r, 0.0)) for r in sorted(per_node)]


@dataclass
class VirtualArrivals(Generic[T]):
    """Replies held back and released in virtual arrival order.

    For methods whose order of events depends on timing: when a reply really
    arrives, the ServerApp files it with its *virtual* arrival time (from the
    clock); it then processes the earliest virtual arrival first, so a node on
    a slow emulated link is really late, not just late on paper.
    """

    _heap: list[tuple[float, int, T]] = field(default_factory=list)
    _counter: itertools.count = field(default_factory=itertools.count)

    def add(self, item: T, at: float) -> None:
        """File ``item`` as arriving at virtual time ``at``."""
        heapq.heappush(self._heap, (at, next(self._counter), item))

    def pop(self) -> tuple[float, T]:
        """The earliest arrival (ties in filing order)."""
        at, _, item = heapq.heappop(self._heap)
        return at, item

    def __len__(self) -> int:
        return len(self._heap)
