"""Table I of the paper: the two shared representation networks, and the per-client linear head."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

REPRESENTATION_DIM = 256
NetworkName = Literal["network1", "network2"]


class Network1(nn.Module):
    """CNN for 1x40x40 grayscale faces (MTFL): four convolutions, three max-pools, 256 features."""

    input_shape = (1, 40, 40)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 48, 3),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(48, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 64, 2),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)


class Network2(nn.Module):
    """MLP 256-512-1024-2048-512-256 for RadCom I/Q vectors."""

    input_shape = (256,)
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


NETWORKS: dict[str, type[nn.Module]] = {"network1": Network1, "network2": Network2}


def build_shared(network: str, seed: int) -> nn.Module:
    """The shared network, initialised deterministically from ``seed``."""
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; known: {sorted(NETWORKS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NETWORKS[network]()


def build_head(outputs: int, seed: int) -> nn.Linear:
    """A client's personal head: one linear layer from the 256-d representation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(REPRESENTATION_DIM, outputs)
