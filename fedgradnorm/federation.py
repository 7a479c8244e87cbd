"""A federation: the shared network, and per task its head, loss, metric and data, read from a TOML spec.

A federation is data, not code in the library. Its spec is a TOML file (``tomllib``, in the standard
library) that names the shared network's factory and, per task, the outputs, loss, metric and head;
code the spec needs (a network, a loss, a reader) is named by import path ``package.module:attr``
(:mod:`fedgradnorm.factory`). RadCom and MTFL are two such files shipped inside the package
(``fedgradnorm/federations/*.toml``); every command takes ``--federation NAME`` (a shipped spec) or
``--federation PATH`` (a spec of the user's). The format, key by key::

    name = "sensors"                      # required; nodes and aggregator compare it
    description = "..."                   # optional
    python_path = ["."]                   # optional: folders (relative to this file) put on sys.path

    [network]                             # the shared network omega
    factory = "sensors_fed:SensorNet"     # required: a callable returning a torch.nn.Module
    kwargs = { hidden = 64 }              # optional keyword arguments
    input_shape = [12]                    # required: one sample's shape
    omega_tilde = []                      # optional: parameters of GradNorm's norm (default: last layer)

    [data]
    reader = "arrays"                     # radcom | mtfl | arrays | images | package.module:attr (path -> Pools)
    synthetic = "sensors_fed:make_pools"  # optional: (seed=, size=) -> Pools, the data without --data

    [[tasks]]                             # one table per task, in order
    name = "activity"
    outputs = 4
    loss = "cross_entropy"                # cross_entropy | mse | bce | package.module:attr
    metric = "accuracy"                   # accuracy | binary_accuracy | mse | mae | landmark_error_px | ref
    target = "class"                      # class | real: required with a user loss
    higher_is_better = true               # required with a user metric
    column = "activity"                   # the target column in the data (default: the task's name)
    head = { factory = "...", kwargs = {} }  # optional; default one linear layer
    standardize = false                   # optional, real targets: learn them centred and unit-variance
    loss_scale = 1.0                      # optional: multiplies the task's loss (an experiment's dial)

Unknown keys are refused (a typo fails at start, naming the file and the key).
"""

from __future__ import annotations

import functools
import hashlib
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedgradnorm.data.sources import READERS
from fedgradnorm.factory import Factory, FactoryError, is_ref
from fedgradnorm.tasks import TaskSpec

if TYPE_CHECKING:
    from torch import nn

    from fedgradnorm.models import Architecture

BUILTIN_DIR = Path(__file__).parent / "federations"


class FederationError(ValueError):
    """A federation spec that cannot be used: the message names the file and the problem."""

    def __init__(self, source: str | Path, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


@dataclass(frozen=True)
class Federation:
    """A federation as its spec declares it (see the module docstring)."""

    name: str
    network: Factory
    input_shape: tuple[int, ...]
    tasks: tuple[TaskSpec, ...]
    reader: str = "arrays"
    synthetic: Factory | None = None
    omega_tilde: tuple[str, ...] = ()
    description: str = ""
    source: str = ""  # the spec file
    digest: str = ""  # sha256 of the spec file's bytes
    python_path: tuple[str, ...] = field(default=(), repr=False)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ValueError(f"federation {self.name!r} has no task {name!r}; tasks: {list(self.task_names)}")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def with_loss_scales(self, scales: Mapping[str, float]) -> Federation:
        """This federation with some tasks' ``loss_scale`` replaced (an experiment's dial)."""
        for name in scales:
            self.task(name)
        tasks = tuple(replace(t, loss_scale=float(scales[t.name])) if t.name in scales else t for t in self.tasks)
        return replace(self, tasks=tasks)

    def build_shared(self, seed: int) -> nn.Module:
        """The shared network, initialised from ``seed``."""
        from fedgradnorm.models import build_shared

        return build_shared(self.network, seed)

    def build_head(self, task: TaskSpec, seed: int) -> nn.Module:
        """``task``'s personal head on this federation's representation, initialised from ``seed``."""
        from fedgradnorm.models import build_head

        return build_head(task.head, self.representation_dim, task.outputs, seed, standardize=task.standardize)

    @functools.cached_property
    def _probe(self) -> tuple[Architecture, int]:
        """The architecture and the representation width, from one throw-away build of the network."""
        from fedgradnorm.models import Architecture, representation_dim

        shared = self.build_shared(0)
        return Architecture.of(shared), representation_dim(shared, self.input_shape)

    @property
    def representation_dim(self) -> int:
        """The width of the representation the shared network makes (the heads' input)."""
        return self._probe[1]

    @property
    def architecture(self) -> Architecture:
        """The shared network's architecture (its fingerprint is what Register compares)."""
        return self._probe[0]

    def describe(self) -> dict[str, Any]:
        """The federation as plain values (a model's manifest)."""
        return {
            "name": self.name,
            "spec": self.source,
            "spec_sha256": self.digest,
            "network": {**self.network.describe(), "input_shape": list(self.input_shape)},
        }


def builtin_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in BUILTIN_DIR.glob("*.toml")))


