"""The paper's experiments (Table II, Fig. 2, Fig. 3) on synthetic data: ``python -m experiments.reproduce``."""
