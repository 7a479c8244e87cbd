"""The two federations and their tasks: what each client learns, with which loss and metric."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional

TaskKind = Literal["classification", "regression"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: TaskKind
    outputs: int
    metric: str  # "accuracy" (higher is better) or "landmark_error_px" (lower is better)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "classification":
            return functional.cross_entropy(prediction, target)
        return functional.mse_loss(prediction, target)

    def metric_value(self, prediction: torch.Tensor, target: torch.Tensor, pixel_scale: float = 1.0) -> float:
        """Accuracy, or the mean Euclidean landmark error in pixels (targets x1..x5, y1..y5)."""
        if self.kind == "classification":
            return float((prediction.argmax(dim=1) == target).float().mean())
        diff = (prediction - target) * pixel_scale
        half = diff.shape[1] // 2
        return float(torch.sqrt(diff[:, :half] ** 2 + diff[:, half:] ** 2).mean())


@dataclass(frozen=True)
class Federation:
    name: str
    network: str
    tasks: tuple[TaskSpec, ...]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ValueError(f"federation {self.name!r} has no task {name!r}; tasks: {self.task_names}")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)


FEDERATIONS: dict[str, Federation] = {
    "radcom": Federation(
        name="radcom",
        network="network2",
        tasks=(
            TaskSpec("modulation", "classification", 6, "accuracy"),
            TaskSpec("signal", "classification", 8, "accuracy"),
            TaskSpec("anomaly", "classification", 2, "accuracy"),
        ),
    ),
    "mtfl": Federation(
        name="mtfl",
        network="network1",
        tasks=(
            TaskSpec("landmarks", "regression", 10, "landmark_error_px"),
            TaskSpec("gender", "classification", 2, "accuracy"),
            TaskSpec("smile", "classification", 2, "accuracy"),
            TaskSpec("glasses", "classification", 2, "accuracy"),
            TaskSpec("pose", "classification", 5, "accuracy"),
        ),
    ),
}


def federation(name: str) -> Federation:
    if name not in FEDERATIONS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(FEDERATIONS)}")
    return FEDERATIONS[name]


def derive_seed(seed: int, *parts: str | int) -> int:
    """A stable 31-bit seed from a base seed and labels (same in every process, unlike hash())."""
    text = "/".join([str(seed), *map(str, parts)])
    return zlib.crc32(text.encode()) & 0x7FFFFFFF
