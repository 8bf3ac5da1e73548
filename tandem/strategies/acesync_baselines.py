"""ACE-Sync's baselines (seed 004, Table 1), in the same harness.

- ``fullsync``: every group in float32 every round, the same local steps as
  ACE-Sync: the compression wrapper with the single option ``full`` around
  Flower's ``FedAvg``, weights by data size. Same wire format and checks as
  ACE-Sync, so byte figures compare like with like; with nothing lost the
  aggregate is FedAvg's (up to float32 rounding of ``θ + (θ_k − θ)``).
- ``topk``: every group as its top ``acesync-topk-ratio`` fraction of entries
  by magnitude (Lin et al. 2018, "Deep Gradient Compression"), with error
  feedback ``γ = acesync-gamma`` (Stich et al. 2018); fixed ratio, no
  bandwidth adaptation, no importance.
- ``fedavg-periodic``: Flower's FedAvg syncing every ``acesync-period`` rounds'
  worth of local steps: each round runs ``acesync-period × local-steps``
  steps, full precision both ways. ``num-server-rounds`` counts syncs, so a
  run as long in SGD steps as a ``fullsync`` run of ``R`` rounds has
  ``R / acesync-period`` rounds.
- Flower's FedAvg itself is ``method=fedavg``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from tandem.compression.codecs import Option
from tandem.protocol.acesync import AceSyncOptions
from tandem.server_context import ServerRun
from tandem.strategies.compressed import CompressedUpdates
from tandem.strategies.fedavg import run as run_fedavg

__all__ = ["run_fedavg_periodic", "run_fullsync", "run_topk"]


def _run_wrapped(srv: ServerRun, **wrapper: Any) -> None:
    """FedAvg wrapped in :class:`CompressedUpdates` with ``wrapper`` settings."""
    built: list[CompressedUpdates] = []

    def build(
        *,
        on_reject: Callable[[int, int, str], None],
        on_dropout: Callable[[int, int, str], None],
        max_examples: int,
        **kwargs: Any,
    ) -> CompressedUpdates:
        strategy = CompressedUpdates(
            FedAvg(**kwargs),
            on_reject=on_reject,
            on_dropout=on_dropout,
            max_examples=max_examples,
            **wrapper,
        )
        built.append(strategy)
        return strategy

    def finish(_final: ArrayRecord) -> dict[str, object]:
        strategy = built[0]
        nodes = max(len(strategy.bytes_down), 1)
        return {
            **strategy.compression_stats(),
            "steps-per-edge": strategy.stats.steps / nodes,
        }

    run_fedavg(srv, build, local_steps=srv.cfg.train.local_steps, on_finish=finish)


def run_fullsync(srv: ServerRun) -> None:
    """``method=fullsync``: float32 updates every round through the wrapper."""
    options = srv.options_as(AceSyncOptions)
    _run_wrapped(
        srv,
        codecs=(Option("full"),),
        chunk=options.chunk,
        gamma=0.0,
        importance="uniform",
    )


def run_topk(srv: ServerRun) -> None:
    """``method=topk``: fixed-ratio top-k per group with error feedback."""
    options = srv.options_as(AceSyncOptions)
    _run_wrapped(
        srv,
        codecs=(Option("topk", options.topk_ratio),),
        chunk=options.chunk,
        gamma=options.gamma,
        importance="uniform",
    )


def run_fedavg_periodic(srv: ServerRun) -> None:
    """``method=fedavg-periodic``: FedAvg with ``period × local-steps`` per round."""
    options = srv.options_as(AceSyncOptions)
    run_fedavg(srv, local_steps=options.period * srv.cfg.train.local_steps)
