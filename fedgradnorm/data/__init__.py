"""Data sets of the two federations: readers of the published formats and generators that write them."""

from fedgradnorm.data.base import DataError, MultiTaskArrays, Pools

__all__ = ["DataError", "MultiTaskArrays", "Pools"]
