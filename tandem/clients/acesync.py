"""ACE-Sync, edge side: train, then send the update as compressed as the budget says.

The edge does what the cloud's message says: the message carries the global
weights (as FedAvg's does) and an :class:`~tandem.protocol.acesync.EdgePlan`
in its ``config`` record
(byte budget, local steps, codec options, group size, ``γ``, importance
source, fill decay), plus the importance predictor's weights when the cloud
uses it. Nothing of ACE-Sync is read from the run config here, so the same
handler serves ``acesync``, ``fullsync`` (options ``full`` only) and ``topk``
(one top-k option), and any strategy wrapped in
:class:`tandem.strategies.compressed.CompressedUpdates`.

The edge is FedAvg's train handler (:func:`tandem.clients.fedavg.train_handler`,
step 1) with :func:`compression_mod` around it (steps 2-8), the way Flower
adds differential privacy to a client (``fixedclipping_mod``): the mod reads
the plan, lets the inner handler train, and replaces its reply (the local
model) by the compressed update.

Per round (seed 004; :func:`tandem.compression.pipeline.compress_update`
holds steps 3-7):

0. The model. A message carries either the whole model or, with the
   compressed downlink, the delta since the version the edge holds
   (:class:`~tandem.protocol.acesync.DownlinkHeader`, record
   :data:`~tandem.protocol.acesync.KEY_DOWNLINK`): the edge checks that it
   holds exactly that version, checks and decodes every group, and only then
   adds the delta (:func:`~tandem.compression.downlink.apply_downlink`); a
   bad downlink raises :class:`~tandem.wire.PayloadError` before anything
   changes, so the reply carries the error and the cloud counts it (and
   sends the full model next time). The model it now holds is kept in
   ``Context.state`` (:data:`MODEL_KEY`, :data:`MODEL_VERSION_KEY`).
1. Train ``local-steps`` SGD steps from that model ``θ``
   (:func:`tandem.training.train_steps`, the loop every method shares).
2. The update ``g = θ_k − θ`` over every float tensor, cut into groups
   (:class:`~tandem.compression.layout.GroupLayout`, eq. 1).
3. Error feedback, eq. 7: ``g̃ = g + γ·e`` with the residual ``e`` kept in
   ``Context.state``.
4. Importance per group (eqs. 3-4): a score ``s_i`` in ``[0, 1]`` from the
   cloud's predictor on temporal features (RMS of ``g̃`` per group over the
   last rounds) and structural ones, or from the latest RMS alone (the
   magnitude ablation). The knapsack's value of group ``i`` is
   ``I_i = s_i · ‖g̃_i‖²``, so that with the codecs' fidelities (fraction of
   a group's energy kept) it maximizes the importance-weighted update energy
   that reaches the cloud: the score says which groups matter, the energy
   how much there is to lose. (Valuing groups by ``s_i · n_i`` instead ended
   1.4 points lower on the benchmark's workload, mean of seeds 0 and 1.)
5. Knapsack (eq. 2 generalised): one codec per group within the budget
   (:func:`tandem.compression.knapsack.select_options`).
6. Encode (eq. 6 for ``sign``) and pack the groups into two arrays
   (:func:`tandem.compression.packing.encode_packed`, vectorized; the same
   bytes as :func:`~tandem.compression.codecs.encode` per group). ``sent_i``
   is the decoded payload, or for a deferred group the stand-in the cloud
   will use: ``decay^a · u_i``, the last update sent for it ``a`` rounds ago
   (the edge mirrors the cloud's cache, and both call
   :func:`~tandem.compression.pipeline.fill_unsent`).
7. New residual ``e ← g̃ − sent``: what the cloud did not
   get, or got in excess from the cached stand-in, is carried to the next
   round.
8. Reply with the two arrays, the metrics (with ``model-digest``, the
   :func:`~tandem.compression.downlink.model_digest` of ``θ``: the cloud
   compares it with its record of the device's model) and the node record.

With continuous synchronization (``acesync-interval-mode = continuous``) a
device trains every round of its sync interval and syncs in the last one
(:func:`~tandem.coordination.interval_phase`): the plan's ``hold`` says to
keep the trained model in ``Context.state`` (:data:`PROGRESS_KEY`) and reply
with the training metrics alone, ``resume`` to train on from that model (the
message carries none). Steps 2-8 then take ``θ`` = the model held since the
interval's first round, so the update covers every step of the interval.

Time for steps 2-8 is reported as ``overhead-seconds`` next to the training
compute (``train-compute-seconds``); ``compute-seconds`` (what the virtual
clock charges the edge) is their sum.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from logging import INFO

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
from flwr.supercore import log

from tandem.accounting import KEY_COMPUTE_SECONDS
from tandem.clients import fedavg
from tandem.clients.node import KEY_NODE
from tandem.compression.codecs import CodecError
from tandem.compression.downlink import apply_downlink, model_digest
from tandem.compression.kernels import warm_up
from tandem.compression.layout import GroupLayout
from tandem.compression.pipeline import EdgeMemory, compress_update
from tandem.config import RunConfig
from tandem.protocol.acesync import (
    KEY_DOWNLINK,
    KEY_UPDATE,
    DownlinkHeader,
    EdgePlan,
    read_downlink,
    read_predictor,
    update_record,
)
from tandem.wire import KEY_ARRAYS, KEY_CONFIG, KEY_METRICS, PayloadError, get_record

__all__ = [
    "HANDLERS",
    "compression_mod",
    "held_model",
    "load_memory",
    "resume_model",
    "save_memory",
    "train_handler",
]

#: Where the edge keeps residuals, magnitude history and its mirror of the
#: cloud's cache, in ``Context.state``.
STATE_KEY = "acesync.edge"
#: The model the edge holds (every tensor), in ``Context.state``.
MODEL_KEY = "acesync.model"
#: Its version (``{"version": int}``), in ``Context.state``.
MODEL_VERSION_KEY = "acesync.model-version"
#: The model in progress between the rounds of an interval of continuous
#: synchronization (every tensor), in ``Context.state``.
PROGRESS_KEY = "acesync.progress"


def held_model(context: Context) -> tuple[dict[str, np.ndarray] | None, int]:
    """The model the edge holds and its version (``(None, -1)`` if none)."""
    record = context.state.array_records.get(MODEL_KEY)
    meta = context.state.config_records.get(MODEL_VERSION_KEY)
    if record is None or meta is None:
        return None, -1
    return _numpy(record), int(meta["version"])  # type: ignore[arg-type]


def _hold(context: Context, model: dict[str, np.ndarray], version: int) -> None:
    context.state[MODEL_KEY] = ArrayRecord(
        {k: Array(np.require(v, requirements="C")) for k, v in model.items()}
    )
    context.state[MODEL_VERSION_KEY] = ConfigRecord({"version": int(version)})


def _delta_model(
    msg: Message, context: Context, plan: EdgePlan, header: DownlinkHeader
) -> dict[str, np.ndarray]:
    """The model after applying a compressed downlink, every check first."""
    held, version = held_model(context)
    if held is None:
        raise PayloadError(
            f"downlink delta applies to version {header.base}; this node holds no model"
        )
    if version != header.base:
        raise PayloadError(
            f"downlink delta applies to version {header.base}; this node holds "
            f"version {version}"
        )
    layout = GroupLayout.from_arrays(held, plan.chunk)
    codes, payload = read_downlink(  # type: ignore[misc]
        msg.content, groups=len(layout.groups), max_bytes=header.budget
    )
    # the arrays record carries only the tensors outside the groups
    rest = _numpy(get_record(msg.content, KEY_ARRAYS, ArrayRecord))  # type: ignore[arg-type]
    expected = [k for k in held if k not in layout.keys]
    if sorted(rest) != sorted(expected):
        raise PayloadError(
            f"record '{KEY_ARRAYS}' of a delta has arrays {sorted(rest)}, "
            f"expected {sorted(expected)}"
        )
    for key, value in rest.items():
        if value.dtype != held[key].dtype or value.shape != held[key].shape:
            raise PayloadError(
                f"array '{key}' is {value.dtype}{value.shape}, the model's is "
                f"{held[key].dtype}{held[key].shape}"
            )
    try:
        flat = apply_downlink(
            layout.flat(held),
            codes,
            payload,
            options=plan.codecs,
            layout=layout,
            max_bytes=header.budget,
        )
    except CodecError as err:
        raise PayloadError(f"downlink: {err}") from None
    tensors = layout.unflat(flat)
    return {
        k: tensors[k].astype(v.dtype).reshape(v.shape) if k in tensors else rest[k]
        for k, v in held.items()
    }


def receive_model(msg: Message, context: Context, plan: EdgePlan) -> Message:
    """Step 0: the message with the model the edge now holds in ``arrays``.

    A full model is taken as sent; a delta is checked and applied
    (:func:`_delta_model`). The model and its version are stored in
    ``Context.state`` only when everything checked out.

    Raises
    ------
    PayloadError
        Naming what is wrong (header, version, records, arrays, groups).
    """
    conf = get_record(msg.content, KEY_CONFIG, ConfigRecord)
    header = DownlinkHeader.from_config(conf)  # type: ignore[arg-type]
    has_delta = KEY_DOWNLINK in msg.content.array_records
    if header.full:
        if has_delta:
            raise PayloadError(
                f"a full-model message (base -1) carries record '{KEY_DOWNLINK}'"
            )
        model = _numpy(get_record(msg.content, KEY_ARRAYS, ArrayRecord))  # type: ignore[arg-type]
        _hold(context, model, header.version)
        return msg
    if not has_delta:
        raise PayloadError(
            f"train config asks for a delta on version {header.base}; the message "
            f"has no record '{KEY_DOWNLINK}'"
        )
    model = _delta_model(msg, context, plan, header)
    _hold(context, model, header.version)
    content = RecordDict(
        {
            key: value
            for key, value in msg.content.items()
            if key not in (KEY_DOWNLINK, KEY_ARRAYS)
        }
    )
    content[KEY_ARRAYS] = ArrayRecord({k: Array(v) for k, v in model.items()})
    msg.content = content
    return msg


def resume_model(msg: Message, context: Context) -> Message:
    """Continuous synchronization: the message with the model in progress in
    ``arrays`` (the message itself must carry no model).

    Raises
    ------
    PayloadError
        If the message carries a model or a delta, or this node has no model
        in progress (e.g. it restarted since the interval began).
    """
    for key in (KEY_ARRAYS, KEY_DOWNLINK):
        if key in msg.content:
            raise PayloadError(
                f"train config asks to resume; the message carries record '{key}'"
            )
    progress = context.state.array_records.get(PROGRESS_KEY)
    if progress is None:
        raise PayloadError(
            "train config asks to resume; this node has no model in progress"
        )
    content = RecordDict(dict(msg.content.items()))
    content[KEY_ARRAYS] = progress
    msg.content = content
    return msg


def _training_metrics(reply: Message, overhead: float) -> dict[str, object]:
    """The train handler's metrics as the reply reports them:
    ``compute-seconds`` is training plus ``overhead`` (the compression),
    ``train-compute-seconds`` training alone."""
    trained = get_record(reply.content, KEY_METRICS, MetricRecord)
    compute = float(trained[KEY_COMPUTE_SECONDS])  # type: ignore[index, arg-type]
    return {
        "train-loss": trained["train-loss"],  # type: ignore[index]
        "num-examples": trained["num-examples"],  # type: ignore[index]
        "train-seconds": trained["train-seconds"],  # type: ignore[index]
        KEY_COMPUTE_SECONDS: compute + overhead,
        "train-compute-seconds": compute,
        "steps": trained["steps"],  # type: ignore[index]
    }


def _hold_reply(msg: Message, context: Context, reply: Message) -> Message:
    """Continuous synchronization, not the interval's last round: keep the
    trained model in progress; reply with the training metrics alone."""
    context.state[PROGRESS_KEY] = get_record(reply.content, KEY_ARRAYS, ArrayRecord)  # type: ignore[assignment]
    metrics = _training_metrics(reply, overhead=0.0)
    content = RecordDict({KEY_METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    if KEY_NODE in reply.content:
        content[KEY_NODE] = reply.content[KEY_NODE]
    return Message(content=content, reply_to=msg)


def load_memory(context: Context, layout: GroupLayout, history: int) -> EdgeMemory:
    """The edge's memory from ``context.state``; fresh if absent or of another
    layout."""
    record = context.state.array_records.get(STATE_KEY)
    if record is None:
        return EdgeMemory.fresh(layout, history)
    arrays = {k: record[k].numpy() for k in record}
    return EdgeMemory.from_arrays(arrays, layout, history)


def save_memory(context: Context, memory: EdgeMemory) -> None:
    """Store the edge's memory in ``context.state``."""
    context.state[STATE_KEY] = ArrayRecord(
        {k: Array(v) for k, v in memory.to_arrays().items()}
    )


