"""Byte accounting: the real serialized size of every message, up and down.

Flower 1.41 ships a message as a tree of content-addressed objects
(``Message`` -> ``RecordDict`` -> records -> ``Array`` -> ``ArrayChunk``), each
deflated to bytes and transferred separately. The payload size of a message is
therefore the sum of ``len(obj.deflate())`` over the objects of its content
(:func:`payload_bytes`): exactly the bytes of records Flower serializes for it,
with identical objects (e.g. two all-zero chunks) counted once, as Flower sends
them once. Message metadata (ids, TTL, type) is not payload and is not counted.

:class:`MeteredGrid` wraps the ServerApp's Grid and records, for every message
pushed (down, cloud -> edge) and every reply pulled (up, edge -> cloud), its
payload size, node, message type and the round/step it belongs to, in a
:class:`ByteLedger`.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.run import Run

from tandem.network import link_label
from tandem.wire import KEY_NODE

__all__ = [
    "KEY_COMPUTE_SECONDS",
    "ByteLedger",
    "MeteredGrid",
    "Transfer",
    "payload_bytes",
]

#: Metric a reply uses to report the edge compute time behind it (seconds):
#: steps x median step time, see :class:`tandem.training.TrainStats`.
KEY_COMPUTE_SECONDS = "compute-seconds"
#: How often :meth:`MeteredGrid.send_and_receive` asks the SuperLink for replies
#: (a pull is one small call: a round of one local step, SyncSGD's, takes
#: about 0.15 s on the simulation engine, so a 0.1 s poll would add a third).
POLL_SECONDS = 0.02


def payload_bytes(content: RecordDict) -> int:
    """Serialized size in bytes of a message's content, as Flower ships it."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


@dataclass(frozen=True)
class Transfer:
    """One message on the wire.

    Attributes
    ----------
    round : int
        The round (or step) the ledger was at when the message moved.
    node_id : int
        The edge node sending or receiving it.
    direction : str
        ``"down"`` (cloud -> edge) or ``"up"`` (edge -> cloud).
    message_type : str
        Flower message type, e.g. ``"train"`` or ``"train.forward"``.
    nbytes : int
        Payload bytes (:func:`payload_bytes`).
    at : float
        ``time.perf_counter()`` on the ServerApp when the message was pushed
        or its reply pulled.
    compute_seconds : float | None
        For replies: the edge compute time the reply reports as the metric
        ``compute-seconds`` (measured on the node), else ``None``.
    link : str
        For replies: the link the node declares, if any.
    """

    round: int
    node_id: int
    direction: str
    message_type: str
    nbytes: int
    at: float = 0.0
    compute_seconds: float | None = None
    link: str = ""


@dataclass
class ByteLedger:
    """Every transfer of a run, with per-round and per-node totals."""

    current_round: int = 0
    transfers: list[Transfer] = field(default_factory=list)
    #: reply message id -> wall-clock seconds from the reply's creation on the
    #: node (its ``created_at``) to its pull by the ServerApp: the upload, the
    #: SuperLink's relay and at most one poll interval (assumes NTP clocks)
    transit: dict[str, float] = field(default_factory=dict)

    def record(
        self,
        node_id: int,
        direction: str,
        message_type: str,
        nbytes: int,
        compute_seconds: float | None = None,
        link: str = "",
    ) -> None:
        """Add one transfer at the current round."""
        self.transfers.append(
            Transfer(
                self.current_round,
                node_id,
                direction,
                message_type,
                nbytes,
                time.perf_counter(),
                compute_seconds,
                link,
            )
        )

    def transit_seconds(self, reply: Message) -> float | None:
        """The transit time measured for ``reply`` when it was pulled, if known."""
        return self.transit.get(reply.metadata.message_id)

    @property
    def last_up_at(self) -> float | None:
        """When the latest reply was pulled (``perf_counter``), if any."""
        ups = [t.at for t in self.transfers if t.direction == "up"]
        return max(ups) if ups else None

    def totals(self, round_: int | None = None) -> dict[str, int]:
        """``bytes-up``, ``bytes-down``, ``messages-up``, ``messages-down``."""
        out = {"bytes-up": 0, "bytes-down": 0, "messages-up": 0, "messages-down": 0}
        for t in self.transfers:
            if round_ is None or t.round == round_:
                out[f"bytes-{t.direction}"] += t.nbytes
                out[f"messages-{t.direction}"] += 1
        return out

    def per_node(self, round_: int) -> dict[int, dict[str, float | str]]:
        """``{node: {"bytes-up", "bytes-down", "edge-seconds"}}`` for one round.

        ``edge-seconds`` sums the compute time the node's replies reported;
        ``link`` is the link the node declared (``link-profile`` in its node
        config), when it declared one.
        """
        out: dict[int, dict[str, float | str]] = defaultdict(
            lambda: {"bytes-up": 0, "bytes-down": 0, "edge-seconds": 0.0}
        )
        for t in self.transfers:
            if t.round == round_:
                row = out[t.node_id]
                row[f"bytes-{t.direction}"] += t.nbytes  # type: ignore[operator]
                row["edge-seconds"] += t.compute_seconds or 0.0  # type: ignore[operator]
                if t.link:
                    row["link"] = t.link
        return dict(out)


