"""Shared networks and heads: Table I's two networks, building any network a federation names, and
the architecture fingerprint that nodes and the aggregator compare at registration."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedgradnorm.factory import Factory, FactoryError


class Network1(nn.Module):
    """CNN for 1x40x40 grayscale faces (MTFL): four convolutions, three max-pools, 256 features."""

    input_shape = (1, 40, 40)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 48, 3),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(48, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 64, 2),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)


class Network2(nn.Module):
    """MLP 256-512-1024-2048-512-256 for RadCom I/Q vectors."""

    input_shape = (256,)
    widths = (256, 512, 1024, 2048, 512, 256)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(self.widths[:-1], self.widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(self.widths) - 2:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


def build_shared(factory: Factory, seed: int) -> nn.Module:
    """The shared network the factory builds, initialised deterministically from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = factory()
    if not isinstance(module, nn.Module):
        raise FactoryError(f"{factory.ref} built a {type(module).__name__}, not a torch.nn.Module")
    if not any(True for _ in module.parameters()):
        raise FactoryError(f"{factory.ref}: the shared network has no parameters")
    return module


def build_head(
    factory: Factory | None, in_features: int, outputs: int, seed: int, *, standardize: bool = False
) -> nn.Module:
    """A client's personal head: one linear layer by default, else ``factory(in_features=, out_features=)``;
    wrapped in a :class:`StandardizedHead` when the task standardizes its targets."""
    head = _plain_head(factory, in_features, outputs, seed)
    return StandardizedHead(head, outputs) if standardize else head


def _plain_head(factory: Factory | None, in_features: int, outputs: int, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if factory is None:
            return nn.Linear(in_features, outputs)
        head = factory(in_features=in_features, out_features=outputs)
    if not isinstance(head, nn.Module):
        raise FactoryError(f"{factory.ref} built a {type(head).__name__}, not a torch.nn.Module")
    return head


class StandardizedHead(nn.Module):
    """A head that learns standardized targets but predicts in the data's units.

    ``inner`` predicts ``(y - mean) / std``; the forward pass returns ``inner(z) * std + mean``, so the
    metric and an exported model see the data's units (pixels, say). ``mean`` and ``std`` are buffers
    (saved with the head, never trained), set by :meth:`fit` from the client's own training targets.
    The loss is computed in standardized units (:func:`loss_units`)."""

    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(self, inner: nn.Module, outputs: int) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("target_mean", torch.zeros(outputs))
        self.register_buffer("target_std", torch.ones(outputs))

    def fit(self, targets: torch.Tensor) -> None:
        """Column means and standard deviations of the training targets (a constant column keeps std 1)."""
        y = targets.double().reshape(len(targets), -1)
        std = y.std(dim=0, unbiased=False)  # 0 for one sample: kept at 1 below
        with torch.no_grad():
            self.target_mean.copy_(y.mean(dim=0))
            self.target_std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    def standardized(self, values: torch.Tensor) -> torch.Tensor:
        return (values.reshape(len(values), -1) - self.target_mean) / self.target_std

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(z) * self.target_std + self.target_mean
        return out


def loss_units(head: nn.Module, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction, target)`` in the units the task's loss is computed in: standardized for a
    :class:`StandardizedHead`, as they are otherwise."""
    if isinstance(head, StandardizedHead):
        return head.standardized(prediction), head.standardized(target)
    return prediction, target


def representation_dim(shared: nn.Module, input_shape: Sequence[int]) -> int:
    """The width of the representation ``shared`` makes of inputs of ``input_shape`` (one sample's shape)."""
    was_training = shared.training
    shared.eval()
    try:
        with torch.no_grad():
            out = shared(torch.zeros(2, *input_shape))
    except Exception as err:  # a user's network: say what it was fed
        raise FactoryError(
            f"the shared network fails on inputs of shape {tuple(input_shape)}: {type(err).__name__}: {err}"
        ) from err
    finally:
        shared.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FactoryError(f"the shared network must return (batch, features), not {shape}")
    return int(out.shape[1])


@dataclass(frozen=True)
class Architecture:
    """A shared network's fingerprint and parameters (name, shape, dtype, in order).

    The fingerprint hashes the module tree (names and classes) and the parameters: equal fingerprints
    mean the same module classes in the same tree with the same parameter shapes, so omega fits. It is
    what a node and the aggregator compare at registration; the parameters let a refusal say what differs.
    """

    fingerprint: str
    parameters: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, module: nn.Module) -> Architecture:
        params = tuple(
            (name, tuple(int(d) for d in p.shape), str(p.dtype).removeprefix("torch."))
            for name, p in module.named_parameters()
        )
        modules = [(name, type(m).__qualname__) for name, m in module.named_modules()]
        text = json.dumps({"parameters": params, "modules": modules}, separators=(",", ":"))
        return cls("sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32], params)

    def difference(self, other: Architecture, limit: int = 3) -> str:
        """What differs between this network ("here") and ``other`` ("there"), in a sentence."""
        mine = {n: (s, d) for n, s, d in self.parameters}
        theirs = {n: (s, d) for n, s, d in other.parameters}
        diffs = [f"{n} only here" for n in mine if n not in theirs][:limit]
        diffs += [f"{n} only there" for n in theirs if n not in mine][:limit]
        for name in [n for n in mine if n in theirs and mine[n] != theirs[n]][:limit]:
            (s1, d1), (s2, d2) = mine[name], theirs[name]
            diffs.append(f"{name} is {list(s1)} {d1} here, {list(s2)} {d2} there")
        if diffs:
            return f"{len(mine)} parameter tensors here, {len(theirs)} there; " + "; ".join(diffs)
        if [n for n, _, _ in self.parameters] != [n for n, _, _ in other.parameters]:
            return "the same parameters in another order"
        if self.fingerprint != other.fingerprint:
            return f"the same parameter shapes in different modules (fingerprint {self.fingerprint} here, {other.fingerprint} there)"
        return "no difference"
