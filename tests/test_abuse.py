"""Hostile but well-formed input against a real aggregator process on loopback: numbers a node may
legally send (1e308 losses, 1e30 gradients, a made-up F_0), one client opening many streams or
registrations, and the crash windows of the commit. A client that speaks the wire protocol
(tests/grpc_client.py) plays every part; nothing may stop the round driver, poison the stored
state, or let one session hold threads or memory that do not come back.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
from fedgradnorm.algorithm import ClientReport
from fedgradnorm.reasons import Reason
from fedgradnorm.services import serde
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
from fedgradnorm.services.aggregator.roundlog import RoundLog, round_records
from fedgradnorm.services.aggregator.server import start_aggregator
from fedgradnorm.services.aggregator.store import MemberRecord
from fedgradnorm.services.domain import RoundSummary, Submission
from fedgradnorm.services.refusals import reason_of
from tests.faults_helpers import (
    NOT_SERVING,
    SERVING,
    Processes,
    aggregator_process,
    gradient_like,
    health,
    metric,
    metrics_records,
    read_committed,
    safe_structlog,
    scrape,
    wait_until,
)
from tests.grpc_client import RawNode, connect, register, state

F32 = tensor_pb2.DTYPE_FLOAT32


def mtfl(state_dir: Path, *extra: str, min_nodes: int = 2) -> list[str]:
    return ["--federation", "mtfl", "--min-nodes", str(min_nodes), "--state-dir", str(state_dir), *extra]


def proc_status(pid: int, field: str) -> int:
    """VmRSS (KiB) or Threads of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mib(pid: int) -> float:
    return proc_status(pid, "VmRSS") / 1024


def play(nodes: list[RawNode], value: float = 0.01, **kw: Any) -> int:
    """Every node fetches the open round and submits a constant gradient; returns the round."""
    fetched = [n.fetch() for n in nodes]
    rounds = {h.round for h, _ in fetched}
    assert len(rounds) == 1 and all(o is not None for _, o in fetched), fetched
    for n, (h, omega) in zip(nodes, fetched, strict=True):
        assert omega is not None
        assert n.submit(h.round, gradient_like(omega, value), **kw).accepted
    return rounds.pop()


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# ---------------------------------------------------------------------------------------------
# Numbers a node may legally send
# ---------------------------------------------------------------------------------------------


def test_an_absurd_loss_ratio_is_refused_and_rounds_go_on(tmp_path: Path, procs: Processes) -> None:
    """Two nodes reporting loss 1e308 with F_0 1 (F~ 1e308: finite and consistent) used to kill the
    round driver (OverflowError in the weight rule) while health said SERVING."""
    _, ready = aggregator_process(procs, tmp_path, mtfl(tmp_path / "state"))
    channel, stub = connect(ready["grpc_port"])
    with channel:
        nodes = [register(stub, "a", "gender"), register(stub, "b", "smile")]
        assert play(nodes) == 0
        fetched = [n.fetch() for n in nodes]
        for n, (h, omega) in zip(nodes, fetched, strict=True):
            assert omega is not None
            absurd = n.header(h.round, gradient_like(omega), loss=1e308, initial_loss=1.0, loss_ratio=1e308)
            e = refused(lambda n=n, absurd=absurd, omega=omega: n.submit(0, gradient_like(omega), header=absurd))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "loss_ratio" in (e.details() or "")
        for n, (h, omega) in zip(nodes, fetched, strict=True):  # the honest updates of the same round
            assert omega is not None and n.submit(h.round, gradient_like(omega)).accepted
        wait_until(lambda: state(stub).round == 2, 30, "round 1 to close")
        assert health(ready["grpc_port"]) == SERVING
        assert play(nodes) == 2


