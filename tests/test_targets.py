"""Standardized regression targets, loss scales and reference levels (fedgradnorm/tasks.py,
fedgradnorm/models.py StandardizedHead, the client, the export, the federation spec)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from fedgradnorm.algorithm import ClientConfig
from fedgradnorm.client import LocalClient
from fedgradnorm.data.base import MultiTaskArrays
from fedgradnorm.data.partition import ClientData
from fedgradnorm.export import load_model, save_model
from fedgradnorm.federation import FederationError, load_federation
from fedgradnorm.models import StandardizedHead, build_head
from fedgradnorm.simulation_config import SimulationConfig, parse_loss_scales
from fedgradnorm.tasks import TaskSpec, constant_prediction

SPEC = textwrap.dedent("""
    name = "points"

    [network]
    factory = "torch.nn:Linear"
    kwargs = { in_features = 6, out_features = 4 }
    input_shape = [6]

    [[tasks]]
    name = "where"
    outputs = 2
    loss = "mse"
    metric = "mae"
    standardize = true

    [[tasks]]
    name = "kind"
    outputs = 3
    """)


def _client_data(n: int = 64, seed: int = 0) -> ClientData:
    """Targets far from unit scale: column 0 around 300 (spread 40), column 1 around -2 (spread 0.01)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = np.stack([300 + 40 * x[:, 0], -2 + 0.01 * x[:, 1]], axis=1).astype(np.float32)
    kind = rng.integers(0, 3, n)
    arrays = MultiTaskArrays(x=x, targets={"where": y, "kind": kind})
    return ClientData(task="where", train=arrays, test=arrays)


@pytest.fixture
def fed(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "points.toml"
    path.write_text(SPEC)
    return load_federation(str(path))


def test_a_standardized_head_learns_unit_targets_and_predicts_in_the_data_units(fed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = _client_data()
    client = LocalClient("n", fed, data, ClientConfig(), seed=0)
    head = client.head
    assert isinstance(head, StandardizedHead)
    y = torch.as_tensor(data.train.targets["where"])
    torch.testing.assert_close(head.target_mean, y.double().mean(0).float())
    torch.testing.assert_close(head.target_std, y.double().std(0, unbiased=False).float())
    z = torch.randn(5, 4)
    torch.testing.assert_close(head(z), head.inner(z) * head.target_std + head.target_mean)
    # the loss is the MSE of the standardized values, so both columns weigh alike whatever their units
    pred = head(z)
    expected = functional.mse_loss(
        (pred - head.target_mean) / head.target_std, (y[:5] - head.target_mean) / head.target_std
    )
    torch.testing.assert_close(client.loss(pred, y[:5]), expected)
    # the constant reference (the training mean) costs about 1 in those units, its metric is in data units
    ref = client.reference()
    assert ref is not None and ref.test_loss == pytest.approx(1.0, abs=1e-4)
    assert ref.value == pytest.approx(float((y - y.mean(0)).abs().mean()), rel=1e-4)
    # the exported model carries the scaling: it predicts in data units, and its loss is the node's
    shared = fed.build_shared(0)
    node = client.evaluate(shared)
    save_model(tmp_path / "m", federation=fed, task=fed.task("where"), shared=shared, head=head, round_=3, metrics={})
    model = load_model(tmp_path / "m", fed)
    x = torch.as_tensor(data.test.x)
    with torch.no_grad():
        assert torch.equal(model.predict(x), head(shared(x)))
    got = model.evaluate(x, torch.as_tensor(data.test.targets["where"]))
    assert got == {"test_loss": node.test_loss, "mae": node.value}
    # training moves the predictions towards the targets in data units
    before = client.evaluate(shared).value
    for k in range(40):
        client.run_round(shared, k)
    assert client.evaluate(shared).value < before


def test_a_standardized_head_survives_the_nodes_restart(fed) -> None:  # type: ignore[no-untyped-def]
    client = LocalClient("n", fed, _client_data(), ClientConfig(), seed=0)
    blob = client.state_bytes()
    other = LocalClient("n", fed, _client_data(seed=1), ClientConfig(), seed=0)
    assert not torch.equal(other.head.target_mean, client.head.target_mean)
    other.load_state_bytes(blob)
    assert torch.equal(other.head.target_mean, client.head.target_mean)


def test_constant_predictions_are_the_prior_and_the_mean() -> None:
    ce = TaskSpec("c", 3)
    prior = constant_prediction(ce, torch.tensor([0, 0, 0, 1]))
    assert prior is not None
    torch.testing.assert_close(prior.exp(), torch.tensor([3.5, 1.5, 0.5]) / 5.5)  # add-half smoothed
    assert int(prior.argmax()) == 0  # the majority class
    mse = TaskSpec("r", 2, loss="mse", metric="mse")
    torch.testing.assert_close(
        constant_prediction(mse, torch.tensor([[1.0, 2.0], [3.0, 6.0]])), torch.tensor([2.0, 4.0])
    )
    bce = TaskSpec("b", 1, loss="bce", metric="binary_accuracy")
    torch.testing.assert_close(
        constant_prediction(bce, torch.tensor([1.0, 1.0, 1.0, 0.0])), torch.tensor([math.log(3)])
    )
    user = TaskSpec("u", 1, loss="torch.nn.functional:l1_loss", target="real", metric="mae")
    assert constant_prediction(user, torch.zeros(3)) is None


def test_a_loss_scale_multiplies_the_loss_and_is_validated() -> None:
    p, y = torch.tensor([[0.2, 0.9]]), torch.tensor([1])
    base = TaskSpec("c", 2)
    scaled = TaskSpec("c", 2, loss_scale=100.0)
    torch.testing.assert_close(scaled.loss_value(p, y), 100 * base.loss_value(p, y))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="loss_scale must be a finite number above 0"):
            TaskSpec("c", 2, loss_scale=bad)
    with pytest.raises(ValueError, match="standardize applies to real targets"):
        TaskSpec("c", 2, standardize=True)
    assert isinstance(build_head(None, 4, 2, 0, standardize=True), StandardizedHead)
    assert isinstance(build_head(None, 4, 2, 0), nn.Linear)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("standardize = true", "standardize applies to real targets"),
        ('standardize = "yes"', "standardize must be true or false"),
        ('loss_scale = "big"', "loss_scale must be a number"),
        ("loss_scale = -3", "loss_scale must be a finite number above 0"),
        ("loss_scale = 1e400", "loss_scale must be a finite number above 0"),
    ],
)
def test_bad_task_keys_are_refused_naming_the_file(line: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(SPEC.replace('name = "kind"\noutputs = 3', f'name = "kind"\noutputs = 3\n{line}'))
    with pytest.raises(FederationError) as e:
        load_federation(str(path))
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_the_simulators_loss_scale_overrides_the_spec() -> None:
    config = SimulationConfig(federation="mtfl", loss_scale="landmarks=100, gender=0.5")
    assert config.spec.task("landmarks").loss_scale == 100.0
    assert config.spec.task("gender").loss_scale == 0.5
    assert config.spec.task("smile").loss_scale == 1.0
    assert config.spec.task("landmarks").standardize  # the shipped MTFL spec standardizes the landmarks
    assert parse_loss_scales("") == {}
    for bad in ("landmarks", "landmarks=0", "landmarks=x", "=3", "landmarks=inf"):
        with pytest.raises(ValueError, match="expected task=factor"):
            parse_loss_scales(bad)
    with pytest.raises(ValueError, match="has no task 'nose'"):
        SimulationConfig(federation="mtfl", loss_scale="nose=2")
