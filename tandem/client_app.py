"""tandem's ClientApp: thin routing from Flower message types to method handlers.

Each message's run config is parsed into a :class:`RunConfig`, the method's
handler for the message type (``train``, ``evaluate``, ``train.<action>`` ...)
is looked up in the registry, and the handler does the work.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from tandem.config import RunConfig
from tandem.registry import METHODS, get_method

__all__ = ["app"]

app = ClientApp()


def dispatch(msg: Message, context: Context) -> Message:
    """Route ``msg`` to the configured method's handler for its type."""
    cfg = RunConfig.from_flat(dict(context.run_config))
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