def test_a_failing_round_driver_halts_visibly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever raises inside the round driver, the aggregator never stays 'SERVING but stuck':
    phase HALTED with the cause, readiness NOT_SERVING, fedgradnorm_halted 1."""
    import fedgradnorm.services.aggregator.coordinator as coordinator

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("injected fault in the server step")

    monkeypatch.setattr(coordinator, "apply_step", broken)
    service = ServiceConfig(
        listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", state_dir=str(tmp_path / "state"), insecure=True
    )
    with safe_structlog():
        agg = start_aggregator(service, CoordinatorConfig(federation="mtfl", min_nodes=2))
        try:
            channel, stub = connect(agg.grpc_port)
            with channel:
                nodes = [register(stub, "a", "gender"), register(stub, "b", "smile")]
                play(nodes)
                wait_until(lambda: state(stub).phase == pb.PHASE_HALTED, 30, "the aggregator to halt")
                s = state(stub)
                assert "round driver failed" in s.halted_reason and "injected fault" in s.halted_reason
                assert s.round == 0 and s.last_committed_round == -1
                wait_until(lambda: health(agg.grpc_port) == NOT_SERVING, 10, "readiness NOT_SERVING")
                assert metric(scrape(agg.metrics_port), "fedgradnorm_halted") == 1
                assert agg.coordinator.running  # the driver thread is alive, parked, not dead
        finally:
            agg.stop()


def test_a_huge_gradient_is_left_out_and_never_poisons_the_state(tmp_path: Path, procs: Processes) -> None:
    """A finite float32 gradient of 1e30 per element passes every finiteness check but overflows
    Adam's second moment to +inf, after which omega never moves again. With three updates it is
    above the round's norm bound and left out; the state stays finite and keeps training."""
    state_dir = tmp_path / "state"
    _, ready = aggregator_process(procs, tmp_path, mtfl(state_dir, min_nodes=3))
    channel, stub = connect(ready["grpc_port"])
    with channel:
        a, b, c = register(stub, "a", "gender"), register(stub, "b", "smile"), register(stub, "c", "glasses")
        fetched = [n.fetch() for n in (a, b, c)]
        for n, (h, omega) in zip((a, b, c), fetched, strict=True):
            assert omega is not None
            assert n.submit(h.round, gradient_like(omega, 1e30 if n is c else 0.01)).accepted
        wait_until(lambda: state(stub).last_committed_round == 0, 30, "round 0 to be committed")
        _, snap = read_committed(state_dir)
        for t in (*snap.server.omega.values(), *snap.server.omega_adam.exp_avg_sq.values()):
            assert bool(torch.isfinite(t).all())
        assert set(snap.server.weights) == {"a", "b"} and snap.members["c"].last_round == -1
        wait_until(
            lambda: metric(scrape(ready["metrics_port"]), "fedgradnorm_updates_total", outcome="dropped_norm") == 1,
            10,
            "the dropped update to be counted",
        )
        before = {k: v.clone() for k, v in snap.server.omega.items()}
        assert play([a, b, c]) == 1  # the next round uses all three, and omega moves
        wait_until(lambda: state(stub).last_committed_round == 1, 30, "round 1 to be committed")
        _, snap = read_committed(state_dir)
        assert any(not torch.equal(before[k], snap.server.omega[k]) for k in before)


def test_a_step_that_would_poison_the_state_is_refused_and_the_round_reopens(tmp_path: Path, procs: Processes) -> None:
    """With two updates no median can tell the honest one: the step itself refuses to commit a
    non-finite state; the committed file stays byte for byte, and the round opens again."""
    state_dir = tmp_path / "state"
    agg, ready = aggregator_process(procs, tmp_path, mtfl(state_dir))
    channel, stub = connect(ready["grpc_port"])
    with channel:
        a, b = register(stub, "a", "gender"), register(stub, "b", "smile")
        blob, _ = read_committed(state_dir)
        fetched = [n.fetch() for n in (a, b)]
        for n, (h, omega) in zip((a, b), fetched, strict=True):
            assert omega is not None
            assert n.submit(h.round, gradient_like(omega, 1e30 if n is b else 0.01)).accepted
        wait_until(
            lambda: metric(scrape(ready["metrics_port"]), "fedgradnorm_rounds_refused_total") == 1, 30, "the refusal"
        )
        assert read_committed(state_dir)[0] == blob
        s = state(stub)
        assert s.round == 0 and s.phase in (pb.PHASE_WAITING_FOR_NODES, pb.PHASE_ROUND_OPEN)
        assert health(ready["grpc_port"]) == SERVING
        assert play([a, b]) == 0  # the same round again, honest this time
        wait_until(lambda: state(stub).last_committed_round == 0, 30, "round 0 to be committed")
        assert any("round.refused" in line for line in agg.log_text().splitlines())


