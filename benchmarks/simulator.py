"""The simulator's round with its clients in turn (``workers`` 1) against two worker processes
(``workers`` 2), and both against the bare compute of the same round.

RadCom (3 clients, Network 2) and MTFL (5 clients, Network 1) on their synthetic sets, the paper's
τ_h = τ_ω = 5 and batch 64, one torch thread per client step everywhere (``client_threads`` 1: the
two simulators then compute the same numbers bit for bit, which the run checks). The two simulations
of one configuration advance side by side, a round of each in turn, so that other work on the machine
weighs on both alike. Each one's pool is wrapped in a :class:`RecordingPool`, which keeps the time of
the pool's round and every client step's own time where it ran, so one run gives:

* the sequential and the parallel round: ``Simulation.step``, timed whole;
* the bare compute: the client steps in turn, each timed alone, summed, plus the server step (the
  sequential step's time outside its pool);
* the critical path of two workers: the slower worker's client steps plus the server step, with the
  steps timed alone (what two workers could give at best) and as the workers ran them side by side
  (the machine's own contention: two steps at once may each run slower than one alone). The parallel
  round above the latter is what the parallel path itself costs: omega and the gradients through
  shared memory, the pipe messages, the wait.
"""

from __future__ import annotations

import multiprocessing
import pickle
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from benchmarks.common import MB, Table, fmt_s, median
from fedgradnorm.client_pool import ClientInfo, ClientPool, ClientRoundResult
from fedgradnorm.data.partition import Allocation, load_clients
from fedgradnorm.machine import machine_info, torch_threads
from fedgradnorm.process_pool import FlatLayout, shares
from fedgradnorm.simulation_config import SimulationConfig
from fedgradnorm.simulator import Simulation

WORKERS = 2


class RecordingPool:
    """A :class:`~fedgradnorm.client_pool.ClientPool` that passes every call on to ``inner`` and keeps, per
    round, the wall time of its ``run_round`` and each client step's time where it ran."""

    def __init__(self, inner: ClientPool) -> None:
        self.inner = inner
        self.rounds: list[tuple[float, dict[str, float]]] = []

    @property
    def members(self) -> Mapping[str, ClientInfo]:
        return self.inner.members

    def run_round(self, omega: Mapping[str, torch.Tensor], round_: int) -> list[ClientRoundResult]:
        t0 = time.perf_counter()
        results = self.inner.run_round(omega, round_)
        self.rounds.append((time.perf_counter() - t0, {r.client: r.seconds for r in results}))
        return results

    def close(self) -> None:
        self.inner.close()


def same_run(a: Simulation, b: Simulation) -> bool:
    return (
        a.records == b.records
        and a.state.weights == b.state.weights
        and all(torch.equal(b.state.omega[k], v) for k, v in a.state.omega.items())
    )


def critical_path(seconds: dict[str, float], groups: Sequence[tuple[str, ...]]) -> float:
    """The slowest worker's summed client steps."""
    return max(sum(seconds[n] for n in g) for g in groups)


def measure(federation: str, synthetic_size: int, rounds: int, skip: int) -> dict[str, Any]:
    """Median seconds per round of both simulators side by side, after ``skip`` warm-up rounds."""
    config = SimulationConfig(federation=federation, synthetic_size=synthetic_size, client_threads=1)
    data = load_clients(
        config.source(), config.task_names, Allocation.parse(config.allocation, config.test_fraction), config.seed
    )
    t0 = time.perf_counter()
    sequential = Simulation.build(config, data)
    built_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    parallel = Simulation.build(replace(config, workers=WORKERS), data)
    built_par = time.perf_counter() - t0
    seq_pool, par_pool = RecordingPool(sequential.pool), RecordingPool(parallel.pool)
    sequential.pool, parallel.pool = seq_pool, par_pool
    seq, par = [], []
    try:
        for _ in range(skip + rounds):
            t0 = time.perf_counter()
            sequential.step()
            seq.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            parallel.step()
            par.append(time.perf_counter() - t0)
    finally:
        parallel.close()
    groups = shares(tuple(config.task_names), WORKERS)
    bare, alone, together, overhead = [], [], [], []
    for k in range(skip, skip + rounds):
        (seq_wall, seq_steps), (par_wall, par_steps) = seq_pool.rounds[k], par_pool.rounds[k]
        server = seq[k] - seq_wall  # the server step (and the records)
        bare.append(sum(seq_steps.values()) + server)
        alone.append(critical_path(seq_steps, groups) + server)
        together.append(critical_path(par_steps, groups) + par[k] - par_wall)
        overhead.append(par_wall - critical_path(par_steps, groups))
    return {
        "federation": federation,
        "clients": len(config.task_names),
        "synthetic_size": synthetic_size,
        "samples": sum(c.num_samples for c in sequential.pool.members.values()),
        "rounds": rounds,
        "sequential": median(seq[skip:]),
        "parallel": median(par[skip:]),
        "bare": median(bare),
        "critical_alone": median(alone),
        "critical_together": median(together),
        "overhead": median(overhead),
        "build_sequential": built_seq,
        "build_parallel": built_par,
        "identical": same_run(sequential, parallel),
    }


