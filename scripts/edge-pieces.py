"""SimulTrain's stream edge, piece by piece, after waits of each length (README,
"Warm steps, like for like").

One node's stream session at the run config's defaults (MNIST-1D, chunks of 4
micro-batches, int8 activations), driven without a stream: each chunk is
forwarded, and the gradients of the oldest of two in flight (seeded values,
the cloud's frame) are applied. Before each piece of work the thread sleeps
``--sleeps`` seconds, as a stream's edge waits for gradients and, in real
time, for the emulated device. For each sleep it records the CPU time of the
pieces as they ran (no repeats) and what the session charges with its
repeats off the record (the fastest of the live piece and its repeats).
Prints one JSON line per sleep and writes them all to ``--out``.

    python scripts/edge-pieces.py --sleeps 0 0.001 0.005 0.03 --out pieces.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, RecordDict

from tandem.clients import simultrain as edge_side
from tandem.config import RunConfig
from tandem.frames import encode_frame
from tandem.protocol.simultrain import CloudMessage, SimulTrainOptions, message_frame
from tandem.split import encode_cut
from tandem.training import WARM_REPEATS


def _session(out: Path) -> edge_side.StreamedEdge:
    flat = {"method": "simultrain", "min-nodes": 2, "output-dir": str(out)}
    cfg = RunConfig.from_flat(flat)
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=flat,
    )
    chunk = cfg.options_as(SimulTrainOptions).stream_chunk
    return edge_side.StreamedEdge.detached(context, cfg, 2, chunk, 10**9)


def _measure(chunks: int, sleep: float, repeats: int, out: Path) -> dict[str, float]:
    """Median CPU ms per piece as timed from outside, and charged per chunk."""
    edge_side.WARM_REPEATS = repeats
    session = _session(out)
    rng = np.random.default_rng(0)
    pieces: dict[str, list[float]] = {"forward": [], "receive": []}
    charged = []
    for seq in range(chunks):
        time.sleep(sleep)
        before = session.total_compute + session.compute
        tick = time.thread_time()
        session.forward(session.start.chunk)
        pieces["forward"].append(time.thread_time() - tick)
        if len(session.in_flight) < 2:
            continue
        version = session.in_flight[0]
        shape = (len(session.state.stash[f"c{version}/idx"]), 32, 40)
        grads = rng.standard_normal(shape).astype(np.float32) * 1e-3
        msg = CloudMessage(
            v_c=version,
            want=session.start.chunk,
            grad_for=version,
            grads=encode_cut(grads, session.opts.precision, "g"),
        )
        data = encode_frame(message_frame(msg, seq))
        time.sleep(sleep)
        tick = time.thread_time()
        session.receive(data)
        pieces["receive"].append(time.thread_time() - tick)
        charged.append(session.total_compute + session.compute - before)
    skip = 20  # torch's lazy set-up
    return {
        "forward_ms": 1e3 * statistics.median(pieces["forward"][skip:]),
        "receive_ms": 1e3 * statistics.median(pieces["receive"][skip:]),
        "charged_ms_per_chunk": 1e3 * statistics.median(charged[skip:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sleeps", type=float, nargs="+", default=[0, 0.005, 0.03])
    parser.add_argument("--chunks", type=int, default=300)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one CPU per ClientApp, as in the simulation
    scratch = Path(tempfile.mkdtemp(prefix="edge-pieces-"))
    rows = []
    for sleep in args.sleeps:
        live = _measure(args.chunks, sleep, 0, scratch)
        warm = _measure(args.chunks, sleep, WARM_REPEATS, scratch)
        row = {
            "sleep_s": sleep,
            "chunks": args.chunks,
            "live_forward_ms": live["forward_ms"],
            "live_receive_ms": live["receive_ms"],
            "live_ms_per_chunk": live["charged_ms_per_chunk"],
            "charged_ms_per_chunk": warm["charged_ms_per_chunk"],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