def test_the_first_update_must_have_loss_ratio_one_and_f0_is_kept(tmp_path: Path, procs: Processes) -> None:
    _, ready = aggregator_process(procs, tmp_path, mtfl(tmp_path / "state"))
    channel, stub = connect(ready["grpc_port"])
    with channel:
        a, b = register(stub, "a", "gender"), register(stub, "b", "smile")
        (ha, oa), (hb, ob) = a.fetch(), b.fetch()
        assert oa is not None and ob is not None
        e = refused(lambda: a.submit(ha.round, gradient_like(oa), loss=0.5, initial_loss=1.0, loss_ratio=0.5))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "first update" in (e.details() or "")
        assert a.submit(ha.round, gradient_like(oa), loss=2.0, initial_loss=2.0, loss_ratio=1.0).accepted
        assert b.submit(hb.round, gradient_like(ob)).accepted
        (ha, oa), (hb, ob) = a.fetch(), b.fetch()
        assert oa is not None and ob is not None
        e = refused(lambda: a.submit(ha.round, gradient_like(oa), loss=1.5, initial_loss=3.0, loss_ratio=0.5))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "stored F_0" in (e.details() or "")
        assert a.submit(ha.round, gradient_like(oa), loss=1.0, initial_loss=2.0, loss_ratio=0.5).accepted
        assert {n.node_id: n.initial_loss for n in state(stub).nodes}["a"] == 2.0


# ---------------------------------------------------------------------------------------------
# One client must not exhaust the aggregator
# ---------------------------------------------------------------------------------------------


@pytest.mark.long  # heavy (Network 2 or hundreds of calls): make test-faults, run by CI
def test_huge_names_with_a_wrong_token_cost_no_memory(tmp_path: Path, procs: Processes) -> None:
    """300 registrations with 1 MiB names and a wrong enrolment token used to keep every name as a
    rate-limiter key (343 MiB that never came back)."""
    agg, ready = aggregator_process(procs, tmp_path, mtfl(tmp_path / "state", "--enrollment-token", "secret-7"))
    channel, stub = connect(ready["grpc_port"])
    with channel:
        register(stub, "warm-up", "gender", enrollment_token="secret-7")
        before = rss_mib(agg.pid)
        for i in range(300):
            req = pb.RegisterRequest(
                node_name=f"{i}" + "x" * (1 << 20),
                federation="mtfl",
                network=serde.federation_network("mtfl"),
                task="gender",
                num_samples=5,
                enrollment_token="no",
            )
            e = refused(lambda req=req: stub.Register(req, timeout=30))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and len(e.details() or "") <= 512
        after = rss_mib(agg.pid)
        print(f"RSS before {before:.0f} MiB, after 300 x 1 MiB names {after:.0f} MiB")
        assert after - before < 100, (before, after)
        assert state(stub).total_nodes == 1


