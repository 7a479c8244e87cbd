"""Flower 1.42 apps for the peers benchmark (benchmarks/peers.py): FedAvg over Network 2."""
