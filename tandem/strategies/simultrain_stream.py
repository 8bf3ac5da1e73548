"""SimulTrain's streaming transport (``simultrain-transport = "stream"``).

Flower messages are the control plane, one gRPC stream per edge the data
plane (:mod:`tandem.streaming`, frames of :mod:`tandem.frames`):

1. The cloud serves a stream endpoint (``simultrain-stream-bind``, default
   ``127.0.0.1:0``: loopback, any free port; advertised to the edges as
   ``simultrain-stream-advertise``, default the bound address), with TLS when
   ``simultrain-stream-tls-cert`` and ``-key`` are set.
2. Each edge gets one Flower message (:data:`SESSION_TYPE`,
   :class:`~tandem.protocol.simultrain.SessionStart`): the endpoint, a fresh
   secret for this node and session, the root certificate to trust, W, the
   steps and chunk size, and ``θ_e^c``.
3. The edge opens one stream; its first frame presents its node id and the
   secret (constant-time compare, one stream per secret). A wrong, missing,
   replayed or another node's secret is refused (``UNAUTHENTICATED``),
   counted as a rejected reply and logged.
4. The edge streams chunks with up to W in flight; each stream is served by
   its own thread, the cloud's state guarded by one lock around
   :meth:`SimulTrainCloud.on_chunk`, which checks the chunk as a Flower reply
   is checked, trains ``θ_c`` and answers with its gradients at once. A bad
   frame is rejected and counted without touching the cloud's state, and the
   edge's stream ends (the edge is dropped). Every frame's bytes go to the
   byte ledger (``stream.chunk`` up, ``stream.grads`` down).
5. The edge answers the session message at the end with its final delta,
   merged like any other. A stream silent for ``reply-timeout`` seconds, or
   an error reply, drops the edge; a node that connects later gets a session
   and starts from ``θ_e^c``.
6. A session whose stream has not opened yet waits while other streams send
   frames: an engine that runs fewer ClientApps at once than there are edges
   (the simulation engine with fewer CPUs than edges) starts the sessions in
   turns. It is dropped once no stream at all has sent a frame for
   ``reply-timeout`` seconds since its session began.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from flwr.app import Message

from tandem.failures import app_error
from tandem.frames import FrameError, decode_frame, encode_frame
from tandem.network import LinkProfile, assign_links, encode_link
from tandem.options import ConfigError
from tandem.protocol.simultrain import (
    SESSION_TYPE,
    SessionStart,
    frame_reply,
    message_frame,
    read_compute_seconds,
    read_delta,
    read_hello,
)
from tandem.schedules import pipeline_window
from tandem.server_context import ServerRun
from tandem.split import cut_bytes
from tandem.strategies import simultrain
from tandem.strategies.simultrain import EdgeTrack, InFlight, SimulTrainCloud
from tandem.streaming import ServerTls, SessionKeys, StreamServer
from tandem.training import cpu_clock
from tandem.wire import PayloadError

__all__ = ["STREAM_DOWN", "STREAM_HELLO", "STREAM_UP", "StreamLoop", "server_tls"]

#: Seconds a new stream may take to present its secret.
HELLO_SECONDS = 10.0
#: Ledger message types of the stream's frames.
STREAM_HELLO = "stream.hello"
STREAM_UP = "stream.chunk"
STREAM_DOWN = "stream.grads"


def server_tls(cert: str, key: str, ca: str) -> tuple[ServerTls | None, bytes]:
    """The stream's TLS from ``simultrain-stream-tls-*``, and the root to send.

    The edges are told to trust ``ca`` (default: the certificate itself).

    Raises
    ------
    ConfigError
        If only one of ``cert`` and ``key`` is given, or a file is unreadable.
    """
    if not cert and not key:
        return None, b""
    if not cert or not key:
        raise ConfigError(
            "simultrain-stream-tls-cert", cert, "needs simultrain-stream-tls-key too"
        )
    files = {}
    for name, path in (("cert", cert), ("key", key), ("ca", ca or cert)):
        try:
            files[name] = Path(path).read_bytes()
        except OSError as err:
            raise ConfigError(f"simultrain-stream-tls-{name}", path, str(err)) from None
    return ServerTls(files["cert"], files["key"]), files["ca"]


@dataclass
class Session:
    """One edge's session: its Flower message and its stream."""

    track: EdgeTrack
    message_id: str
    last_frame: float  # monotonic time of its last frame (or of the start)
    window: int = 1  # W: the edge's credits
    first_version: int = 0  # the version of the session's first chunk
    context: grpc.ServicerContext | None = None  # set once its stream is open
    closed: bool = False
    hello: float | None = None  # monotonic time its stream presented its secret


