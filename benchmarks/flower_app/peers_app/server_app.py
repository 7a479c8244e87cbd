"""ServerApp: FedAvg over Network 2 on every node, each round's close stamped to a file.

The stamp is taken when ``aggregate_train`` returns (the round's model is aggregated), which is
where fedgradnorm's aggregator appends a round to its metrics.jsonl; benchmarks/peers.py reads
the file while the run goes on and takes close-to-close intervals, as for fedgradnorm.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class StampedFedAvg(FedAvg):
    def __init__(self, stamps_path: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.stamps_path = stamps_path

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        errors = [m.error.reason for m in replies if m.has_error()]
        if errors or arrays is None or len(replies) != self.min_train_nodes:
            raise RuntimeError(f"round {server_round}: {len(replies)} replies, errors {errors}")
        with open(self.stamps_path, "a") as f:
            f.write(f"{server_round} {time.time():.6f}\n")
        return arrays, metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes = int(cfg["num-nodes"])
    with np.load(str(cfg["model-path"])) as f:  # Network 2's parameters, saved by benchmarks/peers.py
        initial = ArrayRecord({name: Array(f[name]) for name in f.files})
    strategy = StampedFedAvg(
        str(cfg["stamps-path"]),
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=nodes,
        min_available_nodes=nodes,
    )
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(cfg["num-server-rounds"]))
