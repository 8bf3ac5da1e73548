"""The ``tandem`` command: helpers around ``flwr run``.

- ``tandem plot RUN [RUN ...] --out FILE.png``: accuracy vs round and vs bytes.
- ``tandem bench SUITE ...``: methods side by side (:mod:`tandem.bench`).
- ``tandem stop-superlink``: stop the project's local SuperLink (it outlives
  ``flwr run`` and keeps serving the code it first loaded).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tandem.launch import PROJECT_ROOT, FlowerHome
from tandem.plots import PlotError, plot_runs

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tandem`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from tandem.bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    plot = sub.add_parser("plot", help="plot runs' metrics.jsonl")
    plot.add_argument("runs", nargs="+", type=Path, help="run folders or metrics.jsonl")
    plot.add_argument("--out", type=Path, default=Path("plot.png"))
    plot.add_argument("--title", default="")

    sub.add_parser("stop-superlink", help="stop the project's local SuperLink")
    sub.add_parser("bench", help="run a benchmark suite (tandem bench --help)")

    args = parser.parse_args(argv)
    if args.command == "plot":
        try:
            print(plot_runs(args.runs, args.out, args.title, note=_note))
        except PlotError as err:
            parser.exit(2, f"tandem plot: error: {err}\n")
    elif args.command == "stop-superlink":
        home = FlowerHome(
            Path(os.environ.get("FLWR_HOME", PROJECT_ROOT / ".flwr")),
            http_port=int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", 39291)),
            control_port=int(os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", 39293)),
        )
        pids = home.superlink_pids()
        home.stop_superlink()
        print(f"stopped SuperLink {pids}" if pids else "no local SuperLink running")
    return 0


def _note(text: str) -> None:
    print(f"tandem plot: {text}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
