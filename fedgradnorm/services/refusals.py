"""A refused call on the wire: its gRPC status, a bounded message, and the machine-readable reason
(trailing metadata ``fedgradnorm-reason``) that a client decides on. Both services use it."""

from __future__ import annotations

from typing import NoReturn

import grpc

from fedgradnorm.reasons import REASON_KEY, Reason
from fedgradnorm.wire import WireError

MAX_STATUS_MESSAGE = 512  # status details echo request fields: keep them within gRPC's metadata limits


def clip(text: str) -> str:
    return text if len(text) <= MAX_STATUS_MESSAGE else text[: MAX_STATUS_MESSAGE - 3] + "..."


def refuse(context: grpc.ServicerContext, code: grpc.StatusCode, reason: Reason, message: str) -> NoReturn:
    """End the call with ``code``, the reason as trailing metadata, and the message (clipped)."""
    context.set_trailing_metadata(((REASON_KEY, reason.value),))
    context.abort(code, clip(message))
    raise AssertionError("context.abort returned")  # it raises; this line only tells type checkers


def wire_status(error: WireError) -> grpc.StatusCode:
    """RESOURCE_EXHAUSTED for a payload above the limit, INVALID_ARGUMENT for every other framing error."""
    return grpc.StatusCode.RESOURCE_EXHAUSTED if error.code is Reason.TOO_LARGE else grpc.StatusCode.INVALID_ARGUMENT


def reason_of(error: grpc.RpcError) -> Reason | None:
    """The reason a refused call carried, or None (a transport error, an older aggregator)."""
    trailing = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    for key, value in trailing or ():
        if key == REASON_KEY:
            try:
                return Reason(value)
            except ValueError:
                return None
    return None
