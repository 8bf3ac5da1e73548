"""SimulTrain, edge side: stream cut-layer activations, apply returned gradients.

One handler, message type ``train.simultrain``. Each message from the cloud
may carry (1) the cut-layer gradients of a chunk this edge sent earlier,
(2) the cloud's copy ``θ_e^c`` of the edge layers when reconciliation is due,
and (3) how many micro-batches to forward next. The edge, in this order:

1. recomputes the stashed chunk's forward pass at the *stashed* weights
   ``w`` (PipeDream-style weight stashing), back-propagates the received
   gradients, and takes one SGD step (heavy-ball momentum, learning rate
   ``lr × simultrain-edge-lr-scale``) on the chunk's mean gradient with the
   forecast correction of seed 002, ``∇̃ = ∇ℓ(w; x) + α·(θ_e − w)``: the
   gradient computed at the stashed version, carried to the current version
   ``θ_e`` it is applied to (``simultrain-forecast = "stash"``; the literal
   ``α·(θ_e^c − θ_e)`` is ``"cloud-copy"``);
2. on reconciliation, reports its delta since the last one and applies
   ``θ_e ← (1 − λ)·θ_e + λ·θ_e^c``;
3. forwards the next chunk and replies with its activations (float32,
   float16 or int8 with one scale per sample) and labels, stashing the rows'
   indices and the weights used.

All state (θ_e, its momentum, the last θ_e^c, the base of the next delta,
stashes, version, data position) lives in ``Context.state`` and survives
between messages on both engines.

**Why one step per chunk, and the smaller edge rate.** The gradients of a
chunk arrive two messages after its forward pass, so every edge step is
delayed. Measured on MNIST-1D (900 steps, one edge, cut at ``act2``):
momentum SGD at the full rate with a 2-step delay fell to chance (9%); at a
tenth of the rate it reached 86% (91.5% without delay). Stepping once per
chunk keeps the delay at two steps whatever the chunk size.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from torch import nn

from tandem.clients.node import (
    NodeConfig,
    load_node_split,
    node_record,
    restore_stream,
    save_stream,
)
from tandem.config import RunConfig, parse_section
from tandem.datasets import load_dataset
from tandem.models import DEFAULT_CUTS, build_model, default_model_for
from tandem.split import (
    cut_keys,
    decode_cut,
    encode_cut,
    forecast_gradients,
    soft_reconcile,
    split_model,
)
from tandem.strategies.simultrain_options import SimulTrainOptions
from tandem.wire import (
    KEY_CONFIG,
    KEY_METRICS,
    KEY_NODE,
    PayloadError,
    check_arrays,
    get_record,
    layout_of,
)

__all__ = ["HANDLERS", "MESSAGE_TYPE", "edge_model"]

MESSAGE_TYPE = "train.simultrain"
KEY_GRADS = "grads"
KEY_EDGE_PARAMS = "edge-params"
KEY_ACTS = "acts"
KEY_DELTA = "delta"
KEY_META = "meta"
_S = "simultrain."


def edge_model(cfg: RunConfig, opts: SimulTrainOptions) -> tuple[nn.Module, nn.Module]:
    """The run's model split into (edge, cloud) parts, freshly initialised."""
    bundle = load_dataset(cfg.data)
    name = cfg.train.model
    if name == "auto":
        name = default_model_for(bundle.input_shape)
    model = build_model(name, bundle.input_shape, bundle.num_classes, cfg.seed)
    cut = DEFAULT_CUTS[name] if opts.cut == "default" else opts.cut
    return split_model(model, cut)


def _tensors(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    if record is None:
        return {}
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}


