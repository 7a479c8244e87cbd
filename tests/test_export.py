"""Exported personalized models (fedgradnorm/export.py) and the `export` / `predict` commands
(fedgradnorm/cli/models.py).

Most tests use a tiny user federation written beside its network code (a 256-8-8 MLP, so that a
synthetic RadCom file is its data): a classification task and a regression task whose target is
RadCom's anomaly column. The end-to-end export runs on the shipped RadCom federation (Network 2).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional

from fedgradnorm.algorithm import AdamState, ClientConfig, ServerState
from fedgradnorm.cli import app, models
from fedgradnorm.client import LocalClient, load_omega_
from fedgradnorm.data.partition import node_data
from fedgradnorm.data.sources import read_pools
from fedgradnorm.data.synthetic_radcom import generate_radcom
from fedgradnorm.export import FORMAT, ExportedModel, ModelError, load_model, save_model
from fedgradnorm.federation import Federation, load_federation
from fedgradnorm.services.aggregator.store import FileStateStore, Snapshot
from fedgradnorm.services.edge_node.store import Identity, NodeStore

REPO = Path(__file__).resolve().parent.parent
TINY_MODULE = "fgn_export_tinynet"
TINY_CODE = '''
"""A tiny shared network and a user reader for tests/test_export.py."""
import numpy as np
import torch
from torch import nn

from fedgradnorm.data.base import MultiTaskArrays, Pools


class TinyNet(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def read_narrow(path):
    """Samples of the wrong width (10 values, the network takes 256)."""
    return Pools(MultiTaskArrays(x=np.zeros((4, 10), np.float32), targets={}))


def read_unlabelled(path):
    """Three train and two test samples without targets."""
    x = np.linspace(-1, 1, 5 * 256, dtype=np.float32).reshape(5, 256)
    return Pools(MultiTaskArrays(x=x[:3], targets={}), MultiTaskArrays(x=x[3:], targets={}))
'''


def tiny_spec(hidden: int = 8, name: str = "tiny") -> str:
    return textwrap.dedent(f"""
        name = "{name}"
        python_path = ["."]

        [network]
        factory = "{TINY_MODULE}:TinyNet"
        kwargs = {{ hidden = {hidden} }}
        input_shape = [256]

        [data]
        reader = "radcom"

        [[tasks]]
        name = "modulation"
        outputs = 6

        [[tasks]]
        name = "level"
        outputs = 1
        loss = "mse"
        metric = "mae"
        column = "anomaly"
        """)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tinyfed")
    (folder / f"{TINY_MODULE}.py").write_text(TINY_CODE)
    (folder / "tiny.toml").write_text(tiny_spec())
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Federation:
    return load_federation(str(tiny_dir / "tiny.toml"))


@pytest.fixture(scope="module")
def radcom_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic RadComDynamic file: 2 samples per (modulation, signal, SNR), 360 samples."""
    return Path(generate_radcom(tmp_path_factory.mktemp("data") / "radcom.hdf5", samples_per_key=2, seed=0))


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """The real `fedgradnorm` entry point (app.main: its parser and its one-line errors) with this
    module's commands in place of the services'; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(app, "_service_commands", lambda: models.REGISTRARS)

    def run(*argv: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = app.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def trained(fed: Federation, task: str, seed: int = 1) -> tuple[nn.Module, nn.Module]:
    """A shared network and head with weights other than the seed-0 ones load_model starts from."""
    return fed.build_shared(seed), fed.build_head(fed.task(task), seed + 1)


def all_x(path: Path) -> torch.Tensor:
    return torch.as_tensor(read_pools("radcom", path).train.x)


# -- save and load -------------------------------------------------------------------------------


def test_round_trip_reproduces_predictions_exactly(tiny: Federation, tmp_path: Path, radcom_file: Path) -> None:
    shared, head = trained(tiny, "modulation")
    path = save_model(
        tmp_path / "model",
        federation=tiny,
        task=tiny.task("modulation"),
        shared=shared,
        head=head,
        round_=12,
        metrics={"test_loss": 1.5, "accuracy": 0.25},
        node="node-7",
    )
    assert path == tmp_path / "model" / "model.safetensors"
    x = all_x(radcom_file)
    with torch.no_grad():
        expected = head(shared(x))
    for source, fed in ((path, None), (path.parent, None), (path.parent, tiny)):
        model = load_model(source, fed)
        assert isinstance(model, ExportedModel)
        assert torch.equal(model.predict(x), expected)
        assert torch.equal(model.predict(x, batch_size=50)[:50], model.predict(x[:50]))
        assert not model.shared.training and not model.head.training

    manifest = json.loads((path.parent / "manifest.json").read_text())
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["manifest"]) == manifest
    assert manifest["format"] == FORMAT == "fedgradnorm-model/1"
    assert manifest["federation"] == {**tiny.describe(), "reader": "radcom"}
    assert manifest["task"] == {**tiny.task("modulation").describe(), "column": ""}
    assert manifest["representation_dim"] == 8
    assert manifest["fingerprint"] == tiny.architecture.fingerprint
    assert (manifest["round"], manifest["node"]) == (12, "node-7")
    assert manifest["metrics"] == {"test_loss": 1.5, "accuracy": 0.25}
    assert isinstance(manifest["created_unix"], float)

    tensors = load_file(path)
    assert sorted(tensors) == sorted(
        [f"shared.{n}" for n, _ in shared.named_parameters()] + [f"head.{n}" for n, _ in head.named_parameters()]
    )
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())


def test_evaluate_matches_the_node_and_not_finite_metrics_are_null(
    tiny: Federation, tmp_path: Path, radcom_file: Path
) -> None:
    task = tiny.task("level")
    data = node_data(tiny, task, radcom_file, 0.2, 0)
    client = LocalClient("n", tiny, data, ClientConfig(), seed=3)
    shared = tiny.build_shared(4)
    node = client.evaluate(shared)
    save_model(
        tmp_path,
        federation=tiny,
        task=task,
        shared=shared,
        head=client.head,
        round_=0,
        metrics={"test_loss": float("nan")},
    )
    model = load_model(tmp_path)
    assert model.manifest["metrics"] == {"test_loss": None}
    assert model.task.column == "anomaly"
    got = model.evaluate(torch.as_tensor(data.test.x), torch.as_tensor(data.test.targets["level"]))
    assert got == {"test_loss": node.test_loss, "mae": node.value}


def test_plain_torch_reproduces_the_recorded_metric(
    tiny: Federation, tiny_dir: Path, tmp_path: Path, radcom_file: Path
) -> None:
    """The file needs nothing of fedgradnorm: safetensors, the network class and an nn.Linear head."""
    task = tiny.task("modulation")
    data = node_data(tiny, task, radcom_file, 0.2, 0)
    client = LocalClient("n", tiny, data, ClientConfig(), seed=5)
    shared = tiny.build_shared(6)
    ev = client.evaluate(shared)
    path = save_model(
        tmp_path,
        federation=tiny,
        task=task,
        shared=shared,
        head=client.head,
        round_=3,
        metrics={"test_loss": ev.test_loss, ev.metric: ev.value},
    )

    sys.path.insert(0, str(tiny_dir))
    try:
        from fgn_export_tinynet import TinyNet  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tiny_dir))
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["manifest"])
    tensors = load_file(path)
    net = TinyNet(**manifest["federation"]["network"]["kwargs"])
    net.load_state_dict({k.removeprefix("shared."): v for k, v in tensors.items() if k.startswith("shared.")})
    linear = nn.Linear(manifest["representation_dim"], manifest["task"]["outputs"])
    linear.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
    x, y = torch.as_tensor(data.test.x), torch.as_tensor(data.test.targets["modulation"])
    with torch.no_grad():
        logits = linear(net(x))
    accuracy = float((logits.argmax(dim=1) == y).float().mean())
    loss = float(functional.cross_entropy(logits, y))
    assert abs(accuracy - manifest["metrics"]["accuracy"]) < 1e-6
    assert abs(loss - manifest["metrics"]["test_loss"]) < 1e-6
    assert 0 < accuracy < 1  # a real comparison, not two zeros


# -- refusals -------------------------------------------------------------------------------------


def rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, object]], None]) -> None:
    """Rewrite a model file with its tensors and manifest changed by ``edit`` (in place)."""
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["manifest"])
    tensors = load_file(path)
    edit(tensors, manifest)
    save_file(tensors, path, metadata={"manifest": json.dumps(manifest)})


@pytest.fixture
def model_path(tiny: Federation, tmp_path: Path) -> Path:
    shared, head = trained(tiny, "modulation")
    return save_model(
        tmp_path / "m", federation=tiny, task=tiny.task("modulation"), shared=shared, head=head, round_=1, metrics={}
    )


def test_a_changed_network_is_refused_by_fingerprint(tiny: Federation, tiny_dir: Path, model_path: Path) -> None:
    def wider(_t: dict[str, torch.Tensor], m: dict[str, object]) -> None:
        m["federation"]["network"]["kwargs"] = {"hidden": 16}  # type: ignore[index]

    wide_spec = tiny_dir / "tiny-wide.toml"
    wide_spec.write_text(tiny_spec(hidden=16))
    with pytest.raises(ModelError, match="the network code changed since the export") as err:
        load_model(model_path, load_federation(str(wide_spec)))
    assert str(model_path) in str(err.value)

    rewrite(model_path, wider)
    with pytest.raises(
        ModelError, match=r"fingerprint sha256:\w+, the model was exported with sha256:\w+: the network code changed"
    ):
        load_model(model_path)


def test_a_model_of_another_federation_or_task_is_refused(tiny_dir: Path, model_path: Path) -> None:
    with pytest.raises(ModelError, match="a model of federation 'tiny', not 'radcom'"):
        load_model(model_path, load_federation("radcom"))
    other = tiny_dir / "tiny-six-outputs-changed.toml"
    other.write_text(tiny_spec().replace("outputs = 6", "outputs = 5"))
    with pytest.raises(ModelError, match=r"task 'modulation' differs .* outputs 6 in the model, 5 in the federation"):
        load_model(model_path, load_federation(str(other)))


def test_save_refuses_a_network_that_is_not_the_federations(tiny: Federation, tmp_path: Path) -> None:
    _, head = trained(tiny, "modulation")
    with pytest.raises(ValueError, match="not the network of federation 'tiny': 2 parameter tensors here, 4 there"):
        save_model(
            tmp_path, federation=tiny, task=tiny.task("modulation"), shared=nn.Linear(256, 8), head=head,
            round_=0, metrics={},
        )  # fmt: skip
    shared, _ = trained(tiny, "modulation")
    with pytest.raises(
        ValueError, match=r"the head does not fit task 'modulation': its tensors are \{'weight': \(1, 8\)"
    ):
        save_model(
            tmp_path, federation=tiny, task=tiny.task("modulation"), shared=shared, head=tiny.build_head(tiny.task("level"), 0),
            round_=0, metrics={},
        )  # fmt: skip
    assert not (tmp_path / "model.safetensors").exists()


def _drop(name: str) -> Callable[[dict[str, torch.Tensor], dict[str, object]], None]:
    def edit(tensors: dict[str, torch.Tensor], _manifest: dict[str, object]) -> None:
        del tensors[name]

    return edit


def _set(name: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor], dict[str, object]], None]:
    return lambda t, _m: t.__setitem__(name, value)


def _manifest(key: str, value: object) -> Callable[[dict[str, torch.Tensor], dict[str, object]], None]:
    return lambda _t, m: m.__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_drop("shared.body.2.bias"), "tensor(s) missing: shared.body.2.bias"),
        (_drop("head.weight"), "tensor(s) missing: head.weight"),
        (_set("shared.body.0.weight", torch.zeros(8, 255)), "tensor shared.body.0.weight has shape [8, 255], the network expects [8, 256]"),
        (_set("head.bias", torch.zeros(6, dtype=torch.float16)), "tensor head.bias is torch.float16, expected torch.float32"),
        (_set("head.extra", torch.zeros(1)), "unexpected tensor(s) head.extra"),
        (_set("stray", torch.zeros(1)), "unexpected tensor(s) stray"),
        (_manifest("format", "fedgradnorm-model/9"), "manifest format 'fedgradnorm-model/9': this version reads 'fedgradnorm-model/1'"),
        (_manifest("fingerprint", None), "manifest fingerprint is missing: needs a string"),
        (_manifest("round", "7"), "manifest round '7': not an integer"),
        (_manifest("task", {"name": "modulation", "outputs": 0}), "manifest task.outputs 0: not a positive integer"),
        (_manifest("task", {"name": "modulation", "outputs": 6, "loss": "no_such_loss"}), "the manifest's task cannot be rebuilt"),
    ],
)  # fmt: skip
def test_bad_tensors_and_manifests_are_refused_naming_the_file(
    model_path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, object]], None], problem: str
) -> None:
    rewrite(model_path, edit)
    with pytest.raises(ModelError) as err:
        load_model(model_path.parent)
    assert str(err.value).startswith(f"{model_path}: ")
    assert problem in str(err.value)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: p.unlink(), "no such file"),
        (lambda p: p.write_bytes(b""), "not a safetensors model file"),
        (lambda p: p.write_bytes(os.urandom(300)), "not a safetensors model file"),
        (lambda p: p.write_bytes(p.read_bytes()[:-7]), "not a safetensors model file"),
        (lambda p: save_file({"x": torch.zeros(2)}, p), "no manifest in the safetensors metadata"),
        (lambda p: save_file({"x": torch.zeros(2)}, p, metadata={"manifest": "{oops"}), "the manifest is not valid JSON"),
        (lambda p: save_file({"x": torch.zeros(2)}, p, metadata={"manifest": "[1]"}), "the manifest is a JSON list"),
    ],
)  # fmt: skip
def test_missing_or_corrupt_files_are_refused_naming_the_file(
    model_path: Path, damage: Callable[[Path], object], problem: str
) -> None:
    damage(model_path)
    with pytest.raises(ModelError) as err:
        load_model(model_path)
    assert str(err.value).startswith(f"{model_path}: ")
    assert problem in str(err.value)


class _Payload:
    """Unpickling this creates the folder ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_a_pickle_renamed_to_model_safetensors_is_refused_without_unpickling(tmp_path: Path) -> None:
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))  # the payload works when it is unpickled
    assert proof.is_dir()

    marker = tmp_path / "unpickled"
    writers: list[Callable[[Path], object]] = [
        lambda p: p.write_bytes(pickle.dumps({"shared.w": _Payload(marker)})),
        lambda p: torch.save({"shared.w": _Payload(marker)}, p),  # torch's zip archive around the pickle
    ]
    for i, write in enumerate(writers):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        write(folder / "model.safetensors")
        with pytest.raises(ModelError, match="not a safetensors model file") as err:
            load_model(folder)
        assert str(folder / "model.safetensors") in str(err.value)
    assert not marker.exists()


