"""Partitioners: share the sample indices of one pool out among named clients, deterministically by seed.

Each returns ``{client: indices}``: sorted int64 arrays, disjoint, all within ``range(n)``, one per client
in the order given. The same arguments (seed included) give the same shares on every machine, since only
:func:`numpy.random.default_rng` draws are used.

- :func:`iid`: a random permutation cut into consecutive shares, equal (to within one sample, every sample
  given out) or of the sizes asked for (the rest left out);
- :func:`dirichlet`: label skew by the recipe of Hsu, Qi and Brown (2019), "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification" (arXiv:1909.06335), in the form
  common to federated-learning benchmarks: for each class separately, draw client proportions
  ``p ~ Dir(alpha, ..., alpha)`` and cut that class's shuffled samples at ``floor(cumsum(p) * n_class)``,
  so every sample goes to some client. Small ``alpha`` (0.1) gives each client few classes; large
  ``alpha`` (100) approaches the class mix of the pool. A draw is redone, whole, until every client holds
  at least ``min_size`` samples, at most ``max_tries`` times;
- :func:`parse_partitioner`: ``iid`` or ``dirichlet:ALPHA`` (a command-line flag, say) to a
  :class:`Partitioner`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Partitioner", "dirichlet", "iid", "parse_partitioner"]

_SPEC = "'iid' or 'dirichlet:ALPHA' with ALPHA a finite number > 0 (dirichlet:0.5, say)"


def iid(n_samples: int, clients: Sequence[str], seed: int, sizes: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Disjoint random shares of ``range(n_samples)``.

    Without ``sizes`` every sample is given out and the shares differ by at most one sample (the first
    ``n_samples % len(clients)`` clients get the extra one); there must be at least one sample per client.
    With ``sizes`` (one non-negative count per client, in order, summing to at most ``n_samples``) client
    ``i`` gets ``sizes[i]`` samples and the rest are left out. Raises :class:`ValueError` on bad arguments.
    """
    names = _check_clients(clients)
    n = _check_count("n_samples", n_samples)
    k = len(names)
    if sizes is None:
        if n < k:
            raise ValueError(f"{n} samples cannot give each of {k} clients a sample")
        counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
    else:
        if len(sizes) != k:
            raise ValueError(f"sizes has {len(sizes)} entries for {k} clients")
        counts = [_check_count(f"sizes[{i}]", size) for i, size in enumerate(sizes)]
        if sum(counts) > n:
            raise ValueError(f"sizes add up to {sum(counts)}, more than the {n} samples")
    order = np.random.default_rng(seed).permutation(n)
    ends = np.cumsum(counts)
    return {name: np.sort(order[end - count : end]) for name, count, end in zip(names, counts, ends, strict=True)}


def dirichlet(
    labels: np.ndarray,
    clients: Sequence[str],
    alpha: float,
    seed: int,
    min_size: int = 1,
    *,
    max_tries: int = 1000,
) -> dict[str, np.ndarray]:
    """Label-skewed shares of the samples whose class labels are ``labels`` (see the module docstring).

    ``labels``: a 1-D integer array, one class per sample; ``alpha``: the Dirichlet concentration, finite
    and > 0; ``min_size``: the fewest samples any client may get. Every sample is given out. Raises
    :class:`ValueError` on bad arguments, when ``len(labels) < min_size * len(clients)``, or when none of
    ``max_tries`` draws gives every client ``min_size`` samples (lower ``min_size``, raise ``alpha`` or
    use fewer clients).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D array of integer classes, got shape {labels.shape} of {labels.dtype}")
    names = _check_clients(clients)
    _check_alpha(alpha)
    min_size = _check_count("min_size", min_size)
    if _check_count("max_tries", max_tries) < 1:
        raise ValueError("max_tries must be at least 1")
    n, k = len(labels), len(names)
    if n < min_size * k:
        raise ValueError(f"{n} samples cannot give each of {k} clients {min_size}")
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    owner = np.empty(n, dtype=np.int64)
    for _ in range(max_tries):
        for members in classes:
            proportions = rng.dirichlet(np.full(k, alpha))
            cuts = np.minimum((np.cumsum(proportions) * len(members)).astype(np.int64), len(members))
            cuts[-1] = len(members)
            owner[rng.permutation(members)] = np.repeat(np.arange(k), np.diff(cuts, prepend=0))
        if np.bincount(owner, minlength=k).min() >= min_size:
            return {name: np.flatnonzero(owner == j) for j, name in enumerate(names)}
    raise ValueError(
        f"no draw in {max_tries} gave each of {k} clients at least {min_size} of the {n} samples "
        f"(alpha {alpha:g}); lower min_size, raise alpha or use fewer clients"
    )


@dataclass(frozen=True)
class Partitioner:
    """A partitioner chosen by name (see :func:`parse_partitioner`); ``alpha`` is set for ``dirichlet`` only."""

    kind: Literal["iid", "dirichlet"]
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "dirichlet":
            if self.alpha is None:
                raise ValueError("a dirichlet partitioner needs alpha")
            _check_alpha(self.alpha)
        elif self.kind == "iid":
            if self.alpha is not None:
                raise ValueError("an iid partitioner takes no alpha")
        else:
            raise ValueError(f"partitioner kind must be 'iid' or 'dirichlet', got {self.kind!r}")

    def split(
        self, labels: np.ndarray, clients: Sequence[str], seed: int, *, min_size: int = 1
    ) -> dict[str, np.ndarray]:
        """Shares of a pool whose class labels are ``labels`` (``iid`` uses only their number; ``min_size``
        is for ``dirichlet``)."""
        if self.alpha is None:
            return iid(len(labels), clients, seed)
        return dirichlet(labels, clients, self.alpha, seed, min_size)

    def __str__(self) -> str:
        """The text :func:`parse_partitioner` reads back to this partitioner."""
        return "iid" if self.alpha is None else f"dirichlet:{float(self.alpha)!r}"


def parse_partitioner(text: str) -> Partitioner:
    """``iid`` or ``dirichlet:ALPHA`` (ALPHA finite and > 0, ``dirichlet:0.5`` say; surrounding spaces are
    ignored) to a :class:`Partitioner`; anything else raises :class:`ValueError` saying what is accepted."""
    kind, sep, value = text.strip().partition(":")
    if kind == "iid" and not sep:
        return Partitioner("iid")
    if kind != "dirichlet":
        raise ValueError(f"partitioner {text!r}: expected {_SPEC}")
    if not sep or not value.strip():
        raise ValueError(f"partitioner {text!r}: dirichlet needs its concentration, as dirichlet:ALPHA (dirichlet:0.5)")
    try:
        alpha = float(value)
    except ValueError:
        raise ValueError(f"partitioner {text!r}: alpha {value.strip()!r} is not a number; expected {_SPEC}") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"partitioner {text!r}: alpha must be finite and > 0, got {value.strip()}")
    return Partitioner("dirichlet", alpha)


def _check_clients(clients: Sequence[str]) -> list[str]:
    names = list(clients)
    if isinstance(clients, str) or not names:
        raise ValueError("clients must be a non-empty sequence of client names")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"client {name!r} is named twice")
    return names


def _check_count(what: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_alpha(alpha: float) -> None:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float | np.integer | np.floating)
        or not (math.isfinite(alpha) and alpha > 0)
    ):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
