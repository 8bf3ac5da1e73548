"""An in-process Grid: a method's cloud side against real edge handlers.

For tests that need many exchanges fast and deterministically. Messages are
real Flower ``Message`` objects handled by the real ClientApp ``dispatch``
with one ``Context`` per node (its ``state`` persisting), but without an
engine: no process, no transport. Each node can be given a *speed*: its reply
becomes visible only after that many ``pull_messages`` calls, so a slow node
really lags behind a fast one. ``tamper`` may rewrite a reply (hostile edge).
``silent_after`` makes a node stop answering after that many messages (a
dropout); ``late`` adds nodes that connect only after that many polls.
``threaded`` handles each message in its own thread as soon as it is pushed
(all nodes at once, as on an engine; ``lag`` and ``silent_after`` then do not
apply): for methods whose handlers stream for a long time.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from tandem.client_app import dispatch
from tandem.config import RunConfig
from tandem.registry import get_method
from tandem.server_context import ServerRun
from tandem.tracking import read_jsonl


class InProcessGrid:
    """Enough of Flower's ``Grid`` for tandem's strategies, in one process."""

    def __init__(
        self,
        run_config: Mapping[str, object],
        nodes: int,
        lag: Mapping[int, int] | None = None,
        tamper: Callable[[int, Message], Message] | None = None,
        silent_after: Mapping[int, int] | None = None,
        late: Mapping[int, int] | None = None,
        threaded: bool = False,
        id_base: int = 0,
    ) -> None:
        self.threaded = threaded
        self._done: dict[str, Message] = {}  # threaded: id -> reply
        self._lock = threading.Lock()
        self.late = dict(late or {})
        total = nodes + len(self.late)
        # node ids 1..N, or id_base + 1.. (Flower's ids are unsigned 64-bit)
        self.contexts = {
            id_base + node: Context(
                run_id=1,
                node_id=id_base + node,
                node_config={"partition-id": node - 1, "num-partitions": total},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node in range(1, total + 1)
        }
        self.silent_after = dict(silent_after or {})
        self.pulls = 0
        self.lag = dict(lag or {})
        self.tamper = tamper
        self._pending: dict[str, tuple[int, Message]] = {}  # id -> (pulls left, msg)
        self.handled: dict[int, int] = dict.fromkeys(self.contexts, 0)

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if self.late.get(n, 0) <= self.pulls]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            if self.threaded:
                threading.Thread(target=self._handle, args=(msg_id, msg)).start()
                continue
            self._pending[msg_id] = (self.lag.get(msg.metadata.dst_node_id, 0), msg)
        return ids

    def _handle(self, msg_id: str, msg: Message) -> None:
        node = msg.metadata.dst_node_id
        try:
            reply = dispatch(msg, self.contexts[node])
        except Exception as err:  # an engine turns it into an error reply
            reply = Message(
                error=Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(err)
                ),
                reply_to=msg,
            )
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        if self.tamper is not None:
            reply = self.tamper(node, reply)
        with self._lock:
            self.handled[node] += 1
            self._done[msg_id] = reply

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        if self.threaded:
            with self._lock:
                return [self._done.pop(i) for i in message_ids if i in self._done]
        replies = []
        for msg_id in list(message_ids):
            if msg_id not in self._pending:
                continue
            left, msg = self._pending[msg_id]
            if left > 0:
                self._pending[msg_id] = (left - 1, msg)
                continue
            node = msg.metadata.dst_node_id
            if self.handled[node] >= self.silent_after.get(node, 10**9):
                continue  # gone: the message stays unanswered
            del self._pending[msg_id]
            reply = dispatch(msg, self.contexts[node])
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as stored
            self.handled[node] += 1
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        ids = self.push_messages(messages)
        replies: list[Message] = []
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while len(replies) < len(ids) and time.monotonic() < deadline:
            answered = {r.metadata.reply_to_message_id for r in replies}
            fresh = self.pull_messages([i for i in ids if i not in answered])
            replies.extend(fresh)
            if not fresh:
                time.sleep(0.01)
        return replies


def run_inprocess(
    run_config: Mapping[str, object],
    nodes: int,
    out: Path,
    lag: Mapping[int, int] | None = None,
    tamper: Callable[[int, Message], Message] | None = None,
    silent_after: Mapping[int, int] | None = None,
    late: Mapping[int, int] | None = None,
    edges: InProcessGrid | None = None,
    threaded: bool = False,
    id_base: int = 0,
) -> tuple[list[dict], InProcessGrid]:
    """Run a method's cloud side against ``nodes`` in-process edges.

    Without ``threaded`` the grid handles one message at a time, inside
    ``pull_messages``, so SimulTrain runs on its message transport unless
    ``run_config`` sets ``simultrain-transport``.

    ``edges``: a grid of an earlier run whose nodes (their ``Context``, e.g.
    data stream positions) carry on, as SuperNodes do when only the
    ServerApp restarts. ``threaded``: every message is handled in a thread of
    its own (see :class:`InProcessGrid`). ``id_base``: node ids start after
    it (e.g. ``2**63`` for ids past int64, as Flower's can be).
    """
    flat = {"output-dir": str(out), "min-nodes": nodes, **run_config}
    if not threaded:  # one message at a time: SimulTrain on messages unless asked
        flat.setdefault("simultrain-transport", "message")
    cfg = RunConfig.from_flat(flat)
    grid = InProcessGrid(
        flat, nodes, lag, tamper, silent_after, late, threaded, id_base
    )
    if edges is not None:
        for node, context in edges.contexts.items():
            context.run_config = dict(flat)
            grid.contexts[node] = context
    srv = ServerRun.open(cfg, grid, run_id=1)  # type: ignore[arg-type]
    get_method(cfg.method).run_server(srv)
    return read_jsonl(srv.tracker.path), grid