def _record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in tensors.items()})


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def handler(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Handle one ``train.simultrain`` message (see the module docstring)."""
    compute = 0.0  # CPU seconds of the edge's own math (backward, forward)
    opts = parse_section(SimulTrainOptions, context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    split = load_node_split(cfg, node, "train")
    edge, _ = edge_model(cfg, opts)
    state = context.state
    conf = get_record(msg.content, KEY_CONFIG, ConfigRecord)

    fresh = _S + "edge" not in state.array_records  # first message to this node
    theta = _tensors(state.array_records.get(_S + "edge")) or _params(edge)
    theta_cloud = _tensors(state.array_records.get(_S + "edge-cloud")) or dict(theta)
    base = _tensors(state.array_records.get(_S + "base")) or dict(theta)
    velocity = _tensors(state.array_records.get(_S + "velocity")) or {
        k: torch.zeros_like(v) for k, v in theta.items()
    }
    stash = state.array_records.get(_S + "stash") or ArrayRecord()
    meta = state.config_records.get(_S + "meta") or ConfigRecord(
        {"v-e": 0, "steps": 0, "base-v-c": 0}
    )
    stream = restore_stream(
        context, split, cfg.train.batch_size, node.stream_seed(cfg.seed)
    )
    lr, momentum = cfg.train.lr * opts.edge_lr_scale, cfg.train.momentum

    # 1. backward for the chunk whose gradients arrived, at its stashed weights
    grad_for = int(conf["grad-for"])  # type: ignore[arg-type]
    if grad_for >= 0:
        grads = get_record(msg.content, KEY_GRADS, ArrayRecord)
        prefix = f"c{grad_for}/"
        if prefix + "idx" not in stash:
            raise PayloadError(f"gradients for chunk {grad_for}, which is not stashed")
        idx = stash[prefix + "idx"].numpy()
        sizes = stash[prefix + "sizes"].numpy()
        try:
            arrays = {k: v.numpy() for k, v in grads.items()}  # type: ignore[attr-defined]
            if set(arrays) != cut_keys(opts.precision, "g"):
                raise ValueError(f"gradient arrays {sorted(arrays)}")
            with torch.no_grad():
                cut = edge(torch.from_numpy(split.x[idx[:1]])).shape[1:]
            g = decode_cut(arrays, opts.precision, "g", (len(idx), *cut))
        except ValueError as err:
            raise PayloadError(f"cut-layer gradients: {err}") from None
        stashed = {
            k[len(prefix) + 2 :]: torch.from_numpy(np.array(stash[k].numpy()))
            for k in stash
            if k.startswith(prefix + "w.")
        }
        edge.load_state_dict(stashed)
        # one step per chunk, on the mean of its micro-batches' gradients: every
        # micro-batch of a chunk was forwarded at the same (stashed) weights
        tick = time.thread_time()
        edge.zero_grad(set_to_none=True)
        edge(torch.from_numpy(split.x[idx])).backward(torch.from_numpy(g / len(sizes)))
        step = {k: p.grad for k, p in edge.named_parameters()}
        if opts.forecast == "stash":  # from the stashed to the current version
            step = forecast_gradients(step, stashed, theta, opts.alpha)
        else:  # the literal reading: from θ_e to the cloud's copy θ_e^c
            step = forecast_gradients(step, theta, theta_cloud, opts.alpha)
        for k in step:  # SGD with heavy-ball momentum, as every method
            velocity[k] = momentum * velocity[k] + step[k]
            theta[k] = theta[k] - lr * velocity[k]
        compute += time.thread_time() - tick
        for k in [k for k in stash if k.startswith(prefix)]:
            del stash[k]

    # 2. reconciliation: report the delta, pull toward the cloud's copy
    reply = RecordDict()
    if KEY_EDGE_PARAMS in msg.content:
        record = get_record(msg.content, KEY_EDGE_PARAMS, ArrayRecord)
        checked = check_arrays(record, layout_of(_record(theta)))  # type: ignore[arg-type]
        received = {k: torch.from_numpy(np.array(v)) for k, v in checked.items()}
        theta_cloud = received
        if fresh:  # a node that joined late starts from the cloud's copy
            theta = dict(received)
        else:
            reply[KEY_DELTA] = _record({k: theta[k] - base[k] for k in theta})
            theta = soft_reconcile(theta, theta_cloud, opts.lam)
        base = dict(theta)
        meta["base-v-c"] = int(conf["v-c"])  # type: ignore[arg-type]

    # 3. forward the next chunk at the current weights, stash inputs and weights
    want = int(conf["want"])  # type: ignore[arg-type]
    version = int(meta["v-e"])  # type: ignore[arg-type]
    if want > 0:
        edge.load_state_dict(theta)
        batches = [stream.next_indices() for _ in range(want)]
        idx = np.concatenate(batches)
        tick = time.thread_time()
        with torch.no_grad():
            acts = edge(torch.from_numpy(split.x[idx]))
        compute += time.thread_time() - tick
        record = {
            k: Array(v)
            for k, v in encode_cut(acts.numpy(), opts.precision, "a").items()
        }
        record["y"] = Array(split.y[idx])
        record["sizes"] = Array(np.array([len(b) for b in batches], dtype=np.int64))
        reply[KEY_ACTS] = ArrayRecord(record)
        prefix = f"c{version}/"
        stash[prefix + "idx"] = Array(idx.astype(np.int64))
        stash[prefix + "sizes"] = Array(np.array([len(b) for b in batches], np.int64))
        for k, v in theta.items():
            stash[prefix + "w." + k] = Array(v.numpy())
        meta["steps"] = int(meta["steps"]) + want  # type: ignore[arg-type]
        meta["v-e"] = version + 1

    state[_S + "edge"] = _record(theta)
    state[_S + "edge-cloud"] = _record(theta_cloud)
    state[_S + "base"] = _record(base)
    state[_S + "velocity"] = _record(velocity)
    state[_S + "stash"] = stash
    state[_S + "meta"] = meta
    save_stream(context, stream)

    reply[KEY_META] = ConfigRecord(
        {"v-e": version if want > 0 else -1, "base-v-c": int(meta["base-v-c"])}  # type: ignore[arg-type]
    )
    reply[KEY_METRICS] = MetricRecord(
        {"compute-seconds": compute, "steps": int(meta["steps"])}  # type: ignore[arg-type]
    )
    reply[KEY_NODE] = node_record(node)
    return Message(content=reply, reply_to=msg)


HANDLERS = {MESSAGE_TYPE: handler}