@pytest.mark.long  # heavy (Network 2 or hundreds of calls): make test-faults, run by CI
def test_one_node_cannot_hold_many_fetch_streams(tmp_path: Path, procs: Processes) -> None:
    """70 unread FetchRound streams of one node used to hold 70 worker threads (health and GetState
    timed out); now a node's newer FetchRound replaces its older one, and a stream the client does
    not read is cut off at the round's deadline. The model is Network 2 (15.7 MB: more than any
    flow-control window, so an unread stream really blocks its sender)."""
    flags = ["--federation", "radcom", "--min-nodes", "1", "--round-timeout", "4", "--state-dir", str(tmp_path / "s")]
    agg, ready = aggregator_process(procs, tmp_path, flags)
    channel, stub = connect(ready["grpc_port"])
    with channel, contextlib.ExitStack() as stack:
        node = register(stub, "m", "modulation", federation="radcom")
        threads_before = proc_status(agg.pid, "Threads")
        req = pb.FetchRoundRequest(node_id=node.node_id, session_token=node.token, wait_seconds=20)
        # A client that reads nothing: no BDP probing, so its receive window stays at 64 KiB and the
        # aggregator's send of a 15.7 MB model really blocks (a grown window could take it whole).
        greedy = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}", options=[("grpc.http2.bdp_probe", 0)])
        stack.callback(greedy.close)
        streams = [pb_grpc.AggregatorStub(greedy).FetchRound(req, timeout=120) for _ in range(70)]
        time.sleep(3)
        t0 = time.monotonic()
        assert health(ready["grpc_port"], timeout=5) == SERVING
        assert state(stub).round == 0
        answered = time.monotonic() - t0
        threads = proc_status(agg.pid, "Threads")
        print(f"threads {threads_before} -> {threads} with 70 unread streams; health+GetState in {answered:.2f} s")
        assert answered < 5 and threads - threads_before < 30

        # The aggregator keeps the stream it saw last (not necessarily the last one sent) and cancels
        # the others at once; the survivor, never read, is cut off at its round's deadline + 5 s.
        # Nothing is read before that: reading the survivor would drain it.
        wait_until(
            lambda: (
                metric(scrape(ready["metrics_port"]), "fedgradnorm_streams_cancelled_total", reason="deadline") >= 1
            ),
            40,
            "the unread stream to be cut off at its deadline",
        )

        def code(s: Any) -> grpc.StatusCode:
            try:
                for _ in s:
                    pass
            except grpc.RpcError as e:
                return e.code()
            return grpc.StatusCode.OK

        codes = [code(s) for s in streams]  # replaced or cut off; one may have ended on its own (NOT_YET)
        assert codes.count(grpc.StatusCode.CANCELLED) >= 69, codes
        s = scrape(ready["metrics_port"])
        assert metric(s, "fedgradnorm_streams_cancelled_total", reason="replaced") >= 69
        assert proc_status(agg.pid, "Threads") - threads_before < 30  # idle pool threads stay, bounded
        assert play([node]) == 0  # the round was re-offered (nobody submitted by its deadline): it goes on


def _stalled_submit(
    node: RawNode, header: pb.SubmitHeader, release: threading.Event
) -> Iterator[pb.SubmitUpdateRequest]:
    yield pb.SubmitUpdateRequest(header=header)
    release.wait(60)  # the upload stalls after its header


@pytest.mark.long  # heavy (Network 2 or hundreds of calls): make test-faults, run by CI
def test_one_node_cannot_hold_many_submit_streams_or_trickle_forever(tmp_path: Path, procs: Processes) -> None:
    """40 stalled SubmitUpdate streams of one node used to preallocate 40 model-sized buffers (456
    MiB at Network 2) and live as long as the client liked. Now one is in flight per node, cut off at
    the round's deadline; a chunk above max_chunk_bytes is refused."""
    flags = ["--federation", "radcom", "--min-nodes", "1", "--round-timeout", "4", "--chunk-bytes", "65536"]
    agg, ready = aggregator_process(procs, tmp_path, [*flags, "--state-dir", str(tmp_path / "s")])
    channel, stub = connect(ready["grpc_port"])
    release = threading.Event()
    with channel:
        node = register(stub, "m", "modulation", federation="radcom")
        h, omega = node.fetch()
        assert omega is not None
        header = node.header(h.round, gradient_like(omega))
        before = rss_mib(agg.pid)
        first = stub.SubmitUpdate.future(_stalled_submit(node, header, release), timeout=120)
        time.sleep(1)
        busy = [stub.SubmitUpdate.future(_stalled_submit(node, header, release), timeout=120) for _ in range(39)]
        codes = [f.exception().code() for f in busy]  # type: ignore[union-attr]
        assert codes == [grpc.StatusCode.ALREADY_EXISTS] * 39, codes
        grown = rss_mib(agg.pid) - before
        print(f"RSS growth with 40 stalled uploads: {grown:.0f} MiB")
        assert grown < 100
        e = first.exception(timeout=30)  # the round's deadline (4 s) + 5 s of grace
        assert e is not None and e.code() == grpc.StatusCode.CANCELLED, e  # cut off by the aggregator
        release.set()
        h, omega = node.fetch()  # the next round
        assert omega is not None
        big = [b"\0" * 65537]
        e = refused(lambda: node.submit(h.round, gradient_like(omega), chunks=big))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_chunk_bytes" in (e.details() or "")
        s = scrape(ready["metrics_port"])
        assert metric(s, "fedgradnorm_updates_total", outcome="busy") == 39
        assert metric(s, "fedgradnorm_updates_total", outcome="deadline") == 1


