"""Hostile input: thousands of malformed and adversarial messages through the real gRPC server,
and a lying aggregator, corrupt state folders and bad data files thrown at the edge node.

The aggregator under fire runs in-process (start_aggregator, plaintext, 127.0.0.1:0) with a round
open, one update already in it, and the federation full. Every hostile call must end in a gRPC
status with a message (never UNKNOWN, never a hang, never INTERNAL: bytes that do not decode are
INVALID_ARGUMENT, see fedgradnorm/services/aggregator/codec.py), and afterwards omega, p, the
Adam moments and the membership must be bit-identical to before: the committed state file,
GetState, and the coordinator's in-memory state.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import h5py
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgradnorm import wire
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
from fedgradnorm.data.base import DataError
from fedgradnorm.federation import load_federation
from fedgradnorm.launch import start_aggregator as start_aggregator_process
from fedgradnorm.services import serde
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
from fedgradnorm.services.aggregator.server import RunningAggregator, start_aggregator
from fedgradnorm.services.aggregator.store import STATE_FILE, FileStateStore, StateError
from fedgradnorm.services.domain import Phase
from fedgradnorm.services.edge_node.config import EdgeConfig
from fedgradnorm.services.edge_node.node import EdgeNode, EdgeNodeError
from fedgradnorm.services.edge_node.store import NodeStateError
from tests.faults_helpers import gradient_like, health, safe_structlog, same_tensors, small_client_data, wait_until
from tests.grpc_client import OPTIONS, RawNode, connect, register, state

ENROLL = "enrol-7c1d9e04b2"
MTFL_TASKS = load_federation("mtfl").task_names
F32 = tensor_pb2.DTYPE_FLOAT32
ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}

# Examples per property in `make test` (a few thousand in all, about a minute) and in the long run.
SHORT, LONG = 1, 5


EXAMPLES: dict[str, int] = {}  # examples run per property, printed by each test


def count(name: str) -> None:
    EXAMPLES[name] = EXAMPLES.get(name, 0) + 1


def hypothesis_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------------------------------------
# The aggregator under fire
# ---------------------------------------------------------------------------------------------


@dataclass
class Target:
    agg: RunningAggregator
    state_dir: Path
    channel: grpc.Channel
    stub: pb_grpc.AggregatorStub
    nodes: dict[str, RawNode]  # a: submitted to the open round; b: participant; c: joined late; d: left
    round: int
    specs: list[tuple[str, tuple[int, ...]]]
    payload: bytes  # a well-formed float32 gradient of the model's size

    @property
    def tokens(self) -> dict[str, str]:
        return {k: n.token for k, n in self.nodes.items()}

    @property
    def model_bytes(self) -> int:
        return len(self.payload)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with safe_structlog():
        state_dir = tmp_path_factory.mktemp("hostile") / "state"
        service = ServiceConfig(
            listen="127.0.0.1:0", metrics_listen="", state_dir=str(state_dir), insecure=True, max_fetch_wait=0.2
        )
        rounds = CoordinatorConfig(
            federation="mtfl",
            min_nodes=2,
            max_nodes=3,
            round_timeout=3600.0,
            heartbeat_interval=0.2,
            heartbeat_timeout=3600.0,
            enrollment_token=ENROLL,
            # The registration rate limit would throttle most of the barrage before it reaches the
            # checks behind it; it has a test of its own.
            register_burst=10**6,
            register_rate=1e6,
        )
        agg = start_aggregator(service, rounds)
        channel, stub = connect(agg.grpc_port)
        try:
            a = register(stub, "a", "gender", enrollment_token=ENROLL)
            b = register(stub, "b", "smile", enrollment_token=ENROLL)
            fetched = [n.fetch() for n in (a, b)]
            for n, (h, omega) in zip((a, b), fetched, strict=True):
                assert n.submit(h.round, gradient_like(omega)).accepted
            wait_until(lambda: state(stub).round == 1 and state(stub).phase == pb.PHASE_ROUND_OPEN, 30, "round 1")
            d = register(stub, "d", "glasses", enrollment_token=ENROLL)
            d.deregister()
            c = register(stub, "c", "pose", enrollment_token=ENROLL)  # the federation is now full
            header, omega = a.fetch()
            assert header.round == 1 and omega is not None
            assert a.submit(1, gradient_like(omega)).accepted  # replays of this one must be refused
            specs = [(k, tuple(v.shape)) for k, v in omega.items()]
            payload = b"".join(wire.iter_chunks(gradient_like(omega), F32, 1 << 30))
            yield Target(agg, state_dir, channel, stub, {"a": a, "b": b, "c": c, "d": d}, 1, specs, payload)
        finally:
            channel.close()
            agg.stop(grace=0.2)


def fingerprint(t: Target) -> dict[str, Any]:
    """Everything hostile input must not change, copied."""
    coord = t.agg.coordinator
    s = coord._state
    o = coord._open
    assert s is not None and o is not None
    return {
        "file": (t.state_dir / STATE_FILE).read_bytes(),
        "get_state": t.stub.GetState(pb.GetStateRequest(), timeout=10).SerializeToString(deterministic=True),
        "round": s.round,
        "phase": coord.phase,
        "omega": {k: v.clone() for k, v in s.omega.items()},
        "adam": (
            s.omega_adam.step,
            {k: v.clone() for k, v in s.omega_adam.exp_avg.items()},
            {k: v.clone() for k, v in s.omega_adam.exp_avg_sq.items()},
        ),
        "weights": {k: asdict(w) for k, w in s.weights.items()},
        "members": {k: asdict(m) for k, m in coord.members.records.items()},
        "open": (o.number, sorted(o.participants), sorted(o.submitted)),
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["file"] == before["file"], "the committed state file changed"
    assert after["get_state"] == before["get_state"], "GetState changed"
    assert (after["round"], after["phase"], after["open"]) == (before["round"], before["phase"], before["open"])
    assert same_tensors(after["omega"], before["omega"]), "omega changed"
    assert after["adam"][0] == before["adam"][0]
    assert same_tensors(after["adam"][1], before["adam"][1]) and same_tensors(after["adam"][2], before["adam"][2])
    assert after["weights"] == before["weights"], "the weights p changed"
    assert after["members"] == before["members"], "the membership changed"


def quick_invariant(t: Target) -> tuple[object, ...]:
    """A cheap per-example check of what a successful hostile call would change first."""
    coord = t.agg.coordinator
    o = coord._open
    return (
        coord.phase,
        o.number if o else None,
        frozenset(o.submitted) if o else None,
        frozenset(o.participants) if o else None,
        tuple((k, m.registered, m.num_samples) for k, m in sorted(coord.members.records.items())),
    )


@pytest.fixture
def unchanged(target: Target) -> Iterator[Target]:
    """The test may throw anything at the target; afterwards nothing may have changed and the
    server must still answer."""
    before = fingerprint(target)
    yield target
    assert target.agg.coordinator.running, "the round driver died"
    assert health(target.agg.grpc_port) == health_pb2.HealthCheckResponse.SERVING
    assert_unchanged(before, fingerprint(target))


def outcome(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, object]:
    try:
        return grpc.StatusCode.OK, "", call()
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


def assert_refused(code: grpc.StatusCode, details: str, what: object) -> None:
    assert code in ERRORS, f"{what!r}: {code.name} {details!r}"
    assert details.strip(), f"{what!r}: {code.name} without a message"


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

TEXT = st.text(max_size=80)
PARTICIPATING = frozenset({"a", "b", "c"})  # registered; d has deregistered
KNOWN_IDS = ["a", "b", "c", "d", "ghost", "", "A", "a ", "../a", "a\x00"]


def credentials(t: Target, legit: frozenset[str] = frozenset()) -> st.SearchStrategy[tuple[str, str]]:
    """(node_id, session_token) pairs that are never a node's own, except for the ``legit`` ones."""
    tokens = t.tokens
    forged_tokens = [*tokens.values(), "", "x", tokens["a"][:-1], tokens["a"] + "=", tokens["b"].upper()]
    ids = st.one_of(st.sampled_from(KNOWN_IDS), TEXT)
    toks = st.one_of(st.sampled_from(forged_tokens), TEXT)
    forged = st.tuples(ids, toks).filter(lambda p: tokens.get(p[0]) != p[1])
    if not legit:
        return forged
    return st.one_of(forged, st.sampled_from(sorted(legit)).map(lambda n: (n, tokens[n])))


