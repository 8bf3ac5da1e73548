"""SimulTrain's whole `flwr run` on both engines, in pairs (README, "Deployment").

Starts a local SuperLink (simulation) and a loopback deployment (a SuperLink
and N insecure SuperNodes) first, then times pairs of runs at SimulTrain's
defaults from submitting each to its ``finished:completed`` status: pair 1
simulation then deployment, pair 2 the other way round, and so on. Prints one
JSON line per run and writes them all to ``--out``.

    python scripts/engine-pairs.py --nodes 4 --pairs 2 --out pairs.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from tandem.launch import FlowerHome, LoopbackDeployment
from tandem.tracking import read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="engine-pairs-"))
    simulation = FlowerHome(root / "simulation")
    deployment = LoopbackDeployment(root / "deployment", num_nodes=args.nodes)
    deployment.start()
    cli = FlowerHome(root / "cli", connections=deployment.connections)
    simulation.start_superlink()  # up before any timing, as the deployment's is
    rows: list[dict[str, object]] = []
    federation = {
        "num-supernodes": args.nodes,
        "client-resources-num-cpus": 1,
        "init-args-num-cpus": args.nodes,
    }

    def one(engine: str, pair: int) -> None:
        out = root / f"runs-{engine}-{pair}"
        config = {"method": "simultrain", "output-dir": str(out)}
        load = os.getloadavg()[0]
        began = time.monotonic()
        if engine == "simulation":
            status = simulation.run(config, federation, timeout=900)
        else:
            status = cli.run(config, connection="deploy", timeout=900)
        wall = time.monotonic() - began
        records = read_jsonl(out / f"simultrain-{status.run_id}" / "metrics.jsonl")
        summary = [r for r in records if r["event"] == "summary"][-1]
        stream = [r for r in records if r["event"] == "stream"]
        row = {
            "engine": engine,
            "pair": pair,
            "nodes": args.nodes,
            "status": status.status,
            "whole_run_seconds": round(wall, 1),
            "serverapp_seconds": round(summary["wall-seconds"], 1),
            "stream_seconds": round(stream[-1]["seconds"], 1) if stream else None,
            "final_accuracy": summary["final-accuracy"],
            "load": [round(load, 1), round(os.getloadavg()[0], 1)],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)

    try:
        for pair in range(1, args.pairs + 1):
            order = ("simulation", "deployment")
            for engine in order if pair % 2 else order[::-1]:
                one(engine, pair)
    finally:
        deployment.stop()
        simulation.stop_superlink()
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
