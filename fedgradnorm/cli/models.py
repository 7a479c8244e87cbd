"""Subcommands on personalized models: ``export`` (omega and one node's head into a model folder) and
``predict`` (a model on a data file, predictions as CSV).

Each ``register_*`` adds one subcommand to a subparsers object; :data:`REGISTRARS` lists them. torch, the
federation and the service stores are imported only when a command runs, so ``--help`` stays fast. Bad
input raises a ``ValueError`` (:class:`fedgradnorm.export.ModelError`, :class:`fedgradnorm.data.base.DataError`
and :class:`fedgradnorm.federation.FederationError` are ones) or a :class:`fedgradnorm.errors.FatalError`, which
the ``fedgradnorm`` entry point prints as one line before exiting with status 2.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fedgradnorm.data.base import MultiTaskArrays
    from fedgradnorm.federation import Federation
    from fedgradnorm.services.aggregator.store import Snapshot
    from fedgradnorm.tasks import TaskSpec

# Samples per forward pass in predict: bounded memory on large files.
PREDICT_BATCH = 4096


# -- export ----------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    """omega from the aggregator's state and the head from a node's client.pt, written by save_model."""
    import torch

    from fedgradnorm.client import load_omega_
    from fedgradnorm.data.partition import node_data
    from fedgradnorm.errors import FatalError
    from fedgradnorm.export import evaluate_with, save_model
    from fedgradnorm.services.edge_node.store import NodeStore

    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError(f"--test-fraction {args.test_fraction}: a fraction in (0, 1)")
    state_path, snap = _aggregator_snapshot(args.aggregator_state)
    fed = _export_federation(args.federation, snap, state_path)
    stored_fed = snap.identity.get("federation")
    if stored_fed != fed.name:
        raise FatalError(f"{state_path}: the aggregator state is of federation {stored_fed!r}, not {fed.name!r}")
    if snap.identity.get("network") != fed.architecture.fingerprint:
        raise FatalError(
            f"{state_path}: omega was trained on a network with architecture fingerprint "
            f"{snap.identity.get('network')}, federation {fed.name!r}'s network has {fed.architecture.fingerprint} "
            "(its network code or spec changed since)"
        )

    node_store = NodeStore(args.node_state)
    identity = node_store.load_identity()
    if identity is not None and identity.federation != fed.name:
        raise FatalError(
            f"{node_store.identity_path}: the node belongs to federation {identity.federation!r}, not {fed.name!r}"
        )
    blob = node_store.load_client()
    if blob is None:
        raise FatalError(
            f"{node_store.client_path}: no such file (a node writes its personal model there after its first round)"
        )
    head_state, task_name = _client_state(node_store.client_path, blob)
    if identity is not None and identity.task != task_name:
        raise FatalError(
            f"{node_store.client_path}: a head of task {task_name!r}, but the node's identity says {identity.task!r}"
        )
    try:
        task = fed.task(task_name)
    except ValueError as err:
        raise FatalError(f"{node_store.client_path}: {err}") from err

    shared = fed.build_shared(0)
    try:
        load_omega_(shared, snap.server.omega)
    except ValueError as err:
        raise FatalError(f"{state_path}: {err}") from err
    head = fed.build_head(task, 0)
    try:
        head.load_state_dict(head_state, strict=True)
    except (RuntimeError, TypeError) as err:
        raise FatalError(f"{node_store.client_path}: the head does not fit task {task.name!r}: {err}") from err

    metrics: dict[str, float] = {}
    if args.data:
        data = node_data(fed, task, args.data, args.test_fraction, args.seed)
        x = torch.as_tensor(data.test.x, dtype=torch.float32)
        metrics = evaluate_with(shared, head, task, x, task.targets(data.test.targets[task.name]))
    path = save_model(
        args.out,
        federation=fed,
        task=task,
        shared=shared,
        head=head,
        round_=snap.server.round,
        metrics=metrics,
        node=identity.node_id if identity is not None else "",
    )
    scores = "".join(f", {k} {v:.6g}" for k, v in metrics.items())
    print(
        f"wrote {path} and {path.with_name('manifest.json').name}: federation {fed.name}, task {task.name}, "
        f"round {snap.server.round}{scores}"
    )
    return 0


def _aggregator_snapshot(folder: str) -> tuple[Path, Snapshot]:
    """The aggregator state file in ``folder`` and its snapshot.

    Read with the store's own decoder, not ``FileStateStore.load()``: that one also deletes the temporary
    files of an interrupted commit, which would break a commit in flight of a running aggregator."""
    from fedgradnorm.errors import FatalError
    from fedgradnorm.services.aggregator.store import FileStateStore, decode_snapshot

    path = FileStateStore(folder).path
    if not path.is_file():
        raise FatalError(f"{path}: no aggregator state there (--aggregator-state is the aggregator's state folder)")
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise FatalError(f"{path}: cannot read ({err.strerror or err})") from err
    return path, decode_snapshot(blob, str(path))


def _export_federation(given: str, snap: Snapshot, state_path: Path) -> Federation:
    """The federation ``--federation`` names, else the one the aggregator state records (by name)."""
    from fedgradnorm.federation import FederationError, load_federation

    if given:
        return load_federation(given)
    name = snap.identity.get("federation")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{state_path}: the state records no federation; give --federation")
    try:
        return load_federation(name)
    except FederationError as err:
        raise ValueError(
            f"{state_path}: the state's federation {name!r} is not a shipped one; give its spec with --federation PATH"
        ) from err


def _client_state(path: Path, blob: bytes) -> tuple[dict[str, Any], str]:
    """The head's state dict and task name from a node's client.pt (read with ``weights_only``: no code runs)."""
    from fedgradnorm.client import decode_client_state
    from fedgradnorm.errors import FatalError

    try:
        state = decode_client_state(blob)
    except ValueError as err:
        raise FatalError(f"{path}: {err}") from err
    return state["head"], state["task"]


def register_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        help="write a node's personalized model (omega + its head) as model.safetensors and manifest.json",
        description="Reads omega from the aggregator's state folder and the head from the node's state folder "
        "(client.pt), checks both belong to the federation, and writes a model `fedgradnorm predict` and plain "
        "torch can load (safetensors: no pickle).",
    )
    p.add_argument("--aggregator-state", required=True, metavar="DIR", help="the aggregator's state folder")
    p.add_argument("--node-state", required=True, metavar="DIR", help="the edge node's state folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the model into (created)")
    p.add_argument(
        "--federation",
        default="",
        metavar="NAME|SPEC",
        help="the federation: a shipped name or a spec file (default: the name the aggregator state records)",
    )
    p.add_argument(
        "--data",
        default="",
        metavar="PATH",
        help="the node's own data file: evaluate on its test split and record the metrics in the manifest",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="test share of --data when it has no test pool, as the node used it (default 0.2, the node's)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of --data's test split, as the node used it (default 0, the node's)"
    )
    p.set_defaults(func=_export)


# -- predict ---------------------------------------------------------------------------------------


def _predict(args: argparse.Namespace) -> int:
    """A model's predictions for every sample of a data file, as CSV; its loss and metric where the file has targets."""
    import numpy as np
    import torch

    from fedgradnorm.atomic import atomic_write_text
    from fedgradnorm.data.base import DataError
    from fedgradnorm.data.partition import task_view
    from fedgradnorm.data.sources import read_pools
    from fedgradnorm.export import load_model, metrics_of
    from fedgradnorm.federation import load_federation

    fed = load_federation(args.federation) if args.federation else None
    model = load_model(args.model, fed)
    task = model.task
    reader = args.reader or model.manifest["federation"]["reader"]
    pools = read_pools(reader, args.data)
    parts = [pools.train] if pools.test is None else [pools.train, pools.test]
    x = np.concatenate([p.x for p in parts]) if len(parts) > 1 else parts[0].x
    if len(x) == 0:
        raise DataError(args.data, "no samples")
    if tuple(x.shape[1:]) != model.input_shape:
        raise DataError(args.data, f"samples of shape {list(x.shape[1:])}; the model takes {list(model.input_shape)}")
    prediction = model.predict(torch.as_tensor(x, dtype=torch.float32), batch_size=PREDICT_BATCH)

    where = str(args.data)
    scores: dict[str, float] | None = None
    if all(_has_target(p, task) for p in parts):
        y = np.concatenate([task_view(p, task, where).targets[task.name] for p in parts])
        scores = metrics_of(task, model.head, prediction, torch.as_tensor(y))

    text = _csv(task, prediction)
    lines = [f"{len(x)} samples from {args.data} (task {task.name})"]
    if scores is not None:
        lines.append(
            f"{task.metric} {scores[task.metric]:.6g}, loss {scores['test_loss']:.6g} ({task.loss}) "
            f"over all {len(x)} samples"
        )
    else:
        lines.append(f"no {task.column or task.name!r} targets in the file: predictions only")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
        lines.append(f"wrote {out}")
        print("\n".join(lines))
    else:  # the CSV is the output; the summary goes beside it
        sys.stdout.write(text)
        print("\n".join(lines), file=sys.stderr)
    return 0


