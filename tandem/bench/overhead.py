"""ACE-Sync's edge overhead on a larger model, timed in-process.

The benchmark's runs use the default cnn1d (9,610 parameters), where fixed
costs dominate the edge's selection and encoding. The seed's overhead claim
is about real models, so the benchmark also times the same edge code
(:func:`tandem.compression.pipeline.compress_update`: error feedback, importance
scores from the predictor, knapsack, encoding, packing) on a wider cnn1d
(``width = 128``: 112,138 parameters), next to the local training it follows
(:func:`tandem.training.train_steps`, the loop every method shares), on one
torch thread as a simulated ClientApp has, and the cloud's checking and
decoding of the result (:func:`tandem.compression.packing.unpack_groups`).
Times are CPU times of the calling thread (``time.thread_time``), the same
clock the runs report compute with; each figure is the median of
``repeats`` rounds.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from tandem.compression.budget import byte_budget
from tandem.compression.layout import GroupLayout
from tandem.compression.packing import unpack_groups
from tandem.compression.pipeline import EdgeMemory, compress_update
from tandem.config import DataConfig
from tandem.datasets import load_dataset
from tandem.importance import ImportancePredictor
from tandem.models import cnn1d
from tandem.protocol.acesync import AceSyncOptions, EdgePlan
from tandem.training import BatchStream, make_optimizer, train_steps

__all__ = ["measure_overhead"]


def measure_overhead(
    width: int = 128,
    local_steps: int = 50,
    *,
    repeats: int = 5,
    bandwidth_mbps: float = 32.0,
    samples: int = 4000,
    seed: int = 0,
) -> dict[str, float | int]:
    """Edge selection + encoding time against local training, on cnn1d(width).

    Parameters
    ----------
    width : int (default: 128)
        Channels of the cnn1d (32 is the default model).
    local_steps : int (default: 50)
        SGD steps per round (batch 32, lr 0.05, momentum 0.9).
    repeats : int (default: 5)
        Rounds timed; medians are reported.
    bandwidth_mbps : float (default: 32.0)
        Uplink bandwidth for the eq. 5 budget (32 Mbit/s: the geometric
        middle of the 5-200 Mbit/s variable links).
    samples : int (default: 4000)
        MNIST-1D samples to train on.
    seed : int (default: 0)
        Model initialization and batch order.

    Returns
    -------
    dict
        ``parameters``, ``groups``, ``budget_bytes``, median seconds of
        ``train_compute`` / ``overhead`` (edge) / ``decode`` (cloud), and
        ``share`` = overhead / training and ``share_with_decode``.
    """
    options = AceSyncOptions()
    data = load_dataset(DataConfig(mnist1d_samples=samples))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cnn1d(1, data.input_shape[1], data.num_classes, width)
        stream = BatchStream(data.train, 32, seed)
        state_np = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        layout = GroupLayout.from_arrays(state_np, options.chunk)
        state = EdgeMemory.fresh(layout, options.history)
        predictor = ImportancePredictor(alpha=options.alpha, seed=seed)
        budget = byte_budget(
            layout.full_bytes,
            bandwidth_mbps * 1e6,
            c_min=options.c_min,
            c_max=options.c_max,
            beta=options.beta,
        )
        train, overhead, decode = [], [], []
        for round_ in range(1, repeats + 1):
            weights = layout.flat(
                {k: v.detach().numpy() for k, v in model.state_dict().items()}
            )
            optimizer = make_optimizer(model, 0.05, 0.9)
            stats = train_steps(
                model, iter(stream), local_steps, optimizer, torch.device("cpu")
            )
            train.append(stats.compute_seconds)
            plan = EdgePlan.from_options(
                options,
                budget=budget,
                local_steps=local_steps,
                server_round=round_,
            )
            tick = time.thread_time()
            update = (
                layout.flat(
                    {k: v.detach().numpy() for k, v in model.state_dict().items()}
                )
                - weights
            )
            out = compress_update(update, weights, state, plan, layout, predictor)
            overhead.append(time.thread_time() - tick)
            tick = time.thread_time()
            unpack_groups(
                out.codecs, out.payload, layout.sizes, plan.codecs, max_bytes=budget
            )
            decode.append(time.thread_time() - tick)
    finally:
        torch.set_num_threads(threads)
    t, o, d = (statistics.median(x) for x in (train, overhead, decode))
    return {
        "model": f"cnn1d(width={width})",
        "parameters": layout.total,
        "groups": len(layout.groups),
        "local_steps": local_steps,
        "budget_bytes": budget,
        "train_compute_seconds": t,
        "overhead_seconds": o,
        "decode_seconds": d,
        "share": o / t,
        "share_with_decode": (o + d) / t,
        "clock": f"thread CPU time, one torch thread, median of {repeats} rounds",
        "encoded_bytes_last": int(np.asarray(out.payload).size),
    }