def test_a_resumed_node_counts_against_max_nodes(tmp_path: Path, procs: Processes) -> None:
    _, ready = aggregator_process(procs, tmp_path, mtfl(tmp_path / "state", "--max-nodes", "2"))
    channel, stub = connect(ready["grpc_port"])
    with channel:
        a, _b = register(stub, "a", "gender"), register(stub, "b", "smile")
        a.deregister()
        register(stub, "c", "glasses")
        resume = pb.RegisterRequest(
            node_name="a",
            federation="mtfl",
            network=serde.federation_network("mtfl"),
            task="gender",
            num_samples=5,
            node_id=a.node_id,
            session_token=a.token,
        )
        e = refused(lambda: stub.Register(resume, timeout=10))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in (e.details() or "")
        assert sum(n.active for n in state(stub).nodes) == 2


def test_membership_is_bounded_paged_and_new_names_are_rate_limited(tmp_path: Path, procs: Processes) -> None:
    """17,500 register+deregister cycles used to keep every member (GetState 1.1 MB, commit 2.1 s)."""
    flags = mtfl(tmp_path / "state", "--max-departed", "5", "--new-node-burst", "57", "--new-node-rate", "0.001")
    _, ready = aggregator_process(procs, tmp_path, flags)
    channel, stub = connect(ready["grpc_port"])
    with channel:
        for i in range(50):
            register(stub, f"cycle-{i}", "gender").deregister()
        wait_until(lambda: state(stub).total_nodes <= 5, 20, "departed members to be forgotten")
        live = [register(stub, f"live-{i}", "smile") for i in range(7)]
        e = refused(lambda: register(stub, "one-too-many", "smile"))  # the 58th new name from one peer
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "new node names" in (e.details() or "")
        s = state(stub)
        assert s.total_nodes <= 12 and {n.node_id for n in live} <= {n.node_id for n in s.nodes}
        seen: list[str] = []
        token = ""
        while True:
            page = stub.GetState(pb.GetStateRequest(page_size=3, page_token=token), timeout=10)
            assert len(page.nodes) <= 3 and page.total_nodes == s.total_nodes
            seen += [n.node_id for n in page.nodes]
            token = page.next_page_token
            if not token:
                break
        assert seen == sorted(n.node_id for n in s.nodes)
        e = refused(lambda: stub.GetState(pb.GetStateRequest(page_token="x" * 1000), timeout=10))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.long  # heavy (Network 2 or hundreds of calls): make test-faults, run by CI
def test_names_that_only_register_never_hold_a_round_open(tmp_path: Path, procs: Processes) -> None:
    """1,000 sybil registrations used to make every honest round wait for its deadline."""
    flags = mtfl(tmp_path / "state", "--round-timeout", "60", "--new-node-burst", "2000")
    _, ready = aggregator_process(procs, tmp_path, flags)
    channel, stub = connect(ready["grpc_port"])
    with channel:
        for i in range(1000):
            stub.Register(
                pb.RegisterRequest(
                    node_name=f"sybil-{i}",
                    federation="mtfl",
                    network=serde.federation_network("mtfl"),
                    task="pose",
                    num_samples=1,
                )
            )
        nodes = [register(stub, "a", "gender"), register(stub, "b", "smile")]
        t0 = time.monotonic()
        for _ in range(3):
            play(nodes)
        wait_until(lambda: state(stub).round == 3, 30, "three rounds")
        seconds = time.monotonic() - t0
        print(f"3 honest rounds beside 1,000 silent registrations: {seconds:.1f} s")
        assert seconds < 30  # one round waiting for the sybils would take 60 s


# ---------------------------------------------------------------------------------------------
# Crash windows
# ---------------------------------------------------------------------------------------------


