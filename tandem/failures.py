"""Fail fast: stop a run whose nodes all fail the same way, and say why.

A ClientApp that raises (a bad node config, data it cannot load) answers with
an error reply. When every node asked in a round answers with the *same* error,
no later round can go differently, so the run stops at once:
:func:`stop_if_all_failed` raises :class:`RunFailedError`, whose message is that one
error. Flower 1.41 turns an exception out of the ServerApp into the run status
``finished:failed`` with the details ``ServerApp failed with exception:
<message>`` (``flwr list``, ``flwr log`` and the streamed log show it).

Only errors the ClientApp itself raised count (Flower's error codes
``LOAD_CLIENT_APP_EXCEPTION`` and ``CLIENT_APP_RAISED_EXCEPTION``); timeouts and
errors the SuperLink makes for unreachable nodes do not stop a run, since a
node may come back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping

from flwr.app import Message
from flwr.common.constant import ErrorCode

__all__ = [
    "RunFailedError",
    "app_error",
    "app_errors",
    "common_failure",
    "run_reporting_failure",
    "stop_if_all_failed",
    "tidy_reason",
]

#: Error codes of failures the ClientApp raised itself.
APP_ERROR_CODES = frozenset(
    {ErrorCode.LOAD_CLIENT_APP_EXCEPTION, ErrorCode.CLIENT_APP_RAISED_EXCEPTION}
)

# Flower writes a ClientApp's exception as "<class 'X'>:<'message'>"; the
# simulation engine wraps it once more in a ClientAppException.
_WRAPPED = re.compile(r"^<class '[\w.]+'>:<'(.*)'>$", re.DOTALL)
_SIMULATION = re.compile(r"^\s*Exception ClientAppException occurred\. Message: ")


class RunFailedError(RuntimeError):
    """Every node of a round failed with the same error: the run cannot go on."""


def tidy_reason(reason: str) -> str:
    """The ClientApp's own message out of Flower's error reason.

    ``"<class 'flwr...ClientAppException'>:<'\\nException ClientAppException
    occurred. Message: bad key'>"`` and ``"<class 'ValueError'>:<'bad key'>"``
    both give ``"bad key"``; anything else is returned stripped.
    """
    text = reason.strip()
    for _ in range(3):  # unwrap nested layers
        match = _WRAPPED.match(text)
        if match is None:
            break
        text = _SIMULATION.sub("", match.group(1)).strip()
    return text


def app_error(reply: Message) -> str | None:
    """The tidy reason of a reply the ClientApp failed on, else ``None``."""
    if not reply.has_error() or reply.error.code not in APP_ERROR_CODES:
        return None
    return tidy_reason(reply.error.reason)


def app_errors(asked: Iterable[int], replies: Iterable[Message]) -> dict[int, str]:
    """``{node: reason}`` for the nodes ``asked`` whose ClientApp failed."""
    asked = set(asked)
    out = {}
    for reply in replies:
        reason = app_error(reply)
        if reason is not None and reply.metadata.src_node_id in asked:
            out[reply.metadata.src_node_id] = reason
    return out


def common_failure(asked: Collection[int], errors: Mapping[int, str]) -> str | None:
    """The one error every node in ``asked`` failed with, else ``None``.

    ``None`` when nothing was asked, when a node did not fail (or failed
    otherwise than by its ClientApp's error), or when the errors differ.
    """
    if not asked or any(node not in errors for node in asked):
        return None
    reasons = {errors[node] for node in asked}
    return reasons.pop() if len(reasons) == 1 else None


def stop_if_all_failed(
    round_: int, asked: Collection[int], errors: Mapping[int, str]
) -> None:
    """Raise :class:`RunFailedError` if every node asked in ``round_`` failed alike.

    Raises
    ------
    RunFailedError
        ``"round R: every node (N) failed: <the error>"``.
    """
    reason = common_failure(asked, errors)
    if reason is not None:
        raise RunFailedError(
            f"round {round_}: every node ({len(asked)}) failed: {reason}"
        )


def run_reporting_failure(
    fail: Callable[[str], None], body: Callable[[], None]
) -> None:
    """Run ``body``; on an exception, ``fail(message)`` first, then re-raise.

    The ServerApp wraps the method in this so the run's own record (console,
    ``metrics.jsonl``, W&B) ends with the reason Flower reports as the status
    details.
    """
    try:
        body()
    except Exception as err:
        fail(str(err) or type(err).__name__)
        raise
