"""What a method's cloud side gets from the ServerApp: :class:`ServerRun`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Context
from torch import nn

from tandem.accounting import ByteLedger, MeteredGrid
from tandem.config import RunConfig
from tandem.datasets import DataBundle, load_dataset
from tandem.models import build_model, resolve_device
from tandem.tracking import Tracker

__all__ = ["ServerRun"]


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
        The validated run config.
    options : Any
        The method's own option section (``None`` if it has none).
    tracker : Tracker
        Metrics sink (JSON lines, console, W&B).
    context : Context
        Flower's ServerApp context.
    """

    grid: MeteredGrid
    ledger: ByteLedger
    cfg: RunConfig
    options: Any
    tracker: Tracker
    context: Context
    _rejected: dict[int, int] = field(default_factory=dict)
    _dropouts: dict[int, int] = field(default_factory=dict)
    _cum: dict[str, int] = field(
        default_factory=lambda: {"bytes-up": 0, "bytes-down": 0}
    )

    def data(self) -> DataBundle:
        """The run's dataset (the test split is the server's evaluation set)."""
        return load_dataset(self.cfg.data)

    def build_model(self) -> nn.Sequential:
        """A fresh model as every node builds it (same seed, same weights)."""
        data = self.data()
        return build_model(
            self.cfg.train.model, data.input_shape, data.num_classes, self.cfg.seed
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
