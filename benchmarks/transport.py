"""Transport: the chunked tensor stream against a plain loopback socket, and bytes on the wire.

* Throughput: a server process streams a model with the project's codec (``wire.iter_chunk_messages``,
  1 MiB chunks serialized as the services do, the real ``FetchRoundResponse`` / ``SubmitUpdateRequest`` messages, the
  aggregator's channel options) and the client reassembles it with ``wire.TensorAssembler``;
  timed from the call to the finished float32 tensors, for a 16 MB model (Network 2's tensors)
  and a 256 MiB one (64 tensors of 1 Mi floats), in both directions. The same bytes through a
  plain TCP socket on 127.0.0.1 are measured in the same run.
* Bytes on the wire: the real loopback deployment (aggregator + 3 no-train RadCom nodes) with a
  counting TCP proxy between the nodes and the aggregator, float32 and float16 on the wire;
  bytes per round (both directions, everything: HTTP/2, protobuf, heartbeats) against the raw
  tensor bytes a round moves.
* float16's effect on learning: the in-process simulator with omega and every gradient rounded
  to float16 and back each round - exactly what the float16 wire does - against float32.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import torch

from benchmarks.common import MB, Table, fmt_s, loopback_copy, median
from benchmarks.deploy import Deployment
from fedgradnorm import wire
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
from fedgradnorm.wire_format import MESSAGE_LIMITS

SERVICE = "fedgradnorm.bench.Transport"
CHUNK_FIELD = pb.FetchRoundResponse.DESCRIPTOR.fields_by_name["chunk"].number  # = SubmitUpdateRequest's
OPTIONS = [
    *MESSAGE_LIMITS,
    ("grpc.so_reuseport", 0),
]


def model(name: str) -> dict[str, torch.Tensor]:
    """``network2``: Network 2's shared tensors (15.7 MB); ``big``: 64 tensors of 1 Mi floats (256 MiB)."""
    if name == "network2":
        from fedgradnorm.federation import load_federation

        return {k: v.detach().clone() for k, v in load_federation("radcom").build_shared(0).named_parameters()}
    if name == "big":
        g = torch.Generator().manual_seed(0)
        return {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(64)}
    raise ValueError(name)


def _shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model(name).items()}


def _serve(port_q: Any, stop: Any, chunk_bytes: int, sizes: tuple[str, ...]) -> None:
    """The server process: streams a model out (Fetch) and reassembles one coming in (Submit)."""
    from concurrent import futures

    models = {name: model(name) for name in sizes}
    shapes = {name: {k: tuple(v.shape) for k, v in m.items()} for name, m in models.items()}

    def fetch(request: pb.FetchRoundRequest, context: grpc.ServicerContext) -> Iterator[pb.FetchRoundResponse]:
        omega = models[request.node_id]
        dtype = request.dtype or tensor_pb2.DTYPE_FLOAT32
        specs = wire.tensor_specs(omega, dtype)
        yield pb.FetchRoundResponse(
            header=pb.RoundHeader(
                status=pb.ROUND_STATUS_OPEN, round=0, tensors=specs, total_bytes=wire.payload_nbytes(specs)
            )
        )
        yield from wire.iter_chunk_messages(omega, dtype, chunk_bytes, CHUNK_FIELD)  # as the aggregator sends them

    def submit(requests: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext) -> pb.SubmitUpdateResponse:
        first = next(requests)
        asm = wire.TensorAssembler.from_header(first.header, shapes[first.header.node_id])
        for msg in requests:
            asm.feed(msg.chunk.data)
        asm.finish()
        return pb.SubmitUpdateResponse(accepted=True)

    def drain(requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.SubmitUpdateResponse:
        for _ in requests:  # gRPC's own receive path: the serialized messages, never parsed
            pass
        return pb.SubmitUpdateResponse(accepted=True)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Fetch": grpc.unary_stream_rpc_method_handler(
                fetch,
                request_deserializer=pb.FetchRoundRequest.FromString,
                response_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            ),
            "Submit": grpc.stream_unary_rpc_method_handler(
                submit,
                request_deserializer=pb.SubmitUpdateRequest.FromString,
                response_serializer=pb.SubmitUpdateResponse.SerializeToString,
            ),
            "Drain": grpc.stream_unary_rpc_method_handler(
                drain, request_deserializer=None, response_serializer=pb.SubmitUpdateResponse.SerializeToString
            ),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_q.put(port)
    stop.wait(600)
    server.stop(1).wait()


