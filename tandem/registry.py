"""The method registry: run-config ``method`` name -> cloud side and edge side.

A method is a strategy module (cloud side, run inside the ServerApp) and a
client module (edge side, message handlers inside the ClientApp), plus an
optional option section. Adding one is adding those modules and one
:class:`MethodSpec` line to :data:`METHODS`. Unknown names are rejected with
the list of known ones.

Every part is named by a ``"module:attribute"`` string and imported only when
asked for, so reading the table (as :mod:`tandem.config` does) imports no
method module: this module depends on :mod:`tandem.options` alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tandem.options import registered, section_keys

if TYPE_CHECKING:
    from flwr.app import Context, Message

    from tandem.config import RunConfig
    from tandem.server_context import ServerRun

__all__ = [
    "METHODS",
    "ClientHandler",
    "MethodSpec",
    "get_method",
    "method_option_classes",
    "method_option_keys",
]

#: Edge-side handler: (message, node context, run config) -> reply message.
ClientHandler = Callable[["Message", "Context", "RunConfig"], "Message"]


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class MethodSpec:
    """Where a method's two halves live.

    Parameters
    ----------
    name : str
        The run-config value of ``method``.
    summary : str
        One line for ``--help`` texts and the README.
    server : str
        ``"module:function"``; the function takes a :class:`ServerRun` and runs
        the whole method on the ServerApp side.
    client : str
        ``"module:HANDLERS"``; a mapping from Flower message type (``"train"``,
        ``"evaluate"``, ``"train.<action>"``) to a :data:`ClientHandler`.
    options_ref : str | None (default: None)
        ``"module:Class"`` of a frozen dataclass of :func:`tandem.config.option`
        fields holding the method's own run-config keys.
    """

    name: str
    summary: str
    server: str
    client: str
    options_ref: str | None = None

    @property
    def options(self) -> type | None:
        """The method's option dataclass, if it has one."""
        return None if self.options_ref is None else _load(self.options_ref)

    def run_server(self, run: ServerRun) -> None:
        """Run the method's cloud side."""
        _load(self.server)(run)

    def client_handlers(self) -> dict[str, ClientHandler]:
        """The method's edge-side handlers by message type."""
        return dict(_load(self.client))


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="fedavg",
            summary="Flower's FedAvg (McMahan et al. 2017): the baseline.",
            server="tandem.strategies.fedavg:run",
            client="tandem.clients.fedavg:HANDLERS",
        ),
        MethodSpec(
            name="syncsgd",
            summary="Synchronous SGD: one step per exchange (Flower's FedAvgM).",
            server="tandem.strategies.syncsgd:run",
            client="tandem.clients.fedavg:HANDLERS",
        ),
        MethodSpec(
            name="centralized",
            summary="Raw data uploaded once, the cloud trains: the ceiling.",
            server="tandem.strategies.centralized:run",
            client="tandem.clients.centralized:HANDLERS",
        ),
        MethodSpec(
            name="simultrain",
            summary="Split training streaming cut-layer activations, pipelined.",
            server="tandem.strategies.simultrain_run:run",
            client="tandem.clients.simultrain:HANDLERS",
            options_ref="tandem.protocol.simultrain:SimulTrainOptions",
        ),
        MethodSpec(
            name="acesync",
            summary="ACE-Sync: importance-ranked, bandwidth-budgeted compressed "
            "updates with error feedback, divergence control and clustering.",
            server="tandem.strategies.acesync:run",
            client="tandem.clients.acesync:HANDLERS",
            options_ref="tandem.protocol.acesync:AceSyncOptions",
        ),
        MethodSpec(
            name="fullsync",
            summary="Full-precision updates every round (ACE-Sync's harness).",
            server="tandem.strategies.acesync_baselines:run_fullsync",
            client="tandem.clients.acesync:HANDLERS",
            options_ref="tandem.protocol.acesync:AceSyncOptions",
        ),
        MethodSpec(
            name="topk",
            summary="Top-k sparsified updates at a fixed ratio, error feedback.",
            server="tandem.strategies.acesync_baselines:run_topk",
            client="tandem.clients.acesync:HANDLERS",
            options_ref="tandem.protocol.acesync:AceSyncOptions",
        ),
        MethodSpec(
            name="fedavg-periodic",
            summary="FedAvg syncing every acesync-period rounds' worth of steps.",
            server="tandem.strategies.acesync_baselines:run_fedavg_periodic",
            client="tandem.clients.fedavg:HANDLERS",
            options_ref="tandem.protocol.acesync:AceSyncOptions",
        ),
    )
}


def get_method(name: str) -> MethodSpec:
    """Look a method up by name.

    Raises
    ------
    ConfigError
        If no method of that name is registered.
    """
    return registered(METHODS, "method", name)


def method_option_classes() -> tuple[type, ...]:
    """Every registered method's option section, each class once, in table order."""
    classes: list[type] = []
    for spec in METHODS.values():
        kind = spec.options
        if kind is not None and kind not in classes:
            classes.append(kind)
    return tuple(classes)


def method_option_keys() -> tuple[str, ...]:
    """Run-config keys declared by every registered method's options."""
    return tuple(key for kind in method_option_classes() for key in section_keys(kind))
