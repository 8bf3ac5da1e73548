"""Benchmark suites: which method variants run side by side.

Every variant of a suite runs on the same workload (dataset, partitions,
model, seeds, number of nodes); only its run-config overrides differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["SUITES", "Suite", "Variant"]


@dataclass(frozen=True)
class Variant:
    """One column of the comparison.

    Attributes
    ----------
    label : str
        Name in tables, plots and ``results.json``.
    overrides : Mapping[str, object]
        Run-config keys for this variant (``method`` at least).
    schedule : str
        How its emulated time is computed: ``"sync"`` re-times recorded
        synchronous rounds (valid because their order of events does not
        depend on timing).
    """

    label: str
    overrides: Mapping[str, object]
    schedule: str = "sync"

    @property
    def local_steps(self) -> int:
        """SGD steps per node per round."""
        return int(self.overrides.get("local-steps", 50))  # type: ignore[call-overload]


@dataclass(frozen=True)
class Suite:
    """A named set of variants and the workload defaults they share."""

    name: str
    description: str
    variants: tuple[Variant, ...]
    defaults: Mapping[str, object] = field(default_factory=dict)


SUITES: dict[str, Suite] = {
    "fedavg": Suite(
        name="fedavg",
        description="Flower's FedAvg with 10 vs 50 local steps per round",
        variants=(
            Variant("fedavg-k10", {"method": "fedavg", "local-steps": 10}),
            Variant("fedavg-k50", {"method": "fedavg", "local-steps": 50}),
        ),
    ),
}