class CodecServer:
    """The streaming server above, in its own process; a context manager."""

    def __init__(self, sizes: tuple[str, ...], chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._q = ctx.Queue()
        self._stop = ctx.Event()
        self.proc = ctx.Process(target=_serve, args=(self._q, self._stop, chunk_bytes, sizes), daemon=True)
        self.port = 0

    def __enter__(self) -> CodecServer:
        self.proc.start()
        try:
            self.port = self._q.get(timeout=120)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self._stop.set()
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_seconds(channel: grpc.Channel, name: str, dtype: int, shapes: dict) -> float:
    call = channel.unary_stream(
        f"/{SERVICE}/Fetch",
        request_serializer=pb.FetchRoundRequest.SerializeToString,
        response_deserializer=pb.FetchRoundResponse.FromString,
    )
    t0 = time.perf_counter()
    stream = call(pb.FetchRoundRequest(node_id=name, dtype=dtype), timeout=300)
    asm = wire.TensorAssembler.from_header(next(stream).header, shapes)
    for msg in stream:
        asm.feed(msg.chunk.data)
    asm.finish()
    return time.perf_counter() - t0


def bare_fetch_seconds(channel: grpc.Channel, name: str, dtype: int) -> float:
    """The same Fetch stream with nothing decoded: gRPC Python's own receive path, the ceiling any
    codec on top of it can reach."""
    call = channel.unary_stream(
        f"/{SERVICE}/Fetch", request_serializer=pb.FetchRoundRequest.SerializeToString, response_deserializer=None
    )
    t0 = time.perf_counter()
    for _ in call(pb.FetchRoundRequest(node_id=name, dtype=dtype), timeout=300):
        pass
    return time.perf_counter() - t0


def submit_seconds(
    channel: grpc.Channel, name: str, tensors: dict[str, torch.Tensor], dtype: int, method: str = "Submit"
) -> float:
    """The Submit stream as the edge node sends it; ``method="Drain"``: the same messages to a
    handler that neither parses nor reassembles them (gRPC's own path, the ceiling)."""
    call = channel.stream_unary(
        f"/{SERVICE}/{method}", request_serializer=bytes, response_deserializer=pb.SubmitUpdateResponse.FromString
    )

    def messages() -> Iterator[bytes]:  # pre-serialized, as the edge node sends them
        specs = wire.tensor_specs(tensors, dtype)
        yield pb.SubmitUpdateRequest(
            header=pb.SubmitHeader(node_id=name, tensors=specs, total_bytes=wire.payload_nbytes(specs))
        ).SerializeToString()
        yield from wire.iter_chunk_messages(tensors, dtype, wire.DEFAULT_CHUNK_BYTES, CHUNK_FIELD)

    t0 = time.perf_counter()
    call(messages(), timeout=300)
    return time.perf_counter() - t0


def throughput(repeats: int = 3, sizes: tuple[str, ...] = ("network2", "big")) -> Table:
    t = Table(
        "Transport: chunked gRPC stream vs plain loopback socket (same bytes, same run)",
        [
            "model",
            "direction",
            "wire dtype",
            "payload",
            "stream time",
            "stream GB/s",
            "socket GB/s",
            "stream / socket",
            "bare gRPC / socket",
        ],
    )
    rows = []
    with CodecServer(sizes) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}", options=OPTIONS) as channel:
        for name in sizes:
            tensors = model(name)
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            raw = sum(v.numel() * 4 for v in tensors.values())
            cases = [("fetch", tensor_pb2.DTYPE_FLOAT32), ("submit", tensor_pb2.DTYPE_FLOAT32)]
            if name == "network2":
                cases.append(("fetch", tensor_pb2.DTYPE_FLOAT16))
            for direction, dtype in cases:
                payload = raw // 2 if dtype == tensor_pb2.DTYPE_FLOAT16 else raw
                fetch_seconds(channel, name, dtype, shapes) if direction == "fetch" else None  # warm the channel
                times = [
                    fetch_seconds(channel, name, dtype, shapes)
                    if direction == "fetch"
                    else submit_seconds(channel, name, tensors, dtype)
                    for _ in range(repeats)
                ]
                stream = median(times)
                bare = median(
                    [
                        bare_fetch_seconds(channel, name, dtype)
                        if direction == "fetch"
                        else submit_seconds(channel, name, tensors, dtype, method="Drain")
                        for _ in range(repeats)
                    ]
                )
                sock = loopback_copy(payload, repeats)
                label = "16 MB (Network 2)" if name == "network2" else "256 MiB (64 × 1 Mi floats)"
                dname = "float16" if dtype == tensor_pb2.DTYPE_FLOAT16 else "float32"
                t.add(
                    label,
                    direction,
                    dname,
                    f"{payload / MB:.1f} MB",
                    fmt_s(stream),
                    f"{payload / stream / 1e9:.2f}",
                    f"{payload / sock / 1e9:.2f}",
                    f"{sock / stream:.0%}",
                    f"{sock / bare:.0%}",
                )
                rows.append(
                    {
                        "model": name,
                        "direction": direction,
                        "dtype": dname,
                        "seconds": stream,
                        "bare": bare,
                        "socket": sock,
                    }
                )
            del tensors
    t.notes += [
        f"Stream time: median of {repeats} calls, from the call to the reassembled float32 tensors (float16 payloads "
        "widened on arrival); the server is another process. Socket: best of the same count, a sender thread into a "
        "preallocated buffer. 'stream / socket' is the share of the socket's throughput the stream achieves. "
        "'bare gRPC / socket': the same messages on the same channel with nothing decoded (fetch: no response "
        "deserializer, the chunks dropped as they come; submit: a handler that drains the raw messages), median of "
        f"{repeats}: what gRPC Python itself reaches, the ceiling of any codec on top of it.",
    ]
    t.data = {"rows": rows}
    return t