def _clock() -> float:
    """The clock :func:`tandem.training.train_steps` measures compute with."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def compression_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """ACE-Sync's edge around a train handler that replies with its local model.

    A Flower client mod (``(msg, context, call_next) -> reply``): the plan and
    the predictor are read (and checked) before training; ``call_next`` trains
    and replies with the local model in ``arrays`` and the metrics
    ``train-loss``, ``num-examples``, ``train-seconds``, ``compute-seconds``
    and ``steps`` (as :func:`tandem.clients.fedavg.train_handler` does); the
    reply is replaced by the compressed update ``θ_k − θ`` (steps 2-8 of the
    module docstring) with the node record kept.

    Raises
    ------
    PayloadError
        If the plan, the predictor or the global arrays are malformed, or the
        budget is below the cheapest choice.
    """
    conf = get_record(msg.content, KEY_CONFIG, ConfigRecord)
    plan = EdgePlan.from_config(conf)  # type: ignore[arg-type]
    scored = plan.importance == "predictor" and not plan.hold
    predictor = read_predictor(msg.content) if scored else None
    held = None
    if plan.resume:  # 0. the model in progress (continuous synchronization)
        msg = resume_model(msg, context)
        if not plan.hold:  # the update will be taken against the held model
            held, _ = held_model(context)
            if held is None:
                raise PayloadError(
                    "train config asks to resume; this node holds no model"
                )
    else:  # 0. the model, full or a delta
        msg = receive_model(msg, context, plan)
        if PROGRESS_KEY in context.state:  # a new interval starts here
            del context.state[PROGRESS_KEY]
    reply = call_next(msg, context)  # 1. local training
    if reply.has_error():
        return reply
    if plan.hold:
        return _hold_reply(msg, context, reply)
    # 2-8. the update since the model held (sent in the interval's first
    # round), compressed; the codec's compiled loops are made ready first (a
    # process's first round compiles or loads them once: not a round's work)
    warmed = warm_up()
    if warmed:
        log(INFO, "codec loops compiled or loaded in %.2f s", warmed)
    tick = _clock()
    if held is not None:  # resumed: the update since the interval's model
        del context.state[PROGRESS_KEY]
        global_state = held
    else:
        global_state = _numpy(get_record(msg.content, KEY_ARRAYS, ArrayRecord))  # type: ignore[arg-type]
    layout = GroupLayout.from_arrays(global_state, plan.chunk)
    weights = layout.flat(global_state)
    local = _numpy(get_record(reply.content, KEY_ARRAYS, ArrayRecord))  # type: ignore[arg-type]
    update = layout.flat(local) - weights
    memory = load_memory(context, layout, plan.history)
    try:
        out = compress_update(
            update, weights, memory, plan, layout, predictor, in_place=True
        )
    except CodecError as err:
        raise PayloadError(str(err)) from None
    save_memory(context, memory)
    overhead = _clock() - tick

    metrics = {
        **_training_metrics(reply, overhead),
        "overhead-seconds": overhead,
        "bytes-budget": plan.budget,
        "bytes-encoded": out.encoded_bytes,
        "kept-fraction": out.kept_fraction,
        "groups-sent": out.groups_sent,
        "update-norm": float(np.linalg.norm(update.astype(np.float64))),
        "residual-norm": float(np.linalg.norm(memory.residual.astype(np.float64))),
        "model-digest": model_digest(weights),
    }
    content = RecordDict(
        {
            KEY_UPDATE: update_record(out.codecs, out.payload),
            KEY_METRICS: MetricRecord(metrics),  # type: ignore[arg-type]
        }
    )
    if KEY_NODE in reply.content:
        content[KEY_NODE] = reply.content[KEY_NODE]
    return Message(content=content, reply_to=msg)


def train_handler(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """FedAvg's train handler with :func:`compression_mod` around it."""
    return compression_mod(
        msg, context, functools.partial(fedavg.train_handler, cfg=cfg)
    )


HANDLERS = {"train": train_handler, "evaluate": fedavg.evaluate_handler}
