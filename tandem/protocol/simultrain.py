"""SimulTrain's contract between the cloud and the edge.

One message type, ``train.simultrain``. The cloud's message
(:class:`CloudMessage`) carries

- ``config`` (:data:`~tandem.wire.KEY_CONFIG`): the cloud's step count
  ``v-c``, how many micro-batches to forward next (``want``) and which chunk
  the enclosed gradients belong to (``grad-for``, -1: none);
- ``grads`` (:data:`KEY_GRADS`): the cut-layer gradients of chunk
  ``grad-for``, encoded by :func:`tandem.split.encode_cut` (key ``g``);
- ``edge-params`` (:data:`KEY_EDGE_PARAMS`): the cloud's copy ``θ_e^c`` of the
  edge layers, when reconciliation is due.

The edge's answer (:class:`EdgeReply`) carries

- ``delta`` (:data:`KEY_DELTA`): ``θ_e − base``, its progress since it last
  reconciled, when it reconciled on this message;
- ``acts`` (:data:`KEY_ACTS`): the next chunk's cut-layer activations (key
  ``a``, :func:`~tandem.split.encode_cut`), labels ``y`` and micro-batch
  sizes ``sizes`` (int64);
- ``meta`` (:data:`KEY_META`): the chunk's version ``v-e`` (-1: no chunk) and
  the ``v-c`` of the edge's last reconciliation;
- ``metrics`` (:data:`~tandem.wire.KEY_METRICS`): ``compute-seconds`` of the
  edge's own maths and its ``steps`` so far.

The readers validate what comes from the other side and raise
:class:`~tandem.wire.PayloadError` naming what is wrong. Both sides build the
same split model with :func:`edge_model`, and read the same options
(:class:`SimulTrainOptions`, keys ``simultrain-*``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from tandem.datasets import load_dataset
from tandem.frames import Frame
from tandem.models import build_model, default_model_for, model_entry
from tandem.network import link_option_check
from tandem.options import option
from tandem.split import cut_keys, decode_cut, split_model, warmed_up
from tandem.wire import (
    KEY_CONFIG,
    KEY_METRICS,
    PayloadError,
    check_arrays,
    check_values,
    get_record,
    read_array,
)

if TYPE_CHECKING:
    from tandem.config import RunConfig

__all__ = [
    "EDGE_OPTIMIZERS",
    "KEY_ACTS",
    "KEY_DELTA",
    "KEY_EDGE_PARAMS",
    "KEY_GRADS",
    "KEY_META",
    "MESSAGE_TYPE",
    "SESSION_TYPE",
    "Activations",
    "CloudMessage",
    "EdgeReply",
    "SessionStart",
    "SimulTrainOptions",
    "check_activations",
    "compute_seconds_of",
    "edge_model",
    "frame_reply",
    "hello_frame",
    "message_frame",
    "read_activations",
    "read_compute_seconds",
    "read_delta",
    "read_hello",
    "read_message_frame",
    "reply_frame",
    "split_run_model",
]

MESSAGE_TYPE = "train.simultrain"
KEY_GRADS = "grads"
KEY_EDGE_PARAMS = "edge-params"
KEY_ACTS = "acts"
KEY_DELTA = "delta"
KEY_META = "meta"

#: ``{name: (shape, dtype)}`` of the edge layers' state dict.
Layout = Mapping[str, tuple[tuple[int, ...], str]]

_LINK_KEY = "simultrain-link"
#: The edge's optimizers (``simultrain-edge-optimizer``): torch's SGD with
#: the run's momentum, or torch's Adam (betas 0.9, 0.999, eps 1e-8).
EDGE_OPTIMIZERS = ("sgd", "adam")


def _address(address: str) -> bool:
    """``host:port``, port in [0, 65535]."""
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and int(port) <= 65535)


_PATH = "must be empty or a file path (PEM, read on the ServerApp's machine)"


def _path(path: str) -> bool:
    """Empty, or a plausible path: not blank, no NUL or line breaks."""
    return path == "" or (bool(path.strip()) and not any(c in path for c in "\0\n\r"))


@dataclass(frozen=True)
class SimulTrainOptions:
    """SimulTrain settings (keys ``simultrain-*``), checked when parsed."""

    cut: str = option("simultrain-cut", "default")
    steps: int = option(
        "simultrain-steps", 300, "must be >= 1 (SGD steps per edge)", lambda n: n >= 1
    )
    chunk: int = option(
        "simultrain-chunk",
        0,
        "must be >= 0 (micro-batches per message; 0 = adapt to the exchange cost)",
        lambda n: n >= 0,
    )
    max_chunk: int = option(
        "simultrain-max-chunk",
        4,
        "must be >= 1 (largest adaptive chunk)",
        lambda n: n >= 1,
    )
    alpha: float = option(
        "simultrain-alpha", 0.5, "must lie in [0, 1] (forecast)", lambda a: 0 <= a <= 1
    )
    edge_lr_scale: float = option(
        "simultrain-edge-lr-scale",
        0.5,
        "must be > 0 (edge learning rate = lr x this)",
        lambda f: f > 0,
    )
    edge_optimizer: str = option(
        "simultrain-edge-optimizer", "sgd", choices=EDGE_OPTIMIZERS
    )
    edge_lr: float = option(
        "simultrain-edge-lr",
        0.0,
        "must be >= 0 (the edge's learning rate; 0 = lr x simultrain-edge-lr-scale)",
        lambda f: f >= 0,
    )
    edge_warmup: int = option(
        "simultrain-edge-warmup",
        0,
        "must be >= 0 (micro-batches forwarded over which the edge's rate "
        "rises linearly from 0; 0 = no warm-up)",
        lambda n: n >= 0,
    )
    predict_weights: bool = option("simultrain-predict-weights", False)
    forecast: str = option(
        "simultrain-forecast", "stash", choices=("stash", "cloud-copy")
    )
    lam: float = option(
        "simultrain-lambda", 0.8, "must lie in [0, 1]", lambda x: 0 <= x <= 1
    )
    reconcile_every: int = option(
        "simultrain-reconcile-every",
        4,
        "must be >= 0 (steps between reconciliations; 0 = never)",
        lambda n: n >= 0,
    )
    staleness_bound: int = option(
        "simultrain-staleness-bound", 8, "must be >= 0", lambda n: n >= 0
    )
    precision: str = option(
        "simultrain-precision", "int8", choices=("float32", "float16", "int8")
    )
    eval_every: int = option(
        "simultrain-eval-every", 50, "must be >= 1 (steps per edge)", lambda n: n >= 1
    )
    link: str = option(_LINK_KEY, "4g", check=link_option_check(_LINK_KEY))
    edge_factor: float = option(
        "simultrain-edge-factor", 1.0, "must be > 0", lambda f: f > 0
    )
    cloud_factor: float = option(
        "simultrain-cloud-factor", 1.0, "must be > 0", lambda f: f > 0
    )
    transport: str = option(
        "simultrain-transport", "stream", choices=("message", "stream")
    )
    window: int = option(
        "simultrain-window",
        0,
        "must be >= 0 (chunks in flight per edge; 0 = auto: on the stream, "
        "enough to fill the link's bandwidth-delay product within the staleness "
        "bound, on the message transport min(2, max(1, staleness bound)); "
        "1 = one at a time, no overlap: splitsync)",
        lambda n: n >= 0,
    )
    stream_bind: str = option(
        "simultrain-stream-bind", "127.0.0.1:0", "must be host:port", _address
    )
    stream_advertise: str = option(
        "simultrain-stream-advertise",
        "",
        "must be host:port, or empty (the bound address)",
        lambda a: a == "" or _address(a),
    )
    stream_tls_cert: str = option("simultrain-stream-tls-cert", "", _PATH, _path)
    stream_tls_key: str = option("simultrain-stream-tls-key", "", _PATH, _path)
    stream_tls_ca: str = option("simultrain-stream-tls-ca", "", _PATH, _path)
    realtime: bool = option("simultrain-realtime", False)
    dilation: float = option(
        "simultrain-realtime-dilation",
        1.0,
        "must be >= 1 (real time runs this many times slower than emulated time)",
        lambda k: k >= 1.0,
    )
    stream_max_frame_mb: float = option(
        "simultrain-stream-max-frame-mb",
        64.0,
        "must be > 0 (largest stream frame, MB)",
        lambda f: f > 0,
    )

    @property
    def in_flight(self) -> int:
        """W on the message transport (the stream's default W is per link).

        W = 1 is split learning without the pipeline (the ``splitsync``
        baseline): the edge waits for each chunk's gradients before it
        forwards the next, on either transport (the message transport
        otherwise has W = 2: each message carries the gradients of the chunk
        before the one just received). On the stream, W is the edge's
        credits: ``simultrain-window``, or with 0 the window that fills its
        link (:func:`tandem.schedules.pipeline_window`).
        """
        return self.window or min(2, max(1, self.staleness_bound))

    def edge_rate(self, lr: float) -> float:
        """The edge's learning rate before its warm-up: ``simultrain-edge-lr``,
        or with 0 the run's ``lr`` × ``simultrain-edge-lr-scale``."""
        return self.edge_lr if self.edge_lr > 0 else lr * self.edge_lr_scale

    def warmed_up(self, rate: float, forwarded: int) -> float:
        """The edge step's rate after ``forwarded`` micro-batches in all:
        ``rate × min(1, forwarded / N)`` with ``N = simultrain-edge-warmup``
        (Goyal et al., 2017, §2.2, gradual warm-up); ``rate`` itself with
        ``N = 0`` or once ``forwarded >= N``."""
        return warmed_up(rate, forwarded, self.edge_warmup)

    @property
    def max_frame_bytes(self) -> int:
        """The frame bound in bytes (``simultrain-stream-max-frame-mb``)."""
        return int(self.stream_max_frame_mb * 2**20)

    @property
    def stream_chunk(self) -> int:
        """Micro-batches per chunk on the stream (the adaptive size is not used)."""
        return self.chunk or self.max_chunk


def edge_model(cfg: RunConfig, opts: SimulTrainOptions) -> tuple[nn.Module, nn.Module]:
    """The run's model split into (edge, cloud) parts, freshly initialised.

    Both sides call it with the same config, so they start from the same
    weights (the model's seed is the run's).
    """
    return split_run_model(cfg, opts.cut)


def split_run_model(
    cfg: RunConfig, cut: str, key: str = "simultrain-cut"
) -> tuple[nn.Sequential, nn.Sequential]:
    """The run's model, freshly initialised at the run's seed, cut after stage
    ``cut`` (name or index; ``"default"``: the model's own); a bad cut raises
    :class:`~tandem.options.ConfigError` naming ``key``."""
    bundle = load_dataset(cfg.data)
    name = cfg.train.model
    if name == "auto":
        name = default_model_for(bundle.input_shape, bundle.tokens)
    model = build_model(name, bundle.input_shape, bundle.num_classes, cfg.seed)
    if cut == "default":
        cut = model_entry(name).default_cut
    return split_model(model, cut, key)


def _int(record: ConfigRecord, key: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"config '{key}' = {value!r}, expected an integer")
    return value


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: read_array(a, k) for k, a in record.items()}


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


