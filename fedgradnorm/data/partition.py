"""From data on disk (or a synthetic set) to each client's train and test split.

Two ways, one per setting:

- **A node's own data** (:func:`node_data`): an edge node's ``--data`` file is that node's data, all of
  it: its test pool when the file has one, else a seeded ``test_fraction`` split.
- **A shared pool, partitioned** (:func:`load_clients`): the simulator (and edge nodes without
  ``--data``, which simulate a deployment on a synthetic set) share one pool out among the clients,
  disjointly and deterministically by seed: by task with the paper's allocations (``balanced``,
  ``imbalanced`` = Table II, ``task=N,...``), or by :mod:`fedgradnorm.data.splitting` (``iid``, Dirichlet
  label skew). Every process computing the same partition picks the same share, so no data crosses
  the network. ``fedgradnorm partition`` writes the shares as per-node files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedgradnorm.data.base import DataError, MultiTaskArrays, Pools
from fedgradnorm.data.sources import read_pools
from fedgradnorm.data.splitting import Partitioner, parse_partitioner

if TYPE_CHECKING:
    from fedgradnorm.federation import Federation
    from fedgradnorm.tasks import TaskSpec

# Table II of the paper: the gender and glasses clients hold 500 samples, the others 3,000.
IMBALANCED_MTFL = {"gender": 500, "glasses": 500, "*": 3000}


@dataclass(frozen=True)
class Allocation:
    """How a pool's training samples are shared out among the clients.

    By task (the paper's): ``sizes`` None shares the pool equally, else a size per task name (``"*"`` for
    the rest); sizes larger than the pool are scaled down to what is there. Or by a ``partitioner``
    (:mod:`fedgradnorm.data.splitting`): ``iid`` random equal shares, or ``dirichlet:ALPHA`` label skew
    over ``label_column`` (default: the first integer-labelled column of the clients' tasks). The test
    shares are the same either way."""

    sizes: Mapping[str, int] | None = None
    test_fraction: float = 0.2
    partitioner: Partitioner | None = None
    label_column: str = ""

    @classmethod
    def parse(cls, text: str, test_fraction: float = 0.2) -> Allocation:
        """``balanced``, ``imbalanced`` (Table II), ``task=N,task=N,*=N``, ``iid``, or
        ``dirichlet:ALPHA[:COLUMN]``."""
        text = text.strip()
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), not {test_fraction}")
        if text == "balanced":
            return cls(None, test_fraction)
        if text == "imbalanced":
            return cls(dict(IMBALANCED_MTFL), test_fraction)
        if text == "iid" or text.startswith("dirichlet:"):
            head, _, column = text.partition(":")[2].partition(":") if text != "iid" else ("", "", "")
            partitioner = parse_partitioner("iid" if text == "iid" else f"dirichlet:{head}")
            return cls(None, test_fraction, partitioner, column.strip())
        sizes: dict[str, int] = {}
        for part in text.split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip() or not value.strip().isdigit() or int(value) <= 0:
                raise ValueError(
                    f"allocation {text!r}: expected balanced, imbalanced, task=N,...,*=N with N > 0, iid, "
                    "or dirichlet:ALPHA[:COLUMN]"
                )
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
    if allocation.partitioner is not None:
        return _partitioned(train_pool, tasks, allocation, seed, test_pool)
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


def _partitioned(
    train_pool: MultiTaskArrays,
    tasks: Sequence[str],
    allocation: Allocation,
    seed: int,
    test_pool: MultiTaskArrays | None,
) -> dict[str, ClientData]:
    """``allocate`` by a partitioner: equal random test shares as by task, the training samples left
    split by ``allocation.partitioner`` (over the label column for Dirichlet)."""
    assert allocation.partitioner is not None
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_pool))
    k = len(tasks)
    if test_pool is None:
        test_each = max(1, int(len(train_pool) * allocation.test_fraction) // k)
        tests = [train_pool.subset(np.sort(order[i * test_each : (i + 1) * test_each])) for i in range(k)]
        remaining = np.sort(order[k * test_each :])
    else:
        test_order = rng.permutation(len(test_pool))
        test_each = max(1, len(test_pool) // k)
        tests = [test_pool.subset(np.sort(test_order[i * test_each : (i + 1) * test_each])) for i in range(k)]
        remaining = np.arange(len(train_pool))
    labels = _label_column(train_pool, tasks, allocation.label_column)[remaining]
    shares = allocation.partitioner.split(labels, list(tasks), seed)
    return {
        t: ClientData(task=t, train=train_pool.subset(remaining[shares[t]]), test=tests[i]) for i, t in enumerate(tasks)
    }


def _label_column(pool: MultiTaskArrays, tasks: Sequence[str], column: str) -> np.ndarray:
    """The class labels a Dirichlet split skews: ``column``, else the first tasks' integer 1-D column."""
    candidates = [column] if column else [*tasks, *pool.targets]
    for name in candidates:
        y = pool.targets.get(name)
        if y is not None and y.ndim == 1 and y.dtype.kind in "iu":
            return np.asarray(y)
    if column:
        raise ValueError(f"label column {column!r} is not a 1-D integer column; columns: {sorted(pool.targets)}")
    return np.zeros(len(pool), dtype=np.int64)  # no class labels: every sample one class (iid only needs the count)


@dataclass(frozen=True)
class DataSource:
    """Where a federation's samples come from: a file or folder (``path``), one file per task
    (``task=path,...``), or the federation's synthetic set by seed and size."""

    federation: Federation
    path: str | None = None
    synthetic_seed: int = 0
    synthetic_size: int = 100

    def describe(self) -> str:
        if self.path:
            return self.path
        return f"synthetic {self.federation.name} (seed {self.synthetic_seed}, size {self.synthetic_size})"

    def per_task(self) -> dict[str, str] | None:
        """``{task: path}`` when ``path`` names one file per task (``task=path,...``), else None."""
        if not self.path or "=" not in self.path:
            return None
        files: dict[str, str] = {}
        for part in self.path.split(","):
            task, sep, file = part.partition("=")
            if not sep or not task.strip() or not file.strip():
                raise DataError(self.path, "expected one pool, or task=path,task=path,... (one file per task)")
            files[task.strip()] = file.strip()
        return files


def load_pools(source: DataSource) -> Pools:
    """The federation's pool: read from ``source.path``, or its synthetic set."""
    fed = source.federation
    if source.path:
        return read_pools(fed.reader, source.path)
    if fed.synthetic is None:
        raise DataError(fed.source or fed.name, f"federation {fed.name!r} has no synthetic data set: give --data")
    pools = fed.synthetic(seed=source.synthetic_seed, size=source.synthetic_size)
    if not isinstance(pools, Pools):
        raise DataError(fed.source, f"{fed.synthetic.ref} returned {type(pools).__name__}, not fedgradnorm.data.Pools")
    return pools


def load_clients(source: DataSource, tasks: Sequence[str], allocation: Allocation, seed: int) -> dict[str, ClientData]:
    """Each task's client data: its own file when ``source`` names one per task, else its share of the pool."""
    fed = source.federation
    files = source.per_task()
    if files is not None:
        missing = [t for t in tasks if t not in files]
        if missing:
            raise DataError(source.path or "", f"no file for task(s) {missing}")
        return {t: node_data(fed, fed.task(t), files[t], allocation.test_fraction, seed) for t in tasks}
    pools = load_pools(source)
    shares = allocate(pools.train, tasks, allocation, seed, pools.test)
    where = source.describe()
    return {t: _client(shares[t].train, shares[t].test, fed.task(t), where) for t in tasks}


def node_data(fed: Federation, task: TaskSpec, path: str | Path, test_fraction: float, seed: int) -> ClientData:
    """A node's own data file, all of it: its test pool if it has one, else a seeded ``test_fraction`` split."""
    pools = read_pools(fed.reader, path)
    train, test = pools.train, pools.test
    if test is None:
        if len(train) < 2:
            raise DataError(path, f"{len(train)} sample(s): a node needs at least 2 (train and test)")
        order = np.random.default_rng(seed).permutation(len(train))
        n_test = min(len(train) - 1, max(1, round(len(train) * test_fraction)))
        train, test = train.subset(np.sort(order[n_test:])), train.subset(np.sort(order[:n_test]))
    return _client(train, test, task, str(path))


def _client(train: MultiTaskArrays, test: MultiTaskArrays, task: TaskSpec, where: str) -> ClientData:
    return ClientData(task=task.name, train=task_view(train, task, where), test=task_view(test, task, where))


def task_view(arrays: MultiTaskArrays, task: TaskSpec, where: str) -> MultiTaskArrays:
    """``arrays`` with only ``task``'s target column, under the task's name, checked against the task.

    The column is ``task.column`` (default: the task's name), else the data's only target column. Class
    targets must be integers in [0, outputs); real targets have ``outputs`` columns (or are 1-D for 1)."""
    column = task.column or task.name
    if column not in arrays.targets:
        if len(arrays.targets) != 1:
            raise DataError(
                where, f"no target column {column!r} for task {task.name!r}; columns: {sorted(arrays.targets)}"
            )
        column = next(iter(arrays.targets))
    y = np.asarray(arrays.targets[column])
    if task.target == "class":
        if y.ndim != 1 or y.dtype.kind not in "iub":
            raise DataError(
                where, f"task {task.name!r} needs integer class labels (1-D), column {column!r} is {y.dtype} {y.shape}"
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= task.outputs):
            raise DataError(
                where,
                f"task {task.name!r}: class labels must lie in [0, {task.outputs}), column {column!r} has {int(y.min())}..{int(y.max())}",
            )
        y = y.astype(np.int64, copy=False)
    else:
        width = 1 if y.ndim == 1 else int(np.prod(y.shape[1:]))
        if y.dtype.kind not in "iufb" or width != task.outputs:
            raise DataError(
                where,
                f"task {task.name!r} needs {task.outputs} real value(s) a sample, column {column!r} is {y.dtype} {y.shape}",
            )
        y = y.astype(np.float32, copy=False).reshape(len(y), task.outputs)
    return MultiTaskArrays(x=arrays.x, targets={task.name: y}, extras=arrays.extras)


def write_partition(
    source: DataSource, tasks: Sequence[str], allocation: Allocation, seed: int, out: str | Path
) -> dict[str, Path]:
    """Each client's share (train and test) as its own arrays file ``out/<task>.npz``, the task's
    target as column ``y``: the files an edge node's ``--data`` takes, the same shares the simulator trains on."""
    from fedgradnorm.data.arrays import write_arrays

    clients = load_clients(source, tasks, allocation, seed)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for task, data in clients.items():
        path = folder / f"{task}.npz"
        train = MultiTaskArrays(data.train.x, {"y": data.train.targets[task]})
        test = MultiTaskArrays(data.test.x, {"y": data.test.targets[task]})
        write_arrays(path, Pools(train, test))
        written[task] = path
    return written
