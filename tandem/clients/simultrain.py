"""SimulTrain, edge side: stream cut-layer activations, apply returned gradients.

One handler, message type ``train.simultrain``. Each message from the cloud
(:class:`~tandem.protocol.simultrain.CloudMessage`) may carry (1) the
cut-layer gradients of a chunk this edge sent earlier, (2) the cloud's copy
``θ_e^c`` of the edge layers when reconciliation is due, and (3) how many
micro-batches to forward next. The edge, in this order:

1. back-propagates the received gradients through the chunk's forward
   pass at the *stashed* weights ``w`` (PipeDream-style weight stashing;
   kept from step 3 on the stream, recomputed on the message transport),
   and takes one step on the chunk's mean gradient
   (``simultrain-edge-optimizer``: torch's SGD with momentum, or torch's
   Adam; learning rate ``simultrain-edge-lr``, by default
   ``lr × simultrain-edge-lr-scale``, warmed up linearly over the first
   ``simultrain-edge-warmup`` micro-batches forwarded) with the forecast
   correction of seed 002,
   ``∇̃ = ∇ℓ(w; x) + α·(θ_e − w)``: the gradient computed at the stashed
   version, carried to the current version ``θ_e`` it is applied to
   (``simultrain-forecast = "stash"``; the literal ``α·(θ_e^c − θ_e)`` is
   ``"cloud-copy"``) (:func:`apply_gradients`);
2. on reconciliation, reports its delta since the last one and applies
   ``θ_e ← (1 − λ)·θ_e + λ·θ_e^c`` (:func:`reconcile`);
3. forwards the next chunk and replies with its activations (float32,
   float16 or int8 with one scale per sample) and labels, stashing the rows'
   indices and the weights used (:func:`forward_chunk`).

All state (:class:`EdgeState`: θ_e, its momentum or Adam state, the last
θ_e^c, the base of the next delta, stashes, version, data position) lives
in ``Context.state`` and survives between messages on both engines.

**Why one step per chunk, and the smaller edge rate.** The gradients of a
chunk arrive two messages after its forward pass on the message transport,
and up to W chunks after it on the stream, so every edge step is delayed.
Measured on MNIST-1D on the message transport (900 steps, one edge, cut at
``act2``): momentum SGD at the full rate with a 2-step delay fell to chance
(9%); at a tenth of the rate it reached 86% (91.5% without delay). Stepping
once per chunk keeps the delay at two steps (W on the stream) whatever the
chunk size. The rate was not re-tuned for the stream's deeper window.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn

from tandem.clients.node import (
    NodeConfig,
    load_node_split,
    node_record,
    restore_stream,
    save_stream,
)
from tandem.config import RunConfig
from tandem.datasets.base import ArraySplit
from tandem.frames import FrameError, decode_frame, encode_frame
from tandem.network import LinkPacer, LinkProfile, parse_link
from tandem.optim import adam_, adam_state, momentum_sgd_
from tandem.protocol.simultrain import (
    MESSAGE_TYPE,
    SESSION_TYPE,
    CloudMessage,
    EdgeReply,
    SessionStart,
    SimulTrainOptions,
    edge_model,
    hello_frame,
    read_message_frame,
    reply_frame,
)
from tandem.schedules import pipeline_window, steady_seconds
from tandem.split import (
    encode_cut,
    forecast_gradients,
    predicted_weights,
    soft_reconcile,
)
from tandem.streaming import Inbox, Outbox, Pace, open_stream, wait_until
from tandem.training import WARM_REPEATS, BatchStream
from tandem.wire import KEY_NODE, PayloadError, layout_of

__all__ = [
    "HANDLERS",
    "EdgeState",
    "KeptForwards",
    "StreamedEdge",
    "adam_step",
    "apply_gradients",
    "forward_chunk",
    "handler",
    "prediction_span",
    "reconcile",
    "session_handler",
    "sgd_step",
]

_S = "simultrain."
#: Real-time mode: the recent CPU times per kind of edge work a steady
#: time is taken from.
STEADY_WINDOW = 64
#: Forward and backward passes before a stream opens (the first is cold).
WARM_UP_PASSES = 3

Tensors = dict[str, torch.Tensor]


def _tensors(record: ArrayRecord | None) -> Tensors:
    if record is None:
        return {}
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}


def _record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in tensors.items()})


def _params(module: nn.Module) -> Tensors:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class EdgeState:
    """What the edge keeps between messages (in ``Context.state``).

    Attributes
    ----------
    theta : dict of str to Tensor
        ``θ_e``, the edge layers' own weights (state dict).
    theta_cloud : dict of str to Tensor
        The last ``θ_e^c`` received from the cloud.
    base : dict of str to Tensor
        ``θ_e`` right after the last reconciliation: the next delta is
        ``θ_e − base``.
    momentum : dict of str to Tensor
        SGD's momentum buffer per parameter (absent before the first step).
    stash : dict of str to ndarray
        Per chunk in flight ``c{v}/``: row indices ``idx``, micro-batch
        ``sizes``, the cut's shape ``cut`` and the weights ``w.*`` it was
        forwarded at (plain arrays in memory; a record only in ``Context``).
    version : int
        Version of the next chunk to forward.
    steps : int
        Micro-batches forwarded so far.
    base_v_c : int
        ``v-c`` of the message the edge last reconciled on.
    fresh : bool
        No message was handled before (a late joiner starts from ``θ_e^c``).
    adam : dict of str to Tensor
        Adam's state per parameter ``k`` (``simultrain-edge-optimizer =
        "adam"``): ``exp_avg/k``, ``exp_avg_sq/k`` and its step count
        ``step/k`` (absent before its first step; :func:`adam_step`).
    """

    theta: Tensors
    theta_cloud: Tensors
    base: Tensors
    momentum: Tensors
    stash: dict[str, np.ndarray]
    version: int = 0
    steps: int = 0
    base_v_c: int = 0
    fresh: bool = True
    adam: Tensors = field(default_factory=dict)

    @classmethod
    def load(cls, state: RecordDict, initial: Tensors) -> EdgeState:
        """The state saved in ``state``, or a fresh one starting at ``initial``."""
        fresh = _S + "edge" not in state.array_records
        theta = _tensors(state.array_records.get(_S + "edge")) or initial
        meta = state.config_records.get(_S + "meta")
        counters = {k: v for k, v in (meta or {}).items() if isinstance(v, int)}
        return cls(
            theta=theta,
            theta_cloud=_tensors(state.array_records.get(_S + "edge-cloud"))
            or dict(theta),
            base=_tensors(state.array_records.get(_S + "base")) or dict(theta),
            momentum=_tensors(state.array_records.get(_S + "momentum")),
            stash={
                k: a.numpy()
                for k, a in (state.array_records.get(_S + "stash") or {}).items()
            },
            version=counters.get("v-e", 0),
            steps=counters.get("steps", 0),
            base_v_c=counters.get("base-v-c", 0),
            fresh=fresh,
            adam=_tensors(state.array_records.get(_S + "adam")),
        )

    def save(self, state: RecordDict) -> None:
        """Store the state in ``state`` for the next message."""
        state[_S + "edge"] = _record(self.theta)
        state[_S + "edge-cloud"] = _record(self.theta_cloud)
        state[_S + "base"] = _record(self.base)
        state[_S + "momentum"] = _record(self.momentum)
        state[_S + "adam"] = _record(self.adam)
        state[_S + "stash"] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in self.stash.items()}
        )
        state[_S + "meta"] = ConfigRecord(
            {"v-e": self.version, "steps": self.steps, "base-v-c": self.base_v_c}
        )


def sgd_step(
    theta: Tensors, grads: Tensors, momentum: Tensors, lr: float, beta: float
) -> tuple[Tensors, Tensors]:
    """One step of torch's SGD from ``θ_e`` along ``grads``, heavy-ball momentum.

    ``v ← β·v + g`` (``v = g`` at the first step), ``θ ← θ − lr·v``: the
    update :class:`torch.optim.SGD` applies with ``momentum=β``, no dampening,
    no Nesterov, no weight decay (:func:`~tandem.optim.momentum_sgd_`, the
    step of every method's optimizer). The functional form keeps the
    momentum buffers in ``Context.state`` between messages: on the
    deployment engine every message is a fresh process.

    Returns
    -------
    theta : dict of str to Tensor
        The new weights (every key of ``theta``; tensors without a gradient
        keep their values).
    momentum : dict of str to Tensor
        The momentum buffers for the next step.
    """
    names = list(grads)
    params = [theta[k].detach().clone() for k in names]
    buffers = [momentum[k].clone() if k in momentum else None for k in names]
    momentum_sgd_(params, [grads[k] for k in names], buffers, lr, beta)
    new_theta = {**theta, **dict(zip(names, params, strict=True))}
    new_momentum = dict(momentum)
    new_momentum.update(
        {k: b for k, b in zip(names, buffers, strict=True) if b is not None}
    )
    return new_theta, new_momentum


#: The Adam state's parts per parameter (:attr:`EdgeState.adam`'s key prefixes).
ADAM_PARTS = ("exp_avg", "exp_avg_sq", "step")


def adam_step(
    theta: Tensors, grads: Tensors, adam: Tensors, lr: float
) -> tuple[Tensors, Tensors]:
    """One step of torch's Adam from ``θ_e`` along ``grads``.

    The update :class:`torch.optim.Adam` applies with its defaults (betas
    0.9 and 0.999, eps 1e-8, no weight decay, no AMSGrad), bias corrected
    with each parameter's own step count (:func:`~tandem.optim.adam_`, the
    same functional step). ``adam`` holds, per parameter ``k``,
    ``exp_avg/k``, ``exp_avg_sq/k`` and ``step/k`` (a scalar tensor); a
    parameter without all three starts fresh (step 0, zero moments). As
    :func:`sgd_step`, it keeps the state in plain tensors that
    ``Context.state`` carries between messages.

    Returns
    -------
    theta : dict of str to Tensor
        The new weights (every key of ``theta``; tensors without a gradient
        keep their values).
    adam : dict of str to Tensor
        The Adam state for the next step (the input's is not changed).
    """
    names = list(grads)
    params = [theta[k].detach().clone() for k in names]
    states = []
    for k, p in zip(names, params, strict=True):
        keys = {part: f"{part}/{k}" for part in ADAM_PARTS}
        if all(key in adam for key in keys.values()):
            states.append({part: adam[key].clone() for part, key in keys.items()})
        else:
            states.append(adam_state(p))
    adam_(params, [grads[k] for k in names], states, lr)
    new_theta = {**theta, **dict(zip(names, params, strict=True))}
    new_adam = dict(adam)
    for k, st in zip(names, states, strict=True):
        new_adam.update({f"{part}/{k}": st[part] for part in ADAM_PARTS})
    return new_theta, new_adam


class _EdgeCopy(NamedTuple):
    """A copy of the edge layers and its ``(name, parameter)`` pairs, looked
    up once (walking the module tree costs more than the layers' work)."""

    module: nn.Module
    params: list[tuple[str, nn.Parameter]]


class KeptForwards:
    """The forward passes of a stream session's chunks in flight, kept for
    their backward passes.

    Step 1 back-propagates a chunk's gradients at the weights it was
    forwarded at. The message transport recomputes that forward pass (its
    state crosses processes); a stream session lives in one process, so it
    keeps each chunk's forward pass, autograd graph included, until the
    chunk's gradients come back: the edge device's forward pass is not done
    twice. Each chunk in flight runs on its own copy of the edge layers
    (loaded with ``θ_e`` when it is forwarded), so a later load cannot touch
    a graph still waiting; copies are reused once their chunk is done, so
    there are at most W + 1 of them.

    Only for edge layers whose state is their parameters (no buffers, such as
    batch norm's running statistics, that a forward pass in training mode
    would change a second time): :meth:`usable`.
    """

    def __init__(self, edge: nn.Module) -> None:
        self.edge = edge
        self.free: list[_EdgeCopy] = []
        self.kept: dict[int, tuple[_EdgeCopy, torch.Tensor]] = {}

    @staticmethod
    def usable(edge: nn.Module) -> bool:
        """Whether ``edge``'s state dict holds its parameters and nothing else."""
        return set(edge.state_dict()) == {name for name, _ in edge.named_parameters()}

    def forward(self, version: int, theta: Tensors, x: torch.Tensor) -> torch.Tensor:
        """Chunk ``version``'s activations at ``theta`` (detached); its
        forward pass is kept."""
        if self.free:
            edge = self.free.pop()
        else:
            module = copy.deepcopy(self.edge)
            edge = _EdgeCopy(module, list(module.named_parameters()))
        with torch.no_grad():  # its state is its parameters (usable)
            for name, param in edge.params:
                param.copy_(theta[name])
        acts = edge.module(x)
        self.kept[version] = (edge, acts)
        return acts.detach()

    def backward(self, version: int, grad: torch.Tensor) -> Tensors | None:
        """The parameter gradients of chunk ``version``'s kept forward pass
        under the cut gradients ``grad``; None if it was not kept.

        ``torch.autograd.grad`` of the activations: the gradients
        ``acts.backward(grad)`` would accumulate into the (zeroed) ``.grad``
        of the copy's parameters, without touching them; a parameter the
        forward pass did not use has none.
        """
        entry = self.kept.pop(version, None)
        if entry is None:
            return None
        edge, acts = entry
        found = torch.autograd.grad(
            acts, [p for _, p in edge.params], grad, allow_unused=True
        )
        grads = {
            name: g
            for (name, _), g in zip(edge.params, found, strict=True)
            if g is not None
        }
        self.free.append(edge)
        return grads

    def discard(self, version: int) -> None:
        """Drop chunk ``version``'s kept forward pass (its copy is reused)."""
        entry = self.kept.pop(version, None)
        if entry is not None:
            self.free.append(entry[0])

    def clear(self) -> None:
        """Drop every kept forward pass (the session ended)."""
        self.kept.clear()


def stashed_weights(stash: Mapping[str, np.ndarray], version: int) -> Tensors:
    """The edge weights chunk ``version`` was forwarded at (its stash's
    ``c{version}/w.*``, :func:`forward_chunk`), as tensors sharing the arrays."""
    prefix = f"c{version}/w."
    return {
        k[len(prefix) :]: torch.from_numpy(v)
        for k, v in stash.items()
        if k.startswith(prefix)
    }


def apply_gradients(
    state: EdgeState,
    edge: nn.Module,
    split: ArraySplit,
    msg: CloudMessage,
    opts: SimulTrainOptions,
    lr: float,
    momentum: float,
    kept: KeptForwards | None = None,
) -> float:
    """Step 1: back-propagate the received cut gradients at the stashed weights.

    One step per chunk on the mean of its micro-batches' gradients (every
    micro-batch of a chunk was forwarded at the same, stashed, weights),
    forecast to the version it is applied to (seed 002). Returns the CPU
    seconds spent.

    ``lr`` is the edge's rate (:meth:`SimulTrainOptions.edge_rate`); the step
    runs at it warmed up over the micro-batches forwarded so far
    (``state.steps``, :meth:`SimulTrainOptions.warmed_up`), with
    ``simultrain-edge-optimizer``'s update: :func:`sgd_step` with
    ``momentum`` (the buffers in ``state.momentum``) or :func:`adam_step`
    (its state in ``state.adam``).

    The backward pass runs through the chunk's own forward pass when
    ``kept`` holds it (:class:`KeptForwards`, the stream session's);
    otherwise the forward pass is recomputed at the stashed weights (the
    message transport, whose state crosses processes). Both give the same
    gradients.

    Raises
    ------
    PayloadError
        If the chunk is not stashed or the gradients do not fit it.
    """
    tick = time.thread_time()  # the whole step, decoding the gradients included
    prefix = f"c{msg.grad_for}/"
    stash = state.stash
    if prefix + "idx" not in stash:
        raise PayloadError(f"gradients for chunk {msg.grad_for}, which is not stashed")
    idx = stash[prefix + "idx"]
    sizes = stash[prefix + "sizes"]
    cut = tuple(int(n) for n in stash[prefix + "cut"])
    g = msg.gradients(opts.precision, (len(idx), *cut))
    stashed = stashed_weights(stash, msg.grad_for)
    grad_out = torch.from_numpy(g / len(sizes))
    grads = None if kept is None else kept.backward(msg.grad_for, grad_out)
    if grads is None:  # recompute the forward pass at the stashed weights
        edge.load_state_dict(stashed)
        edge.zero_grad(set_to_none=True)
        edge(torch.from_numpy(split.x[idx])).backward(grad_out)
        grads = {k: p.grad for k, p in edge.named_parameters() if p.grad is not None}
    if opts.forecast == "stash":  # from the stashed to the current version
        grads = forecast_gradients(grads, stashed, state.theta, opts.alpha)
    else:  # the literal reading: from θ_e to the cloud's copy θ_e^c
        grads = forecast_gradients(grads, state.theta, state.theta_cloud, opts.alpha)
    rate = opts.warmed_up(lr, state.steps)
    if opts.edge_optimizer == "adam":
        state.theta, state.adam = adam_step(state.theta, grads, state.adam, rate)
    else:
        state.theta, state.momentum = sgd_step(
            state.theta, grads, state.momentum, rate, momentum
        )
    for k in [k for k in stash if k.startswith(prefix)]:
        del stash[k]
    return time.thread_time() - tick


def reconcile(
    state: EdgeState, theta_cloud: Tensors, v_c: int, lam: float
) -> Tensors | None:
    """Step 2: pull ``θ_e`` toward the cloud's copy; return the delta to report.

    ``θ_e ← (1 − λ)·θ_e + λ·θ_e^c`` (our form of seed 002's soft
    reconciliation) after reporting ``Δ = θ_e − base``. A node that has
    handled no message yet starts from ``θ_e^c`` and reports nothing (None).
    """
    delta = None
    state.theta_cloud = theta_cloud
    if state.fresh:  # a node that joined late starts from the cloud's copy
        state.theta = dict(theta_cloud)
    else:
        delta = {k: state.theta[k] - state.base[k] for k in state.theta}
        state.theta = soft_reconcile(state.theta, theta_cloud, lam)
    state.base = dict(state.theta)
    state.base_v_c = v_c
    return delta


@dataclass(frozen=True)
class Chunk:
    """A forwarded chunk: encoded activations, labels, micro-batch sizes."""

    acts: dict[str, np.ndarray]
    labels: np.ndarray
    sizes: np.ndarray
    seconds: float  # CPU seconds of the forward pass


def forward_chunk(
    state: EdgeState,
    edge: nn.Module,
    split: ArraySplit,
    stream: BatchStream,
    want: int,
    precision: str,
    kept: KeptForwards | None = None,
    ahead: float = 0.0,
) -> Chunk:
    """Step 3: forward ``want`` micro-batches at ``θ_e``; stash inputs and weights.

    The chunk's ``seconds`` are the CPU time of all of it: the forward pass,
    the stash and the activations' encoding (int8 or half), as the edge
    device runs all of it. With ``kept`` the forward pass is kept for the
    chunk's backward pass (:class:`KeptForwards`).

    ``ahead`` ``> 0`` forwards, and stashes, the weights predicted for when
    the chunk's gradients are applied instead (:func:`predicted_weights`
    with ``rate × ahead``: ``simultrain-predict-weights``).
    """
    tick = time.thread_time()
    batches = [stream.next_indices() for _ in range(want)]
    idx = np.concatenate(batches)
    x = torch.from_numpy(split.x[idx])
    weights = state.theta
    if ahead > 0:
        weights = predicted_weights(state.theta, state.momentum, ahead)
    if kept is not None:
        acts = kept.forward(state.version, weights, x)
    else:
        edge.load_state_dict(weights)
        with torch.no_grad():
            acts = edge(x)
    sizes = np.array([len(b) for b in batches], dtype=np.int64)
    prefix = f"c{state.version}/"
    state.stash[prefix + "idx"] = idx.astype(np.int64)
    state.stash[prefix + "sizes"] = sizes
    state.stash[prefix + "cut"] = np.array(acts.shape[1:], dtype=np.int64)
    for k, v in weights.items():
        state.stash[prefix + "w." + k] = v.numpy().copy()
    state.steps += want
    state.version += 1
    encoded = encode_cut(acts.numpy(), precision, "a")
    return Chunk(encoded, split.y[idx], sizes, time.thread_time() - tick)


def prediction_span(state: EdgeState, opts: SimulTrainOptions, lr: float) -> float:
    """``s·η`` of :func:`predicted_weights` for the chunk forwarded next: ``s``
    the chunks in flight (stashed, their gradients not applied yet), each of
    which takes one edge step first, at the current rate; 0 without
    ``simultrain-predict-weights`` or with the Adam edge (no ``v``)."""
    if not opts.predict_weights or opts.edge_optimizer != "sgd":
        return 0.0
    in_flight = sum(1 for k in state.stash if k.endswith("/idx"))
    return in_flight * opts.warmed_up(lr, state.steps)


_NodeSetup = tuple[
    SimulTrainOptions, NodeConfig, ArraySplit, nn.Module, EdgeState, BatchStream
]


def _node_setup(context: Context, cfg: RunConfig) -> _NodeSetup:
    """What every SimulTrain message needs on the node: the options, the
    node's config and training split, the edge layers, the edge state kept in
    ``Context.state`` and the node's batch stream, restored where it stopped."""
    opts = cfg.options_as(SimulTrainOptions)
    node = NodeConfig.from_node_config(context.node_config)
    split = load_node_split(cfg, node, "train")
    edge, _ = edge_model(cfg, opts)
    state = EdgeState.load(context.state, _params(edge))
    batches = restore_stream(
        context, split, cfg.train.batch_size, node.stream_seed(cfg.seed)
    )
    return opts, node, split, edge, state, batches


def handler(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Handle one ``train.simultrain`` message (see the module docstring)."""
    opts, node, split, edge, state, stream = _node_setup(context, cfg)
    request = CloudMessage.from_content(msg.content, layout_of(_record(state.theta)))
    compute = 0.0  # CPU seconds of the edge's own maths (backward, forward)
    lr = opts.edge_rate(cfg.train.lr)  # before its warm-up
    if request.grad_for >= 0:
        compute += apply_gradients(
            state, edge, split, request, opts, lr, cfg.train.momentum
        )
    delta = None
    if request.edge_params is not None:
        received = {
            k: torch.from_numpy(np.array(v)) for k, v in request.edge_params.items()
        }
        delta = reconcile(state, received, request.v_c, opts.lam)
    chunk = None
    version = state.version
    if request.want > 0:
        ahead = prediction_span(state, opts, lr)
        chunk = forward_chunk(
            state, edge, split, stream, request.want, opts.precision, ahead=ahead
        )
        compute += chunk.seconds
    state.save(context.state)
    save_stream(context, stream)
    reply = EdgeReply(
        version=version if chunk is not None else -1,
        base_v_c=state.base_v_c,
        compute_seconds=compute,
        steps=state.steps,
        delta=None if delta is None else {k: v.numpy() for k, v in delta.items()},
        acts=None if chunk is None else chunk.acts,
        labels=None if chunk is None else chunk.labels,
        sizes=None if chunk is None else chunk.sizes,
    ).to_content()
    reply[KEY_NODE] = node_record(node)
    return Message(content=reply, reply_to=msg)


def _session_link(spec: str) -> LinkProfile:
    """The link a session message names (:func:`tandem.network.encode_link`).

    Raises
    ------
    PayloadError
        If ``spec`` is not a link.
    """
    try:
        return parse_link(spec)
    except ValueError as err:
        raise PayloadError(f"session link: {err}") from None


def link_paces(spec: str, dilation: float = 1.0) -> tuple[Pace | None, Pace | None]:
    """Real-time mode: pace the stream's frames up and down to the link ``spec``.

    Each direction is a :class:`~tandem.network.LinkPacer` on the emulated
    link's clock, which starts now: a frame sent at ``t`` (the instant given,
    else when it is put) arrives when the pacer says (transfers one at a
    time, propagation overlapping), as on the replay's virtual clock. An
    empty ``spec``: no pacing. ``dilation`` ``k``: the emulated clock runs
    ``k`` times slower than the wall clock (``simultrain-realtime-dilation``),
    so every transfer and delay lasts ``k`` times as long.

    Raises
    ------
    PayloadError
        If ``spec`` is not a link.
    """
    if not spec:
        return None, None
    link = _session_link(spec)
    t0 = time.monotonic()

    def pace(direction: str) -> Pace:
        pacer = LinkPacer(link, direction)
        lock = threading.Lock()  # the down pacer is fed by the inbox's thread

        def arrival(nbytes: int, sent: float | None = None) -> float:
            at = time.monotonic() if sent is None else sent
            with lock:
                return t0 + dilation * pacer.send(nbytes, (at - t0) / dilation)[2]

        return arrival

    return pace("up"), pace("down")


class StreamedEdge:
    """An edge's stream session: up to W chunks in flight, the steps above.

    Credit-based flow control: the session grants W credits (with
    ``simultrain-window = 0`` the edge keeps only as many as fill the
    pipeline given its compute measured before the stream opens, and says so
    in its hello frame: :meth:`_window`); forwarding a chunk spends one, the
    gradients of the oldest chunk in flight return it.
    While credits are left the edge forwards the next chunk (step 3) and
    queues its frame, which gRPC's thread sends while the edge goes on;
    with none left it waits for gradients, applies them at the chunk's
    stashed weights (step 1) and reconciles when ``θ_e^c`` comes with them
    (step 2). The delta of a reconciliation rides on the next chunk's frame
    (or a frame of its own when no chunk is left to send; the last one on
    the reply that ends the session).

    With W = 2 this is the message transport's schedule: chunk ``v + 2`` is
    forwarded right after chunk ``v``'s gradients are applied. With W = 1
    (the ``splitsync`` baseline) chunk ``v + 1`` is forwarded only after
    chunk ``v``'s gradients are applied: no overlap. Every wait for the cloud
    gives up after ``reply-timeout`` seconds.
    """

    def __init__(
        self,
        state: EdgeState,
        edge: nn.Module,
        split: ArraySplit,
        batches: BatchStream,
        opts: SimulTrainOptions,
        cfg: RunConfig,
        start: SessionStart,
    ) -> None:
        self.state = state
        self.edge = edge
        self.split = split
        self.batches = batches
        self.opts = opts
        self.lr = opts.edge_rate(cfg.train.lr)  # before its warm-up
        self.momentum = cfg.train.momentum
        self.timeout = cfg.reply_timeout  # longest wait for the cloud (s)
        self.start = start
        self.layout = layout_of(_record(state.theta))
        self.pending: Tensors | None = None  # a delta not yet reported
        self.compute = 0.0  # CPU seconds not yet reported
        self.total_compute = 0.0
        self.steady: dict[Hashable, deque[float]] = {}  # real time: CPU s per kind
        self.free_at: float | None = None  # real time: the emulated edge's
        self.arrival = 0.0  # real time: the last gradients frame's arrival
        self.in_flight: deque[int] = deque()  # chunk versions awaiting gradients
        self.seq = 0  # frames sent
        self.node_id = -1  # set when the stream opens
        # each chunk's forward pass, kept for its backward pass
        self.kept = KeptForwards(edge) if KeptForwards.usable(edge) else None
        # the same, for the pieces of work repeated off the record
        self.twin_kept = None if self.kept is None else KeptForwards(edge)

    @classmethod
    def detached(
        cls, context: Context, cfg: RunConfig, window: int, chunk: int, steps: int
    ) -> StreamedEdge:
        """A session of ``context``'s node that opens no stream, begun on the
        edge's own weights as ``θ_e^c``: :meth:`forward` and :meth:`receive`
        are driven directly (tests, ``scripts/edge-pieces.py``)."""
        opts, _, split, edge, state, batches = _node_setup(context, cfg)
        params = {k: v.detach().numpy().copy() for k, v in edge.named_parameters()}
        start = SessionStart(
            address="localhost:1",
            secret=bytes(32),
            window=window,
            steps=steps,
            chunk=chunk,
            next_version=0,
            v_c=0,
            edge_params=params,
        )
        session = cls(state, edge, split, batches, opts, cfg, start)
        session.begin()
        return session

    def begin(self) -> None:
        """Reconcile on the session's ``θ_e^c`` (a fresh node starts from it)."""
        state = self.state
        received = {
            k: torch.from_numpy(np.array(v)) for k, v in self.start.edge_params.items()
        }
        self.pending = reconcile(state, received, self.start.v_c, self.opts.lam)
        state.fresh = False
        state.stash = {}  # chunks of an earlier session are void
        state.version = self.start.next_version

    def _reply(
        self, chunk: Chunk | None, version: int, delta: Tensors | None
    ) -> EdgeReply:
        return EdgeReply(
            version=version if chunk is not None else -1,
            base_v_c=self.state.base_v_c,
            compute_seconds=self.compute,
            steps=self.state.steps,
            delta=None if delta is None else {k: v.numpy() for k, v in delta.items()},
            acts=None if chunk is None else chunk.acts,
            labels=None if chunk is None else chunk.labels,
            sizes=None if chunk is None else chunk.sizes,
        )

    def _frame(self, chunk: Chunk | None, version: int) -> bytes:
        reply = self._reply(chunk, version, self.pending)
        self.pending = None
        self.total_compute += self.compute
        self.compute = 0.0
        data = encode_frame(reply_frame(reply, self.seq))
        self.seq += 1
        return data

    def _twin(self) -> tuple[EdgeState, BatchStream]:
        """Copies of the edge's state and batch stream that a piece of work
        can be repeated on, off the record (:meth:`forward`, :meth:`receive`):
        the steps replace ``θ_e``, its optimizer state and the batch
        stream's position rather than change them in place, so only the
        stash needs a copy of its own."""
        return replace(self.state, stash=dict(self.state.stash)), copy.copy(
            self.batches
        )

    def _slow_down(self, kind: Hashable, ready: float, seconds: float) -> None:
        """Real-time mode: end a piece of work when the emulated edge would.

        The emulated edge starts the piece once it is free and its input is
        there (``ready``: when the piece began, or the gradients frame's
        arrival on the emulated link) and takes ``edge-factor`` times this
        machine's *steady* CPU time for it: the lower quartile of the
        ``kind``'s times so far (:func:`~tandem.schedules.steady_seconds`,
        the replay's rule), so that a moment this machine was descheduled is
        not stretched tenfold. The edge waits until that end on the wall
        clock. What this machine adds between pieces (a late wake-up, the
        loop, the other threads) is absorbed by the next deadline rather
        than added to it, as long as this machine keeps up.
        """
        stretch = self.opts.dilation * self.opts.edge_factor
        if not self.opts.realtime or stretch <= 1:
            return
        history = self.steady.setdefault(kind, deque(maxlen=STEADY_WINDOW))
        history.append(seconds)
        begin = ready if self.free_at is None else max(self.free_at, ready)
        self.free_at = begin + stretch * steady_seconds(list(history))
        wait_until(self.free_at)

    def _warm_up(self, rows: int) -> tuple[float, int]:
        """Passes off the record: ``(the edge's compute per chunk, bytes)``.

        A process's first backward pass costs hundreds of times a steady one
        (torch's lazy set-up); stretched by the edge factor it would stall
        a real-time stream for seconds that the replay, which times steady
        steps, never charges. A copy of the edge model runs
        :data:`WARM_UP_PASSES` forward and backward passes (with the
        activations' encoding) on a chunk's worth of rows before the stream
        opens; nothing of it is kept. The fastest pass after the first, times
        ``simultrain-edge-factor``, is the emulated edge's compute per chunk
        (:meth:`_window` sizes W on it), and the activations' encoded size is
        a chunk's bytes each way.
        """
        model = copy.deepcopy(self.edge)
        x = torch.from_numpy(self.split.x[: max(rows, 1)])
        seconds = []
        for _ in range(WARM_UP_PASSES):
            tick = time.thread_time()
            out = model(x)
            out.backward(torch.ones_like(out))
            encoded = encode_cut(out.detach().numpy(), self.opts.precision, "a")
            seconds.append(time.thread_time() - tick)
        nbytes = sum(int(a.nbytes) for a in encoded.values())
        return self.opts.edge_factor * min(seconds[1:]), nbytes

    def _window(self, edge_seconds: float, nbytes: int) -> int:
        """W for this session: the session's (the cap), or with
        ``simultrain-window = 0`` the fewest chunks that keep the pipeline
        full on the session's link given the edge's compute per chunk
        (:func:`~tandem.schedules.pipeline_window`).

        Raises
        ------
        PayloadError
            If the session's link is not a link.
        """
        start = self.start
        if self.opts.window or not start.link:
            return start.window
        link = _session_link(start.link)
        return pipeline_window(link, nbytes, nbytes, start.window, edge_seconds)

    def forward(self, want: int) -> bytes:
        """Step 3 on the next chunk; its frame (spends a credit).

        The edge's compute is all of its work on the chunk: the forward pass,
        the stash, the activations' encoding and the frame's. Each part is
        timed warm, as every method's step is
        (:attr:`~tandem.training.TrainStats.compute_seconds`): the fastest
        of the live part and of :data:`~tandem.training.WARM_REPEATS`
        repeats of it right after, off the record (:meth:`_twin`). A
        stream's edge waits between pieces of work (for gradients, and in
        real time for the emulated device), and a piece after a wait of tens
        of milliseconds was seen here to take twice the CPU time of the same
        piece run back to back: the caches went cold meanwhile, which the
        emulated device, busy all along, would not see.
        """
        began = time.monotonic()
        version = self.state.version
        ahead = prediction_span(self.state, self.opts, self.lr)
        twins = [self._twin() for _ in range(WARM_REPEATS)]
        chunk = forward_chunk(
            self.state,
            self.edge,
            self.split,
            self.batches,
            want,
            self.opts.precision,
            self.kept,
            ahead,
        )
        warm = [self._forward_again(*twin, want, ahead, version) for twin in twins]
        seconds = min([chunk.seconds, *(w[0] for w in warm)])
        self.compute += seconds
        self.in_flight.append(version)
        tick = time.thread_time()
        data = self._frame(chunk, version)
        framing = min([time.thread_time() - tick, *(w[1] for w in warm)])
        self.compute += framing  # reported with the next frame
        # its input (a credit) is there as soon as the edge is free
        ready = began if self.free_at is None else self.free_at
        self._slow_down(("forward", want), ready, seconds + framing)
        return data

    def _forward_again(
        self,
        state: EdgeState,
        batches: BatchStream,
        want: int,
        ahead: float,
        version: int,
    ) -> tuple[float, float]:
        """:meth:`forward`'s work repeated on a twin: ``(the chunk's CPU
        seconds, the frame's)``."""
        chunk = forward_chunk(
            state,
            self.edge,
            self.split,
            batches,
            want,
            self.opts.precision,
            self.twin_kept,
            ahead,
        )
        if self.twin_kept is not None:
            self.twin_kept.discard(version)
        tick = time.thread_time()
        encode_frame(reply_frame(self._reply(chunk, version, self.pending), self.seq))
        return chunk.seconds, time.thread_time() - tick

    def receive(self, data: bytes) -> None:
        """Steps 1 and 2 on a gradients frame (returns a credit).

        The compute, decoding included, is timed warm as :meth:`forward`'s.

        Raises
        ------
        PayloadError
            If the frame is malformed or not for the oldest chunk in flight.
        """
        twins = [self._twin() for _ in range(WARM_REPEATS)]  # before step 1
        tick = time.thread_time()
        msg, delta = self._apply(self.state, data, self.kept, live=True)
        seconds = time.thread_time() - tick
        if msg.edge_params is not None:
            self.pending = delta
        for state, _ in twins:
            seconds = min(seconds, self._receive_again(state, data, msg.grad_for))
        self.compute += seconds
        kind = ("receive", msg.edge_params is not None)
        self._slow_down(kind, self.arrival, seconds)

    def _apply(
        self, state: EdgeState, data: bytes, kept: KeptForwards | None, live: bool
    ) -> tuple[CloudMessage, Tensors | None]:
        """Steps 1 and 2 of gradients frame ``data`` on ``state``: the
        message and the delta of its reconciliation (None without). ``live``:
        the frame must be for the oldest chunk in flight, which then leaves
        the chunks in flight (its credit returns).
        """
        try:
            frame = decode_frame(data, self.start.max_frame)
        except FrameError as err:
            raise PayloadError(f"gradients frame: {err}") from None
        msg = read_message_frame(frame, self.layout)
        if live:
            if not self.in_flight or msg.grad_for != self.in_flight[0]:
                raise PayloadError(
                    f"gradients for chunk {msg.grad_for}, expected "
                    f"{self.in_flight[0] if self.in_flight else 'none'}"
                )
            self.in_flight.popleft()
        apply_gradients(
            state,
            self.edge,
            self.split,
            msg,
            self.opts,
            self.lr,
            self.momentum,
            kept,
        )
        delta = None
        if msg.edge_params is not None:
            received = {
                k: torch.from_numpy(np.array(v)) for k, v in msg.edge_params.items()
            }
            delta = reconcile(state, received, msg.v_c, self.opts.lam)
        return msg, delta

    def _receive_again(self, state: EdgeState, data: bytes, version: int) -> float:
        """:meth:`receive`'s work repeated on a twin: its CPU seconds. The
        chunk's forward pass, which the live step consumed, is kept again
        first, off the clock."""
        if self.twin_kept is not None:
            theta = stashed_weights(state.stash, version)
            x = torch.from_numpy(self.split.x[state.stash[f"c{version}/idx"]])
            self.twin_kept.forward(version, theta, x)
        tick = time.thread_time()
        self._apply(state, data, self.twin_kept, live=False)
        return time.thread_time() - tick

    def run(self, node_id: int) -> None:
        """Stream the session's chunks through (see the class docstring).

        Raises
        ------
        RuntimeError
            If the cloud ends the stream before every gradient came back.
        TimeoutError
            If the cloud sends nothing for ``reply-timeout`` seconds.
        grpc.RpcError
            If the stream fails (refused, cancelled, unreachable).
        """
        start = self.start
        self.node_id = node_id
        window = self._window(*self._warm_up(start.chunk * self.batches.batch_size))
        up, down = link_paces(
            start.link if self.opts.realtime else "", self.opts.dilation
        )
        outbox = Outbox(up)
        outbox.put(encode_frame(hello_frame(node_id, start.secret, window)))
        channel, stream = open_stream(
            start.address, iter(outbox), start.max_frame, start.root_cert or None
        )
        inbox = Inbox(stream, down)
        try:
            left = start.steps
            while left > 0 or self.in_flight:
                # real time: each frame leaves when the emulated edge is
                # done with it (free_at), however late this thread woke up
                while left > 0 and len(self.in_flight) < window:
                    want = min(start.chunk, left)
                    frame = self.forward(want)
                    outbox.put(frame, self.free_at)
                    left -= want
                if self.pending is not None and self.in_flight:
                    frame = self._frame(None, -1)  # a delta, no chunk left
                    outbox.put(frame, self.free_at)
                data = inbox.get(self.timeout)
                self.arrival = inbox.arrival
                if data is None:
                    raise RuntimeError(
                        f"the cloud closed the stream with {len(self.in_flight)} "
                        "chunks in flight"
                    )
                self.receive(data)
            outbox.close()
            if inbox.get(self.timeout) is not None:  # the cloud ends after us
                raise RuntimeError("an unexpected frame after the last gradients")
        finally:
            outbox.close()
            channel.close()
            if self.kept is not None:
                self.kept.clear()

    def reply(self) -> EdgeReply:
        """The session's answer: the final delta and the compute not reported."""
        delta = self.pending
        self.total_compute += self.compute
        return EdgeReply(
            version=-1,
            base_v_c=self.state.base_v_c,
            compute_seconds=self.compute,
            steps=self.state.steps,
            delta=None if delta is None else {k: v.numpy() for k, v in delta.items()},
        )


def session_handler(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Handle a ``train.simultrain_session`` message: one stream session.

    The session runs torch on one thread, as the simulation engine's
    ClientApps do (one CPU each): its pieces of work are timed by the
    thread's CPU clock, which a second torch thread would escape, and the
    edge layers are too small to gain from one. A deployment's ClientApp
    process otherwise gets a torch thread per core; with two SuperNodes on
    2 cores its stream took 9.8 s against 3.5 s on one thread
    (``scripts/engine-pairs.py``, README "Deployment"). The count is put
    back when the session ends.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opts, node, split, edge, state, batches = _node_setup(context, cfg)
        start = SessionStart.from_content(msg.content, layout_of(_record(state.theta)))
        session = StreamedEdge(state, edge, split, batches, opts, cfg, start)
        session.begin()
        try:
            session.run(context.node_id)
        finally:
            state.save(context.state)
            save_stream(context, batches)
    finally:
        torch.set_num_threads(threads)
    reply = session.reply().to_content()
    reply[KEY_NODE] = node_record(node)
    return Message(content=reply, reply_to=msg)


HANDLERS = {MESSAGE_TYPE: handler, SESSION_TYPE: session_handler}