class StreamLoop:
    """The I/O loop of the stream transport (see the module docstring)."""

    def __init__(self, srv: ServerRun, cloud: SimulTrainCloud) -> None:
        opts = cloud.opts
        self.srv = srv
        self.cloud = cloud
        self.opts = opts
        # real-time mode checks the replay, which leaves evaluation out:
        # periods are evaluated after the streams, on copies taken on time
        cloud.defer_evaluations = opts.realtime
        self.lock = threading.Lock()  # guards the cloud and the sessions
        self.keys = SessionKeys()
        self.sessions: dict[int, Session] = {}  # node -> its current session
        self.waiting: dict[str, Session] = {}  # session message id -> session
        self.failed: list[tuple[Session, str]] = []  # bad streams, to drop
        self.lost: set[int] = set()
        self.grad_bytes: dict[tuple[int, int], int] = {}  # (node, chunk) -> bytes
        self.refused = 0
        self.last_frame = time.monotonic()  # of any stream (or of the start)
        self.first_hello: float | None = None  # when the first stream opened
        tls, self.root_cert = server_tls(
            opts.stream_tls_cert, opts.stream_tls_key, opts.stream_tls_ca
        )
        self.server = StreamServer(
            self.handle, opts.stream_bind, opts.max_frame_bytes, tls
        )
        self.address = opts.stream_advertise or f"{self.server.host}:{self.server.port}"
        #: one chunk's activations (and gradients) on the wire, estimated
        self.chunk_bytes = cut_bytes(
            cloud.cut_shape,
            opts.stream_chunk * srv.cfg.train.batch_size,
            opts.precision,
        )

    # ------------------------------------------------------------ control plane
    def open(self, track: EdgeTrack) -> None:
        """Send the edge its session message (a fresh secret each time)."""
        secret = self.keys.issue(track.node_id)
        link = self.link(track.node_id)
        window = self.opts.window or pipeline_window(
            link, self.chunk_bytes, self.chunk_bytes, max(1, self.opts.staleness_bound)
        )
        with self.lock:
            params = self.cloud.open_session(track)
            start = SessionStart(
                address=self.address,
                secret=secret,
                window=window,
                steps=max(self.opts.steps - track.steps_requested, 0),
                chunk=self.opts.stream_chunk,
                next_version=track.next_version,
                v_c=self.cloud.cloud_steps,
                edge_params=params,
                root_cert=self.root_cert,
                max_frame=self.opts.max_frame_bytes,
                link=encode_link(link),
            )
        msg = Message(
            content=start.to_content(),
            dst_node_id=track.node_id,
            message_type=SESSION_TYPE,
        )
        session = Session(track, "", time.monotonic(), window, start.next_version)
        with self.lock:  # open before the message leaves: the edge may
            self.sessions[track.node_id] = session  # connect before it returns
        (message_id,) = list(self.srv.grid.push_messages([msg]))
        with self.lock:
            session.message_id = message_id
            self.waiting[message_id] = session

    def link(self, node: int) -> LinkProfile:
        """``node``'s link: the one the replay gives it (``simultrain-link``).

        It sizes the session's window (``simultrain-window = 0``:
        :func:`~tandem.schedules.pipeline_window`, for a chunk's activations
        and gradients at the run's precision, within the staleness bound) and,
        in real-time mode, paces the session's frames.
        """
        nodes = sorted({*self.cloud.tracks, node})
        return assign_links(nodes, self.opts.link, self.srv.cfg.seed)[node]

    def serve(self) -> None:
        """Open every edge's session; run until every session has ended."""
        self.server.start()
        try:
            for track in list(self.cloud.tracks.values()):
                self.open(track)
            next_scan = time.monotonic() + simultrain.JOIN_SCAN
            while self.waiting:
                replies = list(self.srv.grid.pull_messages(list(self.waiting)))
                now = time.monotonic()
                with self.lock:
                    for session, reason in self.failed:
                        self._drop(session, reason)
                    self.failed.clear()
                    self._drop_silent(now)
                    for reply in replies:
                        self._end(reply)
                if now >= next_scan:
                    self._admit_newcomers()
                    next_scan = now + simultrain.JOIN_SCAN
                if not replies:
                    time.sleep(0.02)
        finally:
            self.server.stop(1.0)
        self.srv.tracker.log_event("stream", self.summary())

    def summary(self) -> dict[str, object]:
        """The ``stream`` event: the endpoint and what crossed it.

        ``frames-up``/``-down`` and ``bytes-up``/``-down`` add up the byte
        ledger's stream frames (hello and chunk frames up, gradient frames
        down: their real sizes); ``refused`` counts streams refused at their
        hello; ``seconds`` is the streaming phase, from the first stream's
        hello to the last frame of any stream (the run's wall time less the
        engine's start of the ClientApps and the last evaluation);
        ``session-seconds`` the longest stream, from its hello to its last
        frame (the edges' ClientApps may start apart: the makespan had they
        started together); ``windows`` each edge's W; ``realtime``: frames
        paced to the links (``simultrain-realtime``), on a clock ``dilation``
        times slower than the emulated one (``simultrain-realtime-dilation``:
        the seconds above are wall seconds).
        """
        spans = [
            s.last_frame - s.hello
            for s in self.sessions.values()
            if s.hello is not None
        ]
        up = [
            t.nbytes
            for t in self.srv.ledger.transfers
            if t.message_type in (STREAM_HELLO, STREAM_UP)
        ]
        down = [
            t.nbytes for t in self.srv.ledger.transfers if t.message_type == STREAM_DOWN
        ]
        return {
            "address": self.address,
            "tls": bool(self.root_cert),
            "refused": self.refused,
            "frames-up": len(up),
            "frames-down": len(down),
            "bytes-up": sum(up),
            "bytes-down": sum(down),
            "seconds": 0.0
            if self.first_hello is None
            else self.last_frame - self.first_hello,
            "session-seconds": max(spans, default=0.0),
            "windows": sorted({s.window for s in self.sessions.values()}),
            "realtime": self.opts.realtime,
            "dilation": self.opts.dilation if self.opts.realtime else 1.0,
        }

    def _end(self, reply: Message) -> None:
        """An edge answered its session message: merge its final delta."""
        session = self.waiting.pop(reply.metadata.reply_to_message_id, None)
        if session is None or session.closed:
            return
        session.closed = True
        track = session.track
        if reply.has_error():
            self._drop(session, f"error reply: {reply.error.reason}", app_error(reply))
            return
        if track.steps_requested < self.opts.steps:
            self._drop(
                session,
                f"session ended after {track.steps_requested} of "
                f"{self.opts.steps} steps",
            )
            return
        try:
            read_compute_seconds(reply.content)
            delta = read_delta(reply.content, self.cloud.edge_layout)
        except PayloadError as err:
            self.cloud.reject(track, f"final delta: {err}")
            return
        if delta is not None:
            self.cloud.merge_checked(track, delta)

    def _drop(self, session: Session, reason: str, error: str | None = None) -> None:
        session.closed = True
        self.waiting.pop(session.message_id, None)
        if session.context is not None:
            session.context.cancel()
        track = session.track
        if self.cloud.tracks.get(track.node_id) is track:
            self.lost.add(track.node_id)
            self.cloud.drop(track, reason, error)

    def _drop_silent(self, now: float) -> None:
        """Drop streams silent for ``reply-timeout`` s, and sessions whose
        stream never opened while no stream at all sent a frame that long."""
        timeout = self.srv.cfg.reply_timeout
        for session in list(self.waiting.values()):
            last = session.last_frame
            if session.context is None:  # not streaming yet: maybe queued
                last = max(last, self.last_frame)
            if now - last > timeout:
                self._drop(session, f"no frame within {timeout:g} s")

    def _admit_newcomers(self) -> None:
        online = set(self.srv.grid.get_node_ids())
        with self.lock:
            self.lost &= online
            newcomers = sorted(online - set(self.cloud.tracks) - self.lost)
            tracks = [self.cloud.join(node) for node in newcomers]
        for track in tracks:
            self.open(track)

    # ------------------------------------------------------------ data plane
    def _refuse(self, node: int, reason: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.refused += 1
            self.srv.reject(self.cloud.period + 1, node, f"stream refused: {reason}")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "stream refused")

    def handle(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Serve one stream: authenticate, then answer chunk after chunk."""
        limit = self.opts.max_frame_bytes
        # a stream holds a server thread: one that does not say who it is
        # within HELLO_SECONDS is cancelled
        watchdog = threading.Timer(HELLO_SECONDS, context.cancel)
        watchdog.start()
        try:
            first = next(requests)
            node, secret, window = read_hello(decode_frame(first, limit))
        except StopIteration:  # closed without presenting a secret
            self._refuse(-1, "no hello frame", context)
            return
        except (FrameError, PayloadError) as err:
            self._refuse(-1, f"bad hello: {err}", context)
            return
        except grpc.RpcError:  # cancelled by the watchdog
            self._refuse(-1, f"no hello within {HELLO_SECONDS:g} s", context)
            return
        finally:
            watchdog.cancel()
        refusal = self.keys.admit(node, secret)
        with self.lock:
            session = self.sessions.get(node)
            if refusal is None and (session is None or session.closed):
                refusal = f"no open session for node {node}"
            if refusal is None and window > session.window:
                refusal = f"window {window} above the session's {session.window}"
            if refusal is None:
                # the edge keeps W in flight: its own, sized on its measured
                # compute (0: the session's); the replay follows the same W
                session.window = window or session.window
                session.context = context
                session.last_frame = self.last_frame = time.monotonic()
                session.hello = session.last_frame
                if self.first_hello is None:
                    self.first_hello = self.last_frame
                self.srv.ledger.record(node, "up", STREAM_HELLO, len(first))
        if refusal is not None:
            self._refuse(node, refusal, context)
            return
        seq = 0
        try:
            for raw in requests:
                data, reason = self._answer(session, raw, seq)
                if reason is not None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
                    return
                if data is not None:
                    seq += 1
                    yield data
        except grpc.RpcError:  # cancelled: the edge was dropped meanwhile
            return

    def _answer(
        self, session: Session, raw: bytes, seq: int
    ) -> tuple[bytes | None, str | None]:
        """One frame in: ``(answer frame or None, reason it was refused or None)``."""
        track = session.track
        node = track.node_id
        with self.lock:
            if session.closed:
                return None, "session closed"
            session.last_frame = self.last_frame = time.monotonic()
            # the cloud's compute on a chunk is all of its work on the frames:
            # decoding and checks, f_c's steps, encoding the answer
            clock = cpu_clock()
            tick = clock()
            try:
                reply = frame_reply(decode_frame(raw, self.opts.max_frame_bytes))
                answer = self.cloud.on_chunk(track, reply)
            except (FrameError, PayloadError) as err:
                reason = f"bad frame: {err}"
                self.failed.append((session, reason))
                session.closed = True
                return None, reason
            self.srv.ledger.record(node, "up", STREAM_UP, len(raw), track.edge_seconds)
            if answer is None:
                return None, None
            data = encode_frame(message_frame(answer.message, seq))
            cloud_seconds = clock() - tick
            if self.opts.realtime:
                # the one cloud, at the emulated cloud's speed (only slower;
                # on the dilated clock a cloud up to k times this one's)
                stretch = self.opts.dilation * self.opts.cloud_factor - 1
                time.sleep(max(stretch, 0.0) * cloud_seconds)
            self.srv.ledger.record(node, "down", STREAM_DOWN, len(data))
            version = answer.message.grad_for
            self.grad_bytes[(node, version)] = len(data)
            # the edge forwarded this chunk once the gradients of the chunk W
            # before it were in (its credits): what the replay
            # (schedules.replay_pipeline) makes it wait for
            window = session.window
            earlier = version - window
            self.cloud.record(
                track,
                InFlight(
                    seq=version,
                    bytes_down=self.grad_bytes.pop((node, earlier), 0),
                    grads_from=earlier if earlier >= session.first_version else -1,
                    want=answer.micro_batches,
                    final=False,
                    window=window,
                ),
                len(raw),
                cloud_seconds,
            )
            self.cloud.end_period_if_due()
        return data, None