# -- the commands ---------------------------------------------------------------------------------


def aggregator_state(folder: Path, fed: Federation, omega_seed: int, round_: int, **identity: str) -> None:
    """An aggregator's state folder as the aggregator writes it (FileStateStore.save)."""
    omega = {k: v.detach().clone() for k, v in fed.build_shared(omega_seed).named_parameters()}
    ident = {"federation": fed.name, "network": fed.architecture.fingerprint, "algorithm": "fedgradnorm", "seed": 0}
    server = ServerState(round=round_, omega=omega, omega_adam=AdamState.zeros_like(omega))
    FileStateStore(folder).save(Snapshot(identity={**ident, **identity}, server=server, members={}))


def node_state(folder: Path, fed: Federation, task: str, data: Path, **identity: str) -> LocalClient:
    """An edge node's state folder as the node writes it (identity.json, client.pt)."""
    client = LocalClient("node-1", fed, node_data(fed, fed.task(task), data, 0.2, 0), ClientConfig(), seed=9)
    store = NodeStore(folder)
    ident = {"node_id": "node-1", "session_token": "s3cret-token", "aggregator": "agg:50051"}
    store.save_identity(Identity(**{**ident, "federation": fed.name, "task": task, **identity}))
    store.save_client(client.state_bytes())
    return client