# ----------------------------------------------------------------- cloud -> edge
@dataclass(frozen=True)
class CloudMessage:
    """What the cloud sends an edge.

    Attributes
    ----------
    v_c : int
        Cloud steps taken when the message left (``θ_c``'s version).
    want : int
        Micro-batches the edge forwards next (0: none, the last messages).
    grad_for : int
        The chunk version the gradients belong to (-1: none enclosed).
    grads : dict of str to ndarray, or None
        The encoded cut-layer gradients of chunk ``grad_for``
        (:func:`tandem.split.encode_cut`, key ``g``).
    edge_params : dict of str to ndarray, or None
        ``θ_e^c`` when the edge reconciles (or starts from it).
    """

    v_c: int
    want: int
    grad_for: int
    grads: dict[str, np.ndarray] | None = None
    edge_params: dict[str, np.ndarray] | None = None

    def to_content(self) -> RecordDict:
        """The message as Flower records."""
        content = RecordDict()
        if self.grads is not None:
            content[KEY_GRADS] = _record(self.grads)
        if self.edge_params is not None:
            content[KEY_EDGE_PARAMS] = _record(self.edge_params)
        content[KEY_CONFIG] = ConfigRecord(
            {"v-c": self.v_c, "want": self.want, "grad-for": self.grad_for}
        )
        return content

    @classmethod
    def from_content(cls, content: RecordDict, edge_layout: Layout) -> CloudMessage:
        """Read a message; ``θ_e^c`` is checked against ``edge_layout``.

        Raises
        ------
        PayloadError
            On a missing record, a non-integer field, or edge parameters that
            do not fit the edge layers (keys, shapes, dtypes, NaN/Inf).
        """
        conf = get_record(content, KEY_CONFIG, ConfigRecord)
        grad_for = _int(conf, "grad-for")
        grads = None
        if grad_for >= 0:
            grads = _arrays(get_record(content, KEY_GRADS, ArrayRecord))
        params = None
        if KEY_EDGE_PARAMS in content:
            record = get_record(content, KEY_EDGE_PARAMS, ArrayRecord)
            params = check_arrays(record, edge_layout)
        return cls(_int(conf, "v-c"), _int(conf, "want"), grad_for, grads, params)

    def gradients(self, precision: str, shape: tuple[int, ...]) -> np.ndarray:
        """The enclosed cut-layer gradients, decoded to float32 of ``shape``.

        Raises
        ------
        PayloadError
            If there are none, or their arrays, dtypes, shapes or values are
            not what :func:`~tandem.split.encode_cut` makes of ``shape``.
        """
        if self.grads is None:
            raise PayloadError("no cut-layer gradients enclosed")
        try:
            if set(self.grads) != cut_keys(precision, "g"):
                raise ValueError(f"gradient arrays {sorted(self.grads)}")
            return decode_cut(self.grads, precision, "g", shape)
        except ValueError as err:
            raise PayloadError(f"cut-layer gradients: {err}") from None


