"""Federation specs: the shipped ones, a user's, and every way a spec or a node's data can be wrong
(one error naming the file and the problem, before anything trains)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedgradnorm.cli.app import main
from fedgradnorm.data.arrays import write_arrays
from fedgradnorm.data.base import DataError, MultiTaskArrays, Pools
from fedgradnorm.data.partition import Allocation, DataSource, load_clients, node_data
from fedgradnorm.federation import FederationError, builtin_names, load_federation
from fedgradnorm.machine import resolve_device
from fedgradnorm.models import Network1, Network2
from fedgradnorm.simulation_config import SimulationConfig
from fedgradnorm.simulator import Simulation

ROOT = Path(__file__).resolve().parents[1]
SENSORS = ROOT / "examples" / "sensors" / "federation.toml"

MODULE = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.body = nn.Linear(6, width)
        self.last = nn.Linear(width, 3)

    def forward(self, x):
        return torch.relu(self.last(torch.relu(self.body(x))))


def twice_mse(prediction, target):
    return 2 * torch.nn.functional.mse_loss(prediction, target.reshape(prediction.shape))


def negative_mae(prediction, target):
    return -float((prediction - target.reshape(prediction.shape)).abs().mean())


def not_a_module():
    return 42


def make_head(in_features: int, out_features: int, hidden: int = 2):
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
"""

SPEC = """
name = "tiny"
python_path = ["."]

[network]
factory = "tiny_fed:Tiny"
kwargs = { width = 5 }
input_shape = [6]

[[tasks]]
name = "kind"
outputs = 3

[[tasks]]
name = "level"
outputs = 1
loss = "tiny_fed:twice_mse"
target = "real"
metric = "tiny_fed:negative_mae"
higher_is_better = true
"""