def wire_bytes(
    workdir: Path,
    synthetic_size: int,
    rounds: int = 6,
    dtypes: tuple[str, ...] = ("float32", "float16"),
    nodes: tuple[str, ...] = ("modulation", "signal", "anomaly"),
) -> Table:
    from fedgradnorm.federation import load_federation

    raw = sum(p.numel() * 4 for p in load_federation("radcom").build_shared(0).parameters())
    t = Table(
        f"Bytes on the wire per round (aggregator + {len(nodes)} no-train RadCom nodes, counting proxy on loopback)",
        ["wire dtype", "raw float32 tensor bytes per round", "bytes on the wire per round", "wire / raw"],
    )
    data = {}
    for dtype in dtypes:
        agg = ["--rounds", str(rounds), "--wire-dtype", dtype]
        # per round: the final model (sent once, after the last round) is left out
        node_flags = ["--no-train", "true", "--synthetic-size", str(synthetic_size), "--write-model", "false"]
        with Deployment(workdir / f"wire-{dtype}", "radcom", nodes, agg, node_flags, via_proxy=True) as dep:
            # Everything from the first byte to the nodes' exit after the last round: no transfer is
            # cut at either end (a round's commit overlaps the next round's fetches, so there is no
            # quiet moment between rounds to read the counter at).
            for node in dep.procs[1:]:
                assert node.proc is not None
                node.proc.wait(timeout=600)
            assert dep.proxy is not None
            per_round = dep.proxy.total() / rounds
        raw_round = 2 * len(nodes) * raw
        t.add(dtype, f"{raw_round / MB:.3f} MB", f"{per_round / MB:.3f} MB", f"{per_round / raw_round:.4f}")
        data[dtype] = per_round
    t.notes += [
        f"Every byte through the proxy from the nodes' registration to their exit after the aggregator's last "
        f"round ({rounds} rounds), divided by the rounds; the proxy counts TCP payload bytes both ways, so plaintext "
        "HTTP/2 and gRPC framing, protobuf headers, registration, heartbeats and deregistration are all in "
        "(nothing else calls the aggregator).",
    ]
    t.data = data
    return t


def float16_learning(synthetic_size: int, rounds: int) -> Table:
    """float32 against float16-on-the-wire, in-process: omega and gradients rounded each round."""
    from fedgradnorm.algorithm import ClientUpdate, server_step
    from fedgradnorm.client import load_omega_
    from fedgradnorm.simulation_config import SimulationConfig
    from fedgradnorm.simulator import Simulation

    def round16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(torch.float16).float() for k, v in tensors.items()}

    config = SimulationConfig(federation="radcom", synthetic_size=synthetic_size, rounds=rounds)
    finals: dict[str, dict[str, dict[str, float]]] = {}
    for dtype in ("float32", "float16"):
        sim = Simulation.build(config)
        last: dict[str, dict[str, float]] = {}
        for k in range(rounds):
            updates = []
            omega = round16(sim.state.omega) if dtype == "float16" else sim.state.omega
            for name, client in sim.clients.items():
                load_omega_(sim.shared, omega)
                result, ev = client.run_round(sim.shared, k)
                grad = round16(result.gradient) if dtype == "float16" else result.gradient
                updates.append(ClientUpdate(name, grad, result.loss_ratio))
                last[name] = {"train_loss": result.loss, "test_loss": ev.test_loss, "accuracy": ev.value}
            step = server_step(sim.state, updates, config.server_config())
            for name, rep in step.reports.items():
                last[name]["weight"] = rep.weight
        finals[dtype] = last
    t = Table(
        f"float16 on the wire: effect on learning (in-process RadCom, FedGradNorm, {rounds} rounds, seed 0)",
        [
            "task",
            "train loss f32",
            "train loss f16",
            "test loss f32",
            "test loss f16",
            "acc f32",
            "acc f16",
            "p f32",
            "p f16",
        ],
    )
    for task in finals["float32"]:
        a, b = finals["float32"][task], finals["float16"][task]
        t.add(
            task,
            f"{a['train_loss']:.4f}",
            f"{b['train_loss']:.4f}",
            f"{a['test_loss']:.4f}",
            f"{b['test_loss']:.4f}",
            f"{a['accuracy']:.3f}",
            f"{b['accuracy']:.3f}",
            f"{a['weight']:.4f}",
            f"{b['weight']:.4f}",
        )
    t.notes.append(
        "Last round's values. float16 = ω rounded to float16 before every client loads it and every gradient rounded "
        "before the server step, which is what `--wire-dtype float16` does to the payloads (the aggregator keeps ω "
        "and its Adam moments in float32)."
    )
    t.data = finals
    return t


def run(workdir: Path, synthetic_size: int = 20, learning_rounds: int = 20, repeats: int = 3) -> list[Table]:
    return [
        throughput(repeats),
        wire_bytes(workdir, synthetic_size),
        float16_learning(synthetic_size, learning_rounds),
    ]
