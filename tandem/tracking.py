"""Run tracking: a JSON-lines file always, console progress, W&B when enabled.

Every run gets a folder ``<output-dir>/<run-name>/`` holding ``metrics.jsonl``
(one JSON object per line: the config, one ``round`` record per round, per-node
``bytes`` records, and a final ``summary``, or a ``failed`` record with the
reason) and, with ``wandb=true``, W&B's own files under ``wandb/``. Offline W&B
(the default mode) sets ``WANDB_MODE`` before ``wandb.init`` so it never looks
up a host; ``wandb sync`` uploads the run later. Only this module imports W&B.

W&B names: a round's metrics are logged as ``round/<key>`` (one step per
round), each node's bytes of the round as ``node/<id>/bytes-up`` and
``node/<id>/bytes-down`` (a series per node), and the final summary as
``total/<key>`` for counters summed over the run (bytes, messages, rejected
replies, dropouts) and ``final/<key>`` for everything else, plus a
``nodes/bytes`` table of each node's total bytes. Round and final figures
never share a name, so the summary never shows one round's bytes as the total.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from tandem.config import TrackingConfig

__all__ = ["Tracker", "format_summary", "read_jsonl", "wandb_summary_key"]

Number = int | float

#: Summary entries that are sums over the run (W&B ``total/<key>``).
TOTALS = frozenset({"rejected-replies", "dropouts", "exchanges"})


def wandb_summary_key(key: str) -> str:
    """The W&B summary name of a run-summary entry: ``total/`` or ``final/``."""
    is_total = key in TOTALS or key.startswith(("bytes-", "messages-"))
    if key.endswith("-per-step"):
        is_total = False
    return f"total/{key}" if is_total else f"final/{key}"


def format_summary(summary: Mapping[str, object]) -> str:
    """``key value`` pairs of the scalar entries, two spaces apart.

    Lists and mappings (per-node or per-period figures) stay in
    ``metrics.jsonl``: a console line is for a person.
    """
    shown = []
    for key, value in summary.items():
        if isinstance(value, Mapping | list | tuple):
            continue
        if isinstance(value, float):
            shown.append(f"{key} {value:.4g}")
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 10000:
            shown.append(f"{key} {value:,}")
        else:
            shown.append(f"{key} {value}")
    return "  ".join(shown)


def _clean(value: object) -> object:
    """JSON-safe value: NaN/Inf become None, numpy scalars become Python ones."""
    if hasattr(value, "item"):
        value = value.item()  # type: ignore[union-attr]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


class Tracker:
    """Writes a run's metrics to JSON lines, the console and (optionally) W&B.

    Parameters
    ----------
    cfg : TrackingConfig
        Output folder and W&B options.
    run_name : str
        Folder name under ``cfg.output_dir`` and the W&B run name.
    group : str
        W&B group (the Flower run id), so all processes of a run group together.
    config : Mapping[str, object]
        The effective run config, recorded first.
    total_rounds : int
        For the ``round x/N`` progress line.
    console : TextIO (default: sys.stdout)
        Where progress lines go.
    unit : str (default: "round")
        What one report counts (SimulTrain: ``period``).
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        run_name: str,
        group: str,
        config: Mapping[str, object],
        total_rounds: int,
        console: TextIO | None = None,
        unit: str = "round",
    ) -> None:
        self.run_dir = Path(cfg.output_dir).resolve() / run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._console = console or sys.stdout
        self._total = total_rounds
        self._unit = unit
        self._start = time.perf_counter()
        self._wandb: Any = None
        self._node_series: dict[str, Number] = {}
        self._node_totals: dict[int, dict[str, int]] = {}
        self._write({"event": "config", "config": dict(config)})
        if cfg.wandb and cfg.wandb_mode != "disabled":
            self._wandb = self._init_wandb(cfg, run_name, group, config)
        self._print(f"run folder {self.run_dir}")

    def _init_wandb(
        self,
        cfg: TrackingConfig,
        run_name: str,
        group: str,
        config: Mapping[str, object],
    ) -> Any:
        # The mode must be in the environment before wandb.init, or wandb looks
        # up its host and can stall at exit on a closed network.
        os.environ["WANDB_MODE"] = cfg.wandb_mode
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        return wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity or None,
            group=group,
            name=run_name,
            config=dict(config),
            dir=str(self.run_dir),
            mode=cfg.wandb_mode,
            reinit="create_new",
        )

    def set_total_rounds(self, total: int, unit: str | None = None) -> None:
        """Change the ``N`` (and the unit) of the ``round x/N`` progress line."""
        self._total = total
        if unit is not None:
            self._unit = unit

    @property
    def elapsed(self) -> float:
        """Seconds since the tracker started."""
        return time.perf_counter() - self._start

    def _write(self, record: Mapping[str, object]) -> None:
        clean = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, default=str) + "\n")
        self._file.flush()

    def _print(self, text: str) -> None:
        print(f"[tandem] {text}", file=self._console, flush=True)

    def log_round(self, round_: int, metrics: Mapping[str, Number]) -> None:
        """Record one round's metrics (JSON line, console line, W&B step)."""
        record = {"event": "round", "round": round_, "elapsed": self.elapsed, **metrics}
        self._write(record)
        parts = [f"{self._unit} {round_}/{self._total}"]
        for key, label in (("train-loss", "loss"), ("eval-loss", "eval-loss")):
            if key in metrics:
                parts.append(f"{label} {metrics[key]:.4f}")
        if "eval-accuracy" in metrics:
            parts.append(f"acc {metrics['eval-accuracy']:.2%}")
        if "eval-perplexity" in metrics:
            parts.append(f"ppl {metrics['eval-perplexity']:.2f}")
        if "bytes-up" in metrics:
            parts.append(f"up {_fmt_bytes(metrics['bytes-up'])}")
        if "bytes-down" in metrics:
            parts.append(f"down {_fmt_bytes(metrics['bytes-down'])}")
        parts.append(f"elapsed {self.elapsed:.1f} s")
        self._print("  ".join(parts))
        if self._wandb is not None:
            row = {f"round/{k}": _clean(v) for k, v in metrics.items()}
            self._wandb.log({**row, **self._node_series}, step=round_)
        self._node_series = {}

    def warn(self, text: str) -> None:
        """A console line that needs attention (also kept in the JSON lines)."""
        self._print(f"WARNING {text}")

    def note(self, text: str) -> None:
        """An informational console line (e.g. what data was loaded)."""
        self._print(text)

    def log_event(self, event: str, payload: Mapping[str, object]) -> None:
        """Record a non-round event in the JSON lines.

        ``bytes`` events (one node's bytes in a round) also go to W&B with the
        next round's row, as ``node/<id>/bytes-up`` and ``node/<id>/bytes-down``,
        and add up into the final ``nodes/bytes`` table.
        """
        self._write({"event": event, **payload})
        if event == "bytes" and "node-id" in payload:
            node = int(payload["node-id"])  # type: ignore[call-overload]
            totals = self._node_totals.setdefault(
                node, {"bytes-up": 0, "bytes-down": 0}
            )
            for key in ("bytes-up", "bytes-down"):
                value = payload.get(key)
                if isinstance(value, int | float):
                    self._node_series[f"node/{node}/{key}"] = value
                    totals[key] += int(value)

    def finish(self, summary: Mapping[str, object]) -> None:
        """Record the final summary, print it last, and close W&B and the file.

        The console gets the summary's scalar entries, the run folder and the
        command that plots the run.
        """
        summary = {**summary, "wall-seconds": self.elapsed}
        self._write({"event": "summary", **summary})
        self._print(f"done: {format_summary(summary)}")
        self._print(f"run folder {self.run_dir}")
        self._print(
            f"plot it:   tandem plot {self.run_dir} --out {self.run_dir}/plot.png"
        )
        if self._wandb is not None:
            for key, value in summary.items():
                self._wandb.summary[wandb_summary_key(key)] = _clean(value)
            self._wandb_node_table()
            self._wandb.finish()
            self._wandb = None
        self._file.close()

    def fail(self, reason: str) -> None:
        """Record that the run failed, and why; close W&B (as failed) and the file."""
        if self._file.closed:
            return
        self._write({"event": "failed", "reason": reason, "wall-seconds": self.elapsed})
        self._print(f"run FAILED: {reason}")
        self._print(f"run folder {self.run_dir}")
        if self._wandb is not None:
            self._wandb.summary["final/failed"] = reason
            self._wandb.finish(exit_code=1)
            self._wandb = None
        self._file.close()

    def _wandb_node_table(self) -> None:
        """Each node's total bytes as the W&B table ``nodes/bytes``."""
        if not self._node_totals:
            return
        import wandb

        table = wandb.Table(columns=["node-id", "bytes-up", "bytes-down"])
        for node, totals in sorted(self._node_totals.items()):
            table.add_data(node, totals["bytes-up"], totals["bytes-down"])
        self._wandb.log({"nodes/bytes": table})


def read_jsonl(path: str | Path, growing: bool = False) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file back as a list of records.

    ``growing``: the file of a run still going; a last line without its
    newline is still being written and is left for the next read.
    """
    with Path(path).open(encoding="utf-8") as fh:
        lines = list(fh)
    if growing and lines and not lines[-1].endswith("\n"):
        lines.pop()
    return [json.loads(line) for line in lines if line.strip()]