def test_getstate_tells_which_rounds_are_durable(tmp_path: Path, procs: Processes) -> None:
    state_dir = tmp_path / "state"
    _, ready = aggregator_process(procs, tmp_path, mtfl(state_dir))
    channel, stub = connect(ready["grpc_port"])
    with channel:
        nodes = [register(stub, "a", "gender"), register(stub, "b", "smile")]
        assert state(stub).last_committed_round == -1
        for _ in range(3):
            play(nodes)
        wait_until(lambda: state(stub).last_committed_round == 2, 30, "round 2 to be committed")
        assert read_committed(state_dir)[1].server.round == 3


@pytest.mark.long  # heavy (Network 2 or hundreds of calls): make test-faults, run by CI
def test_metrics_log_has_each_committed_round_once_after_a_crash(tmp_path: Path, procs: Processes) -> None:
    """A SIGKILL between a round's commit and its metrics.jsonl append lost the round's rows; one in
    the middle of the append tore a line. The committed state carries the rows and a restart puts
    them back, exactly once."""
    state_dir = tmp_path / "state"
    flags = mtfl(state_dir)
    agg, ready = aggregator_process(procs, tmp_path, flags)
    channel, stub = connect(ready["grpc_port"])
    with channel:
        nodes = [register(stub, "a", "gender"), register(stub, "b", "smile")]
        for _ in range(3):
            play(nodes)
        wait_until(lambda: len(metrics_records(state_dir)) == 6, 30, "three rounds of rows")
    agg.kill()
    log_path = state_dir / "metrics.jsonl"
    complete = metrics_records(state_dir)
    lines = log_path.read_text().splitlines(keepends=True)
    cases = {
        "append lost": lines[:4],  # round 2 committed, its rows never written
        "append torn": [*lines[:4], lines[4], lines[5][:17]],  # half of round 2's second row
    }
    for i, (case, kept) in enumerate(cases.items()):
        log_path.write_text("".join(kept))
        agg, ready = aggregator_process(procs, tmp_path, flags, name=f"aggregator-{i}")
        rows = metrics_records(state_dir)
        keys = sorted((r["round"], r["client"]) for r in rows)
        assert keys == sorted((r["round"], r["client"]) for r in complete), case
        for got, want in zip(sorted(rows, key=lambda r: (r["round"], r["client"])), complete, strict=True):
            assert got["weight"] == want["weight"] and got["train_loss"] == want["train_loss"], case
        agg.kill()


def test_round_log_reconcile_keeps_complete_rows_and_drops_later_ones(tmp_path: Path) -> None:
    def summary(round_: int) -> RoundSummary:
        rep = ClientReport(
            weight=1.0, previous_weight=1.0, grad_norm=1.0, loss_ratio=1.0, relative_rate=1.0, target=1.0
        )
        from fedgradnorm.algorithm import StepResult

        member = MemberRecord("a", "a", "mtfl", "gender", "", 1)
        sub = Submission("a", round_, {}, 1.0, 1.0, 1.0, 1)
        return RoundSummary(
            round_,
            "fedgradnorm",
            ("a",),
            {"a": sub},
            StepResult(round_, 0.0, {"a": rep}),
            {"a": member},
            0.1,
            commit_seconds=0.2,
        )

    log = RoundLog(tmp_path / "metrics.jsonl")
    for k in range(3):
        log(summary(k))
    text = log.path.read_text()
    committed = [{**r, "commit_seconds": None} for r in round_records(summary(2))]
    log.reconcile(committed)
    assert log.path.read_text() == text  # complete: untouched, commit_seconds kept
    log.reconcile([{**r, "commit_seconds": None} for r in round_records(summary(1))])
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["commit_seconds"] == 0.2


def test_refusals_carry_a_machine_readable_reason(tmp_path: Path, procs: Processes) -> None:
    """A client decides on the reason code (trailing metadata), never on the words of a message."""
    _, ready = aggregator_process(procs, tmp_path, mtfl(tmp_path / "state"))
    channel, stub = connect(ready["grpc_port"])
    with channel:
        a = register(stub, "a", "gender")
        a.deregister()
        e = refused(lambda: a.fetch(wait=0.1))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and reason_of(e) is Reason.DEREGISTERED
        e = refused(lambda: register(stub, "a", "gender"))
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS and reason_of(e) is Reason.NAME_TAKEN
        e = refused(lambda: register(stub, "b", "no-such-task"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(e) is Reason.BAD_TASK
