"""Benchmarks of the system against its limits: ``python -m benchmarks.run``."""