def _has_target(arrays: MultiTaskArrays, task: TaskSpec) -> bool:
    """Whether ``arrays`` holds ``task``'s targets, by the rule :func:`fedgradnorm.data.partition.task_view` reads
    them with: the task's column, else its name, else a file's only target column."""
    column = task.column or task.name
    return column in arrays.targets or (not task.column and len(arrays.targets) == 1)


def _csv(task: TaskSpec, prediction: torch.Tensor) -> str:
    """The CSV text: ``index,prediction,p_0..p_{k-1}`` (arg-max class and softmax) for a classification
    task, ``index,y_0..y_{k-1}`` (the head's outputs) otherwise; floats with 9 significant digits
    (float32 exactly)."""
    import numpy as np
    import torch

    pred = prediction.detach().to("cpu", torch.float32).reshape(len(prediction), -1)
    index = np.arange(len(pred)).reshape(-1, 1)
    k = pred.shape[1]
    values: np.ndarray
    if task.kind == "classification":
        header = ["index", "prediction", *(f"p_{i}" for i in range(k))]
        classes = pred.argmax(dim=1).numpy().reshape(-1, 1)
        probs = torch.softmax(pred, dim=1).numpy()
        values = np.hstack([index, classes, probs])
        fmt = ["%d", "%d", *["%.9g"] * k]
    else:
        header = ["index", *(f"y_{i}" for i in range(k))]
        values = np.hstack([index, pred.numpy()])
        fmt = ["%d", *["%.9g"] * k]
    buf = io.StringIO()
    np.savetxt(buf, values, fmt=fmt, delimiter=",", header=",".join(header), comments="")
    return buf.getvalue()


def register_predict(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "predict",
        help="run an exported model on a data file: predictions as CSV, its metric where the file has targets",
        description="Predicts every sample of the file (its train pool, then its test pool if it has one). The CSV "
        "has index,prediction,p_0..p_{k-1} (arg-max class and softmax probabilities) for a classification task "
        "and index,y_0..y_{k-1} otherwise. With --out the summary goes to stdout, else the CSV does and the "
        "summary goes to stderr.",
    )
    p.add_argument("--model", required=True, metavar="PATH", help="the model folder or its model.safetensors")
    p.add_argument("--data", required=True, metavar="PATH", help="the data file, in the federation reader's format")
    p.add_argument("--out", default="", metavar="FILE.csv", help="CSV file to write (default: stdout)")
    p.add_argument(
        "--reader",
        default="",
        metavar="NAME",
        help="the data file's reader: radcom, mtfl, arrays, images or package.module:attr (default: the model's)",
    )
    p.add_argument(
        "--federation",
        default="",
        metavar="SPEC",
        help="the model's federation spec, needed when the network's code lies beside the spec",
    )
    p.set_defaults(func=_predict)


REGISTRARS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    register_export,
    register_predict,
]
