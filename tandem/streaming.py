"""gRPC plumbing of the streaming data plane: one bidirectional stream per session.

No protobuf: the service has one generic stream-stream method
(:data:`METHOD`) whose messages are raw bytes (the frames of
:mod:`tandem.frames`), so nothing is generated or unpickled.

- :class:`StreamServer` serves that method on ``bind`` (``host:port``; port 0
  picks a free one), insecure or with TLS (:class:`ServerTls`), with gRPC's
  message limits set to the frame bound.
- :func:`open_stream` dials it from an edge, trusting only the root
  certificate it was given when TLS is on.
- :class:`Outbox` is the request side of a stream: frames put into it are
  sent by gRPC's own thread while the caller computes the next ones;
  :class:`Inbox` the response side, with a deadline on every wait. Both
  can pace their frames to an emulated link (real-time mode, :data:`Pace`).
- :class:`SessionKeys` issues one fresh secret per node and session
  (``secrets.token_bytes``) and checks the one a stream presents in constant
  time (``hmac.compare_digest``); each secret opens one stream only.
"""

from __future__ import annotations

import hmac
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc

__all__ = [
    "METHOD",
    "SECRET_BYTES",
    "Inbox",
    "Outbox",
    "Pace",
    "ServerTls",
    "SessionKeys",
    "StreamServer",
    "open_stream",
    "split_address",
]

SERVICE = "tandem.Stream"
METHOD = f"/{SERVICE}/Session"
SECRET_BYTES = 32

#: A stream handler: the request frames in, the response frames out.
Handler = Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]


def _limits(max_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets) as ``(host, port)``.

    Raises
    ------
    ValueError
        If there is no ``:port`` or the port is not an integer in [0, 65535].
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"'{address}' is not host:port")
    return host, int(port)


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes of the server's certificate chain and private key."""

    cert_chain: bytes
    private_key: bytes


class StreamServer:
    """A gRPC server with one generic bidirectional method on raw bytes.

    Parameters
    ----------
    handler : callable
        ``handler(requests, context)`` yields the response frames of one stream;
        each stream runs in its own thread of the server's pool.
    bind : str
        ``host:port`` to listen on (port 0: any free port, see :attr:`port`).
    max_bytes : int
        Largest message either way (gRPC refuses bigger ones).
    tls : ServerTls, optional
        Serve TLS with this certificate; insecure when absent.
    workers : int (default: 64)
        Threads, hence streams served at once.

    Raises
    ------
    OSError
        If ``bind`` cannot be bound.
    """

    def __init__(
        self,
        handler: Handler,
        bind: str,
        max_bytes: int,
        tls: ServerTls | None = None,
        workers: int = 64,
    ) -> None:
        host, _ = split_address(bind)
        self.host = host
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tds"),
            options=_limits(max_bytes),
        )
        method = grpc.stream_stream_rpc_method_handler(handler)
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"Session": method})]
        )
        if tls is None:
            port = self._server.add_insecure_port(bind)
        else:
            creds = grpc.ssl_server_credentials([(tls.private_key, tls.cert_chain)])
            port = self._server.add_secure_port(bind, creds)
        if not port:
            raise OSError(f"cannot bind the stream server to {bind}")
        self.port = port

    def start(self) -> None:
        """Start serving."""
        self._server.start()

    def stop(self, grace: float = 1.0) -> None:
        """Stop; streams still open get ``grace`` seconds, then are cancelled."""
        self._server.stop(grace).wait()


def open_stream(
    address: str,
    requests: Iterator[bytes],
    max_bytes: int,
    root_cert: bytes | None = None,
) -> tuple[grpc.Channel, Iterator[bytes]]:
    """Open one stream to :data:`METHOD` at ``address``.

    TLS when ``root_cert`` (PEM) is given: the server must present a
    certificate that chains to it and names ``address``'s host.

    Returns
    -------
    channel : grpc.Channel
        Close it when the stream is done.
    responses : iterator of bytes
        The server's frames; raises :class:`grpc.RpcError` if the stream fails.
    """
    options = _limits(max_bytes)
    if root_cert:
        creds = grpc.ssl_channel_credentials(root_certificates=root_cert)
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    call = channel.stream_stream(METHOD)  # no (de)serializers: raw bytes
    return channel, call(requests)


