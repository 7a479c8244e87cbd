"""The simulator with its clients in worker processes (``workers`` > 1): bit for bit the clients in turn,
a worker that raises or dies fails the run naming the client, and no worker outlives the simulation.

Real processes, real federations. Both sides pin one torch thread per client step (``client_threads``):
the clients in turn give different last bits with two threads than with one."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedgradnorm.cli import main
from fedgradnorm.errors import FatalError
from fedgradnorm.machine import torch_threads
from fedgradnorm.process_pool import ClientProcessError
from fedgradnorm.simulation_config import SimulationConfig
from fedgradnorm.simulator import Simulation

MODULE = """
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedgradnorm.data import MultiTaskArrays, Pools

CONTROL = Path(__file__).with_name("control.txt")  # what the level client's loss does next


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 4)

    def forward(self, x):
        return torch.relu(self.body(x))


class Normed(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(super().forward(x))


def make_pools(seed: int, size: int) -> Pools:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20 * size, 6)).astype(np.float32)
    targets = {"kind": rng.integers(0, 3, len(x)), "level": rng.normal(size=len(x)).astype(np.float32)}
    return Pools(MultiTaskArrays(x=x, targets=targets))


def flaky_mse(prediction, target):
    what = CONTROL.read_text().strip() if CONTROL.exists() else ""
    if what == "raise":
        raise RuntimeError("the level sensor is unplugged")
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "hang":
        time.sleep(120)
    return torch.nn.functional.mse_loss(prediction, target.reshape(prediction.shape))
"""

SPEC = """
name = "flaky"
python_path = ["."]

[network]
factory = "flaky_fed:Tiny"
input_shape = [6]

[data]
synthetic = "flaky_fed:make_pools"

[[tasks]]
name = "kind"
outputs = 3

[[tasks]]
name = "level"
outputs = 1
loss = "flaky_fed:flaky_mse"
target = "real"
metric = "mse"
"""


def small(federation: str, **kwargs: Any) -> SimulationConfig:
    """A short run of one torch thread per client step."""
    return SimulationConfig(
        federation=federation, tau_h=2, tau_omega=2, batch_size=16, client_threads=1, synthetic_size=2, **kwargs
    )


@pytest.fixture
def flaky(tmp_path: Path) -> Path:
    """A two-task federation whose ``level`` client raises, dies or hangs when ``control.txt`` says so."""
    folder = tmp_path / "flaky"
    folder.mkdir()
    (folder / "flaky_fed.py").write_text(MODULE)
    spec = folder / "federation.toml"
    spec.write_text(SPEC)
    return spec


def no_workers_left() -> bool:
    return multiprocessing.active_children() == []


def run(config: SimulationConfig) -> Simulation:
    with Simulation.build(config) as sim:
        for _ in sim.rounds():
            pass
    return sim


def assert_same_run(a: Simulation, b: Simulation) -> None:
    assert a.records == b.records
    assert a.state.round == b.state.round == a.config.rounds
    assert a.state.omega.keys() == b.state.omega.keys()
    for name, ref in a.state.omega.items():
        assert torch.equal(b.state.omega[name], ref), name
    assert a.state.weights == b.state.weights  # p and its Adam moments, exactly


def test_radcom_fedgradnorm_on_two_workers_is_the_clients_in_turn() -> None:
    config = small("radcom", rounds=3)
    parallel = run(replace(config, workers=2))
    assert isinstance(parallel.pool.members, dict) and list(parallel.pool.members) == list(config.task_names)
    sequential = run(config)
    assert_same_run(sequential, parallel)
    assert {r["weight"] for r in parallel.records} != {1.0}  # the weights moved: the rule ran on both sides
    assert no_workers_left()


def test_client_threads_pin_the_clients_in_turn_whatever_the_process_has() -> None:
    """The comparisons above pin one thread per client step; so does the process's own count when
    ``client_threads`` is 0, and the pinned run leaves the process's count as it found it."""
    config = small("radcom", rounds=1)
    with torch_threads(2):
        pinned = run(config)
        assert torch.get_num_threads() == 2
    with torch_threads(1):
        unpinned = run(replace(config, client_threads=0))
    assert_same_run(pinned, unpinned)


def test_mtfl_fedrep_five_clients_on_two_workers_is_the_clients_in_turn() -> None:
    config = replace(small("mtfl", algorithm="fedrep", rounds=2), synthetic_size=20)
    assert_same_run(run(config), run(replace(config, workers=2)))
    assert no_workers_left()


def test_a_client_that_raises_fails_the_run_naming_it(flaky: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (flaky.parent / "control.txt").write_text("raise")
    flags = ["--federation", str(flaky), "--rounds", "2", "--synthetic-size", "4", "--quiet"]
    # 9 workers for 2 clients: clamped to one per client
    rc = main(["simulate", *flags, "--workers", "9", "--out", str(flaky.parent / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("{")]  # not a log line
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("fedgradnorm simulate: error: client 'level' failed in round 0 (worker process ")
    assert err[0].endswith("): RuntimeError: the level sensor is unplugged")
    assert no_workers_left()


def test_a_worker_killed_mid_round_fails_the_run_naming_its_client(flaky: Path) -> None:
    config = small(str(flaky), rounds=3, workers=2)
    with Simulation.build(config) as sim:
        sim.step()
        (flaky.parent / "control.txt").write_text("kill")
        with pytest.raises(
            ClientProcessError, match=r"client 'level': its worker process \d+ was killed by SIGKILL in round 1"
        ):
            sim.step()
        with pytest.raises(FatalError, match="stopped by an error"):
            sim.step()
    assert no_workers_left()


def test_ctrl_c_mid_round_stops_every_worker(flaky: Path) -> None:
    """SIGINT reaches the simulating process while a client hangs: KeyboardInterrupt comes at once and
    closing the simulation stops both workers (the hanging one by SIGTERM)."""
    config = small(str(flaky), rounds=3, workers=2)
    # Python's own SIGINT handler, whatever this test process inherited: a shell starts a background
    # job (`pytest ... &`) with SIGINT ignored, and Python then never raises KeyboardInterrupt.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with Simulation.build(config) as sim:
        pids = sim.pool.pids  # type: ignore[attr-defined]
        (flaky.parent / "control.txt").write_text("hang")
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                sim.step()
        finally:
            timer.cancel()
            signal.signal(signal.SIGINT, previous)
    assert no_workers_left()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_bad_worker_counts_fail_fast_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for flags, says in (
        (["--workers", "0"], "workers must be at least 1"),
        (["--workers", "-2"], "workers must be at least 1"),
        (["--workers", "two"], "--workers: 'two' is not a valid int"),
        (["--client-threads", "-1"], "client_threads must be 0 (automatic) or a positive count"),
    ):
        assert main(["simulate", *flags, "--rounds", "1", "--quiet", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], (flags, err)
    assert SimulationConfig(federation="radcom", workers=7).worker_count == 3
    assert SimulationConfig(federation="mtfl", workers=2, tasks=("gender",)).worker_count == 1
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_a_shared_network_with_buffers_is_refused_on_workers(flaky: Path) -> None:
    normed = flaky.with_name("normed.toml")
    normed.write_text(SPEC.replace("flaky_fed:Tiny", "flaky_fed:Normed"))
    with pytest.raises(ValueError, match=r"without buffers; flaky_fed:Normed has \['norm.running_mean'"):
        Simulation.build(SimulationConfig(federation=str(normed), workers=2))
