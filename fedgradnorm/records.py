"""The per-round, per-client metrics record: one JSON line of metrics.jsonl.

The simulator and the aggregator service write the same shape, so plots and reports read both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedgradnorm.algorithm import ClientReport


def round_record(
    *,
    round_: int,
    client: str,
    task: str,
    algorithm: str,
    report: ClientReport,
    f_grad: float,
    train_loss: float,
    test_loss: float | None,
    test_metric: str | None,
    test_value: float | None,
    num_samples: int,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "round": round_,
        "client": client,
        "task": task,
        "algorithm": algorithm,
        "weight": report.weight,
        "train_loss": train_loss,
        "loss_ratio": report.loss_ratio,
        "grad_norm": report.grad_norm,
        "relative_rate": report.relative_rate,
        "target_grad_norm": report.target,
        "f_grad": f_grad,
        "test_loss": test_loss,
        "test_metric": test_metric,
        "num_samples": num_samples,
    }
    if test_metric is not None:
        record[test_metric] = test_value
    return record


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