#: Real-time pacing: given a frame's size and the ``time.monotonic()``
#: instant it is sent (None: now), the instant it may be delivered (an
#: emulated link's arrival time).
Pace = Callable[[int, "float | None"], float]


def wait_until(deadline: float) -> None:
    """Sleep until ``deadline`` on :func:`time.monotonic`'s clock (if ahead)."""
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class Outbox:
    """The frames an edge sends: :meth:`put` them, :meth:`close` at the end.

    Iterating yields them in order until closed; gRPC iterates it in its own
    thread, so frames travel while the caller computes. With ``pace`` (real
    time mode), a frame is timed when it is put and handed to gRPC only at
    the instant ``pace`` gives (its arrival on the emulated link).
    """

    _END = object()

    def __init__(self, pace: Pace | None = None) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pace = pace

    def put(self, frame: bytes, sent: float | None = None) -> None:
        """Queue a frame for sending; ``sent``: the instant it leaves the
        emulated device (real time: when the emulated edge finished it,
        which a late wake-up of this machine's thread does not move), else
        now."""
        deadline = self._pace(len(frame), sent) if self._pace is not None else 0.0
        self._queue.put((deadline, frame))

    def close(self) -> None:
        """End the request side of the stream after the queued frames."""
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            deadline, frame = item  # type: ignore[misc]
            wait_until(deadline)
            yield frame


class Inbox:
    """The frames an edge receives, with a deadline on each wait.

    A thread drains the stream's responses into a queue, so :meth:`get` can
    give up after ``timeout`` seconds: an edge never hangs on a cloud that
    went silent (a stalled ServerApp or a dead link that TCP has not noticed).
    """

    _END = object()

    def __init__(self, responses: Iterator[bytes], pace: Pace | None = None) -> None:
        self._responses = responses
        self._pace = pace
        #: The last frame's arrival on the emulated link (monotonic seconds;
        #: 0 unpaced).
        self.arrival = 0.0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        threading.Thread(target=self._pump, daemon=True, name="tdr").start()

    def _pump(self) -> None:
        try:
            for frame in self._responses:
                deadline = 0.0
                if self._pace is not None:
                    deadline = self._pace(len(frame), None)
                self._queue.put((deadline, frame))
            self._queue.put(self._END)
        except grpc.RpcError as err:
            self._queue.put(err)

    def get(self, timeout: float) -> bytes | None:
        """The next frame; ``None`` when the server has ended the stream.

        Raises
        ------
        TimeoutError
            If none came within ``timeout`` seconds (the stream is cancelled).
        grpc.RpcError
            If the stream failed.
        """
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            self._responses.cancel()  # type: ignore[attr-defined]
            raise TimeoutError(
                f"no frame from the cloud within {timeout:g} s"
            ) from None
        if isinstance(item, grpc.RpcError):
            raise item
        if item is self._END:
            return None
        deadline, frame = item  # type: ignore[misc]
        wait_until(deadline)  # real time: its arrival on the emulated link
        self.arrival = deadline
        return frame  # type: ignore[no-any-return]


class SessionKeys:
    """Per-node session secrets: fresh per session, each valid for one stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[int, bytes] = {}
        self._used: set[int] = set()

    def issue(self, node: int) -> bytes:
        """A fresh secret for ``node``'s next session (the old one is void)."""
        secret = secrets.token_bytes(SECRET_BYTES)
        with self._lock:
            self._keys[node] = secret
            self._used.discard(node)
        return secret

    def admit(self, node: int, secret: bytes) -> str | None:
        """Check a stream's claim; ``None`` if admitted, else why it is refused.

        The comparison takes the same time whatever the bytes
        (:func:`hmac.compare_digest`); an admitted secret is spent, so a
        replay of it is refused.
        """
        with self._lock:
            expected = self._keys.get(node)
            if expected is None:
                return f"no session for node {node}"
            if not hmac.compare_digest(expected, bytes(secret)):
                return f"wrong secret for node {node}"
            if node in self._used:
                return f"secret for node {node} already used"
            self._used.add(node)
            return None
