"""What a method's cloud side gets from the ServerApp: :class:`ServerRun`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.serverapp import Grid
from torch import nn

from tandem.accounting import ByteLedger, MeteredGrid
from tandem.checkpoint import resume_from, save_checkpoint
from tandem.config import RunConfig
from tandem.datasets import DataBundle, load_dataset
from tandem.models import build_model, resolve_device
from tandem.options import ConfigError
from tandem.tracking import Tracker

__all__ = ["CHECKPOINT_NAME", "ServerRun"]

T = TypeVar("T")
#: File name of a run's server checkpoint, in its run folder.
CHECKPOINT_NAME = "checkpoint.npz"


@dataclass
class ServerRun:
    """One run of a method on the ServerApp side.

    Attributes
    ----------
    grid : MeteredGrid
        The engine's Grid, metered: every payload is counted in ``ledger``.
    ledger : ByteLedger
        Bytes per node, direction and round.
    cfg : RunConfig
        The validated run config (the method's own section in ``cfg.options``,
        typed by :meth:`options_as`).
    tracker : Tracker
        Metrics sink (JSON lines, console, W&B).
    """

    grid: MeteredGrid
    ledger: ByteLedger
    cfg: RunConfig
    tracker: Tracker
    _rejected: dict[int, int] = field(default_factory=dict)
    _dropouts: dict[int, int] = field(default_factory=dict)
    _cum: dict[str, int] = field(
        default_factory=lambda: {"bytes-up": 0, "bytes-down": 0}
    )

    @classmethod
    def open(cls, cfg: RunConfig, grid: Grid, run_id: int) -> ServerRun:
        """A run of ``cfg`` on ``grid``: metered Grid, fresh ledger, tracker."""
        tracker = Tracker(
            cfg.tracking,
            run_name=f"{cfg.method}-{run_id}",
            group=str(run_id),
            config=cfg.as_flat(),
            total_rounds=cfg.num_server_rounds,
        )
        ledger = ByteLedger()
        return cls(MeteredGrid(grid, ledger), ledger, cfg, tracker)

    def options_as(self, kind: type[T]) -> T:
        """The method's own option section, checked to be a ``kind``.

        Raises
        ------
        TypeError
            If the run's method has no section of that class.
        """
        return self.cfg.options_as(kind)

    @property
    def options(self) -> Any:
        """The method's own option section, untyped (prefer :meth:`options_as`)."""
        return self.cfg.options

    def wait_for_nodes(
        self, minimum: int | None = None, timeout: float | None = None
    ) -> list[int]:
        """The connected node ids, once at least ``minimum`` are connected.

        Parameters
        ----------
        minimum : int, optional
            Nodes to wait for (default: ``min-nodes``).
        timeout : float, optional
            Seconds to wait at most (default: no limit, as Flower's strategies).

        Raises
        ------
        RuntimeError
            If ``timeout`` passes with fewer nodes connected.
        """
        minimum = self.cfg.min_nodes if minimum is None else minimum
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= minimum:
                return nodes
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} nodes connected, need {minimum}")
            time.sleep(0.5)

    @property
    def checkpoint_path(self) -> Path:
        """Where this run's server checkpoint is written."""
        return self.tracker.run_dir / CHECKPOINT_NAME

    def save_checkpoint(
        self, arrays: Mapping[str, np.ndarray], counters: Mapping[str, Any]
    ) -> Path:
        """Write the method's ``arrays`` and JSON-able ``counters`` atomically.

        The run's method and seed are added to the counters, so that
        :meth:`resumed` refuses a checkpoint of another method.
        """
        state = {"method": self.cfg.method, "seed": self.cfg.seed, **counters}
        return save_checkpoint(self.checkpoint_path, arrays, state)

    def resumed(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The checkpoint named by ``resume`` (arrays, counters), or ``None``.

        Raises
        ------
        ConfigError
            Naming ``resume``: no usable checkpoint there, or one of another
            method.
        """
        if not self.cfg.resume:
            return None
        return resume_from(self.cfg.resume, self.cfg.method)

    def resume_mismatch(self, reason: object) -> ConfigError:
        """The error for a checkpoint that does not fit the model: ``reason``."""
        return ConfigError(
            "resume", self.cfg.resume, f"does not fit the model: {reason}"
        )

    def data(self) -> DataBundle:
        """The run's dataset (the test split is the server's evaluation set)."""
        return load_dataset(self.cfg.data)

    def build_model(self) -> nn.Sequential:
        """A fresh model as every node builds it (same seed, same weights)."""
        data = self.data()
        return build_model(
            self.cfg.train.model,
            data.input_shape,
            data.num_classes,
            self.cfg.seed,
            tokens=data.tokens,
        )

    @property
    def device(self) -> torch.device:
        """Where the cloud side computes (``device`` key; ``auto`` picks CUDA)."""
        return resolve_device(self.cfg.train.device)

    def report_round(self, round_: int, metrics: Mapping[str, float | int]) -> None:
        """Log a round: the method's metrics plus the ledger's bytes for it."""
        totals = self.ledger.totals(round_)
        self._cum["bytes-up"] += totals["bytes-up"]
        self._cum["bytes-down"] += totals["bytes-down"]
        for node_id, nbytes in sorted(self.ledger.per_node(round_).items()):
            self.tracker.log_event(
                "bytes", {"round": round_, "node-id": node_id, **nbytes}
            )
        self.tracker.log_round(
            round_,
            {
                **metrics,
                **totals,
                "rejected-replies": self.rejected(round_),
                "cum-bytes-up": self._cum["bytes-up"],
                "cum-bytes-down": self._cum["bytes-down"],
            },
        )

    def reject(self, round_: int, node_id: int, reason: str) -> None:
        """Count and log a reply rejected as malformed; nothing else changes."""
        self._rejected[round_] = self._rejected.get(round_, 0) + 1
        self.tracker.log_event(
            "rejected", {"round": round_, "node-id": node_id, "reason": reason}
        )
        self.tracker.warn(
            f"round {round_}: rejected reply from node {node_id}: {reason}"
        )

    def dropout(self, round_: int, node_id: int, reason: str) -> None:
        """Count and log a request the node did not answer (error or timeout)."""
        self._dropouts[round_] = self._dropouts.get(round_, 0) + 1
        self.tracker.log_event(
            "dropout", {"round": round_, "node-id": node_id, "reason": reason}
        )
        self.tracker.warn(f"round {round_}: node {node_id} dropped out: {reason}")

    def dropouts(self, round_: int | None = None) -> int:
        """Requests not answered in ``round_`` (or in the whole run)."""
        if round_ is None:
            return sum(self._dropouts.values())
        return self._dropouts.get(round_, 0)

    def rejected(self, round_: int | None = None) -> int:
        """Replies rejected in ``round_`` (or in the whole run)."""
        if round_ is None:
            return sum(self._rejected.values())
        return self._rejected.get(round_, 0)

    @property
    def cumulative_bytes(self) -> dict[str, int]:
        """Bytes up and down reported so far."""
        return dict(self._cum)
