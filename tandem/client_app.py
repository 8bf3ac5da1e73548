"""tandem's ClientApp: thin routing from Flower message types to method handlers.

The run config is parsed once per run and process (:func:`run_config_of`); the
method's handler for the message type (``train``, ``evaluate``,
``train.<action>`` ...) is looked up in the registry, and the handler does the
work with the parsed :class:`RunConfig` (its method section in ``cfg.options``).
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from tandem.config import RunConfig
from tandem.options import Scalar
from tandem.registry import METHODS, get_method

__all__ = ["app", "dispatch", "run_config_of"]

app = ClientApp()


@lru_cache(maxsize=8)
def _parsed(run_id: int, items: tuple[tuple[str, Scalar], ...]) -> RunConfig:
    return RunConfig.from_flat(dict(items))


def run_config_of(context: Context) -> RunConfig:
    """The node's run config, parsed and validated once per run in this process.

    Keyed by the run id and the config's items, so a simulation worker that
    serves many messages (or several runs) parses each config once. A bad
    value raises :class:`~tandem.options.ConfigError` (not cached).
    """
    items = tuple(sorted(context.run_config.items()))
    return _parsed(context.run_id, items)  # type: ignore[arg-type]


def dispatch(msg: Message, context: Context) -> Message:
    """Route ``msg`` to the configured method's handler for its type."""
    cfg = run_config_of(context)
    handlers = get_method(cfg.method).client_handlers()
    message_type = msg.metadata.message_type
    handler = handlers.get(message_type)
    if handler is None:
        raise ValueError(
            f"method '{cfg.method}' has no handler for message type "
            f"'{message_type}' (handles: {', '.join(sorted(handlers))})"
        )
    return handler(msg, context, cfg)


# Register every message type any method handles: "train", "evaluate",
# "query" and "<category>.<action>".
for _type in sorted({t for spec in METHODS.values() for t in spec.client_handlers()}):
    _category, _, _action = _type.partition(".")
    getattr(app, _category)(_action or "default")(dispatch)