def write_spec(
    folder: Path, text: str = SPEC, module: str = MODULE, name: str = "federation.toml", module_name: str = "tiny_fed"
) -> Path:
    """A spec and its module in ``folder``. Python imports a module name once per process: a test whose
    module differs from MODULE gives it a name of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module_name}.py").write_text(module)
    path = folder / name
    path.write_text(text)
    return path


def test_shipped_federations_are_specs_like_any_other() -> None:
    assert builtin_names() == ("mtfl", "radcom")
    radcom, mtfl = load_federation("radcom"), load_federation("mtfl")
    assert radcom.task_names == ("modulation", "signal", "anomaly")
    assert mtfl.task_names == ("landmarks", "gender", "smile", "glasses", "pose")
    assert radcom.source.endswith("federations/radcom.toml") and mtfl.reader == "mtfl"
    assert radcom.representation_dim == mtfl.representation_dim == 256
    # Table I's networks, built from the spec, are the library's classes with the same initialisation
    for fed, cls in ((radcom, Network2), (mtfl, Network1)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            ref = cls()
        built = fed.build_shared(7)
        assert type(built) is cls
        for (n1, p1), (n2, p2) in zip(ref.named_parameters(), built.named_parameters(), strict=True):
            assert n1 == n2 and torch.equal(p1, p2)
    assert load_federation(str(radcom.source)) is radcom  # a path to the same file: the same spec


def test_a_user_spec_with_its_own_network_losses_and_metrics(tmp_path: Path) -> None:
    fed = load_federation(str(write_spec(tmp_path / "tiny")))
    assert fed.name == "tiny" and fed.representation_dim == 3
    net = fed.build_shared(0)
    assert [n for n, _ in net.named_parameters()] == ["body.weight", "body.bias", "last.weight", "last.bias"]
    assert net.body.out_features == 5  # kwargs reach the factory
    kind, level = fed.task("kind"), fed.task("level")
    assert (kind.loss, kind.target, kind.higher_is_better) == ("cross_entropy", "class", True)
    pred, y = torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])
    assert float(level.loss_value(pred, y)) == pytest.approx(2 * (1 + 4) / 2)
    assert level.metric_value(pred, y) == pytest.approx(-1.5)
    head = fed.build_head(level, 0)
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (3, 1)
    with_head = SPEC.replace(
        'name = "kind"\noutputs = 3',
        'name = "kind"\noutputs = 3\nhead = { factory = "tiny_fed:make_head", kwargs = { hidden = 7 } }',
    )
    fed = load_federation(str(write_spec(tmp_path / "head", with_head)))
    head = fed.build_head(fed.task("kind"), 0)
    assert [tuple(p.shape) for p in head.parameters()] == [(7, 3), (7,), (3, 7), (3,)]
    tilde = SPEC.replace("input_shape = [6]", 'input_shape = [6]\nomega_tilde = ["body.weight"]')
    fed = load_federation(str(write_spec(tmp_path / "tilde", tilde)))
    assert SimulationConfig(federation=fed.source).server_config().omega_tilde == ("body.weight",)
    typo = load_federation(str(write_spec(tmp_path / "typo", tilde.replace("body.weight", "bdy.weight"))))
    with pytest.raises(ValueError, match=r"omega_tilde names \['bdy.weight'\] are not parameters of tiny_fed:Tiny"):
        Simulation.build(SimulationConfig(federation=typo.source), data={})
    with pytest.raises(ValueError, match="has no task 'nope'"):
        fed.task("nope")


BAD_SPECS = {
    "not toml": ("name = ", "not a valid TOML file"),
    "unknown key": (SPEC.replace('name = "tiny"', 'name = "tiny"\nnmae = 1'), "unknown key(s) ['nmae']"),
    "no name": (SPEC.replace('name = "tiny"\n', ""), "name must be a non-empty string"),
    "no tasks": (SPEC.split("[[tasks]]")[0], "needs at least one [[tasks]] table"),
    "repeated task": (SPEC.replace('name = "level"', 'name = "kind"'), "task names repeat"),
    "bad import path": (SPEC.replace("tiny_fed:Tiny", "tiny_fed/Tiny"), "not an import path"),
    "missing module": (SPEC.replace('loss = "tiny_fed:twice_mse"', 'loss = "nowhere:f"'), "cannot import module"),
    "missing attribute": (SPEC.replace("tiny_fed:twice_mse", "tiny_fed:thrice"), "has no attribute 'thrice'"),
    "user loss without target": (SPEC.replace('target = "real"\n', ""), "a user loss needs target"),
    "user metric without order": (
        SPEC.replace("higher_is_better = true\n", ""),
        "a user metric needs higher_is_better",
    ),
    "loss and target disagree": (
        SPEC.replace('name = "kind"\noutputs = 3', 'name = "kind"\noutputs = 3\ntarget = "real"'),
        "reads 'class' targets",
    ),
    "bad input shape": (SPEC.replace("input_shape = [6]", "input_shape = [0]"), "input_shape must be a list"),
    "bad reader": (SPEC + '\n[data]\nreader = "csv"\n', "[data] reader 'csv'"),
    "zero outputs": (SPEC.replace("outputs = 3", "outputs = 0"), "outputs must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_spec_is_one_error_naming_the_file(case: str, tmp_path: Path) -> None:
    text, expected = BAD_SPECS[case]
    path = write_spec(tmp_path / case.replace(" ", "-"), text)
    with pytest.raises(FederationError) as e:
        load_federation(str(path))
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


def test_a_network_that_does_not_fit_its_input_shape_fails_when_first_used(tmp_path: Path) -> None:
    fed = load_federation(str(write_spec(tmp_path / "t", SPEC.replace("input_shape = [6]", "input_shape = [7]"))))
    with pytest.raises(ValueError, match=r"fails on inputs of shape \(7,\)"):
        _ = fed.representation_dim
    no_module = SPEC.replace("tiny_fed:Tiny", "tiny_fed:not_a_module").replace("kwargs = { width = 5 }\n", "")
    fed = load_federation(str(write_spec(tmp_path / "m", no_module)))
    with pytest.raises(ValueError, match=r"built a int, not a torch\.nn\.Module"):
        fed.build_shared(0)
    fed = load_federation(str(write_spec(tmp_path / "k", SPEC.replace("width = 5", "depth = 5"))))
    with pytest.raises(ValueError, match=r"tiny_fed:Tiny\(\*\*\{'depth': 5\}\) failed: TypeError"):
        fed.build_shared(0)


def test_the_cli_refuses_a_bad_spec_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.toml"
    assert main(["simulate", "--federation", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err and "no such federation" in err
    assert main(["partition", "--federation", "radcm", "--out", str(tmp_path / "o")]) == 2
    assert "neither a spec file nor one of mtfl, radcom" in capsys.readouterr().err


def test_a_nodes_own_file_is_all_of_its_data(tmp_path: Path) -> None:
    """An edge node's --data is its data: every sample is used (a seeded test share split off, or
    the file's own test part); nothing of it is partitioned away."""
    fed = load_federation(str(SENSORS))
    task = fed.task("activity")
    rng = np.random.default_rng(0)
    x = rng.random((50, 3, 64), dtype=np.float32)
    y = rng.integers(0, 4, 50)
    write_arrays(tmp_path / "own.npz", Pools(MultiTaskArrays(x, {"y": y})))
    data = node_data(fed, task, tmp_path / "own.npz", 0.2, seed=0)
    assert (len(data.train), len(data.test)) == (40, 10)
    together = np.concatenate([data.train.x, data.test.x])
    assert sorted(map(bytes, together)) == sorted(map(bytes, x))  # every sample, once
    write_arrays(tmp_path / "split.npz", Pools(MultiTaskArrays(x, {"y": y}), MultiTaskArrays(x[:7], {"y": y[:7]})))
    data = node_data(fed, task, tmp_path / "split.npz", 0.2, seed=0)
    assert (len(data.train), len(data.test)) == (50, 7)  # the file's own test part


