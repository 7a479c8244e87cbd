"""Whether an update may enter its round: its numbers, its tensors, and its F_0 against the node's.

Pure checks (no lock, no state but what they are given): the coordinator runs :func:`admit` in the
RPC thread before it takes its lock, and :func:`check_initial_loss` under it.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import replace

import torch

from fedgradnorm.algorithm import (
    MAX_LOSS_RATIO,
    AlgorithmError,
    ClientUpdate,
    check_update_shape,
    combined_norm,
    finite_norms,
)
from fedgradnorm.reasons import Reason
from fedgradnorm.services.aggregator.config import NAME_RE
from fedgradnorm.services.aggregator.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from fedgradnorm.services.aggregator.membership import MAX_SAMPLES
from fedgradnorm.services.domain import Submission

LOSS_RATIO_RTOL = 1e-4
FLOAT32_MAX = 3.4028234663852886e38
MAX_TEST_METRICS = 8


def _finite(name: str, value: float, positive: bool = False) -> float:
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0) or v < 0:
        kind = "finite and positive" if positive else "finite and non-negative"
        raise InvalidArgument(f"{name} must be {kind}, got {value}", Reason.BAD_VALUE)
    return v


def check_numbers(sub: Submission) -> float:
    """Raise InvalidArgument unless the update's scalars are usable; returns its loss ratio."""
    loss = _finite("loss", sub.loss)
    f0 = _finite("initial_loss", sub.initial_loss, positive=True)
    ratio = _finite("loss_ratio", sub.loss_ratio, positive=True)
    if ratio > MAX_LOSS_RATIO:
        raise InvalidArgument(f"loss_ratio {ratio} is above {MAX_LOSS_RATIO:g}", Reason.BAD_VALUE)
    if abs(ratio - loss / f0) > LOSS_RATIO_RTOL * max(1.0, ratio):
        raise InvalidArgument(f"loss_ratio {ratio} is not loss / initial_loss = {loss / f0}", Reason.BAD_VALUE)
    if not 1 <= sub.num_samples <= MAX_SAMPLES:
        raise InvalidArgument(f"num_samples must be in [1, {MAX_SAMPLES}], got {sub.num_samples}", Reason.BAD_VALUE)
    if sub.test_loss is not None:
        _finite("test_loss", sub.test_loss)
    if len(sub.test_metrics) > MAX_TEST_METRICS:
        raise InvalidArgument(f"at most {MAX_TEST_METRICS} test metrics per update", Reason.BAD_VALUE)
    for k, v in sub.test_metrics.items():
        if not NAME_RE.match(k):
            raise InvalidArgument(f"test metric name {k[:64]!r} must match {NAME_RE.pattern}", Reason.BAD_VALUE)
        _finite(f"test metric {k!r}", v)
    return ratio


def admit(sub: Submission, omega: Mapping[str, torch.Tensor], omega_tilde: Sequence[str]) -> Submission:
    """The update if its numbers and tensors are usable, with its two norms (the whole update's, for
    the outlier bound, and omega_tilde's, for the weight rule); InvalidArgument otherwise."""
    update = ClientUpdate(sub.node_id, sub.gradient, check_numbers(sub))
    try:
        check_update_shape(update, omega)
        # One float64 pass per tensor gives the finiteness check and both norms (omega_tilde's as
        # grad_norm computes it: the same per-tensor norms, summed in the same order).
        norms = finite_norms(update, omega)
    except AlgorithmError as e:
        raise InvalidArgument(str(e), Reason.BAD_TENSOR) from e
    return replace(sub, norm=combined_norm(norms, list(sub.gradient)), tilde_norm=combined_norm(norms, omega_tilde))


def max_norm(shapes: Mapping[str, Sequence[int]]) -> float:
    """The largest l2 norm a finite float32 tensor of these shapes can have."""
    return math.sqrt(sum(math.prod(s) for s in shapes.values())) * FLOAT32_MAX


def admit_relayed(sub: Submission, bound: float) -> Submission:
    """An update a relay validated and holds (no gradient here): its scalars and its two norms,
    which cannot exceed ``bound`` (:func:`max_norm` of omega: what a finite gradient can have)."""
    check_numbers(sub)
    for name, value in (("norm", sub.norm), ("tilde_norm", sub.tilde_norm)):
        if not (math.isfinite(value) and 0 <= value <= bound):
            raise InvalidArgument(
                f"{name} {value} is not the norm of a finite float32 gradient (0 to {bound:.3g})", Reason.BAD_VALUE
            )
    if sub.tilde_norm > sub.norm * (1 + 1e-9):
        raise InvalidArgument(
            f"tilde_norm {sub.tilde_norm} is above the update's norm {sub.norm}: not the norms of one update",
            Reason.BAD_VALUE,
        )
    return sub


def check_entry(
    node_id: str, round_: int, open_round: int | None, submitted: Container[str], participants: Container[str]
) -> None:
    """Whether ``node_id`` may send its update for ``round_`` to a round ``open_round`` (None: no
    round open for submits) that has ``submitted`` and ``participants``: the aggregator's and a
    relay's rule, one set of refusals."""
    if open_round is None or open_round != round_:
        current = "no round is open" if open_round is None else f"round {open_round} is open"
        raise FailedPrecondition(f"round {round_} is not open for submits ({current})", Reason.WRONG_ROUND)
    if node_id in submitted:
        raise AlreadyExists(f"node {node_id!r} already submitted to round {round_}", Reason.DUPLICATE)
    if node_id not in participants:
        raise FailedPrecondition(
            f"node {node_id!r} is not a participant of round {round_}; it joins the next round",
            Reason.NOT_PARTICIPANT,
        )


def check_initial_loss(stored: float | None, sub: Submission) -> None:
    """A node's first update has F~ = 1 (its loss is F_0, Algorithm 2); later ones carry the F_0
    the aggregator first accepted (``stored``, None before the node's first update)."""
    if stored is None:
        if not math.isclose(sub.loss, sub.initial_loss, rel_tol=1e-6) or abs(sub.loss_ratio - 1.0) > LOSS_RATIO_RTOL:
            raise InvalidArgument(
                f"the first update of node {sub.node_id!r} must have loss = initial_loss and loss_ratio 1 "
                f"(got loss {sub.loss}, initial_loss {sub.initial_loss}, loss_ratio {sub.loss_ratio})",
                Reason.BAD_VALUE,
            )
    elif not math.isclose(sub.initial_loss, stored, rel_tol=1e-6):
        raise InvalidArgument(
            f"initial_loss {sub.initial_loss} differs from the stored F_0 {stored} of node {sub.node_id!r}",
            Reason.BAD_VALUE,
        )
