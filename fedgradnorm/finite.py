"""A fast exact check that a tensor holds no NaN and no infinity.

``torch.isfinite(t).all()`` writes a boolean tensor as large as ``t`` and reads it again: 5-10 ms
for a 15.7 MB model, per update, on the aggregator's hot path. A sum reads ``t`` once and writes
nothing: under IEEE 754 a NaN or an infinity among the terms makes the sum NaN or infinite, in any
summation order. A non-finite sum can also come from finite values whose sum overflows, so only
then is the exact elementwise check run.
"""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when every element of the floating-point tensor ``t`` is finite."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())