INT64 = st.integers(-(2**63), 2**63 - 1)
SAMPLES = st.one_of(st.sampled_from([0, 1, 10, -1, 10**9, 10**9 + 1, 2**63 - 1, -(2**63)]), INT64)
BAD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-300, -1e300])


def register_requests(t: Target) -> st.SearchStrategy[pb.RegisterRequest]:
    def build(enrol: str, name: str, dataset: str, task: str, n: int, cred: tuple[str, str]) -> pb.RegisterRequest:
        return pb.RegisterRequest(
            enrollment_token=enrol,
            node_name=name,
            federation=dataset,
            network=serde.federation_network(dataset) if dataset in ("mtfl", "radcom") else None,
            task=task,
            num_samples=n,
            node_id=cred[0],
            session_token=cred[1],
        )

    return st.builds(
        build,
        st.one_of(st.just(ENROLL), st.sampled_from(["", ENROLL + " ", ENROLL[:-1], ENROLL.upper()]), TEXT),
        st.one_of(st.sampled_from(["a", "b", "c", "d", "e", "new-node", "x" * 63, "x" * 64, "-bad", "o.k_1"]), TEXT),
        st.one_of(st.just("mtfl"), st.sampled_from(["radcom", "", "MTFL", "mtfl\x00"]), TEXT),
        st.one_of(st.sampled_from([*MTFL_TASKS, "modulation", ""]), TEXT),
        SAMPLES,
        st.one_of(st.just(("", "")), credentials(t)),
    )


# Each mutation alone makes a submit invalid. Two of one group could cancel each other out (a
# truncation undoing an overflow; dropping the tensor another mutation changed or duplicated, which
# leaves a valid header in another order - allowed - over a constant payload), so at most one
# mutation of each group is applied.
PAYLOAD_GROUP = ("truncate", "overflow", "half_precision_lie")
SPEC_GROUP = ("half_precision_lie", "bad_dtype", "shape", "rename", "duplicate", "drop", "extra")
STREAM_GROUP = ("no_header", "second_header", "empty_stream", "header_only")
GROUPS = (PAYLOAD_GROUP, SPEC_GROUP, STREAM_GROUP)
INDEPENDENT = (
    "round",
    "total_bytes",
    "nonfinite",
    "loss",
    "initial_loss",
    "ratio",
    "f0_mismatch",
    "samples",
    "test_loss",
    "test_metric",
)
MUTATIONS = tuple(dict.fromkeys(PAYLOAD_GROUP + SPEC_GROUP + STREAM_GROUP + INDEPENDENT))


@dataclass
class HostileSubmit:
    who: str
    mutations: tuple[str, ...]
    messages: list[pb.SubmitUpdateRequest]

    def __repr__(self) -> str:  # keep hypothesis' report readable: no 200 KB payloads
        return f"HostileSubmit(who={self.who!r}, mutations={self.mutations})"