# ----------------------------------------------------------------- edge -> cloud
@dataclass(frozen=True)
class EdgeReply:
    """What an edge answers.

    Attributes
    ----------
    version : int
        The version of the enclosed chunk (-1: no chunk).
    base_v_c : int
        ``v-c`` of the message the edge last reconciled on.
    compute_seconds : float
        CPU seconds of the edge's own maths for this message.
    steps : int
        Micro-batches the edge has forwarded so far.
    delta : dict of str to ndarray, or None
        ``θ_e − base`` when the edge reconciled on this message.
    acts : dict of str to ndarray, or None
        The chunk's encoded activations (:func:`~tandem.split.encode_cut`,
        key ``a``).
    labels, sizes : ndarray or None
        The chunk's labels (int64, one per row) and micro-batch sizes (int64).
    """

    version: int
    base_v_c: int
    compute_seconds: float
    steps: int
    delta: dict[str, np.ndarray] | None = None
    acts: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    sizes: np.ndarray | None = None

    def to_content(self) -> RecordDict:
        """The reply as Flower records."""
        content = RecordDict()
        if self.delta is not None:
            content[KEY_DELTA] = _record(self.delta)
        if self.acts is not None:
            if self.labels is None or self.sizes is None:
                raise ValueError("activations need their labels and sizes")
            content[KEY_ACTS] = _record(
                {**self.acts, "y": self.labels, "sizes": self.sizes}
            )
        content[KEY_META] = ConfigRecord(
            {"v-e": self.version, "base-v-c": self.base_v_c}
        )
        content[KEY_METRICS] = MetricRecord(
            {"compute-seconds": self.compute_seconds, "steps": self.steps}
        )
        return content


