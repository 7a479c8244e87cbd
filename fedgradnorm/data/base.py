"""The container every reader returns, and the error every reader raises."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file that cannot be used: the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class MultiTaskArrays:
    """Inputs shared by all tasks, with one target array per task.

    ``x`` is float32 with the samples on the first axis; ``targets[task]`` holds int64 class
    indices (classification) or float32 rows (regression); ``extras`` holds per-sample side
    information that is not a task (for RadCom, the SNR in dB).
    """

    x: np.ndarray
    targets: Mapping[str, np.ndarray]
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.x)
        for name, arr in {**self.targets, **self.extras}.items():
            if len(arr) != n:
                raise ValueError(f"array {name!r} has {len(arr)} rows, x has {n}")

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, index: np.ndarray) -> MultiTaskArrays:
        return MultiTaskArrays(
            x=self.x[index],
            targets={k: v[index] for k, v in self.targets.items()},
            extras={k: v[index] for k, v in self.extras.items()},
        )


@dataclass(frozen=True)
class Pools:
    """What a data source reads: a training pool, and a separate test pool when the source has one
    (MTFL's testing.txt, an arrays file's ``x_test``/``y_test``); without one, a test share is split off."""

    train: MultiTaskArrays
    test: MultiTaskArrays | None = None
