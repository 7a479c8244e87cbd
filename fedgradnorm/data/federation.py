"""From a data set on disk (or a synthetic one) to each client's train and test split.

The same function runs in the simulator and in every edge node: given the same file, seed and
allocation, each process computes the same disjoint partition and picks its own task's share,
so no data ever crosses the network.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedgradnorm.data.base import DataError, MultiTaskArrays
from fedgradnorm.data.cache import default_cache_dir

# Table II of the paper: the gender and glasses clients hold 500 samples, the others 3,000.
IMBALANCED_MTFL = {"gender": 500, "glasses": 500, "*": 3000}


@dataclass(frozen=True)
class Allocation:
    """Train samples per client: ``None`` shares the pool equally, else a size per task name
    (``"*"`` for the rest). Sizes larger than the pool are scaled down to what is there."""

    sizes: Mapping[str, int] | None = None
    test_fraction: float = 0.2

    @classmethod
    def parse(cls, text: str, test_fraction: float = 0.2) -> Allocation:
        """``balanced``, ``imbalanced`` (Table II), or ``task=N,task=N,*=N``."""
        text = text.strip()
        if text == "balanced":
            return cls(None, test_fraction)
        if text == "imbalanced":
            return cls(dict(IMBALANCED_MTFL), test_fraction)
        sizes: dict[str, int] = {}
        for part in text.split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip() or not value.strip().isdigit() or int(value) <= 0:
                raise ValueError(f"allocation {text!r}: expected 'balanced', 'imbalanced' or task=N,...,*=N with N > 0")
            sizes[name.strip()] = int(value)
        return cls(sizes, test_fraction)

    def requested(self, task: str) -> int | None:
        if self.sizes is None:
            return None
        return self.sizes.get(task, self.sizes.get("*"))


@dataclass(frozen=True)
class ClientData:
    task: str
    train: MultiTaskArrays
    test: MultiTaskArrays


def _split_sizes(pool: int, tasks: Sequence[str], allocation: Allocation) -> list[int]:
    equal = pool // len(tasks)
    wanted = [allocation.requested(t) or equal for t in tasks]
    total = sum(wanted)
    if total > pool:  # a small file trains with what it has
        wanted = [max(1, w * pool // total) for w in wanted]
    return wanted


def allocate(
    train_pool: MultiTaskArrays,
    tasks: Sequence[str],
    allocation: Allocation,
    seed: int,
    test_pool: MultiTaskArrays | None = None,
) -> dict[str, ClientData]:
    """Disjoint shares of the pool per client, deterministic by seed.

    With ``test_pool`` (MTFL's testing.txt) the test pool is shared out equally; otherwise each
    client's share is split into train and test by ``allocation.test_fraction``.
    """
    if not tasks:
        raise ValueError("no tasks to allocate data to")
    if len(train_pool) < 2 * len(tasks):
        raise ValueError(f"{len(train_pool)} samples are too few for {len(tasks)} clients")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_pool))
    test_order = rng.permutation(len(test_pool)) if test_pool is not None else None
    frac = allocation.test_fraction
    if test_pool is None:
        # Reserve the test part first so that imbalanced train sizes keep the same test sets.
        test_each = max(1, int(len(train_pool) * frac) // len(tasks))
        train_sizes = _split_sizes(len(train_pool) - test_each * len(tasks), tasks, allocation)
    else:
        test_each = max(1, len(test_pool) // len(tasks))
        train_sizes = _split_sizes(len(train_pool), tasks, allocation)
    out: dict[str, ClientData] = {}
    start = 0
    for i, task in enumerate(tasks):
        if test_pool is None:
            test = train_pool.subset(np.sort(order[start : start + test_each]))
            start += test_each
        else:
            assert test_order is not None
            test = test_pool.subset(np.sort(test_order[i * test_each : (i + 1) * test_each]))
        train = train_pool.subset(np.sort(order[start : start + train_sizes[i]]))
        start += train_sizes[i]
        out[task] = ClientData(task=task, train=train, test=test)
    return out


def cache_dir() -> Path:
    """Where synthetic data sets are generated (see :func:`fedgradnorm.data.cache.default_cache_dir`); created."""
    path = default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class DataSource:
    """Where a federation's samples come from: a real file/folder, or a synthetic set by seed."""

    dataset: str  # "radcom" | "mtfl"
    path: str | None = None
    synthetic_seed: int = 0
    synthetic_size: int = 100  # radcom: samples per key; mtfl: training faces (test = size * 3 / 10)

    def describe(self) -> str:
        if self.path:
            return self.path
        return f"synthetic {self.dataset} (seed {self.synthetic_seed}, size {self.synthetic_size})"


def _generate_folder_once(root: Path, generate: Callable[[Path], object]) -> None:
    """Generate into a private folder and rename it into place, so that processes generating the
    same synthetic set at once (edge nodes sharing a cache) never read a half-written one."""
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first: its folder is identical (same seed)
        shutil.rmtree(tmp, ignore_errors=True)


def load_pools(source: DataSource) -> tuple[MultiTaskArrays, MultiTaskArrays | None]:
    """(train pool, test pool or None); generates the synthetic set once into the cache."""
    if source.dataset == "radcom":
        from fedgradnorm.data.radcom import read_radcom
        from fedgradnorm.data.synthetic_radcom import generate_radcom

        path = Path(source.path) if source.path else None
        if path is None:
            path = cache_dir() / f"radcom-seed{source.synthetic_seed}-n{source.synthetic_size}.hdf5"
            if not path.exists():
                generate_radcom(path, samples_per_key=source.synthetic_size, seed=source.synthetic_seed)
        return read_radcom(path), None
    if source.dataset == "mtfl":
        from fedgradnorm.data.mtfl import read_mtfl
        from fedgradnorm.data.synthetic_mtfl import generate_mtfl

        root = Path(source.path) if source.path else None
        if root is None:
            n_test = max(10, source.synthetic_size * 3 // 10)
            root = cache_dir() / f"mtfl-seed{source.synthetic_seed}-n{source.synthetic_size}"
            if not (root / "testing.txt").exists():
                _generate_folder_once(
                    root,
                    lambda tmp: generate_mtfl(
                        tmp, n_train=source.synthetic_size, n_test=n_test, seed=source.synthetic_seed
                    ),
                )
        return read_mtfl(root, "training"), read_mtfl(root, "testing")
    raise DataError(source.path or source.dataset, f"unknown data set {source.dataset!r} (radcom or mtfl)")


def load_clients(source: DataSource, tasks: Sequence[str], allocation: Allocation, seed: int) -> dict[str, ClientData]:
    train_pool, test_pool = load_pools(source)
    return allocate(train_pool, tasks, allocation, seed, test_pool)