@dataclass(frozen=True)
class Activations:
    """A checked chunk: float32 activations, labels and micro-batch sizes.

    ``acts`` has shape ``(rows, *cut_shape)``; ``labels`` ``(rows,)``, or
    ``(rows, T)`` for token data; ``sizes`` ``(micro-batches,)`` with
    ``sizes.sum() == rows``.
    """

    acts: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray


def compute_seconds_of(value: object) -> float:
    """A reply's ``compute-seconds`` (finite, >= 0), as a float.

    Raises
    ------
    PayloadError
        If it is not a finite number >= 0.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise PayloadError(f"metric 'compute-seconds' = {value!r}")
    return float(value)


def read_compute_seconds(content: RecordDict) -> float:
    """The reply's ``compute-seconds`` metric (finite, >= 0)."""
    metrics = get_record(content, KEY_METRICS, MetricRecord)
    return compute_seconds_of(metrics.get("compute-seconds"))


def read_delta(
    content: RecordDict, edge_layout: Layout
) -> dict[str, np.ndarray] | None:
    """The reply's delta checked against ``edge_layout`` (None if it has none)."""
    if KEY_DELTA not in content:
        return None
    return check_arrays(get_record(content, KEY_DELTA, ArrayRecord), edge_layout)


def read_activations(
    content: RecordDict,
    expected_version: int,
    want: int,
    cut_shape: tuple[int, ...],
    precision: str,
    num_classes: int,
    max_rows: int,
    label_shape: tuple[int, ...] = (),
) -> Activations:
    """Validate an activations reply and decode it: every array's bytes are
    read by :func:`~tandem.wire.read_array`, then :func:`check_activations`.

    Raises
    ------
    PayloadError
        On a missing record, a malformed array, or any of
        :func:`check_activations`' checks.
    """
    meta = get_record(content, KEY_META, ConfigRecord)
    record = get_record(content, KEY_ACTS, ArrayRecord)
    return check_activations(
        meta.get("v-e"),
        {k: read_array(record[k], k) for k in record},
        expected_version,
        want,
        cut_shape,
        precision,
        num_classes,
        max_rows,
        label_shape,
    )


