"""A task: what one client learns, with which loss and metric; the built-in losses and metrics.

A task names its loss and metric: a built-in (:data:`LOSSES`, :data:`METRICS`) or a user callable
``package.module:attr``. A loss is ``(prediction, target) -> scalar tensor`` (differentiable); a metric
is ``(prediction, target) -> float``. The targets a task reads are class indices (int64) or real
rows (float32): built-in losses imply which; a user loss declares it (``target``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.nn import functional

from fedgradnorm.factory import Factory, resolve

TargetKind = Literal["class", "real"]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], float]


def _bce(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits; a 1-column head may predict a 1-D target."""
    return functional.binary_cross_entropy_with_logits(prediction, target.reshape(prediction.shape))


def accuracy(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Share of samples whose arg-max class is the target."""
    return float((prediction.argmax(dim=1) == target).float().mean())


def binary_accuracy(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Share of logits on the target's side of 0 (targets 0 or 1), over every output."""
    return float(((prediction > 0).float() == target.reshape(prediction.shape)).float().mean())


def mse(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return float(functional.mse_loss(prediction, target.reshape(prediction.shape)))


def mae(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return float(functional.l1_loss(prediction, target.reshape(prediction.shape)))


def landmark_error(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean Euclidean landmark error in the targets' unit (MTFL: pixels; columns x1..xk, y1..yk)."""
    diff = prediction - target
    half = diff.shape[1] // 2
    return float(torch.sqrt(diff[:, :half] ** 2 + diff[:, half:] ** 2).mean())


# name -> (loss, the targets it reads)
LOSSES: dict[str, tuple[Loss, TargetKind]] = {
    "cross_entropy": (functional.cross_entropy, "class"),
    "mse": (functional.mse_loss, "real"),
    "bce": (_bce, "real"),
}
# name -> (metric, higher is better)
METRICS: dict[str, tuple[Metric, bool]] = {
    "accuracy": (accuracy, True),
    "binary_accuracy": (binary_accuracy, True),
    "mse": (mse, False),
    "mae": (mae, False),
    "landmark_error_px": (landmark_error, False),
}


@dataclass(frozen=True)
class TaskSpec:
    """One task of a federation.

    ``loss`` and ``metric`` are built-in names or ``package.module:attr`` callables; ``target`` says
    what the data's targets are (needed for a user loss; a built-in loss implies it); ``column`` is
    the target column a data file holds for the task (empty: the task's name, or the file's only
    column); ``head`` builds the personal head (None: one linear layer); ``higher_is_better`` orders
    a user metric (a built-in metric knows). ``standardize`` (real targets only) has each client learn
    its targets centred on its own training mean and scaled to unit variance, column by column: the
    loss is computed in those units, while the head's outputs (and so the metric and an exported
    model's predictions) stay in the data's units (see :class:`fedgradnorm.models.StandardizedHead`).
    ``loss_scale`` multiplies the task's loss, and so its gradient (an experiment's dial; 1 otherwise).
    """

    name: str
    outputs: int
    loss: str = "cross_entropy"
    metric: str = "accuracy"
    target: TargetKind | None = None
    column: str = ""
    head: Factory | None = None
    higher_is_better: bool | None = None
    standardize: bool = False
    loss_scale: float = 1.0
    _loss_fn: Loss = field(init=False, repr=False, compare=False)
    _metric_fn: Metric = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 128:
            raise ValueError(f"a task needs a name of 1 to 128 characters, not {self.name!r}")
        if self.outputs < 1:
            raise ValueError(f"task {self.name!r}: outputs must be at least 1")
        if self.loss in LOSSES:
            fn, implied = LOSSES[self.loss]
            if self.target not in (None, implied):
                raise ValueError(
                    f"task {self.name!r}: loss {self.loss!r} reads {implied!r} targets, not {self.target!r}"
                )
            object.__setattr__(self, "target", implied)
        else:
            fn = _callable(resolve(self.loss), f"task {self.name!r}: loss")
            if self.target not in ("class", "real"):
                raise ValueError(f"task {self.name!r}: a user loss needs target = 'class' or 'real'")
        object.__setattr__(self, "_loss_fn", fn)
        if self.standardize and self.target != "real":
            raise ValueError(f"task {self.name!r}: standardize applies to real targets, not {self.target!r} ones")
        if not (isinstance(self.loss_scale, int | float) and math.isfinite(self.loss_scale) and self.loss_scale > 0):
            raise ValueError(f"task {self.name!r}: loss_scale must be a finite number above 0, not {self.loss_scale!r}")
        if self.metric in METRICS:
            metric_fn, higher = METRICS[self.metric]
            if self.higher_is_better not in (None, higher):
                raise ValueError(f"task {self.name!r}: metric {self.metric!r} has higher_is_better = {higher}")
            object.__setattr__(self, "higher_is_better", higher)
        else:
            metric_fn = _callable(resolve(self.metric), f"task {self.name!r}: metric")
            if self.higher_is_better is None:
                raise ValueError(f"task {self.name!r}: a user metric needs higher_is_better = true or false")
        object.__setattr__(self, "_metric_fn", metric_fn)

    @property
    def kind(self) -> Literal["classification", "regression"]:
        return "classification" if self.target == "class" else "regression"

    def loss_value(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self._loss_fn(prediction, target)
        return loss * self.loss_scale if self.loss_scale != 1.0 else loss

    def metric_value(self, prediction: torch.Tensor, target: torch.Tensor) -> float:
        return float(self._metric_fn(prediction, target))

    def targets(self, values: Any) -> torch.Tensor:
        """The data's targets as this task's loss reads them (int64 classes or float32 rows)."""
        t = torch.as_tensor(values)
        return t.long() if self.target == "class" else t.float()

    def describe(self) -> dict[str, Any]:
        """The task as plain values (a model's manifest)."""
        return {
            "name": self.name,
            "outputs": self.outputs,
            "loss": self.loss,
            "metric": self.metric,
            "target": self.target,
            "higher_is_better": self.higher_is_better,
            "head": self.head.describe() if self.head else None,
            "standardize": self.standardize,
            "loss_scale": self.loss_scale,
        }


def constant_prediction(task: TaskSpec, train_targets: torch.Tensor) -> torch.Tensor | None:
    """The best constant output for ``task``'s built-in loss, fitted on the training targets (in the
    data's units, one row of ``outputs``): the log class prior for cross-entropy (add-half smoothed, so a
    class missing from a small training set costs a finite loss; arg-max: the majority class), the mean
    for MSE, the logit of the mean for BCE. None for a user loss (no known optimum).

    It is a task's reference level: a model that does not beat it has learnt nothing from the inputs."""
    if task.loss == "cross_entropy":
        counts = torch.bincount(train_targets.long().reshape(-1), minlength=task.outputs)[: task.outputs].double()
        return torch.log((counts + 0.5) / (counts.sum() + 0.5 * task.outputs)).float()
    y = train_targets.double().reshape(len(train_targets), -1)
    if task.loss == "mse":
        return y.mean(dim=0).expand(task.outputs).float()
    if task.loss == "bce":
        return torch.logit(y.mean(dim=0).clamp(1e-6, 1 - 1e-6)).expand(task.outputs).float()
    return None


def _callable(obj: object, what: str) -> Callable[..., Any]:
    if not callable(obj):
        raise ValueError(f"{what} {obj!r} is not callable")
    return obj


def derive_seed(seed: int, *parts: str | int) -> int:
    """A stable 31-bit seed from a base seed and labels (same in every process, unlike hash())."""
    text = "/".join([str(seed), *map(str, parts)])
    return zlib.crc32(text.encode()) & 0x7FFFFFFF
