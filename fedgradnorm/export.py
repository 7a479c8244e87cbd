"""A personalized model as a file: omega (the shared network) with one node's head, outside the federation.

:func:`save_model` writes a folder with two files:

- ``model.safetensors``: the tensors in the safetensors format (read without unpickling, so a model file
  from a stranger cannot run code, unlike ``torch.save``): ``shared.<name>`` for every entry of the shared
  network's ``state_dict()`` (its parameters, and its buffers if it has any) and ``head.<name>`` for the
  head's, on the CPU, contiguous, floating-point tensors as float32. The manifest (below) is stored in the
  file's metadata under the key ``"manifest"`` as JSON, so the file alone is a complete model.
- ``manifest.json``: the same manifest, indented, for people and tools that read JSON.

Both are replaced atomically (:mod:`fedgradnorm.atomic`), the manifest last. :func:`load_model` reads the
manifest from the safetensors metadata (the copy written with the tensors, never a stale ``manifest.json``
left by a crash between the two writes).

The manifest (format ``fedgradnorm-model/1``)::

    {
      "format": "fedgradnorm-model/1",
      "federation": {"name", "spec", "spec_sha256",               # Federation.describe()
                     "network": {"factory", "kwargs", "input_shape"},
                     "reader"},                                    # the federation's data reader
      "task": {"name", "outputs", "loss", "metric", "target",      # TaskSpec.describe()
               "higher_is_better", "head", "standardize",          # (a head predicting standardized
               "loss_scale", "column"},                            #  targets un-scales them itself)
      "representation_dim": 256,                                   # the head's input width
      "fingerprint": "sha256:...",                                 # Architecture.of(shared).fingerprint
      "round": 12,                                                 # the global round omega is from
      "node": "...",                                               # the node whose head this is ("" if unknown)
      "metrics": {"test_loss": 0.41, "accuracy": 0.87},            # may be empty; null where not finite
      "created_unix": 1700000000.0
    }

:func:`load_model` rebuilds the network from the manifest's factory and keyword arguments (or from the
federation it is given), refuses a network whose architecture fingerprint differs from the exported one
(the network code changed since the export), and loads every tensor strictly. Every problem with the file
is a :class:`ModelError` naming the file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fedgradnorm.atomic import atomic_replace, atomic_write_text
from fedgradnorm.factory import Factory
from fedgradnorm.federation import Federation
from fedgradnorm.models import Architecture, build_head, build_shared, loss_units
from fedgradnorm.tasks import TaskSpec

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "ExportedModel",
    "ModelError",
    "evaluate_with",
    "load_model",
    "metrics_of",
    "predict_with",
    "save_model",
]

FORMAT = "fedgradnorm-model/1"
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
SHARED_PREFIX = "shared."
HEAD_PREFIX = "head."
# The task fields a model's task must agree on with the federation's task of the same name.
_TASK_KEYS = ("outputs", "loss", "metric", "target", "higher_is_better", "head", "standardize")
_TASK_DEFAULTS = {"standardize": False}  # keys a manifest written before them lacks


class ModelError(ValueError):
    """A model file that cannot be used: the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# -- running a shared network and a head ------------------------------------------------------------


