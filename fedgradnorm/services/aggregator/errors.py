"""The aggregator's refusals. The class is the kind (the servicer maps each onto one gRPC status
code); ``reason`` is the machine-readable code (fedgradnorm.reasons) that metrics label outcomes
with and that the refused call carries to the client."""

from __future__ import annotations

from fedgradnorm.reasons import Reason


class CoordinatorError(Exception):
    def __init__(self, message: str, reason: Reason) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidArgument(CoordinatorError):
    pass


class Unauthenticated(CoordinatorError):
    pass


class NotFound(CoordinatorError):
    pass


class AlreadyExists(CoordinatorError):
    pass


class FailedPrecondition(CoordinatorError):
    pass


class ResourceExhausted(CoordinatorError):
    pass


class PermissionDenied(CoordinatorError):
    pass


class Unavailable(CoordinatorError):
    """A relay could not reach the aggregator for a node's call (the node retries)."""