def transfer_seconds(federation: str, repeats: int = 3) -> dict[str, float]:
    """Moving one shared network's worth of tensors (omega, or a gradient) to another process, best of
    ``repeats``: pickled to bytes, through a pipe (the one kind a worker has) and unpickled, against one
    in-place copy into a shared-memory buffer."""
    with torch_threads(1):
        shared = SimulationConfig(federation=federation).spec.build_shared(0)
        tensors = {k: torch.randn_like(p) for k, p in shared.named_parameters()}
        layout = FlatLayout.of(tensors)
        views = layout.views(layout.shared_buffers())
        sender, receiver = multiprocessing.Pipe()
        pickled, copied = float("inf"), float("inf")
        try:
            for _ in range(repeats):
                reader = threading.Thread(target=lambda: pickle.loads(receiver.recv_bytes()))
                t0 = time.perf_counter()
                reader.start()
                sender.send_bytes(pickle.dumps(tensors, protocol=pickle.HIGHEST_PROTOCOL))
                reader.join()
                pickled = min(pickled, time.perf_counter() - t0)
                t0 = time.perf_counter()
                for name, view in views.items():
                    view.copy_(tensors[name])
                copied = min(copied, time.perf_counter() - t0)
        finally:
            sender.close()
            receiver.close()
    return {"bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "pickled": pickled, "shared": copied}


def run(rounds: int = 10, radcom_size: int = 20, mtfl_size: int = 1000, skip: int = 2) -> Table:
    results = [measure("radcom", radcom_size, rounds, skip), measure("mtfl", mtfl_size, rounds, skip)]
    transfer = transfer_seconds("radcom")
    t = Table(
        f"Simulator: clients in turn against {WORKERS} worker processes, and against the bare compute "
        "(τ_h = τ_ω = 5, batch 64, 1 torch thread per client step)",
        ["federation", "round", "round (median)", "rounds / s", "speed-up", "above its compute"],
    )
    for r in results:
        label = f"{r['federation']} ({r['clients']} clients, {r['samples']:,} samples)"
        seq = r["sequential"]
        rows: list[tuple[str, float, str, str]] = [
            ("bare compute: client steps in turn + server step", r["bare"], "", ""),
            ("sequential simulator (workers 1)", seq, "1.00×", f"{seq / r['bare'] - 1:+.1%}"),
            (f"critical path of {WORKERS} workers, client steps timed alone", r["critical_alone"], "", ""),
            (
                f"critical path of {WORKERS} workers, client steps as the workers ran them",
                r["critical_together"],
                "",
                "",
            ),
            (
                f"parallel simulator (workers {WORKERS})",
                r["parallel"],
                f"{seq / r['parallel']:.2f}×",
                f"{r['parallel'] / r['critical_together'] - 1:+.1%}",
            ),
        ]
        for i, (what, seconds, speed_up, above) in enumerate(rows):
            t.add(label if i == 0 else "", what, fmt_s(seconds), f"{1 / seconds:.2f}", speed_up, above)
    info = machine_info()
    t.notes += [
        f"{results[0]['rounds']} rounds of each simulator after {skip} warm-up rounds, side by side (a round of "
        f"each in turn), on {info['nproc']} cores (load average {info['loadavg'][0]:.2f} at the end). Above its "
        "compute: the sequential round against the bare compute, the parallel round against its critical path as "
        f"the workers ran (the slower worker's client steps + the server step; {WORKERS} workers hold the clients "
        "round robin). Two client steps at once ran "
        + ", ".join(f"{r['critical_together'] / r['critical_alone']:.2f}×" for r in results)
        + " as long as alone ("
        + ", ".join(r["federation"] for r in results)
        + "): that is the machine (cores, caches, memory bandwidth shared), not the simulator.",
        "Bit for bit the same records, omega and p in both simulators: "
        + ", ".join(f"{r['federation']} {'yes' if r['identical'] else 'NO'}" for r in results)
        + ". Start-up with the data in hand: "
        + ", ".join(
            f"{r['federation']} {fmt_s(r['build_sequential'])} in turn, {fmt_s(r['build_parallel'])} with "
            f"{WORKERS} workers"
            for r in results
        )
        + " (processes spawned, torch imported, clients built in them).",
        f"Moving {transfer['bytes'] / MB:.1f} MB of Network 2 tensors (omega out, or a gradient back) through a "
        f"pipe, pickled: {fmt_s(transfer['pickled'])}; one copy into a shared-memory buffer: "
        f"{fmt_s(transfer['shared'])}. The parallel simulator copies omega once a round and each gradient once.",
    ]
    t.data = {"runs": results, "transfer": transfer, "workers": WORKERS}
    return t