def hostile_submits(t: Target) -> st.SearchStrategy[HostileSubmit]:
    names = [n for n, _ in t.specs]

    @st.composite
    def build(draw: st.DrawFn) -> HostileSubmit:
        who = draw(st.sampled_from(["b"] * 6 + ["a", "a", "c", "d", "forged"]))
        if who == "forged":
            node_id, token = draw(credentials(t))
        else:
            node_id, token = who, t.tokens[who]
        # b is a participant that has not submitted: only a mutation stands between it and the round.
        chosen = draw(st.lists(st.sampled_from(MUTATIONS), min_size=1 if who == "b" else 0, max_size=3, unique=True))
        mutations: list[str] = []
        for m in chosen:
            if not any(m in g and any(x in g for x in mutations) for g in GROUPS):
                mutations.append(m)

        specs = [tensor_pb2.TensorSpec(name=n, shape=list(s), dtype=F32) for n, s in t.specs]
        payload = t.payload
        loss = draw(st.floats(0.1, 10.0))
        f0 = 1.0  # b's stored F_0 (its first round submitted 1.0)
        fields: dict[str, Any] = dict(loss=loss, initial_loss=f0, loss_ratio=loss / f0)
        fields["num_samples"] = draw(st.integers(1, 10**9))
        round_ = t.round
        extra: dict[str, Any] = {}
        if draw(st.booleans()):
            extra["test_loss"] = draw(st.floats(0.0, 100.0))
            extra["test_metrics"] = {"accuracy": draw(st.floats(0.0, 1.0))}

        for m in mutations:
            i = draw(st.integers(0, len(specs) - 1))
            if m == "round":
                round_ = draw(INT64.filter(lambda r: r != t.round))
            elif m == "bad_dtype":
                specs[i].dtype = draw(st.one_of(st.just(0), st.integers(4, 2**31 - 1), st.integers(-(2**31), -1)))
            elif m == "half_precision_lie":  # announced 16-bit, sent 32-bit bytes
                specs[i].dtype = draw(st.sampled_from([tensor_pb2.DTYPE_FLOAT16, tensor_pb2.DTYPE_BFLOAT16]))
            elif m == "shape":
                shape = list(specs[i].shape)
                j = draw(st.integers(0, len(shape)))
                if j == len(shape):
                    shape.append(draw(st.integers(0, 4)))
                else:
                    shape[j] = draw(st.integers(-(2**62), 2**62).filter(lambda d, old=shape[j]: d != old))
                specs[i] = tensor_pb2.TensorSpec(name=specs[i].name, shape=shape, dtype=specs[i].dtype)
            elif m == "rename":
                specs[i].name = draw(TEXT.filter(lambda s: s not in names))
            elif m == "duplicate":
                specs.append(tensor_pb2.TensorSpec(name=specs[i].name, shape=list(specs[i].shape), dtype=F32))
            elif m == "drop":
                del specs[i]
            elif m == "extra":
                name = draw(TEXT.filter(lambda s: s not in names))
                specs.insert(i, tensor_pb2.TensorSpec(name=name, shape=[draw(st.integers(0, 8))], dtype=F32))
            elif m == "truncate":
                payload = payload[: len(payload) - draw(st.integers(1, len(payload)))]
            elif m == "overflow":
                payload = payload + draw(st.binary(min_size=1, max_size=4096))
            elif m == "nonfinite" and len(payload) >= 4:
                at = 4 * draw(st.integers(0, len(payload) // 4 - 1))
                value = struct.pack("<f", draw(st.sampled_from([math.nan, math.inf, -math.inf])))
                payload = payload[:at] + value + payload[at + 4 :]
            elif m == "loss":
                fields["loss"] = draw(st.one_of(BAD_FLOATS, st.just(0.0)))
                with np.errstate(all="ignore"):
                    fields["loss_ratio"] = float(np.float64(fields["loss"]) / fields["initial_loss"])
            elif m == "initial_loss":
                fields["initial_loss"] = draw(st.one_of(BAD_FLOATS, st.just(0.0)))
            elif m == "ratio":
                base = fields["loss"] / fields["initial_loss"] if fields["initial_loss"] > 0 else 1.0
                delta = draw(st.one_of(st.floats(0.01, 10.0), st.floats(-0.99, -0.01)))
                fields["loss_ratio"] = draw(
                    st.one_of(BAD_FLOATS, st.just(0.0), st.just(base * (1 + delta) if math.isfinite(base) else 1.0))
                )
            elif m == "f0_mismatch":  # consistent numbers, but not the F_0 the aggregator stored
                f0_new = draw(st.floats(1.5, 100.0))
                ratio = draw(st.floats(0.1, 10.0))
                fields.update(loss=f0_new * ratio, initial_loss=f0_new, loss_ratio=ratio)
            elif m == "samples":
                fields["num_samples"] = draw(st.one_of(INT64.filter(lambda n: n < 1 or n > 10**9), SAMPLES))
                if 1 <= fields["num_samples"] <= 10**9:
                    fields["num_samples"] = 0
            elif m == "test_loss":
                extra["test_loss"] = draw(BAD_FLOATS)
            elif m == "test_metric":
                extra["test_metrics"] = {draw(TEXT): draw(BAD_FLOATS)}
        total = wire.payload_nbytes(s for s in specs if s.dtype in wire.DTYPES)
        total = max(-(2**63), min(2**63 - 1, total))
        if "total_bytes" in mutations:
            total = draw(INT64.filter(lambda n, ok=total: n != ok))
        header = pb.SubmitHeader(
            node_id=node_id, session_token=token, round=round_, tensors=specs, total_bytes=total, **fields
        )
        if "test_loss" in extra:
            header.test_loss = extra["test_loss"]
        for k, v in extra.get("test_metrics", {}).items():
            header.test_metrics[k] = v
        size = draw(st.integers(4096, 1 << 20))
        chunks = [
            pb.SubmitUpdateRequest(chunk=tensor_pb2.TensorChunk(data=payload[i : i + size]))
            for i in range(0, len(payload), size)
        ]
        first = pb.SubmitUpdateRequest(header=header)
        if "no_header" in mutations:
            messages = chunks
        elif "second_header" in mutations:
            messages = [first, *chunks[:1], first, *chunks[1:]]
        elif "empty_stream" in mutations:
            messages = []
        elif "header_only" in mutations:
            messages = [first]
        else:
            messages = [first, *chunks]
        return HostileSubmit(who, tuple(mutations), messages)

    return build()


# ---------------------------------------------------------------------------------------------
# Properties over every RPC
# ---------------------------------------------------------------------------------------------


def _register_property(t: Target, examples: int) -> None:
    @hypothesis_settings(examples)
    @given(register_requests(t))
    def prop(req: pb.RegisterRequest) -> None:
        count("Register")
        before = quick_invariant(t)
        code, details, _ = outcome(lambda: t.stub.Register(req, timeout=10))
        assert_refused(code, details, req)
        assert quick_invariant(t) == before

    prop()


def _session_rpcs_property(t: Target, examples: int) -> None:
    legit_hb = frozenset({"a", "b", "c", "d"})

    @hypothesis_settings(examples)
    @given(
        st.sampled_from(["heartbeat", "deregister", "fetch"]),
        credentials(t),
        credentials(t, legit_hb),
        st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-(2**31), 2**31 - 1)),
        st.floats(allow_nan=True, allow_infinity=True),
    )
    def prop(rpc: str, forged: tuple[str, str], maybe_legit: tuple[str, str], dtype: int, wait: float) -> None:
        count("Heartbeat/Deregister/FetchRound")
        before = quick_invariant(t)
        if rpc == "heartbeat":
            node_id, token = maybe_legit
            code, details, resp = outcome(
                lambda: t.stub.Heartbeat(pb.HeartbeatRequest(node_id=node_id, session_token=token), timeout=10)
            )
            if code is grpc.StatusCode.OK:  # an unknown or departed id is told to register again
                assert isinstance(resp, pb.HeartbeatResponse)
                assert resp.registered == (t.tokens.get(node_id) == token and node_id in PARTICIPATING)
            else:
                assert_refused(code, details, (rpc, node_id))
        elif rpc == "deregister":
            node_id, token = forged if maybe_legit[0] != "d" else maybe_legit  # d has already left
            code, details, _ = outcome(
                lambda: t.stub.Deregister(pb.DeregisterRequest(node_id=node_id, session_token=token), timeout=10)
            )
            assert_refused(code, details, (rpc, node_id))
        else:
            node_id, token = maybe_legit
            req = pb.FetchRoundRequest(node_id=node_id, session_token=token, wait_seconds=wait, dtype=dtype)

            def fetch() -> list[pb.FetchRoundResponse]:
                return list(t.stub.FetchRound(req, timeout=10))

            code, details, resp = outcome(fetch)
            if code is grpc.StatusCode.OK:
                assert t.tokens.get(node_id) == token and node_id in PARTICIPATING and 0 <= dtype <= 3, (node_id, dtype)
                assert isinstance(resp, list) and resp and resp[0].WhichOneof("payload") == "header"
                assert resp[0].header.round == t.round
                sent = sum(len(m.chunk.data) for m in resp[1:])
                assert sent == resp[0].header.total_bytes
            else:
                assert_refused(code, details, (rpc, node_id, dtype))
        assert quick_invariant(t) == before

    prop()


