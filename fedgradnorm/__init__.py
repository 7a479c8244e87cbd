"""FedGradNorm: personalized federated multi-task learning with dynamic loss weighting."""

__version__ = "0.1.0"