def check_activations(
    version: object,
    arrays: Mapping[str, np.ndarray],
    expected_version: int,
    want: int,
    cut_shape: tuple[int, ...],
    precision: str,
    num_classes: int,
    max_rows: int,
    label_shape: tuple[int, ...] = (),
) -> Activations:
    """Check a chunk's arrays (already read: a Flower reply's, or a stream
    frame's) and decode them.

    Labels are ``(rows, *label_shape)``: one per row for a classifier, one
    per position (``(rows, T)``) for token sequences, whose activations are
    ``(rows, T, D)``.

    Raises
    ------
    PayloadError
        On a version that is not the expected one (replayed or from the
        future), other arrays than ``y``, ``sizes`` and the activations',
        wrong shapes or dtypes, NaN/Inf, int8 scales, labels out of range, or
        more rows than were asked for.
    """
    if version != expected_version:
        raise PayloadError(f"chunk version {version!r}, expected {expected_version}")
    keys = {"y", "sizes"} | cut_keys(precision, "a")
    if set(arrays) != keys:
        raise PayloadError(
            f"activation keys {sorted(arrays)}, expected {', '.join(sorted(keys))}"
        )
    y, sizes = arrays["y"], arrays["sizes"]
    if y.dtype != np.int64 or sizes.dtype != np.int64:
        raise PayloadError(f"dtypes y={y.dtype} sizes={sizes.dtype}")
    rows = y.shape[0] if y.shape else 0
    if rows > max_rows or tuple(y.shape) != (rows, *label_shape):
        rest = "".join(f", {d}" for d in label_shape) or ","
        raise PayloadError(
            f"labels of shape {tuple(y.shape)}, expected (<= {max_rows}{rest})"
        )
    if sizes.ndim != 1 or len(sizes) != want or (sizes <= 0).any():
        raise PayloadError(f"micro-batch sizes {sizes.tolist()} for {want} asked")
    if int(sizes.sum()) != rows:
        raise PayloadError("sizes and label rows disagree")
    try:
        acts = decode_cut(
            {k: arrays[k] for k in cut_keys(precision, "a")},
            precision,
            "a",
            (rows, *cut_shape),
        )
    except ValueError as err:
        raise PayloadError(f"activations: {err}") from None
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise PayloadError(f"labels outside [0, {num_classes})")
    return Activations(acts, np.array(y), np.array(sizes))  # writable copies


# ------------------------------------------------------------------ the stream
#: The Flower message that starts an edge's stream session (control plane).
SESSION_TYPE = "train.simultrain_session"
KEY_SESSION = "session"
#: Frame kinds (:mod:`tandem.frames`) of the stream (data plane).
FRAME_HELLO = 1  # edge -> cloud, first: ints = (node id, W, 0), array "secret"
FRAME_CHUNK = 2  # edge -> cloud: an EdgeReply (a chunk and/or a delta)
FRAME_GRADS = 3  # cloud -> edge: a CloudMessage (one chunk's gradients)
_DELTA = "delta/"
_EDGE = "edge/"


