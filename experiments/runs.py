"""One training run of the in-process simulator, with the evaluations the metrics records lack.

A run trains with :class:`fedgradnorm.simulator.Simulation` on data from :func:`load_clients`
(so the test split keeps its extras, RadCom's SNR). Per round, every client evaluates
(omega_k, h_k) on a fixed random subset of its test split (``eval_test`` samples; the whole split
when 0) - that is the library's per-round evaluation, shrunk to bound the cost. After the last
round the final model (omega_K, h_K) is evaluated on the *whole* test split, per task and, for
RadCom, per SNR.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgradnorm.client import load_omega_
from fedgradnorm.data.partition import Allocation, ClientData, DataSource, load_clients, load_pools
from fedgradnorm.federation import load_federation
from fedgradnorm.hyperparameters import ALPHA, BATCH_SIZE, BETA, GAMMA, TAU_H, TAU_OMEGA
from fedgradnorm.simulation_config import SimulationConfig
from fedgradnorm.simulator import Simulation, write_jsonl
from fedgradnorm.tasks import derive_seed

ALGORITHMS = ("fedrep", "fedgradnorm")  # every experiment compares these two, on the same seeds
MASKING = "mtfl-without-landmarks"  # FedRep without the dominant task: what it masks
DIAL_TASK = "landmarks"  # the task whose loss the dial scales (MTFL, imbalanced allocation)


def federation_tasks(dataset: str) -> tuple[str, ...]:
    """The tasks of a shipped federation, in its spec's order."""
    return load_federation(dataset).task_names


def alone_name(dataset: str, task: str) -> str:
    """The control that trains one task's client by itself."""
    return f"alone-{dataset}-{task}"


def dial_name(scale: float) -> str:
    return f"dial-x{scale:g}"


