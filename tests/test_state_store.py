"""One contract, run against every StateStore implementation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedgradnorm.algorithm import ClientWeight, ServerState
from fedgradnorm.services.aggregator.store import (
    FileStateStore,
    MemberRecord,
    MemoryStateStore,
    Snapshot,
    StateError,
    StateStore,
)


def snapshot(round_: int = 3) -> Snapshot:
    torch.manual_seed(round_)
    state = ServerState.initial({"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)})
    state.round = round_
    state.omega_adam.step = round_
    state.omega_adam.exp_avg["a.bias"] += 0.5
    state.weights = {"n1": ClientWeight(p=0.9, exp_avg=0.1, exp_avg_sq=0.01, step=2), "n2": ClientWeight(p=1.1)}
    members = {
        "n1": MemberRecord(
            "n1", "n1", "radcom", "modulation", "ab" * 32, 100, initial_loss=1.5, test_metrics={"accuracy": 0.5}
        ),
        "n2": MemberRecord("n2", "n2", "radcom", "signal", "cd" * 32, 50, registered=False),
    }
    return Snapshot(identity={"federation": "radcom", "seed": 0}, server=state, members=members)


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    return MemoryStateStore() if request.param == "memory" else FileStateStore(tmp_path / "state")


def assert_same(a: Snapshot, b: Snapshot) -> None:
    assert a.identity == b.identity and a.members == b.members
    assert a.server.round == b.server.round and a.server.weights == b.server.weights
    assert a.server.omega_adam.step == b.server.omega_adam.step
    for part in ("omega",):
        for k in getattr(a.server, part):
            assert torch.equal(getattr(a.server, part)[k], getattr(b.server, part)[k])
    for k in a.server.omega:
        assert torch.equal(a.server.omega_adam.exp_avg[k], b.server.omega_adam.exp_avg[k])
        assert torch.equal(a.server.omega_adam.exp_avg_sq[k], b.server.omega_adam.exp_avg_sq[k])


def test_empty_store_loads_none(store: StateStore) -> None:
    assert store.load() is None


def test_round_trip_is_bit_exact(store: StateStore) -> None:
    snap = snapshot()
    store.save(snap)
    assert_same(store.load(), snap)


def test_later_save_replaces_earlier_and_mutation_after_save_does_not_leak(store: StateStore) -> None:
    store.save(snapshot(1))
    snap = snapshot(2)
    store.save(snap)
    snap.server.omega["a.bias"] += 1  # after the commit
    assert_same(store.load(), snapshot(2))


def test_file_store_disk_full_keeps_previous_state(small_disk: Path) -> None:
    store = FileStateStore(small_disk / "state")
    store.save(snapshot(1))
    big = snapshot(2)
    big.server.omega["a.weight"] = torch.zeros(600, 1000)  # 2.4 MB: more than the disk holds
    with pytest.raises(StateError, match=r"cannot commit.*No space left on device"):
        store.save(big)
    assert_same(store.load(), snapshot(1))
    assert [p.name for p in (small_disk / "state").iterdir()] == ["aggregator-state.pt"]


def test_file_store_commit_into_unwritable_location_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(StateError, match="cannot commit"):
        FileStateStore(blocker / "state").save(snapshot())


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path)
    store.save(snapshot())
    data = store.path.read_bytes()
    store.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError, match=r"aggregator-state\.pt"):
        store.load()