@dataclass(frozen=True)
class SessionStart:
    """What the cloud's session message tells an edge (Flower records).

    Attributes
    ----------
    address : str
        ``host:port`` of the cloud's stream endpoint.
    secret : bytes
        This node's secret for this session; its first frame presents it.
    window : int
        W, chunks the edge may have in flight (its credits): the cap; with
        ``simultrain-window = 0`` the edge may keep fewer in flight, and says
        how many in its hello frame.
    steps : int
        Micro-batches to forward in this session.
    chunk : int
        Micro-batches per chunk (the last one may be smaller).
    next_version : int
        Version of the session's first chunk.
    v_c : int
        The cloud's step count when the session started.
    edge_params : dict of str to ndarray
        ``θ_e^c``: the edge reconciles with it before streaming (a fresh
        node starts from it).
    root_cert : bytes
        PEM certificate the stream's TLS must chain to (empty: no TLS).
    max_frame : int
        Largest frame either way (bytes).
    link : str
        The edge's link as the run assumes it (``simultrain-link``,
        :func:`tandem.network.encode_link`): the edge sizes its W on it and,
        in real-time mode (``simultrain-realtime``), paces its frames both
        ways by it; empty: none assumed.
    """

    address: str
    secret: bytes
    window: int
    steps: int
    chunk: int
    next_version: int
    v_c: int
    edge_params: dict[str, np.ndarray]
    root_cert: bytes = b""
    max_frame: int = 64 * 2**20
    link: str = ""

    def to_content(self) -> RecordDict:
        """The session message as Flower records."""
        content = RecordDict()
        content[KEY_EDGE_PARAMS] = _record(self.edge_params)
        content[KEY_SESSION] = ConfigRecord(
            {
                "address": self.address,
                "secret": self.secret,
                "root-cert": self.root_cert,
                "window": self.window,
                "steps": self.steps,
                "chunk": self.chunk,
                "next-version": self.next_version,
                "v-c": self.v_c,
                "max-frame": self.max_frame,
                "link": self.link,
            }
        )
        return content

    @classmethod
    def from_content(cls, content: RecordDict, edge_layout: Layout) -> SessionStart:
        """Read a session message; ``θ_e^c`` is checked against ``edge_layout``.

        Raises
        ------
        PayloadError
            On a missing record or field, or edge parameters that do not fit.
        """
        conf = get_record(content, KEY_SESSION, ConfigRecord)
        params = check_arrays(
            get_record(content, KEY_EDGE_PARAMS, ArrayRecord), edge_layout
        )
        address, secret, root = (
            conf.get("address"),
            conf.get("secret"),
            conf.get("root-cert"),
        )
        if not isinstance(address, str) or not isinstance(secret, bytes):
            raise PayloadError("session needs an address and a secret")
        ints = {
            k: _int(conf, k)
            for k in ("window", "steps", "chunk", "next-version", "v-c", "max-frame")
        }
        if ints["window"] < 1 or ints["chunk"] < 1 or ints["steps"] < 0:
            raise PayloadError(f"session window/chunk/steps {ints}")
        link = conf.get("link", "")
        if not isinstance(link, str):
            raise PayloadError(f"session link is {type(link).__name__}, not text")
        return cls(
            address,
            secret,
            ints["window"],
            ints["steps"],
            ints["chunk"],
            ints["next-version"],
            ints["v-c"],
            params,
            root if isinstance(root, bytes) else b"",
            ints["max-frame"],
            link,
        )


#: Flower's node ids are unsigned 64-bit integers; a frame's ints are signed.
_NODE_SPAN = 1 << 64


def hello_frame(node: int, secret: bytes, window: int = 0) -> Frame:
    """The edge's first frame: its node id, the session's secret and its W.

    The node id (Flower's, an unsigned 64-bit integer) travels as the int64
    with the same 64 bits (two's complement); :func:`read_hello` reads it back.
    ``window`` is the W the edge will keep in flight, at most the session's
    (:func:`tandem.schedules.pipeline_window` with the edge's measured
    compute); 0: the session's.

    Raises
    ------
    ValueError
        If ``node`` is not in [0, 2**64) or ``window`` is negative.
    """
    if not 0 <= node < _NODE_SPAN:
        raise ValueError(f"node id {node} is not an unsigned 64-bit integer")
    if window < 0:
        raise ValueError(f"window must be >= 0, not {window}")
    signed = node - _NODE_SPAN if node >= _NODE_SPAN // 2 else node
    return Frame(
        FRAME_HELLO,
        0,
        (signed, window, 0),
        0.0,
        {"secret": np.frombuffer(secret, np.uint8)},
    )