def _reported_compute_seconds(content: RecordDict) -> float | None:
    """The ``compute-seconds`` a reply reports in any MetricRecord, if valid."""
    for record in content.metric_records.values():
        value = record.get(KEY_COMPUTE_SECONDS)
        if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
            return float(value)
    return None


def _declared_link(content: RecordDict) -> str:
    """The link a reply's ``node`` record declares (a short string), if any."""
    record = content.config_records.get(KEY_NODE)
    value = record.get("link", "") if record is not None else ""
    return link_label(value) if isinstance(value, str) else ""


class MeteredGrid(Grid):
    """A Grid that records the payload size of every message through it.

    Parameters
    ----------
    inner : Grid
        The ServerApp's Grid (simulation or deployment engine).
    ledger : ByteLedger
        Where transfers are recorded; set ``ledger.current_round`` to attribute
        them to a round or step.
    """

    def __init__(self, inner: Grid, ledger: ByteLedger) -> None:
        self.inner = inner
        self.ledger = ledger

    def _down(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            self.ledger.record(
                msg.metadata.dst_node_id,
                "down",
                msg.metadata.message_type,
                payload_bytes(msg.content),
            )
        return messages

    def _up(self, replies: Iterable[Message]) -> list[Message]:
        pulled_at = time.time()
        replies = list(replies)
        for msg in replies:
            nbytes, seconds, link = 0, None, ""
            if not msg.has_error():
                nbytes = payload_bytes(msg.content)
                seconds = _reported_compute_seconds(msg.content)
                link = _declared_link(msg.content)
                created = msg.metadata.created_at
                self.ledger.transit[msg.metadata.message_id] = pulled_at - created
            self.ledger.record(
                msg.metadata.src_node_id,
                "up",
                msg.metadata.message_type,
                nbytes,
                seconds,
                link,
            )
        return replies

    # --- Grid interface: delegate, metering what crosses ---------------------
    def set_run(self, run: Run) -> None:
        """Delegate to the inner Grid."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """The inner Grid's run."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(
            content, message_type, dst_node_id, group_id, ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._down(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._up(self.inner.pull_messages(message_ids))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull every ``POLL_SECONDS`` until all replied or ``timeout``.

        Flower's deployment Grid pulls every 3 s: a reply would wait up to 3 s
        on the SuperLink, slowing every round and hiding its transit time.

        Replies come back in the order of their nodes' ids, not of their
        arrival: a strategy sums them in that order, so a run's float sums
        (FedAvg's weighted mean) do not depend on which node finished first.
        """
        pending = {i for i in self.push_messages(messages) if i}
        end = time.time() + (timeout if timeout is not None else math.inf)
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or time.time() >= end:
                break
            time.sleep(POLL_SECONDS)
        return sorted(replies, key=lambda m: m.metadata.src_node_id)