BAD_NODE_DATA = {
    "labels out of range": ("activity", {"y": np.full(10, 4)}, "class labels must lie in [0, 4), column 'y' has 4..4"),
    "real labels for classes": ("activity", {"y": np.zeros(10, np.float32)}, "needs integer class labels"),
    "wrong width": ("cadence", {"y": np.zeros((10, 2), np.float32)}, "needs 1 real value(s) a sample"),
    "no such column": ("fall", {"y_a": np.zeros(10), "y_b": np.zeros(10)}, "no target column 'fall'"),
}


@pytest.mark.parametrize("case", sorted(BAD_NODE_DATA))
def test_node_data_that_does_not_fit_its_task_is_refused(case: str, tmp_path: Path) -> None:
    fed = load_federation(str(SENSORS))
    task, targets, expected = BAD_NODE_DATA[case]
    path = tmp_path / "d.npz"
    x = np.zeros((10, 3, 64), np.float32)
    np.savez(path, x=x, **targets)
    with pytest.raises(DataError) as e:
        node_data(fed, fed.task(task), path, 0.2, seed=0)
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


def test_partitioners_share_a_pool_out_as_asked(tmp_path: Path) -> None:
    fed = load_federation(str(SENSORS))
    source = DataSource(fed, None, synthetic_seed=0, synthetic_size=30)  # 600 windows
    tasks = fed.task_names
    by_task = load_clients(source, tasks, Allocation.parse("activity=300,*=50"), seed=0)
    assert [len(by_task[t].train) for t in tasks] == [300, 50, 50]
    skewed = load_clients(source, tasks, Allocation.parse("dirichlet:0.1:activity"), seed=0)
    iid = load_clients(source, tasks, Allocation.parse("iid"), seed=0)
    pool = fed.synthetic(seed=0, size=30).train  # type: ignore[misc]
    labels = {t: pool.targets["activity"] for t in tasks}

    def dominant_share(shares: dict[str, object]) -> float:
        out = []
        for t in tasks:
            x = shares[t].train.x  # type: ignore[attr-defined]
            index = {bytes(row): i for i, row in enumerate(pool.x)}
            y = labels[t][[index[bytes(row)] for row in x]]
            out.append(np.bincount(y, minlength=4).max() / len(y))
        return float(np.mean(out))

    assert dominant_share(skewed) > dominant_share(iid) + 0.15  # label skew, measured on the samples
    for shares in (skewed, iid):
        assert [len(shares[t].test) for t in tasks] == [len(by_task[t].test) for t in tasks]  # same test shares
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        Allocation.parse("dirichlet:-1")


def test_the_device_is_chosen_or_refused() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="this machine has 0 CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_a_client_evaluates_in_eval_mode_and_restores_training_mode(tmp_path: Path) -> None:
    """A network with dropout: the logged test metric is deterministic (eval mode, as an exported
    model predicts), and training continues in training mode."""
    from fedgradnorm.algorithm import ClientConfig
    from fedgradnorm.client import LocalClient
    from fedgradnorm.data.partition import ClientData

    module = (
        MODULE
        + """

class Dropping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)
"""
    )
    fed = load_federation(
        str(
            write_spec(
                tmp_path / "d",
                SPEC.replace("tiny_fed:", "dropping_fed:")
                .replace("dropping_fed:Tiny", "dropping_fed:Dropping")
                .replace("kwargs = { width = 5 }\n", ""),
                module,
                module_name="dropping_fed",
            )
        )
    )
    rng = np.random.default_rng(0)
    arrays = MultiTaskArrays(rng.random((20, 6), dtype=np.float32), {"kind": rng.integers(0, 3, 20)})
    client = LocalClient(
        "c", fed, ClientData("kind", arrays, arrays), ClientConfig(tau_h=1, tau_omega=1, batch_size=4), 0
    )
    shared = fed.build_shared(0)
    first, second = client.evaluate(shared), client.evaluate(shared)
    assert first == second  # dropout off while evaluating
    assert shared.training and client.head.training
    client.run_round(shared, 0)
    assert shared.training and client.head.training
