"""The FLOP-count device model: compute re-timed from counted FLOPs.

The benchmark's default device model (*measured time*) scales every second
measured on this machine by ``local GFLOP/s / device GFLOP/s``. For a small
model most of a measured step is framework overhead (Python, dispatch,
allocation), which that ratio stretches as if it were arithmetic. The
FLOP-count model splits each measured piece of compute in two:

- its FLOPs ``F``, counted by torch's own counter
  (:class:`torch.utils.flop_counter.FlopCounterMode`: matrix products and
  convolutions, forward and backward) on the run's model, at the device's
  rate: ``F / R_device``;
- the rest, this machine's measured seconds less the FLOPs at its rate,
  ``max(t − F / R_host, 0)``: the per-step overhead, charged as measured
  (the device is assumed as quick as this machine at everything but
  arithmetic, the favourable end for a slow edge).

So ``t_device = max(t − F / R_host, 0) + F / R_device``; the measured-time
model gives ``t · R_host / R_device``. The two bracket a real device.

What is counted per piece of compute:

- a synchronous round's training on a node (FedAvg family): its local
  steps × batch rows × the whole model's forward and backward FLOPs per row;
- SimulTrain's edge per exchange: the chunk's rows through the edge part
  forward, plus the rows of the chunk whose gradients it applies through
  the edge part backward; the cloud per exchange: the chunk's rows through
  the cloud part forward and backward.

The cloud's aggregation in a synchronous round is not arithmetic-bound and
keeps its measured-time scaling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tandem.config import RunConfig
from tandem.datasets import load_dataset
from tandem.models import build_model, default_model_for
from tandem.protocol.simultrain import SimulTrainOptions, edge_model
from tandem.schedules import Exchange, NodeRound, SyncRound

__all__ = [
    "RowFlops",
    "count_row_flops",
    "device_seconds",
    "exchanges_on_device",
    "rounds_on_device",
    "row_flops_for",
]


@dataclass(frozen=True)
class RowFlops:
    """FLOPs per input row, forward and backward, of a model and its split.

    ``edge_*``/``cloud_*`` are 0 for a model that is not split.
    """

    full_forward: float
    full_backward: float
    edge_forward: float = 0.0
    edge_backward: float = 0.0
    cloud_forward: float = 0.0
    cloud_backward: float = 0.0


def _forward_backward(
    module: nn.Module, x: torch.Tensor
) -> tuple[float, float, torch.Tensor]:
    """FLOPs of ``module(x)`` and of its backward pass (weights' and, when
    ``x`` requires it, the input's gradients), and the output."""
    module.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fwd:
        out = module(x)
    with FlopCounterMode(display=False) as bwd:
        out.backward(torch.ones_like(out))
    return float(fwd.get_total_flops()), float(bwd.get_total_flops()), out.detach()


def count_row_flops(
    model: nn.Module,
    x: torch.Tensor,
    parts: tuple[nn.Module, nn.Module] | None = None,
) -> RowFlops:
    """FLOPs per row of ``x`` (a batch of the model's inputs).

    ``parts``: the model split into (edge, cloud); the cloud part's input
    (the cut activations) requires gradients, which it sends to the edge.
    """
    rows = x.shape[0]
    full_f, full_b, _ = _forward_backward(model, x)
    if parts is None:
        return RowFlops(full_f / rows, full_b / rows)
    edge, cloud = parts
    edge_f, edge_b, cut = _forward_backward(edge, x)
    cloud_f, cloud_b, _ = _forward_backward(cloud, cut.requires_grad_(True))
    return RowFlops(
        full_f / rows,
        full_b / rows,
        edge_f / rows,
        edge_b / rows,
        cloud_f / rows,
        cloud_b / rows,
    )


def row_flops_for(config: Mapping[str, object]) -> tuple[RowFlops, int]:
    """A run's :class:`RowFlops` and batch size, from its ``config`` event.

    The model is built as the run built it (its dataset's input shape, its
    cut when the method is SimulTrain) and counted on one batch.
    """
    cfg = RunConfig.from_flat(config)
    bundle = load_dataset(cfg.data)
    name = cfg.train.model
    if name == "auto":
        name = default_model_for(bundle.input_shape, bundle.tokens)
    model = build_model(name, bundle.input_shape, bundle.num_classes, cfg.seed)
    batch = cfg.train.batch_size
    x = torch.from_numpy(bundle.train.x[:batch])
    parts = None
    if cfg.method == "simultrain":
        parts = edge_model(cfg, cfg.options_as(SimulTrainOptions))
    return count_row_flops(model, x, parts), batch


def device_seconds(
    measured: float, flops: float, host_gflops: float, device_gflops: float
) -> float:
    """``max(measured − F / R_host, 0) + F / R_device`` (see the module)."""
    overhead = max(measured - flops / (host_gflops * 1e9), 0.0)
    return overhead + flops / (device_gflops * 1e9)


def exchanges_on_device(
    exchanges: Sequence[Exchange],
    flops: RowFlops,
    batch: int,
    host: tuple[float, float],
    device: tuple[float, float],
) -> list[Exchange]:
    """SimulTrain's exchanges with each side's compute on its device.

    ``host`` and ``device``: (edge, cloud) GFLOP/s of this machine (per
    ClientApp core, ServerApp) and of the emulated devices.
    """
    rows = {(ex.node, ex.seq): ex.micro_batches * batch for ex in exchanges}
    out = []
    for ex in exchanges:
        forward = rows[(ex.node, ex.seq)]
        backward = rows.get((ex.node, ex.grads_from), 0) if ex.grads_from >= 0 else 0
        edge = forward * flops.edge_forward + backward * flops.edge_backward
        cloud = forward * (flops.cloud_forward + flops.cloud_backward)
        out.append(
            dataclasses.replace(
                ex,
                edge_seconds=device_seconds(ex.edge_seconds, edge, host[0], device[0]),
                cloud_seconds=device_seconds(
                    ex.cloud_seconds, cloud, host[1], device[1]
                ),
            )
        )
    return out


def rounds_on_device(
    rounds: Sequence[SyncRound],
    flops: RowFlops,
    batch: int,
    steps: Mapping[tuple[int, int], float] | float,
    host: tuple[float, float],
    device: tuple[float, float],
) -> list[SyncRound]:
    """Synchronous rounds with each node's training on the edge device and
    the cloud's aggregation scaled by the measured-time factor.

    ``steps``: local steps per (round, node), or one count for all.
    """
    per_row = flops.full_forward + flops.full_backward
    out = []
    for rnd in rounds:
        nodes = {}
        for node, part in rnd.nodes.items():
            n = steps if isinstance(steps, int | float) else steps[(rnd.round, node)]
            seconds = device_seconds(
                part.edge_seconds, n * batch * per_row, host[0], device[0]
            )
            nodes[node] = NodeRound(part.bytes_down, seconds, part.bytes_up)
        cloud = rnd.cloud_seconds * host[1] / device[1]
        out.append(SyncRound(rnd.round, nodes, cloud))
    return out
