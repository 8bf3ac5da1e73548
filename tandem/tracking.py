"""Run tracking: a JSON-lines file always, console progress, W&B when enabled.

Every run gets a folder ``<output-dir>/<run-name>/`` holding ``metrics.jsonl``
(one JSON object per line: the config, one ``round`` record per round, per-node
``bytes`` records, and a final ``summary``) and, with ``wandb=true``, W&B's own
files under ``wandb/``. Offline W&B (the default mode) sets ``WANDB_MODE``
before ``wandb.init`` so it never looks up a host; ``wandb sync`` uploads the
run later. Only this module imports W&B.
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

__all__ = ["Tracker", "read_jsonl"]

Number = int | float


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
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        run_name: str,
        group: str,
        config: Mapping[str, object],
        total_rounds: int,
        console: TextIO | None = None,
    ) -> None:
        self.run_dir = Path(cfg.output_dir).resolve() / run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._console = console or sys.stdout
        self._total = total_rounds
        self._start = time.perf_counter()
        self._wandb: Any = None
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

    def set_total_rounds(self, total: int) -> None:
        """Change the ``N`` of the ``round x/N`` progress line."""
        self._total = total

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
        parts = [f"round {round_}/{self._total}"]
        for key, label in (("train-loss", "loss"), ("eval-loss", "eval-loss")):
            if key in metrics:
                parts.append(f"{label} {metrics[key]:.4f}")
        if "eval-accuracy" in metrics:
            parts.append(f"acc {metrics['eval-accuracy']:.2%}")
        if "bytes-up" in metrics:
            parts.append(f"up {_fmt_bytes(metrics['bytes-up'])}")
        if "bytes-down" in metrics:
            parts.append(f"down {_fmt_bytes(metrics['bytes-down'])}")
        parts.append(f"elapsed {self.elapsed:.1f} s")
        self._print("  ".join(parts))
        if self._wandb is not None:
            self._wandb.log({k: _clean(v) for k, v in metrics.items()}, step=round_)

    def warn(self, text: str) -> None:
        """A console line that needs attention (also kept in the JSON lines)."""
        self._print(f"WARNING {text}")

    def log_event(self, event: str, payload: Mapping[str, object]) -> None:
        """Record a non-round event (e.g. per-node bytes) in the JSON lines only."""
        self._write({"event": event, **payload})

    def finish(self, summary: Mapping[str, object]) -> None:
        """Record the final summary and close W&B and the file."""
        summary = {**summary, "wall-seconds": self.elapsed}
        self._write({"event": "summary", **summary})
        shown = "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in summary.items()
        )
        self._print(f"done: {shown}")
        if self._wandb is not None:
            for key, value in summary.items():
                self._wandb.summary[key] = _clean(value)
            self._wandb.finish()
            self._wandb = None
        self._file.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file back as a list of records."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
