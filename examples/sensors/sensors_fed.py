"""A federation defined entirely outside fedgradnorm: wearable sensors on edge devices.

Each edge device holds 2-second windows of a 3-axis accelerometer (64 samples at 32 Hz) and learns one
task on a shared 1-D CNN (SensorNet):

- ``activity``: still, walk, run or cycle (4 classes, cross-entropy, accuracy);
- ``fall``: whether the window holds a fall (an impact followed by lying still; binary
  cross-entropy on one logit, binary accuracy);
- ``cadence``: the step or pedal rate in Hz (regression with this module's Huber loss, mean absolute
  error in Hz).

This file is everything the library is given: the network factory, a user loss, and the synthetic
data set (``make_pools``) the simulator and the demo use when no ``--data`` is given. federation.toml
beside it names them by import path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from fedgradnorm.data import MultiTaskArrays, Pools

RATE_HZ = 32
WINDOW = 64  # samples: 2 s
ACTIVITIES = ("still", "walk", "run", "cycle")


class SensorNet(nn.Module):
    """Two 1-D convolutions, global average pooling and a linear layer: ``features`` values a window."""

    def __init__(self, channels: int = 3, width: int = 32, features: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(channels, width // 2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(width // 2, width, 5, padding=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.out = nn.Linear(width, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.relu(self.out(self.conv(x)))


def huber(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The cadence loss: Huber (smooth L1) with a 0.5 Hz knee, robust to the odd mislabelled window."""
    return functional.huber_loss(prediction, target.reshape(prediction.shape), delta=0.5)


def make_pools(seed: int, size: int) -> Pools:
    """``20 * size`` synthetic windows with every task's target (one pool; the test share is split off)."""
    rng = np.random.default_rng(seed)
    n = 20 * size
    t = np.arange(WINDOW) / RATE_HZ
    activity = rng.integers(0, len(ACTIVITIES), n)
    fall = (rng.random(n) < 0.2).astype(np.float32)
    cadence = np.zeros(n, dtype=np.float32)
    x = rng.normal(0.0, 0.05, (n, 3, WINDOW)).astype(np.float32)
    x[:, 2] += 1.0  # gravity on the vertical axis
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi)
        if activity[i] == 1:  # walk: ~1.8 Hz steps
            cadence[i] = rng.uniform(1.5, 2.1)
            x[i, 2] += 0.6 * np.sin(2 * np.pi * cadence[i] * t + phase)
            x[i, 0] += 0.3 * np.sin(np.pi * cadence[i] * t + phase)
        elif activity[i] == 2:  # run: faster and harder steps
            cadence[i] = rng.uniform(2.4, 3.2)
            x[i, 2] += 1.8 * np.abs(np.sin(np.pi * cadence[i] * t + phase))
            x[i, 0] += 0.6 * np.sin(np.pi * cadence[i] * t + phase)
        elif activity[i] == 3:  # cycle: smooth pedalling on the forward axis
            cadence[i] = rng.uniform(0.9, 1.6)
            x[i, 1] += 0.4 * np.sin(2 * np.pi * cadence[i] * t + phase)
        if fall[i]:  # an impact, then lying on the side
            at = rng.integers(8, WINDOW - 16)
            x[i, :, at : at + 2] += rng.uniform(2.5, 4.0)
            x[i, 2, at + 2 :] -= 1.0
            x[i, 0, at + 2 :] += 1.0
    return Pools(
        MultiTaskArrays(
            x=x,
            targets={"activity": activity.astype(np.int64), "fall": fall, "cadence": cadence},
        )
    )