def load_federation(name_or_path: str) -> Federation:
    """A shipped federation by name (``radcom``, ``mtfl``) or the spec file at ``name_or_path``."""
    if not name_or_path:
        raise FederationError("--federation", f"empty; give a name ({', '.join(builtin_names())}) or a spec file")
    builtin = BUILTIN_DIR / f"{name_or_path}.toml"
    if "/" not in name_or_path and "\\" not in name_or_path and builtin.is_file():
        path = builtin
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise FederationError(
                name_or_path, f"no such federation: neither a spec file nor one of {', '.join(builtin_names())}"
            )
        if not path.is_file():
            raise FederationError(name_or_path, "is not a file (expected a federation spec, .toml)")
    resolved = path.resolve()
    return _load_cached(str(resolved), resolved.stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _load_cached(path: str, _mtime_ns: int) -> Federation:
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise FederationError(path, f"cannot read: {err.strerror or err}") from err
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise FederationError(path, f"not a valid TOML file: {err}") from err
    try:
        return _parse(doc, Path(path), hashlib.sha256(raw).hexdigest())
    except FederationError:
        raise
    except (FactoryError, ValueError, TypeError) as err:
        raise FederationError(path, str(err)) from err


def _parse(doc: Mapping[str, Any], path: Path, digest: str) -> Federation:
    top = _table(doc, "the spec", {"name", "description", "python_path", "network", "data", "tasks"}, path)
    name = _string(top, "name", path, required=True)
    python_path = tuple(str((path.parent / p).resolve()) for p in _strings(top, "python_path", path))
    for folder in reversed(python_path):  # code beside the spec is importable before the spec is used
        if folder not in sys.path:
            sys.path.insert(0, folder)

    net = _table(top.get("network"), "[network]", {"factory", "kwargs", "input_shape", "omega_tilde"}, path)
    network = _factory(net, "[network]", path)
    shape = net.get("input_shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise FederationError(path, "[network] input_shape must be a list of positive integers, e.g. [256]")

    data = _table(top.get("data", {}), "[data]", {"reader", "synthetic"}, path)
    reader = _string(data, "reader", path) or "arrays"
    if reader not in READERS and not is_ref(reader):
        raise FederationError(path, f"[data] reader {reader!r}: one of {', '.join(READERS)} or package.module:attr")
    synthetic = None
    if "synthetic" in data:
        spec = data["synthetic"]
        synthetic = (
            Factory(spec)
            if isinstance(spec, str)
            else _factory(_table(spec, "[data.synthetic]", {"factory", "kwargs"}, path), "[data.synthetic]", path)
        )

    tasks_raw = top.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise FederationError(path, "needs at least one [[tasks]] table")
    keys = {
        "name",
        "outputs",
        "loss",
        "metric",
        "target",
        "column",
        "head",
        "higher_is_better",
        "standardize",
        "loss_scale",
    }
    tasks = []
    for i, raw in enumerate(tasks_raw):
        t = _table(raw, f"[[tasks]] #{i + 1}", keys, path)
        head = (
            _factory(_table(t["head"], f"task {t.get('name')!r} head", {"factory", "kwargs"}, path), "head", path)
            if "head" in t
            else None
        )
        if not isinstance(t.get("outputs"), int):
            raise FederationError(path, f"[[tasks]] #{i + 1}: outputs must be an integer")
        if not isinstance(t.get("standardize", False), bool):
            raise FederationError(path, f"[[tasks]] #{i + 1}: standardize must be true or false")
        if isinstance(t.get("loss_scale", 1.0), bool) or not isinstance(t.get("loss_scale", 1.0), int | float):
            raise FederationError(path, f"[[tasks]] #{i + 1}: loss_scale must be a number")
        tasks.append(
            TaskSpec(
                name=_string(t, "name", path, required=True),
                outputs=t["outputs"],
                loss=_string(t, "loss", path) or "cross_entropy",
                metric=_string(t, "metric", path) or "accuracy",
                target=t.get("target"),
                column=_string(t, "column", path),
                head=head,
                higher_is_better=t.get("higher_is_better"),
                standardize=t.get("standardize", False),
                loss_scale=float(t.get("loss_scale", 1.0)),
            )
        )
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise FederationError(path, f"task names repeat: {names}")
    return Federation(
        name=name,
        network=network,
        input_shape=tuple(shape),
        tasks=tuple(tasks),
        reader=reader,
        synthetic=synthetic,
        omega_tilde=tuple(_strings(net, "omega_tilde", path)),
        description=_string(top, "description", path),
        source=str(path),
        digest=digest,
        python_path=python_path,
    )


def _table(value: object, where: str, allowed: set[str], path: Path) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise FederationError(path, f"{where} must be a table")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise FederationError(path, f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return value


def _string(table: Mapping[str, Any], key: str, path: Path, *, required: bool = False) -> str:
    value = table.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise FederationError(path, f"{key} must be a {'non-empty ' if required else ''}string")
    return value


def _strings(table: Mapping[str, Any], key: str, path: Path) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise FederationError(path, f"{key} must be a list of strings")
    return value


def _factory(table: Mapping[str, Any], where: str, path: Path) -> Factory:
    ref = table.get("factory")
    kwargs = table.get("kwargs", {})
    if not isinstance(ref, str) or not isinstance(kwargs, Mapping):
        raise FederationError(path, f"{where}: factory must be 'package.module:attr', kwargs a table")
    return Factory(ref, dict(kwargs))
