"""One client's personal side: its data, its head h^(i), the head's optimiser and F_0.

Both the simulator and the edge-node service drive a :class:`LocalClient`; the only thing they
hand it per round is the global omega (loaded into a shared-network module) and the round number.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from fedgradnorm.algorithm import AdamConfig, ClientConfig, ClientStepResult, ModuleAdam, client_step
from fedgradnorm.data.partition import ClientData
from fedgradnorm.federation import Federation
from fedgradnorm.models import StandardizedHead, loss_units
from fedgradnorm.tasks import TaskSpec, constant_prediction, derive_seed


@dataclass(frozen=True)
class Evaluation:
    test_loss: float
    metric: str
    value: float


def _tensors(
    data: ClientData, task: TaskSpec, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.as_tensor(data.train.x, dtype=torch.float32).to(device),
        task.targets(data.train.targets[task.name]).to(device),
        torch.as_tensor(data.test.x, dtype=torch.float32).to(device),
        task.targets(data.test.targets[task.name]).to(device),
    )


def minibatches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless minibatches: shuffled passes over the data, each batch without replacement.

    The order is drawn on the CPU (``generator``'s device), so batches are the same on every device."""
    n = len(x)
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n - size + 1, size):
            idx = order[start : start + size]
            yield x[idx], y[idx]


class LocalClient:
    """A client of one task (``data.task`` of ``federation``): call :meth:`run_round` with the shared
    network holding omega_k, on ``device`` (its data and head live there; gradients come back on the CPU)."""

    def __init__(
        self,
        name: str,
        federation: Federation,
        data: ClientData,
        config: ClientConfig,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.name = name
        self.task = federation.task(data.task)
        self.config = config
        self.seed = seed
        self.device = torch.device(device)
        self.x, self.y, self.x_test, self.y_test = _tensors(data, self.task, self.device)
        self.num_samples = len(self.x)
        self.head = federation.build_head(self.task, derive_seed(seed, "head", name)).to(self.device)
        if isinstance(self.head, StandardizedHead):
            self.head.fit(self.y)  # this client's own training targets: nothing leaves the node
        self.optimizer = ModuleAdam(self.head.parameters(), AdamConfig(lr=config.beta))
        self.initial_loss: float | None = None

    def batches(self, round_: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "batches", self.name, round_))
        return minibatches(self.x, self.y, self.config.batch_size, g)

    def evaluate(self, shared: nn.Module) -> Evaluation:
        """Test loss and metric of (shared, head) in eval mode (dropout off, batch norm on its running
        statistics: as an exported model predicts), the modules' modes restored after."""
        modes = shared.training, self.head.training
        shared.eval()
        self.head.eval()
        try:
            with torch.no_grad():
                return self.score(self.head(shared(self.x_test)), self.y_test)
        finally:
            shared.train(modes[0])
            self.head.train(modes[1])

    def score(self, prediction: torch.Tensor, target: torch.Tensor) -> Evaluation:
        """The loss (in the units it is trained in) and the metric of the head's ``prediction``."""
        value = self.task.metric_value(prediction, target)
        return Evaluation(test_loss=float(self.loss(prediction, target)), metric=self.task.metric, value=value)

    def reference(self, target: torch.Tensor | None = None) -> Evaluation | None:
        """The score of the best constant prediction fitted on the training targets
        (:func:`fedgradnorm.tasks.constant_prediction`: the class prior, the mean) on ``target`` (default:
        this client's test split): the level a model must beat to have learnt anything. None for a user loss."""
        y = self.y_test if target is None else target
        constant = constant_prediction(self.task, self.y.cpu())
        if constant is None:
            return None
        return self.score(constant.to(y.device).expand(len(y), -1), y)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task's loss of the head's outputs, in the units it is computed in (see :func:`loss_units`)."""
        return self.task.loss_value(*loss_units(self.head, prediction, target))

    def run_round(self, shared: nn.Module, round_: int) -> tuple[ClientStepResult, Evaluation]:
        """tau_h head steps, evaluation of (omega_k, h_k) on the test split, tau_omega omega steps."""
        evaluations: list[Evaluation] = []
        result = client_step(
            shared,
            self.head,
            self.optimizer,
            self.loss,
            self.batches(round_),
            self.config,
            self.initial_loss,
            after_head=lambda: evaluations.append(self.evaluate(shared)),
        )
        self.initial_loss = result.initial_loss
        if self.device.type != "cpu":
            result = replace(result, gradient={k: g.cpu() for k, g in result.gradient.items()})
        return result, evaluations[0]

    # Persistence of the personal state (head, its Adam moments, F_0) for restarts.
    def state_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {
                "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "initial_loss": self.initial_loss,
                "task": self.task.name,
            },
            buf,
        )
        return buf.getvalue()

    def load_state_bytes(self, blob: bytes) -> None:
        state = decode_client_state(blob, self.device)
        if state.get("task") != self.task.name:
            raise ValueError(f"stored state is for task {state.get('task')!r}, not {self.task.name!r}")
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.initial_loss = state["initial_loss"]


def decode_client_state(blob: bytes, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A node's personal state as :meth:`LocalClient.state_bytes` wrote it (``weights_only``: no code
    runs); ValueError unless it is a dict holding the head's tensors and the task's name."""
    try:
        state = torch.load(io.BytesIO(blob), weights_only=True, map_location=device)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"not a readable node state ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not isinstance(state.get("head"), dict) or not isinstance(state.get("task"), str):
        raise ValueError("not a node state (expected a dict with the head's tensors and the task's name)")
    return state


def load_omega_(shared: nn.Module, omega: Mapping[str, torch.Tensor]) -> None:
    """Copy omega into the module's parameters in place (names and shapes must match)."""
    params = dict(shared.named_parameters())
    if set(params) != set(omega):
        raise ValueError(f"global model names differ from the local network: {sorted(set(params) ^ set(omega))}")
    with torch.no_grad():
        for name, p in params.items():
            src = omega[name]
            if src.shape != p.shape:
                raise ValueError(
                    f"global model tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(src)  # to the module's device