def _submit_property(t: Target, examples: int) -> None:
    @hypothesis_settings(examples)
    @given(hostile_submits(t))
    def prop(case: HostileSubmit) -> None:
        count("SubmitUpdate")
        before = quick_invariant(t)
        code, details, resp = outcome(lambda: t.stub.SubmitUpdate(iter(case.messages), timeout=30))
        assert code is not grpc.StatusCode.OK, f"{case!r} was accepted: {resp}"
        assert_refused(code, details, case)
        assert quick_invariant(t) == before

    prop()


# Every method with its request type and how it is called.
METHODS = {
    "/fedgradnorm.v1.Aggregator/Register": (pb.RegisterRequest, "unary"),
    "/fedgradnorm.v1.Aggregator/FetchRound": (pb.FetchRoundRequest, "server_stream"),
    "/fedgradnorm.v1.Aggregator/SubmitUpdate": (pb.SubmitUpdateRequest, "client_stream"),
    "/fedgradnorm.v1.Aggregator/Deregister": (pb.DeregisterRequest, "unary"),
    "/fedgradnorm.v1.Aggregator/Heartbeat": (pb.HeartbeatRequest, "unary"),
    "/fedgradnorm.v1.Aggregator/GetState": (pb.GetStateRequest, "unary"),
    "/grpc.health.v1.Health/Check": (health_pb2.HealthCheckRequest, "unary"),
}


def raw_call(channel: grpc.Channel, method: str, messages: list[bytes]) -> Callable[[], object]:
    """Send bytes as they are: identity serializers, so they reach the server undecoded."""
    kind = METHODS[method][1]
    if kind == "unary":
        return lambda: channel.unary_unary(method)(messages[0], timeout=10)
    if kind == "server_stream":
        return lambda: list(channel.unary_stream(method)(messages[0], timeout=10))
    return lambda: channel.stream_unary(method)(iter(messages), timeout=10)


def decodes(method: str, messages: list[bytes]) -> bool:
    cls = METHODS[method][0]
    try:
        for m in messages:
            cls.FromString(m)
    except DecodeError:
        return False
    return True


def valid_bytes(t: Target) -> list[bytes]:
    """Serialised well-formed requests to cut short or damage. No real session token appears:
    the bytes go to every method, and a fetch request read as a Deregister would otherwise be one."""
    return [
        pb.RegisterRequest(
            enrollment_token="x",
            node_name="n",
            federation="mtfl",
            network=serde.federation_network("mtfl"),
            task="gender",
        ).SerializeToString(),
        pb.FetchRoundRequest(node_id="a", session_token="not-a-token", wait_seconds=0.1).SerializeToString(),
        pb.HeartbeatRequest(node_id="b", session_token="nope").SerializeToString(),
        pb.SubmitUpdateRequest(
            header=pb.SubmitHeader(node_id="b", session_token="nope", round=1, total_bytes=t.model_bytes)
        ).SerializeToString(),
        pb.SubmitUpdateRequest(chunk=tensor_pb2.TensorChunk(data=t.payload[:512])).SerializeToString(),
    ]


def _raw_bytes_property(t: Target, examples: int, stats: dict[str, int]) -> None:
    cut = st.builds(lambda b, n: b[: max(0, len(b) - n)], st.sampled_from(valid_bytes(t)), st.integers(1, 64))
    flipped = st.builds(
        lambda b, i, x: b[: i % max(1, len(b))] + bytes([x]) + b[i % max(1, len(b)) + 1 :],
        st.sampled_from(valid_bytes(t)),
        st.integers(0, 10_000),
        st.integers(0, 255),
    )
    blob = st.one_of(st.binary(max_size=300), cut, flipped)

    @hypothesis_settings(examples)
    @given(st.sampled_from(sorted(METHODS)), st.lists(blob, min_size=1, max_size=4))
    def prop(method: str, messages: list[bytes]) -> None:
        count("raw bytes")
        if METHODS[method][1] != "client_stream":
            messages = messages[:1]
        before = quick_invariant(t)
        code, details, _ = outcome(raw_call(t.channel, method, messages))
        if decodes(method, messages):
            stats["decoded"] += 1
            if method.endswith("Health/Check") and code is grpc.StatusCode.NOT_FOUND:
                pass  # grpc.health.v1's standard answer for an unknown service name carries no message
            elif code is not grpc.StatusCode.OK:
                assert_refused(code, details, (method, messages))
            else:
                assert not method.endswith(("Register", "SubmitUpdate", "Deregister")), (method, messages)
        elif not decodes(method, messages[:1]) or code not in ERRORS:
            # Undecodable (the first message, or a later one the server reached).
            stats["undecodable"] += 1
            assert code is grpc.StatusCode.INVALID_ARGUMENT and details, (method, code, details)
        else:
            stats["decoded"] += 1  # refused on its first message before the bad one was read
            assert_refused(code, details, (method, messages))
        assert quick_invariant(t) == before

    prop()


def test_register_refuses_every_hostile_request(unchanged: Target) -> None:
    _register_property(unchanged, 600 * SHORT)
    print(f"examples: {EXAMPLES}")


def test_session_rpcs_refuse_forged_and_malformed_requests(unchanged: Target) -> None:
    _session_rpcs_property(unchanged, 700 * SHORT)
    print(f"examples: {EXAMPLES}")


