"""The algorithms and the paper's hyperparameters (Section IV-B), declared once.

Every configuration (the server and client steps, the simulator, the aggregator service, the
experiments) takes its defaults from here. Nothing heavy is imported, so the command line can list
them without loading torch.
"""

from __future__ import annotations

from typing import Literal

Algorithm = Literal["fedgradnorm", "fedrep"]
ALGORITHMS: tuple[Algorithm, ...] = ("fedgradnorm", "fedrep")

GAMMA = 0.9  # asymmetry of GradNorm's targets G_bar * r_i ** gamma
ALPHA = 0.004  # learning rate of the Adam on the loss weights p
BETA = 0.0002  # learning rate of the Adam on omega (server) and of every local Adam (clients)
TAU_H = 5  # local head updates per round, omega frozen
TAU_OMEGA = 5  # local updates of omega per round, head frozen
BATCH_SIZE = 64  # minibatch of every local update
WEIGHT_FLOOR = 1e-3  # p never goes below this (it stays positive)
