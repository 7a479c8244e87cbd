"""all_finite: the exact answer of torch.isfinite(t).all(), one read of the tensor in the common case."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgradnorm.finite import all_finite

BAD = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_one_bad_element_anywhere_is_found(dtype: torch.dtype) -> None:
    t = torch.randn(1000, dtype=torch.float32).to(dtype)
    assert all_finite(t)
    for bad in BAD:
        for i in (0, 499, 999):
            u = t.clone()
            u[i] = bad
            assert not all_finite(u), (bad, i)


def test_infinities_of_both_signs_and_nan_together() -> None:
    t = torch.zeros(8)
    t[1], t[5] = float("inf"), -float("inf")  # sum: NaN
    assert not all_finite(t)


def test_finite_values_whose_sum_overflows_are_finite() -> None:
    big = torch.full((4,), 3e38)  # sum overflows float32 to inf; every element is finite
    assert not bool(torch.isfinite(big.sum()))
    assert all_finite(big)
    big[2] = float("nan")
    assert not all_finite(big)


def test_empty_and_scalar() -> None:
    assert all_finite(torch.empty(0))
    assert all_finite(torch.tensor(1.5))
    assert not all_finite(torch.tensor(float("nan")))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from([3.4e38, -3.4e38])),
        min_size=1,
        max_size=64,
    )
)
def test_agrees_with_isfinite_all(values: list[float]) -> None:
    t = torch.tensor(values, dtype=torch.float32)
    assert all_finite(t) == bool(torch.isfinite(t).all())