def test_export_then_predict_end_to_end_on_radcom(
    cli: Callable[..., tuple[int, str, str]], tmp_path: Path, radcom_file: Path
) -> None:
    fed = load_federation("radcom")
    aggregator_state(tmp_path / "agg", fed, omega_seed=11, round_=7)
    client = node_state(tmp_path / "node", fed, "signal", radcom_file)
    shared = fed.build_shared(0)
    load_omega_(shared, FileStateStore(tmp_path / "agg").load().server.omega)  # type: ignore[union-attr]
    node = client.evaluate(shared)

    rc, out, err = cli(
        "export", "--aggregator-state", tmp_path / "agg", "--node-state", tmp_path / "node",
        "--out", tmp_path / "model", "--data", radcom_file,
    )  # fmt: skip
    assert (rc, err) == (0, "")
    model_file = tmp_path / "model" / "model.safetensors"
    assert out.startswith(f"wrote {model_file} and manifest.json: federation radcom, task signal, round 7, test_loss ")
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert (manifest["round"], manifest["node"], manifest["task"]["name"]) == (7, "node-1", "signal")
    assert manifest["metrics"]["test_loss"] == pytest.approx(node.test_loss, abs=1e-6)
    assert manifest["metrics"]["accuracy"] == pytest.approx(node.value, abs=1e-6)
    assert "s3cret" not in (tmp_path / "model" / "manifest.json").read_text()
    assert "s3cret" not in model_file.read_bytes().decode("latin-1")

    csv = tmp_path / "out" / "pred.csv"
    rc, out, err = cli("predict", "--model", tmp_path / "model", "--data", radcom_file, "--out", csv)
    assert (rc, err) == (0, "")
    rows = np.loadtxt(csv, delimiter=",", skiprows=1)
    header = csv.read_text().splitlines()[0]
    assert header == "index,prediction," + ",".join(f"p_{k}" for k in range(8))
    x = all_x(radcom_file)
    y = torch.as_tensor(read_pools("radcom", radcom_file).train.targets["signal"])
    logits = load_model(model_file).predict(x)
    assert rows.shape == (360, 10)
    assert np.array_equal(rows[:, 0], np.arange(360))
    assert np.array_equal(rows[:, 1], logits.argmax(dim=1).numpy())
    assert np.allclose(rows[:, 2:], torch.softmax(logits, dim=1).numpy(), atol=1e-7)
    assert np.allclose(rows[:, 2:].sum(axis=1), 1.0, atol=1e-5)
    accuracy = float((logits.argmax(dim=1) == y).float().mean())
    loss = float(functional.cross_entropy(logits, y))
    assert out.splitlines() == [
        f"360 samples from {radcom_file} (task signal)",
        f"accuracy {accuracy:.6g}, loss {loss:.6g} (cross_entropy) over all 360 samples",
        f"wrote {csv}",
    ]


