"""The workload of fedgradnorm's round-overhead benchmark, in plain torch for the Flower apps.

``Network2`` has the module tree and parameter names of ``fedgradnorm.models.Network2`` (MLP
256-512-1024-2048-512-256, 15.7 MB of float32); the ServerApp starts from the state_dict that
benchmarks/peers.py saved from fedgradnorm's own network, and the ClientApp loads every round's
arrays into this module with ``strict=True``, so any difference in names or shapes fails the run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


class Network2(nn.Module):
    widths = (256, 512, 1024, 2048, 512, 256)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(self.widths[:-1], self.widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(self.widths) - 2:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


def load_data(path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A node's arrays as benchmarks/peers.py wrote them: x, y, x_test, y_test, outputs."""
    with np.load(path) as f:
        return (
            torch.from_numpy(f["x"]),
            torch.from_numpy(f["y"]),
            torch.from_numpy(f["x_test"]),
            torch.from_numpy(f["y_test"]),
            int(f["outputs"]),
        )


def minibatches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled minibatches (a fresh permutation per pass)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def local_round(
    shared: nn.Module,
    head: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    tau_h: int,
    tau_omega: int,
    lr: float,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
) -> tuple[float, float]:
    """fedgradnorm's client step in shape: tau_h Adam steps of the head with the shared network frozen,
    an evaluation on the test split, then tau_omega Adam steps of the shared network with the head
    frozen. Returns (mean training loss of the shared steps, test loss)."""
    loss_fn = nn.CrossEntropyLoss()
    shared.requires_grad_(False)
    head_opt = torch.optim.Adam(head.parameters(), lr=lr, foreach=False)
    for _ in range(tau_h):
        x, y = next(batches)
        with torch.no_grad():
            z = shared(x)
        head_opt.zero_grad(set_to_none=True)
        loss_fn(head(z), y).backward()
        head_opt.step()
    with torch.no_grad():
        test_loss = float(loss_fn(head(shared(x_test)), y_test))
    head.requires_grad_(False)
    shared.requires_grad_(True)
    opt = torch.optim.Adam(shared.parameters(), lr=lr, foreach=False)
    losses = []
    for _ in range(tau_omega):
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(head(shared(x)), y)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    head.requires_grad_(True)
    return sum(losses) / len(losses), test_loss