def sweep_name(alpha: float, gamma: float) -> str:
    return f"sweep-a{alpha:g}-g{gamma:g}"


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run; its JSON is stored beside the results."""

    experiment: str  # "mtfl-imbalanced", "radcom", "dial-x100", ... (see experiments.reproduce.Plan)
    dataset: str  # the federation: "mtfl" | "radcom"
    allocation: str
    algorithm: str
    seed: int  # partition, model initialisation, heads and minibatch order
    rounds: int
    synthetic_size: int
    data_seed: int = 0  # seed of the synthetic generator (one data set for every run seed)
    tau_h: int = TAU_H
    tau_omega: int = TAU_OMEGA
    batch_size: int = BATCH_SIZE
    gamma: float = GAMMA
    alpha: float = ALPHA
    beta: float = BETA
    test_fraction: float = 0.2  # RadCom's per-client test share (MTFL has its own test faces)
    eval_test: int = 0  # per-round evaluation on this many test samples per client; 0: all
    tasks: str = ""  # comma-separated clients to train (a control without some task; one task alone); empty: all
    loss_scale: str = ""  # "task=factor": the dial (see SimulationConfig.loss_scale); empty: none

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.algorithm}/seed{self.seed}"

    def source(self) -> DataSource:
        return DataSource(
            load_federation(self.dataset), None, synthetic_seed=self.data_seed, synthetic_size=self.synthetic_size
        )

    def config(self) -> SimulationConfig:
        return SimulationConfig(
            federation=self.dataset,
            algorithm=self.algorithm,  # type: ignore[arg-type]
            rounds=self.rounds,
            seed=self.seed,
            tau_h=self.tau_h,
            tau_omega=self.tau_omega,
            batch_size=self.batch_size,
            allocation=self.allocation,
            test_fraction=self.test_fraction,
            gamma=self.gamma,
            alpha=self.alpha,
            beta=self.beta,
            synthetic_size=self.synthetic_size,
            tasks=self.task_names,
            loss_scale=self.loss_scale,
        )

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks.split(",") if t)

    @property
    def clients(self) -> tuple[str, ...]:
        """The tasks whose clients this run trains (``tasks``, or every task of the federation)."""
        return self.task_names or federation_tasks(self.dataset)


def prepare_data(spec: RunSpec) -> float:
    """Generate (or find in the cache) the synthetic set; returns the seconds it took."""
    t0 = time.perf_counter()
    load_pools(spec.source())
    return time.perf_counter() - t0


def client_data(spec: RunSpec) -> dict[str, ClientData]:
    clients = load_clients(
        spec.source(), federation_tasks(spec.dataset), Allocation.parse(spec.allocation, spec.test_fraction), spec.seed
    )  # every task's share, as in the full federation: a control trains some clients on the same data
    return {name: clients[name] for name in spec.clients}


def eval_subset(data: dict[str, ClientData], n: int, seed: int) -> dict[str, ClientData]:
    """The same clients with each test split cut to a fixed random ``n`` samples (0: unchanged)."""
    if n <= 0:
        return data
    out = {}
    for name, d in data.items():
        if len(d.test) <= n:
            out[name] = d
            continue
        rng = np.random.default_rng(derive_seed(seed, "eval-subset", name))
        idx = np.sort(rng.permutation(len(d.test))[:n])
        out[name] = ClientData(task=d.task, train=d.train, test=d.test.subset(idx))
    return out


def final_evaluation(sim: Simulation, data: dict[str, ClientData]) -> dict[str, dict[str, Any]]:
    """(omega_K, h_K) on each client's whole test split: loss, metric, and accuracy per SNR (RadCom);
    beside them the reference level of the task (the best constant prediction, fitted on the client's
    training targets: its class prior, its mean), on the whole test split and on the per-round subset."""
    load_omega_(sim.shared, sim.state.omega)
    sim.shared.eval()
    out: dict[str, dict[str, Any]] = {}
    for name, client in sim.clients.items():
        test = data[name].test
        x = torch.as_tensor(test.x, dtype=torch.float32)
        y = client.task.targets(test.targets[name])
        with torch.no_grad():
            pred = client.head(sim.shared(x))
            final = client.score(pred, y)
            reference = client.reference(y)
            subset = client.reference()  # on the per-round evaluation subset the client holds
        result: dict[str, Any] = {
            "test_loss": final.test_loss,
            "metric": final.metric,
            "value": final.value,
            "n": len(y),
        }
        if reference is not None and subset is not None:
            result["reference"] = {"test_loss": reference.test_loss, "value": reference.value}
            result["reference_eval"] = {"test_loss": subset.test_loss, "value": subset.value}
        if "snr" in test.extras and client.task.kind == "classification":
            snr = np.asarray(test.extras["snr"])
            correct = (pred.argmax(dim=1) == y).numpy()
            result["accuracy_by_snr"] = {int(s): float(correct[snr == s].mean()) for s in sorted(set(snr.tolist()))}
        out[name] = result
    return out


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def data_version(spec: RunSpec) -> str:
    """The version of the synthetic generator a run's data comes from (a run of an older drawing is
    not reused)."""
    if spec.dataset == "mtfl":
        from fedgradnorm.data.synthetic_mtfl import GENERATOR_VERSION

        return f"mtfl-v{GENERATOR_VERSION}"
    return f"{spec.dataset}-v1"


def finished(spec: RunSpec, out_root: str | Path) -> dict[str, Any] | None:
    """The stored result of a finished run of exactly ``spec`` on data of the current generator, or None."""
    path = Path(out_root) / spec.key / "result.json"
    if not path.exists():
        return None
    stored: dict[str, Any] = json.loads(path.read_text())
    if stored.get("spec") != asdict(spec) or stored.get("data_version", data_version(spec)) != data_version(spec):
        return None
    stored["reused"] = True
    return stored


def run_one(spec: RunSpec, out_root: str | Path, reuse: bool = False) -> dict[str, Any]:
    """Train one run, write ``metrics.jsonl`` and ``result.json`` under ``out_root/spec.key``."""
    out = Path(out_root) / spec.key
    result_path = out / "result.json"
    if reuse and (stored := finished(spec, out_root)) is not None:
        return stored
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    data = client_data(spec)
    sim = Simulation.build(spec.config(), eval_subset(data, spec.eval_test, spec.seed))
    for _ in sim.rounds():
        pass
    final = final_evaluation(sim, data)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    write_jsonl(out / "metrics.jsonl", sim.records)
    result = {
        "spec": asdict(spec),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "torch_threads": torch.get_num_threads(),
        "max_rss_mib": _rss_mib(),
        "pid": os.getpid(),
        "clients": {n: {"train": c.num_samples, "test": len(data[n].test)} for n, c in sim.clients.items()},
        "final": final,
        "data_version": data_version(spec),
        "metrics": str(out / "metrics.jsonl"),
        "reused": False,
    }
    text = json.dumps(result, indent=1, sort_keys=True)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(result_path)
    return json.loads(text)  # the stored form (JSON object keys are strings), as a reused run returns it


def load_records(result: dict[str, Any]) -> list[dict[str, Any]]:
    with open(result["metrics"]) as f:
        return [json.loads(line) for line in f if line.strip()]