def test_predict_a_regression_task_to_stdout(
    cli: Callable[..., tuple[int, str, str]], tiny: Federation, tmp_path: Path, radcom_file: Path
) -> None:
    shared, head = trained(tiny, "level")
    save_model(tmp_path, federation=tiny, task=tiny.task("level"), shared=shared, head=head, round_=2, metrics={})
    rc, out, err = cli("predict", "--model", tmp_path / "model.safetensors", "--data", radcom_file)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "index,y_0" and len(lines) == 361
    x = all_x(radcom_file)
    y = torch.as_tensor(read_pools("radcom", radcom_file).train.targets["anomaly"], dtype=torch.float32)
    with torch.no_grad():
        pred = head(shared(x))
    got = np.loadtxt(out.splitlines()[1:], delimiter=",")
    assert np.array_equal(got[:, 1].astype(np.float32), pred[:, 0].numpy())  # 9 digits: float32 exactly
    mae = float((pred[:, 0] - y).abs().mean())
    assert f"mae {mae:.6g}, loss " in err and "(mse) over all 360 samples" in err


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("network", "omega was trained on a network with architecture fingerprint sha256:other"),
        ("node-federation", "identity.json: the node belongs to federation 'elsewhere', not 'tiny'"),
        ("node-task", "client.pt: a head of task 'modulation', but the node's identity says 'level'"),
        ("no-client", "client.pt: no such file (a node writes its personal model there after its first round)"),
        ("corrupt-client", "client.pt: not a readable node state"),
        ("no-state", "aggregator-state.pt: no aggregator state there"),
        (
            "default-federation",
            "the state's federation 'tiny' is not a shipped one; give its spec with --federation PATH",
        ),
    ],
)
def test_export_refusals_are_one_line(
    cli: Callable[..., tuple[int, str, str]],
    tiny: Federation,
    tiny_dir: Path,
    tmp_path: Path,
    radcom_file: Path,
    setup: str,
    message: str,
) -> None:
    agg, node = tmp_path / "agg", tmp_path / "node"
    if setup != "no-state":
        aggregator_state(agg, tiny, 1, 3, **({"network": "sha256:other"} if setup == "network" else {}))
    node_state(
        node, tiny, "modulation", radcom_file, **({"federation": "elsewhere"} if setup == "node-federation" else {})
    )
    if setup == "node-task":
        NodeStore(node).save_identity(Identity("node-1", "t", "a:1", "tiny", "level"))
    if setup == "no-client":
        (node / "client.pt").unlink()
    if setup == "corrupt-client":
        (node / "client.pt").write_bytes(b"PK\x03\x04 not really")
    spec = [] if setup == "default-federation" else ["--federation", tiny_dir / "tiny.toml"]
    rc, out, err = cli("export", "--aggregator-state", agg, "--node-state", node, "--out", tmp_path / "m", *spec)
    assert (rc, out) == (2, "")
    assert err.startswith("fedgradnorm export: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "m").exists()


def test_predict_without_targets_predicts_train_then_test_pool(
    cli: Callable[..., tuple[int, str, str]], model_path: Path, tmp_path: Path
) -> None:
    csv = tmp_path / "p.csv"
    reader = f"{TINY_MODULE}:read_unlabelled"
    rc, out, err = cli("predict", "--model", model_path, "--data", tmp_path, "--reader", reader, "--out", csv)
    assert (rc, err) == (0, "")
    assert out.splitlines() == [
        f"5 samples from {tmp_path} (task modulation)",
        "no 'modulation' targets in the file: predictions only",
        f"wrote {csv}",
    ]
    x = torch.as_tensor(np.linspace(-1, 1, 5 * 256, dtype=np.float32).reshape(5, 256))  # as the reader makes them
    rows = np.loadtxt(csv, delimiter=",", skiprows=1)
    assert np.array_equal(rows[:, 1], load_model(model_path).predict(x).argmax(dim=1).numpy())


def test_predict_refusals_are_one_line(
    cli: Callable[..., tuple[int, str, str]], model_path: Path, tmp_path: Path, radcom_file: Path
) -> None:
    cases = [
        (["--model", tmp_path / "nothing", "--data", radcom_file], f"{tmp_path / 'nothing'}: no such file"),
        (["--model", model_path, "--data", tmp_path / "nothing.h5"], str(tmp_path / "nothing.h5")),
        (["--model", model_path, "--data", radcom_file, "--reader", f"{TINY_MODULE}:read_narrow"], "samples of shape [10]; the model takes [256]"),
    ]  # fmt: skip
    for argv, message in cases:
        rc, out, err = cli("predict", *argv)
        assert (rc, out) == (2, "")
        assert err.startswith("fedgradnorm predict: error: ") and err.count("\n") == 1, err
        assert message in err


def test_predict_with_a_user_federation_whose_code_lies_beside_its_spec(
    tiny: Federation, tiny_dir: Path, model_path: Path, radcom_file: Path, tmp_path: Path
) -> None:
    """In a fresh process the network's module is importable only once the spec is loaded: the model
    alone says what to pass; with --federation it predicts."""
    script = textwrap.dedent("""
        import sys
        from fedgradnorm.cli import app, models
        app._service_commands = lambda: models.REGISTRARS
        print("rc", app.main(sys.argv[1:6]), flush=True)
        print("rc", app.main(sys.argv[1:]), flush=True)
        """)
    res = subprocess.run(
        [sys.executable, "-c", script, "predict", "--model", str(model_path), "--data", str(radcom_file),
         "--federation", str(tiny_dir / "tiny.toml"), "--out", str(tmp_path / "p.csv")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.stdout.splitlines()[0] == "rc 2" and res.stdout.splitlines()[-1] == "rc 0", res.stdout + res.stderr
    assert "cannot build the shared network (FactoryError" in res.stderr
    assert "if its code lies beside a federation spec, pass that federation" in res.stderr
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 361


def test_help_does_not_import_torch() -> None:
    script = textwrap.dedent("""
        import argparse, sys
        from fedgradnorm.cli import models
        sub = argparse.ArgumentParser().add_subparsers()
        for register in models.REGISTRARS:
            register(sub)
        assert set(sub.choices) == {"export", "predict"}
        print(sorted(m for m in ("torch", "safetensors", "grpc", "fedgradnorm.federation") if m in sys.modules))
        """)
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
