"""The aggregator over real gRPC on loopback: registration, rounds, stragglers, refusals, big models."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
from fedgradnorm.algorithm import ServerState
from fedgradnorm.federation import load_federation
from fedgradnorm.reasons import Reason
from fedgradnorm.services import serde
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
from fedgradnorm.services.aggregator.server import RunningAggregator, start_aggregator
from fedgradnorm.services.aggregator.store import STATE_FILE, FileStateStore, Snapshot
from fedgradnorm.services.refusals import reason_of
from tests.faults_helpers import wait_until
from tests.grpc_client import RawNode, connect, register, state, weights

Start = Callable[..., RunningAggregator]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    running: list[RunningAggregator] = []

    def _start(state_dir: Path | None = None, **kw: object) -> RunningAggregator:
        rounds = dict(
            federation="mtfl", min_nodes=2, round_timeout=30.0, heartbeat_interval=0.2, heartbeat_timeout=30.0
        )
        rounds.update(kw)
        service = ServiceConfig(
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            state_dir=str(state_dir or tmp_path / "state"),
            insecure=True,
        )
        agg = start_aggregator(service, CoordinatorConfig(**rounds))  # type: ignore[arg-type]
        running.append(agg)
        return agg

    try:
        yield _start
    finally:
        for agg in running:
            agg.stop(grace=0.5)


def zeros_like(omega: dict[str, torch.Tensor], value: float = 0.01) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in omega.items()}


def wait_round(stub, k: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while state(stub).round < k:
        assert time.monotonic() < end, f"round {k} not reached"
        time.sleep(0.02)


def play_round(nodes: list[RawNode]) -> int:
    fetched = [n.fetch() for n in nodes]
    k = fetched[0][0].round
    for n, (_, omega) in zip(nodes, fetched, strict=True):
        assert n.submit(k, zeros_like(omega)).accepted
    wait_round(nodes[0].stub, k + 1)
    return k


def test_health_serving_and_reflection_listed(start: Start) -> None:
    agg = start()
    channel, _ = connect(agg.grpc_port)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fedgradnorm.v1.Aggregator"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"fedgradnorm.v1.Aggregator", "grpc.health.v1.Health"} <= names


def test_register_returns_architecture_and_round_config(start: Start) -> None:
    agg = start(tau_h=3, tau_omega=4, batch_size=32, beta=0.001)
    channel, stub = connect(agg.grpc_port)
    with channel:
        resp = stub.Register(
            pb.RegisterRequest(
                node_name="g", federation="mtfl", network=serde.federation_network("mtfl"), task="gender", num_samples=5
            )
        )
        assert resp.network == "fedgradnorm.models:Network1" and resp.algorithm == "fedgradnorm"
        assert resp.network_fingerprint == load_federation("mtfl").architecture.fingerprint
        assert list(resp.omega_tilde) == ["features.9.weight", "features.9.bias"]
        rc = resp.round_config
        assert (rc.tau_h, rc.tau_omega, rc.batch_size, rc.beta) == (3, 4, 32, 0.001)
        assert resp.max_update_bytes == 4 * 51536 and not resp.HasField("initial_loss") and resp.weight == 1.0
        assert tensor_pb2.DTYPE_FLOAT16 in resp.accepted_dtypes


def test_register_refuses_another_shared_network_and_says_what_differs(start: Start) -> None:
    agg = start()
    channel, stub = connect(agg.grpc_port)
    with channel:
        theirs = serde.federation_network("mtfl")
        wider = pb.NetworkArchitecture()
        wider.CopyFrom(theirs)
        wider.fingerprint = "sha256:" + "0" * 32
        del wider.parameters[0].shape[:]
        wider.parameters[0].shape.extend([32, 1, 5, 5])  # features.0 with 32 filters instead of 16
        cases = {
            "radcom's network": (serde.federation_network("radcom"), "features.0.weight only here"),
            "a wider first layer": (
                wider,
                "features.0.weight is [16, 1, 5, 5] float32 here, [32, 1, 5, 5] float32 there",
            ),
            "no network at all": (pb.NetworkArchitecture(), "0 there"),
        }
        for what, (network, expected) in cases.items():
            with pytest.raises(grpc.RpcError) as e:
                stub.Register(
                    pb.RegisterRequest(node_name="n", federation="mtfl", network=network, task="gender", num_samples=5)
                )
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, what
            assert expected in e.value.details() and "Network1" in e.value.details(), (what, e.value.details())
            assert reason_of(e.value) is Reason.NETWORK_MISMATCH, what
        assert state(stub).total_nodes == 0  # nothing was enrolled


def test_register_bounds_the_declared_network_before_comparing_it(start: Start) -> None:
    """Extreme but well-formed declarations: 5,000 tensors, a 1 MiB tensor name, 1e18-element shapes.
    Each is refused (or found to differ) without enrolling anything."""
    agg = start()
    channel, stub = connect(agg.grpc_port)
    with channel:
        many = pb.NetworkArchitecture(
            fingerprint="sha256:" + "1" * 32,
            parameters=[pb.ParameterShape(name=f"p{i}", shape=[1], dtype="float32") for i in range(5000)],
        )
        long_name = pb.NetworkArchitecture(
            fingerprint="x", parameters=[pb.ParameterShape(name="n" * (1 << 20), shape=[1], dtype="float32")]
        )
        huge = pb.NetworkArchitecture()
        huge.CopyFrom(serde.federation_network("mtfl"))
        huge.fingerprint = "sha256:" + "2" * 32
        del huge.parameters[0].shape[:]
        huge.parameters[0].shape.extend([10**18, 2**62])
        cases = {"5000 tensors": (many, grpc.StatusCode.INVALID_ARGUMENT, "at most 4096 tensors")}
        cases["a 1 MiB name"] = (long_name, grpc.StatusCode.INVALID_ARGUMENT, "256 characters")
        cases["1e18 elements"] = (huge, grpc.StatusCode.FAILED_PRECONDITION, "[1000000000000000000, ")
        for what, (network, code, expected) in cases.items():
            with pytest.raises(grpc.RpcError) as e:
                stub.Register(
                    pb.RegisterRequest(node_name="n", federation="mtfl", network=network, task="gender", num_samples=5),
                    timeout=30,
                )
            assert e.value.code() == code and expected in e.value.details(), (what, e.value.details()[:300])
            assert len(e.value.details()) <= 1024, what  # nothing of a huge name is echoed back
        assert state(stub).total_nodes == 0


def test_finished_carries_the_final_model_in_float32_unless_declined(start: Start) -> None:
    agg = start(rounds=1)
    channel, stub = connect(agg.grpc_port)
    with channel:
        a, b = register(stub, "a", "gender"), register(stub, "b", "smile")
        play_round([a, b])
        wait_until(lambda: state(stub).phase == pb.PHASE_DONE, 30, "training done")
        header, omega = a.fetch(wait=1.0, dtype=tensor_pb2.DTYPE_FLOAT16)
        assert header.status == pb.ROUND_STATUS_FINISHED and header.round == 1
        assert {s.dtype for s in header.tensors} == {tensor_pb2.DTYPE_FLOAT32}  # exact, whatever was asked
        final = agg.coordinator._state
        assert omega is not None and final is not None and set(omega) == set(final.omega)
        for name, value in final.omega.items():
            assert torch.equal(omega[name], value), name
        header, omega = b.fetch(wait=1.0, without_final_model=True)
        assert header.status == pb.ROUND_STATUS_FINISHED and omega is None and not header.tensors


def test_runtime_registration_joins_next_round_with_weight_one(start: Start) -> None:
    agg = start()
    channel, stub = connect(agg.grpc_port)
    with channel:
        a, b = register(stub, "a", "gender"), register(stub, "b", "smile")
        play_round([a, b])
        header, omega = a.fetch()
        k = header.round
        c = register(stub, "c", "pose")  # registers while round k is open
        with pytest.raises(grpc.RpcError) as e:
            c.submit(k, zeros_like(omega))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not a participant" in e.value.details()
        assert c.fetch(wait=0.3)[0].status == pb.ROUND_STATUS_NOT_YET
        for n in (a, b):
            n.submit(k, zeros_like(omega))
        wait_round(stub, k + 1)
        play_round([a, b, c])  # c takes part in round k + 1
        w = weights(stub)
        assert set(w) == {"a", "b", "c"} and sum(w.values()) == pytest.approx(3.0)
        assert {n.node_id: n.last_round for n in state(stub).nodes}["c"] == k + 1


def test_straggler_left_out_at_deadline_and_back_next_round(start: Start) -> None:
    agg = start(round_timeout=1.0)
    channel, stub = connect(agg.grpc_port)
    with channel:
        a, b = register(stub, "a", "gender"), register(stub, "b", "smile")
        header, omega = a.fetch()
        k = header.round
        b.fetch()  # b takes the round but never submits
        a.submit(k, zeros_like(omega))
        wait_round(stub, k + 1, timeout=10)
        nodes = {n.node_id: n for n in state(stub).nodes}
        assert nodes["a"].last_round == k and nodes["b"].last_round == -1
        assert nodes["b"].active  # still registered
        header, omega = b.fetch()
        assert header.round == k + 1
        with pytest.raises(grpc.RpcError) as e:  # its late update for round k is refused
            b.submit(k, zeros_like(omega))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_deregistration(start: Start) -> None:
    agg = start()
    channel, stub = connect(agg.grpc_port)
    with channel:
        a, b = register(stub, "a", "gender"), register(stub, "b", "smile")
        header, omega = a.fetch()
        a.submit(header.round, zeros_like(omega))
        b.deregister()
        wait_round(stub, header.round + 1)  # closes without waiting for b
        assert not {n.node_id: n for n in state(stub).nodes}["b"].active
        assert b.heartbeat().registered is False
        with pytest.raises(grpc.RpcError) as e:
            b.fetch()
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _bad_submits(
    a: RawNode, b: RawNode, k: int, omega: dict[str, torch.Tensor]
) -> list[tuple[str, grpc.StatusCode, Callable[[], object]]]:
    good = zeros_like(omega)
    first = next(iter(omega))
    nan = dict(good)
    nan[first] = torch.full_like(omega[first], float("nan"))
    renamed = {("x" + k_ if k_ == first else k_): v for k_, v in good.items()}
    reshaped = dict(good)
    reshaped[first] = good[first].reshape(-1)
    forged = RawNode(a.stub, "b", a.token, "smile")
    ghost = RawNode(a.stub, "ghost", a.token, "gender")
    half = list(
        __import__("fedgradnorm.wire", fromlist=["iter_chunks"]).iter_chunks(good, tensor_pb2.DTYPE_FLOAT32, 1 << 16)
    )
    truncated = half[: len(half) // 2]
    f16_header = a.header(k, good)
    for spec in f16_header.tensors:
        spec.dtype = tensor_pb2.DTYPE_UNSPECIFIED

    def no_header() -> object:
        return a.stub.SubmitUpdate(iter([pb.SubmitUpdateRequest(chunk=tensor_pb2.TensorChunk(data=b"x"))]), timeout=10)

    return [
        ("wrong round", grpc.StatusCode.FAILED_PRECONDITION, lambda: a.submit(k + 1, good)),
        ("unknown node", grpc.StatusCode.NOT_FOUND, lambda: ghost.submit(k, good)),
        (
            "bad token",
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: RawNode(a.stub, "a", "forged", "gender").submit(k, good),
        ),
        ("another node's token", grpc.StatusCode.UNAUTHENTICATED, lambda: forged.submit(k, good)),
        ("wrong names", grpc.StatusCode.INVALID_ARGUMENT, lambda: a.submit(k, renamed)),
        ("wrong shapes", grpc.StatusCode.INVALID_ARGUMENT, lambda: a.submit(k, reshaped)),
        ("wrong dtype", grpc.StatusCode.INVALID_ARGUMENT, lambda: a.submit(k, good, header=f16_header)),
        ("nan", grpc.StatusCode.INVALID_ARGUMENT, lambda: a.submit(k, nan)),
        ("inf loss ratio", grpc.StatusCode.INVALID_ARGUMENT, lambda: a.submit(k, good, loss_ratio=float("inf"))),
        ("negative samples", grpc.StatusCode.INVALID_ARGUMENT, lambda: a.submit(k, good, num_samples=-5)),
        ("truncated payload", grpc.StatusCode.INVALID_ARGUMENT, lambda: a.submit(k, good, chunks=truncated)),
        (
            "oversized header",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda: a.submit(k, good, header=a.header(k, good, total_bytes=1 << 40)),
        ),
        ("no header", grpc.StatusCode.INVALID_ARGUMENT, no_header),
    ]


def test_every_bad_submit_is_refused_with_its_status_and_changes_nothing(start: Start, tmp_path: Path) -> None:
    agg = start(state_dir=tmp_path / "s")
    channel, stub = connect(agg.grpc_port)
    with channel:
        a, b = register(stub, "a", "gender"), register(stub, "b", "smile")
        play_round([a, b])
        header, omega = a.fetch()
        k = header.round
        wait_until(lambda: state(stub).last_committed_round == k - 1, 30, "the last round's commit")
        file_before = (tmp_path / "s" / STATE_FILE).read_bytes()
        state_before = state(stub)
        for what, code, call in _bad_submits(a, b, k, omega):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == code, f"{what}: {e.value.code()} {e.value.details()}"
            assert e.value.details(), what
        a.submit(k, zeros_like(omega))
        with pytest.raises(grpc.RpcError) as e:
            a.submit(k, zeros_like(omega))
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert (tmp_path / "s" / STATE_FILE).read_bytes() == file_before
        after = state(stub)
        assert after.round == state_before.round
        assert [(n.node_id, n.weight, n.last_round) for n in after.nodes] == [
            (n.node_id, n.weight, n.last_round) for n in state_before.nodes
        ]
        # The refusals are counted by reason for the dashboard.
        samples = {s.labels["outcome"] for m in agg.metrics.updates.collect() for s in m.samples}
        assert {
            "wrong_round",
            "unknown_node",
            "bad_token",
            "unknown_tensor",
            "shape_mismatch",
            "bad_dtype",
            "bad_tensor",
            "bad_value",
            "truncated",
            "too_large",
            "duplicate",
            "accepted",
        } <= samples


def test_large_model_round_trip_through_the_chunked_stream(start: Start, tmp_path: Path) -> None:
    """A 256 MB shared network (pre-seeded state) fetched and submitted through the real servicer."""
    cfg = CoordinatorConfig(federation="mtfl", min_nodes=1)
    big = {"features.9.weight": torch.randn(8192, 8192), "features.9.bias": torch.randn(8192)}  # 256 MiB + 32 KiB
    FileStateStore(tmp_path / "big").save(
        Snapshot(identity=cfg.identity(), server=ServerState.initial(big), members={})
    )
    agg = start(state_dir=tmp_path / "big", min_nodes=1)
    channel, stub = connect(agg.grpc_port)
    with channel:
        a = register(stub, "a", "gender")
        header, omega = a.fetch()
        assert header.total_bytes == 4 * (8192 * 8192 + 8192)
        assert torch.equal(omega["features.9.weight"], big["features.9.weight"])
        grad = {k: torch.full_like(v, 0.5) for k, v in omega.items()}
        del omega
        assert a.submit(header.round, grad).accepted
        wait_round(stub, header.round + 1, timeout=120)
        _header2, omega2 = a.fetch()
        # One Adam step of size beta against a positive gradient.
        torch.testing.assert_close(omega2["features.9.bias"], big["features.9.bias"] - 0.0002, rtol=0, atol=1e-6)