def test_submit_refuses_every_malformed_or_replayed_update(unchanged: Target) -> None:
    _submit_property(unchanged, 1000 * SHORT)
    print(f"examples: {EXAMPLES}")


def test_random_bytes_at_every_rpc(unchanged: Target) -> None:
    stats = {"decoded": 0, "undecodable": 0}
    _raw_bytes_property(unchanged, 1000 * SHORT, stats)
    print(f"examples: {EXAMPLES}; raw bytes: {stats}")
    assert stats["decoded"] and stats["undecodable"]


@pytest.mark.long
def test_hostile_input_long(unchanged: Target) -> None:
    stats = {"decoded": 0, "undecodable": 0}
    _register_property(unchanged, 600 * LONG)
    _session_rpcs_property(unchanged, 700 * LONG)
    _submit_property(unchanged, 1000 * LONG)
    _raw_bytes_property(unchanged, 1000 * LONG, stats)
    print(f"examples: {EXAMPLES}; raw bytes: {stats}")


# ---------------------------------------------------------------------------------------------
# Limits the lead built, checked through the wire
# ---------------------------------------------------------------------------------------------


def test_oversized_update_is_refused_before_any_payload_is_buffered(unchanged: Target) -> None:
    t = unchanged
    b = t.nodes["b"]
    registry = t.agg.metrics.registry
    received = registry.get_sample_value("fedgradnorm_bytes_total", {"direction": "received"})

    def sixteen_megabytes() -> Iterator[pb.SubmitUpdateRequest]:
        specs = [tensor_pb2.TensorSpec(name=n, shape=list(s), dtype=F32) for n, s in t.specs]
        yield pb.SubmitUpdateRequest(
            header=pb.SubmitHeader(
                node_id="b",
                session_token=b.token,
                round=t.round,
                tensors=specs,
                total_bytes=16 << 20,
                loss=1.0,
                initial_loss=1.0,
                loss_ratio=1.0,
                num_samples=10,
            )
        )
        for _ in range(16):
            yield pb.SubmitUpdateRequest(chunk=tensor_pb2.TensorChunk(data=bytes(1 << 20)))

    with pytest.raises(grpc.RpcError) as e:
        t.stub.SubmitUpdate(sixteen_megabytes(), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "too_large" in e.value.details()
    # Nothing was read into a buffer: the header alone was refused.
    assert registry.get_sample_value("fedgradnorm_bytes_total", {"direction": "received"}) == received


def test_a_message_above_the_4_mib_cap_is_refused(unchanged: Target) -> None:
    t = unchanged
    with grpc.insecure_channel(
        f"127.0.0.1:{t.agg.grpc_port}", options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        big = pb.SubmitUpdateRequest(chunk=tensor_pb2.TensorChunk(data=bytes(5 << 20)))
        header = pb.SubmitUpdateRequest(
            header=pb.SubmitHeader(
                node_id="b",
                session_token=t.nodes["b"].token,
                round=t.round,
                tensors=[tensor_pb2.TensorSpec(name=n, shape=list(s), dtype=F32) for n, s in t.specs],
                total_bytes=t.model_bytes,
                loss=1.0,
                initial_loss=1.0,
                loss_ratio=1.0,
                num_samples=10,
            )
        )
        for messages in ([big], [header, big]):
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.AggregatorStub(ch).SubmitUpdate(iter(messages), timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.AggregatorStub(ch).Register(pb.RegisterRequest(node_name="x" * (5 << 20)), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_full_federation_wrong_enrolment_and_stolen_identities_are_refused(unchanged: Target) -> None:
    t = unchanged
    cases = [
        ("full", grpc.StatusCode.RESOURCE_EXHAUSTED, dict(node_name="e", task="gender", enrollment_token=ENROLL)),
        ("no token", grpc.StatusCode.UNAUTHENTICATED, dict(node_name="e", task="gender")),
        ("wrong token", grpc.StatusCode.UNAUTHENTICATED, dict(node_name="e", task="gender", enrollment_token="x")),
        (
            "resume another node",
            grpc.StatusCode.UNAUTHENTICATED,
            dict(node_name="a", task="gender", enrollment_token=ENROLL, node_id="a", session_token=t.tokens["b"]),
        ),
        (
            "resume unknown",
            grpc.StatusCode.NOT_FOUND,
            dict(node_name="z", task="gender", enrollment_token=ENROLL, node_id="z", session_token=t.tokens["a"]),
        ),
        ("name taken", grpc.StatusCode.ALREADY_EXISTS, dict(node_name="d", task="glasses", enrollment_token=ENROLL)),
    ]
    for what, code, kw in cases:
        with pytest.raises(grpc.RpcError) as e:
            t.stub.Register(
                pb.RegisterRequest(federation="mtfl", network=serde.federation_network("mtfl"), num_samples=5, **kw),
                timeout=10,
            )  # type: ignore[arg-type]
        assert e.value.code() == code, f"{what}: {e.value.code()} {e.value.details()}"


def test_session_tokens_are_stored_only_as_hashes(unchanged: Target) -> None:
    blob = (unchanged.state_dir / STATE_FILE).read_bytes()
    snap = FileStateStore(unchanged.state_dir).load()
    assert snap is not None and {"a", "b"} <= set(snap.members)  # committed with round 0
    for name, token in unchanged.tokens.items():
        assert token.encode() not in blob, name
        if name in snap.members:
            assert snap.members[name].token_sha256 == hashlib.sha256(token.encode()).hexdigest()


def test_undecodable_requests_get_invalid_argument(unchanged: Target) -> None:
    """gRPC Python alone would answer INTERNAL 'Exception deserializing request!' before any of our
    code runs; the WireCodec interceptor makes it the client's error, naming the method."""
    bad = [b"\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe"]  # bad tag, truncated field, invalid UTF-8
    tried = 0
    for method in sorted(METHODS):
        for blob in bad:
            if decodes(method, [blob]):
                continue
            tried += 1
            code, details, _ = outcome(raw_call(unchanged.channel, method, [blob]))
            assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, blob, code, details)
            assert method in details and "not a valid protobuf message" in details, details
    assert tried >= len(METHODS) * 2


def test_a_bad_message_later_in_a_stream_is_invalid_argument_and_changes_nothing(unchanged: Target) -> None:
    before = quick_invariant(unchanged)
    header = pb.SubmitUpdateRequest(
        header=pb.SubmitHeader(node_id="b", session_token=unchanged.tokens["b"], round=unchanged.round)
    ).SerializeToString()
    code, details, _ = outcome(
        raw_call(unchanged.channel, "/fedgradnorm.v1.Aggregator/SubmitUpdate", [header, b"\xff"])
    )
    assert code in ERRORS, (code, details)  # refused by the header (b already submitted) or by message 1
    fresh = pb.SubmitUpdateRequest(
        header=pb.SubmitHeader(node_id="nobody", session_token="t", round=unchanged.round)
    ).SerializeToString()
    stream = unchanged.channel.stream_unary("/fedgradnorm.v1.Aggregator/SubmitUpdate")
    code, details, _ = outcome(lambda: stream(iter([b"\xff", fresh]), timeout=10))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "message 0 of the request stream" in details, details
    assert quick_invariant(unchanged) == before


def test_reflection_streams_refuse_undecodable_bytes(unchanged: Target) -> None:
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    call = unchanged.channel.stream_stream(method)
    code, details, _ = outcome(lambda: list(call(iter([b"\xff"]), timeout=10)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and method in details, (code, details)


def test_status_messages_are_bounded_whatever_the_input(unchanged: Target) -> None:
    huge = "x" * 200_000
    calls = {
        "heartbeat-token": lambda: unchanged.stub.Heartbeat(
            pb.HeartbeatRequest(node_id="a", session_token=huge), timeout=10
        ),
        "deregister": lambda: unchanged.stub.Deregister(
            pb.DeregisterRequest(node_id=huge, session_token="t"), timeout=10
        ),
        "fetch": lambda: list(
            unchanged.stub.FetchRound(pb.FetchRoundRequest(node_id=huge, session_token="t"), timeout=10)
        ),
        "register-name": lambda: unchanged.stub.Register(
            pb.RegisterRequest(
                enrollment_token=ENROLL,
                node_name=huge,
                federation="mtfl",
                network=serde.federation_network("mtfl"),
                task="gender",
                num_samples=1,
            ),
            timeout=10,
        ),
        "register-dataset": lambda: unchanged.stub.Register(
            pb.RegisterRequest(enrollment_token=ENROLL, node_name="e", federation=huge, task="gender", num_samples=1),
            timeout=10,
        ),
        "submit-tensor-name": lambda: unchanged.stub.SubmitUpdate(
            iter(
                [
                    pb.SubmitUpdateRequest(
                        header=pb.SubmitHeader(
                            node_id="b",
                            session_token=unchanged.tokens["b"],
                            round=unchanged.round,
                            tensors=[tensor_pb2.TensorSpec(name=huge, shape=[1], dtype=F32)],
                            total_bytes=4,
                        )
                    )
                ]
            ),
            timeout=10,
        ),
    }
    for what, call in calls.items():
        code, details, _ = outcome(call)
        assert code in ERRORS - {grpc.StatusCode.RESOURCE_EXHAUSTED}, (what, code, details[:200])
        assert 0 < len(details) <= 1024, (what, len(details))


def test_registration_attempts_are_rate_limited_per_peer(tmp_path: Path) -> None:
    """Guessing the enrolment token, or hammering one name, is throttled per peer host; an honest
    node on the same host with the right token still gets in."""
    with safe_structlog():
        agg = start_aggregator(
            ServiceConfig(listen="127.0.0.1:0", metrics_listen="", state_dir=str(tmp_path / "s"), insecure=True),
            CoordinatorConfig(federation="mtfl", min_nodes=2, enrollment_token=ENROLL),
        )
        channel, stub = connect(agg.grpc_port)
        try:

            def attempt(token: str, name: str) -> tuple[grpc.StatusCode, str, object]:
                req = pb.RegisterRequest(
                    enrollment_token=token,
                    node_name=name,
                    federation="mtfl",
                    network=serde.federation_network("mtfl"),
                    task="gender",
                    num_samples=1,
                )
                return outcome(lambda: stub.Register(req, timeout=10))

            guesses = [attempt(f"guess-{i}", f"g{i}") for i in range(200)]
            for code, details, _ in guesses:
                assert_refused(code, details, "guess")
            throttled = [d for c, d, _ in guesses if c is grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert throttled and "too many" in throttled[0]
            assert len(throttled) > 150, "most of 200 wrong enrolment tokens in a row must be throttled"
            assert attempt(ENROLL, "taken")[0] is grpc.StatusCode.OK
            same_name = [attempt(ENROLL, "taken")[0] for _ in range(50)]  # a taken name, over and over
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in same_name
            code, details, resp = attempt(ENROLL, "honest")
            assert code is grpc.StatusCode.OK, details
            assert isinstance(resp, pb.RegisterResponse) and resp.node_id == "honest"
        finally:
            channel.close()
            agg.stop(grace=0.2)


def test_an_enrolled_node_cannot_flood_test_metric_names(tmp_path: Path) -> None:
    with safe_structlog():
        agg = start_aggregator(
            ServiceConfig(listen="127.0.0.1:0", metrics_listen="", state_dir=str(tmp_path / "s"), insecure=True),
            CoordinatorConfig(federation="mtfl", min_nodes=1, round_timeout=60.0, heartbeat_interval=0.2),
        )
        channel, stub = connect(agg.grpc_port)
        try:
            a = register(stub, "a", "gender")
            header, omega = a.fetch()
            assert omega is not None
            flood = {f"m{i:05d}": 0.5 for i in range(20_000)}
            code, _details, _ = outcome(lambda: a.submit(header.round, gradient_like(omega), test_metrics=flood))
            assert code is grpc.StatusCode.INVALID_ARGUMENT
        finally:
            channel.close()
            agg.stop(grace=0.2)


# ---------------------------------------------------------------------------------------------
# Tampered state files are refused without running their contents
# ---------------------------------------------------------------------------------------------


class _Payload:
    """A pickle that would create ``marker`` when unpickled by a plain pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_tampered_aggregator_state_file_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(StateError, match=STATE_FILE):
        FileStateStore(state_dir).load()
    with pytest.raises(RuntimeError, match=r"not a readable aggregator state"):  # the process refuses to start
        start_aggregator_process(tmp_path, ["--federation", "mtfl", "--state-dir", str(state_dir)])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# The edge node against a lying aggregator, corrupt state folders and bad data files
# ---------------------------------------------------------------------------------------------


def omega_messages(
    mutate: Callable[[list[tensor_pb2.TensorSpec], bytes], tuple[list[tensor_pb2.TensorSpec], bytes, int]]
    | None = None,
) -> list[pb.FetchRoundResponse]:
    omega = {k: v.detach() for k, v in load_federation("mtfl").build_shared(0).named_parameters()}
    specs = wire.tensor_specs(omega, F32)
    payload = b"".join(wire.iter_chunks(omega, F32, 1 << 30))
    total = len(payload)
    if mutate is not None:
        specs, payload, total = mutate(specs, payload)
    header = pb.RoundHeader(status=pb.ROUND_STATUS_OPEN, round=0, deadline_unix_seconds=0.0, tensors=specs)
    header.total_bytes = total
    chunks = [
        pb.FetchRoundResponse(chunk=tensor_pb2.TensorChunk(data=payload[i : i + 65536]))
        for i in range(0, len(payload), 65536)
    ]
    return [pb.FetchRoundResponse(header=header), *chunks]


class FakeAggregator(pb_grpc.AggregatorServicer):
    """Speaks the protocol, but serves whatever global model the test gives it."""

    def __init__(self, messages: list[pb.FetchRoundResponse], federation: str = "mtfl") -> None:
        self.messages = messages
        self.federation = load_federation(federation)
        self.submits = 0
        self.fetches = 0

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        return pb.RegisterResponse(
            node_id=request.node_id or request.node_name,
            session_token=request.session_token or "token",
            network=self.federation.network.ref,
            network_fingerprint=self.federation.architecture.fingerprint,
            algorithm="fedgradnorm",
            omega_tilde=["features.9.weight", "features.9.bias"],
            round_config=pb.RoundConfig(tau_h=1, tau_omega=1, beta=0.001, batch_size=4),
            seed=0,
            wire_dtype=F32,
            accepted_dtypes=[F32],
            max_chunk_bytes=1 << 20,
            max_update_bytes=4 * 51536,
            heartbeat_interval_seconds=5.0,
            weight=1.0,
        )

    def FetchRound(self, request: pb.FetchRoundRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self.fetches += 1
        yield from self.messages

    def SubmitUpdate(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> pb.SubmitUpdateResponse:
        self.submits += 1
        for _ in request_iterator:
            pass
        return pb.SubmitUpdateResponse(accepted=True, round=0)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(round=0, registered=True)

    def Deregister(self, request: pb.DeregisterRequest, context: grpc.ServicerContext) -> pb.DeregisterResponse:
        return pb.DeregisterResponse()


@pytest.fixture
def fake_aggregator() -> Iterator[Callable[[FakeAggregator], int]]:
    servers: list[grpc.Server] = []

    def serve(fake: FakeAggregator) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
        pb_grpc.add_AggregatorServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return port

    with safe_structlog():
        try:
            yield serve
        finally:
            for s in servers:
                s.stop(0).wait()


def edge_config(port: int, state_dir: Path, **kw: Any) -> EdgeConfig:
    base: dict[str, Any] = dict(
        aggregator=f"127.0.0.1:{port}",
        federation="mtfl",
        task="gender",
        state_dir=str(state_dir),
        insecure=True,
        fetch_wait=0.5,
        max_backoff=0.2,
    )
    base.update(kw)
    return EdgeConfig(**base)


def _first_shape(specs: list[tensor_pb2.TensorSpec], payload: bytes) -> tuple[list[Any], bytes, int]:
    specs[0].shape[:] = list(reversed(specs[0].shape))  # the same size, another shape
    return specs, payload, len(payload)


def _renamed(specs: list[tensor_pb2.TensorSpec], payload: bytes) -> tuple[list[Any], bytes, int]:
    specs[1].name = "backdoor.bias"
    return specs, payload, len(payload)


def _grown(specs: list[tensor_pb2.TensorSpec], payload: bytes) -> tuple[list[Any], bytes, int]:
    specs[0].shape[0] += 1
    return specs, payload + bytes(4 * 25), len(payload) + 4 * 25


def _drop_last(specs: list[tensor_pb2.TensorSpec], payload: bytes) -> tuple[list[Any], bytes, int]:
    cut = wire.payload_nbytes(specs[-1:])
    return specs[:-1], payload[:-cut], len(payload) - cut


def _extra(specs: list[tensor_pb2.TensorSpec], payload: bytes) -> tuple[list[Any], bytes, int]:
    specs.append(tensor_pb2.TensorSpec(name="backdoor.weight", shape=[4], dtype=F32))
    return specs, payload + bytes(16), len(payload) + 16


def _nan(specs: list[tensor_pb2.TensorSpec], payload: bytes) -> tuple[list[Any], bytes, int]:
    at = len(payload) - 8
    return specs, payload[:at] + struct.pack("<f", math.nan) + payload[at + 4 :], len(payload)


def _truncated(specs: list[tensor_pb2.TensorSpec], payload: bytes) -> tuple[list[Any], bytes, int]:
    return specs, payload[:-100], len(payload)


def _overflow(specs: list[tensor_pb2.TensorSpec], payload: bytes) -> tuple[list[Any], bytes, int]:
    return specs, payload + bytes(100), len(payload)


def _huge(specs: list[tensor_pb2.TensorSpec], payload: bytes) -> tuple[list[Any], bytes, int]:
    specs[0].shape[0] = 1 << 40
    return specs, payload, wire.payload_nbytes(specs)


def _no_dtype(specs: list[tensor_pb2.TensorSpec], payload: bytes) -> tuple[list[Any], bytes, int]:
    specs[2].dtype = tensor_pb2.DTYPE_UNSPECIFIED
    return specs, payload, len(payload)


BAD_GLOBAL_MODELS = {
    "wrong shape": (lambda: omega_messages(_first_shape), "shape_mismatch"),
    "missing tensor": (lambda: omega_messages(_drop_last), "missing_tensor"),
    "unknown tensor": (lambda: omega_messages(_renamed), "unknown_tensor"),
    "extra tensor": (lambda: omega_messages(_extra), "too_large"),
    "grown tensor": (lambda: omega_messages(_grown), "too_large"),
    "NaN": (lambda: omega_messages(_nan), "NaN or infinity"),
    "truncated": (lambda: omega_messages(_truncated), "truncated"),
    "overflow": (lambda: omega_messages(_overflow), "overflow"),
    "too large": (lambda: omega_messages(_huge), "too_large"),
    "no dtype": (lambda: omega_messages(_no_dtype), "bad_dtype"),
    "chunk first": (lambda: omega_messages()[1:], "chunk before the round header"),
}


@pytest.mark.parametrize("case", sorted(BAD_GLOBAL_MODELS))
def test_edge_node_refuses_a_bad_global_model_and_does_not_train(
    case: str, fake_aggregator: Callable[[FakeAggregator], int], tmp_path: Path
) -> None:
    messages, expected = BAD_GLOBAL_MODELS[case]
    fake = FakeAggregator(messages())
    port = fake_aggregator(fake)
    node = EdgeNode(edge_config(port, tmp_path / "node"), data=small_client_data())
    with pytest.raises(EdgeNodeError, match=expected) as e:
        node.run(max_rounds=1)
    assert "global model of round 0" in str(e.value) or case == "chunk first"
    assert fake.fetches == 1 and fake.submits == 0
    assert node.client is not None and node.client.optimizer.state_dict()["state"] == {}, "the head was trained"
    assert node.client.initial_loss is None
    assert not (tmp_path / "node" / "client.pt").exists()


def test_edge_node_refuses_an_aggregator_of_another_architecture(
    fake_aggregator: Callable[[FakeAggregator], int], tmp_path: Path
) -> None:
    fake = FakeAggregator(omega_messages(), federation="radcom")
    node = EdgeNode(edge_config(fake_aggregator(fake), tmp_path / "node"), data=small_client_data())
    with pytest.raises(EdgeNodeError, match=r"aggregator trains another shared network \(fedgradnorm.models:Network2"):
        node.run(max_rounds=1)
    assert fake.fetches == 0 and fake.submits == 0


def _real_client_state(task: str) -> bytes:
    from fedgradnorm.algorithm import ClientConfig
    from fedgradnorm.client import LocalClient

    config = ClientConfig(tau_h=1, tau_omega=1, beta=0.001, batch_size=4)
    client = LocalClient(task, load_federation("mtfl"), small_client_data(task), config, 0)
    return client.state_bytes()


CORRUPT_IDENTITIES = {
    "binary garbage": b"\x00\xff garbage \x13",
    "not an object": b"[1, 2, 3]",
    "a string": b'"node"',
    "missing fields": b'{"node_id": "gender"}',
    "truncated": b'{"node_id": "gender", "session_token": "abc", "aggre',
    "another task": b'{"node_id": "x", "session_token": "t", "aggregator": "a", "federation": "mtfl", "task": "smile"}',
}


@pytest.mark.parametrize("case", sorted(CORRUPT_IDENTITIES))
def test_edge_node_refuses_a_corrupt_identity_file(case: str, tmp_path: Path) -> None:
    state_dir = tmp_path / "node"
    state_dir.mkdir()
    (state_dir / "identity.json").write_bytes(CORRUPT_IDENTITIES[case])
    with safe_structlog(), pytest.raises(NodeStateError, match=r"identity\.json"):
        EdgeNode(edge_config(1, state_dir), data=small_client_data())


def test_edge_node_refuses_an_identity_path_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "node" / "identity.json").mkdir(parents=True)
    with safe_structlog(), pytest.raises(NodeStateError, match=r"identity\.json"):
        EdgeNode(edge_config(1, tmp_path / "node"), data=small_client_data())


CORRUPT_CLIENT_STATES: dict[str, Callable[[Path], bytes]] = {
    "binary garbage": lambda _: b"\x00\x01 not a torch file",
    "truncated": lambda _: _real_client_state("gender")[:200],
    "another task": lambda _: _real_client_state("smile"),
    "code in a pickle": lambda marker: pickle.dumps(_Payload(marker)),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case", sorted(CORRUPT_CLIENT_STATES))
def test_edge_node_refuses_a_corrupt_personal_model_and_does_not_train(
    case: str, fake_aggregator: Callable[[FakeAggregator], int], tmp_path: Path
) -> None:
    marker = tmp_path / "executed"
    state_dir = tmp_path / "node"
    state_dir.mkdir()
    (state_dir / "client.pt").write_bytes(CORRUPT_CLIENT_STATES[case](marker))
    fake = FakeAggregator(omega_messages())
    node = EdgeNode(edge_config(fake_aggregator(fake), state_dir), data=small_client_data())
    with pytest.raises(NodeStateError, match=r"client\.pt"):
        node.run(max_rounds=1)
    assert fake.fetches == 0 and fake.submits == 0
    assert not marker.exists()


def _text_file(d: Path) -> Path:
    (d / "r.hdf5").write_bytes(b"hello, not HDF5")
    return d / "r.hdf5"


def _empty_file(d: Path) -> Path:
    (d / "r.hdf5").write_bytes(b"")
    return d / "r.hdf5"


def _foreign_hdf5(d: Path) -> Path:
    with h5py.File(d / "r.hdf5", "w") as f:
        f.create_dataset("not a sample", data=np.zeros(3))
    return d / "r.hdf5"


def _folder(d: Path) -> Path:
    (d / "r.hdf5").mkdir()
    return d / "r.hdf5"


def _file_for_folder(d: Path) -> Path:
    (d / "mtfl").write_bytes(b"x")
    return d / "mtfl"


def _garbage_annotations(d: Path) -> Path:
    (d / "mtfl").mkdir()
    (d / "mtfl" / "training.txt").write_bytes(b"lfw/a.jpg 1 2 3\n")
    return d / "mtfl"


BAD_DATA: dict[str, tuple[str, str, Callable[[Path], Path], str]] = {
    "radcom: text file": ("radcom", "modulation", _text_file, "not an HDF5 file"),
    "radcom: empty file": ("radcom", "modulation", _empty_file, "empty"),
    "radcom: foreign HDF5": ("radcom", "modulation", _foreign_hdf5, "not of the published form"),
    "radcom: folder": ("radcom", "modulation", _folder, "directory"),
    "mtfl: file for a folder": ("mtfl", "gender", _file_for_folder, "not a folder"),
    "mtfl: garbage annotations": ("mtfl", "gender", _garbage_annotations, r"training\.txt"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_edge_node_refuses_a_data_file_of_the_wrong_format(case: str, tmp_path: Path) -> None:
    dataset, task, make, expected = BAD_DATA[case]
    path = make(tmp_path)
    config = EdgeConfig(
        aggregator="127.0.0.1:1",
        federation=dataset,
        task=task,
        data=str(path),
        state_dir=str(tmp_path / "n"),
        insecure=True,
    )
    with safe_structlog(), pytest.raises(DataError, match=expected) as e:
        EdgeNode(config)
    assert str(path) in str(e.value) or str(path / "training.txt") in str(e.value)
    assert not (tmp_path / "n" / "identity.json").exists()


def test_phase_is_still_open_after_the_barrage(target: Target) -> None:
    """Runs last in the module: the round the barrage aimed at is still open and still waits for b."""
    assert target.agg.coordinator.phase is Phase.OPEN
    assert state(target.stub).round == target.round
