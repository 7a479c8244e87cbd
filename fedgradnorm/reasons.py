"""Why a request was refused or an update not used: one machine-readable code per reason.

The aggregator's errors carry one, its metrics label outcomes with it, and a refused call carries it
to the client as the trailing metadata ``fedgradnorm-reason`` (beside the gRPC status and a human
message), so a client decides on a code, never on the words of a message. The wire module's
payload checks use the same codes.
"""

from __future__ import annotations

import enum

REASON_KEY = "fedgradnorm-reason"  # the trailing-metadata key of a refused call


class Reason(enum.StrEnum):
    # Register
    BAD_ENROLLMENT = "bad_enrollment"  # enrolment token missing or wrong
    RATE_LIMITED = "rate_limited"  # too many attempts or new names from one peer
    NAME_TAKEN = "name_taken"
    BAD_TASK = "bad_task"  # another federation, or a task the federation does not have
    NETWORK_MISMATCH = "network_mismatch"  # the node's shared network is not the aggregator's
    BAD_NAME = "bad_name"
    FULL = "full"  # max_nodes registered
    # Sessions
    UNKNOWN_NODE = "unknown_node"  # register (again) without an id
    BAD_TOKEN = "bad_token"
    DEREGISTERED = "deregistered"  # register again with the stored id
    # Rounds
    WRONG_ROUND = "wrong_round"
    NOT_PARTICIPANT = "not_participant"  # joined after the round opened: the next one
    DUPLICATE = "duplicate"  # a second update to the same round
    BUSY = "busy"  # another stream of the same kind of this node is in flight
    REPLACED = "replaced"  # a newer FetchRound of the same node took over this one
    # Content of a request or update
    BAD_VALUE = "bad_value"
    BAD_TENSOR = "bad_tensor"
    BAD_STREAM = "bad_stream"
    CHUNK_TOO_LARGE = "chunk_too_large"
    # Payload framing (fedgradnorm.wire)
    BAD_DTYPE = "bad_dtype"
    DUPLICATE_TENSOR = "duplicate_tensor"
    UNKNOWN_TENSOR = "unknown_tensor"
    MISSING_TENSOR = "missing_tensor"
    ORDER_MISMATCH = "order_mismatch"
    SHAPE_MISMATCH = "shape_mismatch"
    SIZE_MISMATCH = "size_mismatch"
    TOO_LARGE = "too_large"
    OVERFLOW = "overflow"
    TRUNCATED = "truncated"
    NOT_FINITE = "not_finite"
    # Cut off or left out after admission
    DEADLINE = "deadline"  # an upload still running at its round's deadline
    CANCELLED = "cancelled"  # an upload the client abandoned
    DROPPED_NORM = "dropped_norm"  # accepted, then left out at the close: norm above the bound
    # Relays (the Uplink service)
    NOT_RELAY = "not_relay"  # the caller's certificate does not carry the relay role
    UNKNOWN_RELAY = "unknown_relay"  # no such relay session: attach (again)
    WRONG_ATTEMPT = "wrong_attempt"  # a partial sum for weights that are no longer offered
    RELAY_LOST = "relay_lost"
    UPSTREAM = "upstream_unavailable"  # a relay could not reach the aggregator for the call  # a relay's partial sum did not arrive: its nodes' updates were left out
    # The service
    LOADING = "loading"  # the aggregator is loading its state