def predict_with(shared: nn.Module, head: nn.Module, x: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """``head(shared(x))`` in eval mode without gradients, on the shared network's device.

    ``x`` holds samples on its first axis (converted to float32). With ``batch_size`` the samples go
    through in batches of that many (bounded memory for large files), else in one pass. Both modules'
    training flags are restored afterwards.
    """
    device = next(shared.parameters()).device
    x = torch.as_tensor(x, dtype=torch.float32).to(device)
    modes = (shared.training, head.training)
    shared.eval()
    head.eval()
    try:
        with torch.no_grad():
            if batch_size is None or batch_size >= len(x):
                out: torch.Tensor = head(shared(x))
                return out
            if batch_size < 1:
                raise ValueError(f"batch_size must be at least 1, not {batch_size}")
            return torch.cat([head(shared(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])
    finally:
        shared.train(modes[0])
        head.train(modes[1])


def metrics_of(task: TaskSpec, head: nn.Module, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``{"test_loss": loss, <task.metric>: value}`` of ``head``'s ``prediction`` against ``target``, as
    :meth:`fedgradnorm.client.LocalClient.evaluate` computes them (the figures a node logs; the loss in
    the units it is trained in, :func:`fedgradnorm.models.loss_units`).

    ``target`` is converted as the task's loss reads it (:meth:`TaskSpec.targets`)."""
    y = task.targets(target).to(prediction.device)
    with torch.no_grad():
        loss = float(task.loss_value(*loss_units(head, prediction, y)))
        value = task.metric_value(prediction, y)
    return {"test_loss": loss, task.metric: value}


def evaluate_with(
    shared: nn.Module,
    head: nn.Module,
    task: TaskSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int | None = None,
) -> dict[str, float]:
    """The loss and metric of ``head(shared(x))`` against ``y`` (see :func:`metrics_of`), in eval mode."""
    return metrics_of(task, head, predict_with(shared, head, x, batch_size=batch_size), y)


# -- the model file --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedModel:
    """A loaded model: its manifest, its task, and the shared network and head (on the CPU, eval mode)."""

    manifest: dict[str, Any]
    task: TaskSpec
    shared: nn.Module
    head: nn.Module

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape, as the shared network takes it."""
        return tuple(self.manifest["federation"]["network"]["input_shape"])

    def predict(self, x: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """The head's outputs for the samples ``x`` (logits for a classification task); see :func:`predict_with`."""
        return predict_with(self.shared, self.head, x, batch_size=batch_size)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int | None = None) -> dict[str, float]:
        """``{"test_loss": ..., <metric>: ...}`` on the samples ``x`` with targets ``y``; see :func:`metrics_of`."""
        return evaluate_with(self.shared, self.head, self.task, x, y, batch_size=batch_size)


def save_model(
    out_dir: str | Path,
    *,
    federation: Federation,
    task: TaskSpec,
    shared: nn.Module,
    head: nn.Module,
    round_: int,
    metrics: Mapping[str, float],
    node: str = "",
) -> Path:
    """Write ``shared`` and ``head`` as a model of ``federation``'s ``task`` into ``out_dir`` (created if needed).

    ``round_`` is the global round omega comes from, ``metrics`` the figures to record (e.g.
    :func:`evaluate_with` on the node's test split; may be empty; values that are not finite are recorded
    as null), ``node`` the node whose head it is. The tensors are copied to the CPU; the modules are not
    changed. Raises ``ValueError`` when ``task`` is not one of the federation's, ``shared`` is not the
    federation's network (another architecture fingerprint) or ``head`` not the task's (other tensors), ``OSError`` when the folder cannot be
    written (any earlier model there is then left as it was). Returns the path of ``model.safetensors``.
    """
    federation.task(task.name)  # raises ValueError for a task of another federation
    architecture = Architecture.of(shared)
    fingerprint = architecture.fingerprint
    if fingerprint != federation.architecture.fingerprint:
        raise ValueError(
            f"the shared network is not the network of federation {federation.name!r}: "
            f"{architecture.difference(federation.architecture)}"
        )
    want = {k: tuple(v.shape) for k, v in federation.build_head(task, 0).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    if have != want:
        raise ValueError(
            f"the head does not fit task {task.name!r}: its tensors are {have}, the task's head has {want}"
        )
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "federation": {**federation.describe(), "reader": federation.reader},
        "task": {**task.describe(), "column": task.column},
        "representation_dim": int(federation.representation_dim),
        "fingerprint": fingerprint,
        "round": int(round_),
        "node": str(node),
        "metrics": {str(k): (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()},
        "created_unix": time.time(),
    }
    text = json.dumps(manifest, allow_nan=False)
    tensors = {**_cpu_tensors(SHARED_PREFIX, shared), **_cpu_tensors(HEAD_PREFIX, head)}
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / MODEL_FILE
    with atomic_replace(model_path) as tmp:
        save_file(tensors, tmp, metadata={"manifest": text})
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return model_path


def _cpu_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state as independent, contiguous CPU tensors (floating point as float32), names prefixed."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[prefix + name] = t.contiguous().clone()  # clone: tied or shared storage must not reach safetensors
    return out


def load_model(path: str | Path, federation: Federation | None = None) -> ExportedModel:
    """The model at ``path`` (its folder or its ``model.safetensors``), on the CPU in eval mode.

    The network is rebuilt from the manifest's factory and keyword arguments; with ``federation`` (needed
    when the network's code lies beside a user federation's spec) from that federation instead, whose name
    must be the manifest's and whose task of the model's name must agree with the manifest's. The head is
    ``build_head(task.head, representation_dim, outputs, 0)``. Raises :class:`ModelError` (a
    ``ValueError``) for a missing file, a file that is not safetensors, a missing or invalid manifest, a
    network whose fingerprint differs from the exported one, and tensors missing, unexpected or of the
    wrong shape or dtype.
    """
    file = Path(path)
    if file.is_dir():
        file = file / MODEL_FILE
    metadata, tensors = _read_safetensors(file)
    manifest = _parse_manifest(file, metadata)
    net = manifest["federation"]["network"]
    if federation is not None:
        if federation.name != manifest["federation"]["name"]:
            raise ModelError(file, f"a model of federation {manifest['federation']['name']!r}, not {federation.name!r}")
        task = _federation_task(file, federation, manifest["task"])
        factory = federation.network
    else:
        task = _manifest_task(file, manifest["task"])
        try:
            factory = Factory(net["factory"], net["kwargs"])
        except ValueError as err:
            raise ModelError(file, f"manifest network: {err}") from err
    shared = _build(file, "shared network", lambda: build_shared(factory, 0))
    fingerprint = Architecture.of(shared).fingerprint
    if fingerprint != manifest["fingerprint"]:
        raise ModelError(
            file,
            f"the network {factory.ref} built here has architecture fingerprint {fingerprint}, the model was "
            f"exported with {manifest['fingerprint']}: the network code changed since the export",
        )
    head = _build(
        file,
        "head",
        lambda: build_head(task.head, manifest["representation_dim"], task.outputs, 0, standardize=task.standardize),
    )
    unexpected = sorted(k for k in tensors if not k.startswith((SHARED_PREFIX, HEAD_PREFIX)))
    if unexpected:
        raise ModelError(file, f"unexpected tensor(s) {_names(unexpected)}")
    _load_into(file, SHARED_PREFIX, shared, tensors)
    _load_into(file, HEAD_PREFIX, head, tensors)
    shared.eval()
    head.eval()
    return ExportedModel(manifest=manifest, task=task, shared=shared, head=head)


def _read_safetensors(file: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file (its header is parsed, nothing is unpickled)."""
    if not file.exists():
        raise ModelError(file, "no such file")
    if not file.is_file():
        raise ModelError(file, "is not a file")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {str(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except OSError as err:
        raise ModelError(file, f"cannot read: {err.strerror or err}") from err
    except Exception as err:  # safetensors' own error type is not exported in a stable place
        raise ModelError(file, f"not a safetensors model file ({type(err).__name__}: {err})") from err
    return dict(metadata), tensors


def _parse_manifest(file: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """The manifest from the metadata, checked key by key."""
    text = metadata.get("manifest")
    if text is None:
        raise ModelError(file, "no manifest in the safetensors metadata: not a model fedgradnorm exported")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelError(file, f"the manifest is not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise ModelError(file, f"the manifest is a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise ModelError(file, f"manifest format {manifest.get('format')!r}: this version reads {FORMAT!r}")
    fed = _need(file, manifest, "federation", dict)
    _need(file, fed, "name", str, "federation.")
    _need(file, fed, "reader", str, "federation.")
    net = _need(file, fed, "network", dict, "federation.")
    _need(file, net, "factory", str, "federation.network.")
    _need(file, net, "kwargs", dict, "federation.network.")
    shape = _need(file, net, "input_shape", list, "federation.network.")
    if not shape or not all(_is_int(d) and d > 0 for d in shape):
        raise ModelError(file, f"manifest federation.network.input_shape {shape!r}: not a list of positive integers")
    task = _need(file, manifest, "task", dict)
    _need(file, task, "name", str, "task.")
    if not _is_int(task.get("outputs")) or task["outputs"] < 1:
        raise ModelError(file, f"manifest task.outputs {task.get('outputs')!r}: not a positive integer")
    if not _is_int(manifest.get("representation_dim")) or manifest["representation_dim"] < 1:
        raise ModelError(
            file, f"manifest representation_dim {manifest.get('representation_dim')!r}: not a positive integer"
        )
    _need(file, manifest, "fingerprint", str)
    if not _is_int(manifest.get("round")):
        raise ModelError(file, f"manifest round {manifest.get('round')!r}: not an integer")
    _need(file, manifest, "metrics", dict)
    return manifest


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need(file: Path, table: Mapping[str, Any], key: str, kind: type, where: str = "") -> Any:
    """``table[key]``, which must be a ``kind`` (a JSON object, list or string)."""
    value = table.get(key)
    if not isinstance(value, kind):
        what = {"dict": "an object", "list": "a list", "str": "a string"}.get(kind.__name__, kind.__name__)
        raise ModelError(file, f"manifest {where}{key} is {'missing' if value is None else repr(value)}: needs {what}")
    return value


def _manifest_task(file: Path, raw: Mapping[str, Any]) -> TaskSpec:
    """The task as the manifest describes it (its loss and metric imported when they are user code)."""
    head = raw.get("head")
    try:
        if head is not None and not (isinstance(head, dict) and isinstance(head.get("factory"), str)):
            raise ValueError(f"head {head!r} is neither null nor {{factory, kwargs}}")
        return TaskSpec(
            name=raw["name"],
            outputs=raw["outputs"],
            loss=str(raw.get("loss", "cross_entropy")),
            metric=str(raw.get("metric", "accuracy")),
            target=raw.get("target"),
            column=str(raw.get("column") or ""),
            head=Factory(head["factory"], head.get("kwargs", {})) if head else None,
            higher_is_better=raw.get("higher_is_better"),
            standardize=raw.get("standardize", False) is True,
            loss_scale=float(raw.get("loss_scale", 1.0)),
        )
    except (ValueError, TypeError) as err:
        raise ModelError(
            file,
            f"the manifest's task cannot be rebuilt ({err}); if its code lies beside a federation spec, pass that federation",
        ) from err


def _federation_task(file: Path, federation: Federation, raw: Mapping[str, Any]) -> TaskSpec:
    """The federation's task of the model's name, which must agree with the manifest's description."""
    try:
        task = federation.task(raw["name"])
    except ValueError as err:
        raise ModelError(file, str(err)) from err
    mine = task.describe()
    differ = [k for k in _TASK_KEYS if mine.get(k) != raw.get(k, _TASK_DEFAULTS.get(k))]
    if differ:
        detail = "; ".join(f"{k} {raw.get(k)!r} in the model, {mine.get(k)!r} in the federation" for k in differ)
        raise ModelError(file, f"task {task.name!r} differs from federation {federation.name!r}'s: {detail}")
    return task


def _build(file: Path, what: str, make: Callable[[], object]) -> nn.Module:
    """``make()``, a network or head built by (possibly user) code; any failure becomes a ModelError."""
    try:
        module = make()
    except Exception as err:  # user code may raise anything: report it against the model file
        raise ModelError(
            file,
            f"cannot build the {what} ({type(err).__name__}: {err}); if its code lies beside a federation "
            "spec, pass that federation",
        ) from err
    if not isinstance(module, nn.Module):
        raise ModelError(file, f"the {what} built is a {type(module).__name__}, not a torch.nn.Module")
    return module


def _load_into(file: Path, prefix: str, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load the ``prefix`` tensors into ``module`` strictly, after checking names, shapes and dtypes."""
    expected = module.state_dict()
    found = {k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)}
    missing = [prefix + k for k in expected if k not in found]
    if missing:
        raise ModelError(file, f"tensor(s) missing: {_names(missing)}")
    extra = [prefix + k for k in found if k not in expected]
    if extra:
        raise ModelError(file, f"unexpected tensor(s) {_names(extra)}")
    for name, want in expected.items():
        got = found[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ModelError(
                file, f"tensor {prefix}{name} has shape {list(got.shape)}, the network expects {list(want.shape)}"
            )
        dtype = torch.float32 if want.is_floating_point() else want.dtype
        if got.dtype != dtype:
            raise ModelError(file, f"tensor {prefix}{name} is {got.dtype}, expected {dtype}")
    try:
        module.load_state_dict(found, strict=True)
    except RuntimeError as err:
        raise ModelError(file, f"cannot load the {prefix.rstrip('.')} tensors: {err}") from err


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