def read_hello(frame: Frame) -> tuple[int, bytes, int]:
    """``(node id, secret, window)`` of a hello frame (the node id unsigned
    again; window 0: the session's).

    Raises
    ------
    PayloadError
        If it is not a hello frame, carries no byte string as secret, or a
        negative window.
    """
    secret = frame.arrays.get("secret")
    if frame.kind != FRAME_HELLO or set(frame.arrays) != {"secret"}:
        raise PayloadError(f"first frame of kind {frame.kind}, expected a hello")
    if secret is None or secret.dtype != np.uint8 or secret.ndim != 1:
        raise PayloadError("hello without a byte-string secret")
    if frame.ints[1] < 0:
        raise PayloadError(f"hello with window {frame.ints[1]}")
    return frame.ints[0] % _NODE_SPAN, secret.tobytes(), frame.ints[1]


def reply_frame(reply: EdgeReply, seq: int) -> Frame:
    """An :class:`EdgeReply` as a chunk frame (arrays: ``a``…, ``y``, ``sizes``,
    ``delta/<key>``; ints: version, base ``v-c``, steps; real: compute seconds).
    """
    arrays: dict[str, np.ndarray] = {}
    if reply.acts is not None:
        if reply.labels is None or reply.sizes is None:
            raise ValueError("activations need their labels and sizes")
        arrays.update(reply.acts)
        arrays["y"], arrays["sizes"] = reply.labels, reply.sizes
    for k, v in (reply.delta or {}).items():
        arrays[_DELTA + k] = v
    ints = (reply.version, reply.base_v_c, reply.steps)
    return Frame(FRAME_CHUNK, seq, ints, reply.compute_seconds, arrays)


def frame_reply(frame: Frame) -> EdgeReply:
    """The :class:`EdgeReply` a chunk frame carries, its arrays as
    :func:`~tandem.frames.decode_frame` read them (unchecked beyond that:
    :func:`check_activations`, :func:`~tandem.wire.check_values` and
    :func:`compute_seconds_of` check them, as they do a Flower reply's).

    Raises
    ------
    PayloadError
        If it is not a chunk frame, or has activations without labels/sizes.
    """
    if frame.kind != FRAME_CHUNK:
        raise PayloadError(f"frame of kind {frame.kind}, expected a chunk")
    delta = {
        k[len(_DELTA) :]: v for k, v in frame.arrays.items() if k.startswith(_DELTA)
    }
    rest = {k: v for k, v in frame.arrays.items() if not k.startswith(_DELTA)}
    labels, sizes = rest.pop("y", None), rest.pop("sizes", None)
    if (labels is None) != (sizes is None) or (labels is None) != (not rest):
        raise PayloadError(f"chunk arrays {sorted(frame.arrays)}")
    version, base_v_c, steps = frame.ints
    return EdgeReply(
        version,
        base_v_c,
        frame.real,
        steps,
        delta or None,
        rest or None,
        labels,
        sizes,
    )


def message_frame(message: CloudMessage, seq: int) -> Frame:
    """A :class:`CloudMessage` as a gradients frame (arrays ``g``…, ``edge/<key>``;
    ints: ``v-c``, ``want``, ``grad-for``).
    """
    arrays = dict(message.grads or {})
    for k, v in (message.edge_params or {}).items():
        arrays[_EDGE + k] = v
    ints = (message.v_c, message.want, message.grad_for)
    return Frame(FRAME_GRADS, seq, ints, 0.0, arrays)


def read_message_frame(frame: Frame, edge_layout: Layout) -> CloudMessage:
    """The :class:`CloudMessage` of a gradients frame, ``θ_e^c`` checked.

    Raises
    ------
    PayloadError
        If it is not a gradients frame or its edge parameters do not fit.
    """
    if frame.kind != FRAME_GRADS:
        raise PayloadError(f"frame of kind {frame.kind}, expected gradients")
    v_c, want, grad_for = frame.ints
    params = {
        k[len(_EDGE) :]: v for k, v in frame.arrays.items() if k.startswith(_EDGE)
    }
    grads = {k: v for k, v in frame.arrays.items() if not k.startswith(_EDGE)}
    checked = check_values(params, edge_layout) if params else None
    return CloudMessage(v_c, want, grad_for, grads or None, checked)
