"""The tensor codec: round trips, byte layout, zero-copy decoding, errors, memory, and real gRPC."""

from __future__ import annotations

import pickle
import threading
import tracemalloc
import typing
from collections.abc import Iterator, Mapping
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from fedgradnorm import wire
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
from fedgradnorm.reasons import Reason
from fedgradnorm.services.refusals import wire_status
from fedgradnorm.wire import (
    DTYPE_BFLOAT16,
    DTYPE_FLOAT16,
    DTYPE_FLOAT32,
    DTYPES,
    DType,
    TensorAssembler,
    TensorSpec,
    WireError,
    iter_chunks,
    payload_nbytes,
    tensor_specs,
)

ALL_DTYPES = [DTYPE_FLOAT32, DTYPE_FLOAT16, DTYPE_BFLOAT16]
NUMPY_LE = {DTYPE_FLOAT32: "<f4", DTYPE_FLOAT16: "<f2"}


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    """Odd shapes, a scalar and empty tensors at the start, middle and end."""
    g = torch.Generator().manual_seed(seed)
    return {
        "empty.first": torch.empty(0, 3),
        "conv.weight": torch.randn(5, 3, 3, generator=g),
        "conv.bias": torch.randn(5, generator=g),
        "scale": torch.randn((), generator=g),
        "empty.mid": torch.empty(4, 0),
        "fc.weight": torch.randn(7, 11, generator=g),
        "fc.bias": torch.randn(7, generator=g),
        "empty.last": torch.empty(0),
    }


def roundtrip(
    tensors: Mapping[str, torch.Tensor], dtype: DType, chunk_bytes: int, **limits: typing.Any
) -> tuple[dict[str, torch.Tensor], TensorAssembler]:
    specs = tensor_specs(tensors, dtype)
    asm = TensorAssembler(specs, tensors, total_bytes=payload_nbytes(specs), **limits)
    for data in iter_chunks(tensors, dtype, chunk_bytes):
        assert 0 < len(data) <= chunk_bytes
        asm.feed(data)
    return asm.finish(), asm


def le_bytes(tensor: torch.Tensor, dtype: DType) -> bytes:
    """Reference encoding through numpy's explicit little-endian dtypes."""
    if dtype == DTYPE_BFLOAT16:
        bits = tensor.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return bits.astype("<i2").tobytes()
    return tensor.detach().numpy().astype(NUMPY_LE[dtype]).tobytes()


# ------------------------------------------------------------------------------------------------
# Layout and round trips
# ------------------------------------------------------------------------------------------------


def test_dtype_table_matches_the_proto_enum() -> None:
    assert dict(DTYPES) == {
        tensor_pb2.DTYPE_FLOAT32: torch.float32,
        tensor_pb2.DTYPE_FLOAT16: torch.float16,
        tensor_pb2.DTYPE_BFLOAT16: torch.bfloat16,
    }
    assert [wire.element_size(d) for d in ALL_DTYPES] == [4, 2, 2]
    assert tensor_pb2.DTYPE_UNSPECIFIED not in DTYPES


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 13, 64, 1 << 20])
def test_roundtrip(dtype: DType, chunk_bytes: int) -> None:
    tensors = model()
    out, _ = roundtrip(tensors, dtype, chunk_bytes)
    assert list(out) == list(tensors)
    for name, ref in tensors.items():
        got = out[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        # Exactly the sender's value rounded to the wire type, widened back to float32.
        assert torch.equal(got, ref.to(DTYPES[dtype]).float()), name
        if dtype != DTYPE_FLOAT32 and ref.numel():
            rtol = 2.0**-10 if dtype == DTYPE_FLOAT16 else 2.0**-7
            torch.testing.assert_close(got, ref, rtol=rtol, atol=1e-4)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_payload_is_little_endian_and_in_header_order(dtype: DType) -> None:
    tensors = model(1)
    expected = b"".join(le_bytes(t, dtype) for t in tensors.values())
    chunks = list(iter_chunks(tensors, dtype, 10))
    assert b"".join(chunks) == expected
    assert payload_nbytes(tensor_specs(tensors, dtype)) == len(expected)
    assert all(len(c) == 10 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 10


def test_chunks_span_tensor_boundaries() -> None:
    tensors = {"a": torch.arange(3, dtype=torch.float32), "b": torch.arange(3, 6, dtype=torch.float32)}
    chunks = list(iter_chunks(tensors, DTYPE_FLOAT32, 5))  # 24 bytes: 5+5+5+5+4
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 4]
    assert chunks[2] == np.array([2.0, 3.0], dtype="<f4").tobytes()[2:7]  # ends of a, start of b
    out, _ = roundtrip(tensors, DTYPE_FLOAT32, 5)
    assert torch.equal(out["a"], tensors["a"]) and torch.equal(out["b"], tensors["b"])


def test_specs_describe_the_payload() -> None:
    specs = tensor_specs(model(), DTYPE_FLOAT16)
    assert [s.name for s in specs] == list(model())
    assert [tuple(s.shape) for s in specs] == [tuple(t.shape) for t in model().values()]
    assert {s.dtype for s in specs} == {DTYPE_FLOAT16}


def test_big_endian_host_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the host flag flipped, the codec swaps bytes: on this little-endian machine the chunks
    come out big-endian, which proves the swap happens, and the assembler swaps them back."""
    if wire._LITTLE_ENDIAN is False:
        pytest.skip("host is big-endian: the regular tests already exercise the swap")
    monkeypatch.setattr(wire, "_LITTLE_ENDIAN", False)
    tensors = model(2)
    payload = b"".join(iter_chunks(tensors, DTYPE_FLOAT32, 9))
    assert payload == b"".join(t.numpy().astype(">f4").tobytes() for t in tensors.values())
    for dtype in ALL_DTYPES:
        out, _ = roundtrip(tensors, dtype, 9)
        for name, ref in tensors.items():
            assert torch.equal(out[name], ref.to(DTYPES[dtype]).float()), (dtype, name)


def test_only_empty_tensors_and_empty_model() -> None:
    empties = {"a": torch.empty(0), "b": torch.empty(2, 0, 3)}
    assert list(iter_chunks(empties, DTYPE_FLOAT32, 4)) == []
    out, asm = roundtrip(empties, DTYPE_FLOAT32, 4)
    assert asm.total_bytes == 0 and [t.shape for t in out.values()] == [(0,), (2, 0, 3)]
    assert list(iter_chunks({}, DTYPE_FLOAT16, 4)) == []
    assert TensorAssembler([], {}, total_bytes=0).finish() == {}


def test_sources_that_are_not_plain_contiguous_tensors() -> None:
    param = torch.nn.Parameter(torch.randn(4, 6))
    tensors = {"param": param, "transposed": torch.randn(6, 4).t(), "double": torch.randn(3, dtype=torch.float64)}
    out, _ = roundtrip(tensors, DTYPE_FLOAT32, 11)
    assert torch.equal(out["param"], param.detach())
    assert torch.equal(out["transposed"], tensors["transposed"])
    assert torch.equal(out["double"], tensors["double"].float())


def test_mixed_dtype_payload_realigns_float32_after_odd_16_bit_tensor() -> None:
    half = {"h": torch.randn(3)}  # 6 bytes: the next tensor starts at an offset not divisible by 4
    full = {"f": torch.randn(2, 5)}
    specs = tensor_specs(half, DTYPE_FLOAT16) + tensor_specs(full, DTYPE_FLOAT32)
    asm = TensorAssembler(specs, {**half, **full}, total_bytes=payload_nbytes(specs))
    for data in [*iter_chunks(half, DTYPE_FLOAT16, 4), *iter_chunks(full, DTYPE_FLOAT32, 4)]:
        asm.feed(data)
    out = asm.finish()
    assert torch.equal(out["h"], half["h"].half().float())
    assert torch.equal(out["f"], full["f"])


def test_feed_accepts_any_bytes_like_object() -> None:
    tensors = {"x": torch.randn(10)}
    specs = tensor_specs(tensors, DTYPE_FLOAT32)
    asm = TensorAssembler(specs, tensors, total_bytes=40)
    payload = b"".join(iter_chunks(tensors, DTYPE_FLOAT32, 40))
    asm.feed(memoryview(payload)[:16])
    asm.feed(bytearray(payload[16:30]))
    asm.feed(np.frombuffer(payload[30:], dtype=np.uint8).data)
    assert asm.received == 40
    assert torch.equal(asm.finish()["x"], tensors["x"])


def test_finish_twice_returns_the_same_tensors() -> None:
    out, asm = roundtrip(model(), DTYPE_FLOAT16, 8)
    again = asm.finish()
    assert again == out and all(again[k] is out[k] for k in out)


def test_results_follow_the_receivers_order() -> None:
    tensors = model()
    reordered = dict(reversed(list(tensors.items())))
    specs = tensor_specs(reordered, DTYPE_FLOAT32)
    asm = TensorAssembler(specs, tensors, total_bytes=payload_nbytes(specs))
    for data in iter_chunks(reordered, DTYPE_FLOAT32, 17):
        asm.feed(data)
    out = asm.finish()
    assert list(out) == list(tensors)
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)


# ------------------------------------------------------------------------------------------------
# No copies
# ------------------------------------------------------------------------------------------------


def test_float32_decode_returns_views_of_the_buffer() -> None:
    tensors = model()
    out, asm = roundtrip(tensors, DTYPE_FLOAT32, 7)
    start = asm.buffer.data_ptr()
    end = start + asm.total_bytes
    for name, t in out.items():
        if t.numel():
            assert start <= t.data_ptr() and t.data_ptr() + t.nbytes <= end, name
            assert t.untyped_storage().data_ptr() == asm.buffer.untyped_storage().data_ptr(), name
    asm.buffer.zero_()  # writing the buffer shows through: no hidden copy
    assert all(float(t.abs().sum()) == 0.0 for t in out.values())


def test_float32_encode_slices_the_tensor_storage() -> None:
    tensor = torch.randn(1000)
    (block,) = list(wire._byte_blocks(tensor, torch.float32))
    assert np.frombuffer(block, dtype=np.uint8).ctypes.data == tensor.data_ptr()


def test_16_bit_encode_converts_a_bounded_block_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "_CONVERT_ELEMENTS", 100)
    tensor = torch.randn(1050)
    blocks = list(wire._byte_blocks(tensor, torch.float16))
    assert [b.nbytes for b in blocks] == [200] * 10 + [100]
    out, _ = roundtrip({"t": tensor}, DTYPE_FLOAT16, 33)
    assert torch.equal(out["t"], tensor.half().float())


def test_256mb_model_streams_with_bounded_extra_memory() -> None:
    """64M float32 elements (256 MiB) in odd-sized tensors: round trip exact, and the Python-side
    allocations while streaming stay at a couple of chunks (the payload is never joined)."""
    sizes = [32 * 2**20 + 5, 16 * 2**20 - 5, 8 * 2**20 + 1, 8 * 2**20 - 1]
    tensors = {f"layer{i}.weight": torch.randn(n) for i, n in enumerate(sizes)}
    specs = tensor_specs(tensors, DTYPE_FLOAT32)
    total = payload_nbytes(specs)
    assert total == 256 * 2**20
    chunk_bytes = 1 << 20
    asm = TensorAssembler(specs, tensors, total_bytes=total, max_bytes=total)
    tracemalloc.start()
    try:
        count = 0
        for data in iter_chunks(tensors, DTYPE_FLOAT32, chunk_bytes):
            asm.feed(data)
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 256
    assert peak < 3 * chunk_bytes, f"peak Python allocation while streaming: {peak} bytes"
    out = asm.finish()
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

EXPECTED = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}


def spec(name: str, shape: tuple[int, ...], dtype: DType = DTYPE_FLOAT32) -> TensorSpec:
    return TensorSpec(name=name, shape=list(shape), dtype=dtype)


GOOD = [spec("w", (2, 3)), spec("b", (2,))]

HEADER_ERRORS: dict[str, tuple[list[TensorSpec], int, dict[str, typing.Any]]] = {
    "bad_dtype": ([spec("w", (2, 3), tensor_pb2.DTYPE_UNSPECIFIED), spec("b", (2,))], 32, {}),
    "bad_dtype/unknown": ([spec("w", (2, 3), typing.cast(DType, 99)), spec("b", (2,))], 32, {}),
    "bad_dtype/not_allowed": (
        [spec("w", (2, 3), DTYPE_FLOAT16), spec("b", (2,))],
        20,
        {"allowed_dtypes": [DTYPE_FLOAT32]},
    ),
    "duplicate_tensor": ([*GOOD, spec("w", (2, 3))], 56, {}),
    "unknown_tensor": ([*GOOD, spec("extra", (1,))], 36, {}),
    "missing_tensor": (GOOD[:1], 24, {}),
    "order_mismatch": (GOOD[::-1], 32, {"strict_order": True}),
    "shape_mismatch": ([spec("w", (3, 2)), spec("b", (2,))], 32, {}),
    "size_mismatch": (GOOD, 31, {}),
    "size_mismatch/huge": (GOOD, 1 << 50, {}),  # refused before a buffer of that size is allocated
    "size_mismatch/negative": (GOOD, -1, {}),
    "too_large": (GOOD, 32, {"max_bytes": 31}),
    "too_large/huge": (GOOD, 1 << 50, {"max_bytes": 1 << 30}),
}


@pytest.mark.parametrize("case", list(HEADER_ERRORS))
def test_header_errors_are_raised_before_any_payload(case: str) -> None:
    specs, total, limits = HEADER_ERRORS[case]
    with pytest.raises(WireError) as info:
        TensorAssembler(specs, EXPECTED, total_bytes=total, **limits)
    assert info.value.code == case.split("/")[0]
    assert str(info.value).startswith(info.value.code + ": ")


def test_valid_header_and_loose_order_are_accepted() -> None:
    TensorAssembler(GOOD, EXPECTED, total_bytes=32, max_bytes=32, strict_order=True)
    TensorAssembler(GOOD[::-1], EXPECTED, total_bytes=32)
    TensorAssembler(GOOD, {"w": (2, 3), "b": torch.Size([2])}, total_bytes=32)  # shapes work too


def test_overflow() -> None:
    asm = TensorAssembler(GOOD, EXPECTED, total_bytes=32)
    asm.feed(bytes(30))
    with pytest.raises(WireError) as info:
        asm.feed(bytes(3))
    assert info.value.code == "overflow"
    assert asm.received == 30  # the offending chunk was not written


def test_truncated() -> None:
    asm = TensorAssembler(GOOD, EXPECTED, total_bytes=32)
    asm.feed(bytes(31))
    with pytest.raises(WireError) as info:
        asm.finish()
    assert info.value.code == "truncated"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_not_finite_names_the_tensor(bad: float, dtype: DType) -> None:
    tensors = {"w": torch.zeros(2, 3), "b": torch.tensor([0.0, bad])}
    out, _ = roundtrip(tensors, dtype, 5)  # accepted without the flag
    assert not bool(torch.isfinite(out["b"]).all())
    with pytest.raises(WireError, match="'b'") as info:
        roundtrip(tensors, dtype, 5, check_finite=True)
    assert info.value.code == "not_finite"


def test_every_error_code_is_exercised() -> None:
    tested = {case.split("/")[0] for case in HEADER_ERRORS} | {"overflow", "truncated", "not_finite"}
    assert tested == set(wire.FRAMING_REASONS)


def test_wire_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(WireError(Reason.TRUNCATED, "received 3 of 4 bytes")))
    assert (err.code, err.message, str(err)) == (
        "truncated",
        "received 3 of 4 bytes",
        "truncated: received 3 of 4 bytes",
    )


def test_grpc_status_of_errors() -> None:
    assert wire_status(WireError(Reason.TOO_LARGE, "x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert wire_status(WireError(Reason.SHAPE_MISMATCH, "x")) == grpc.StatusCode.INVALID_ARGUMENT


def test_sender_side_errors() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        list(iter_chunks(EXPECTED, DTYPE_FLOAT32, 0))
    with pytest.raises(WireError) as info:
        list(iter_chunks({"n": torch.arange(3)}, DTYPE_FLOAT32, 4))
    assert info.value.code == "bad_dtype"
    with pytest.raises(WireError) as info:
        tensor_specs(EXPECTED, tensor_pb2.DTYPE_UNSPECIFIED)
    assert info.value.code == "bad_dtype"


# ------------------------------------------------------------------------------------------------
# Through a real gRPC server
# ------------------------------------------------------------------------------------------------


class _Servicer(pb_grpc.AggregatorServicer):
    """Serves a fixed omega and collects one update: just enough of the Aggregator to stream."""

    def __init__(self, omega: dict[str, torch.Tensor], chunk_bytes: int) -> None:
        self.omega = omega
        self.chunk_bytes = chunk_bytes
        self.received: dict[str, torch.Tensor] = {}
        self.header: pb.SubmitHeader | None = None
        self.lock = threading.Lock()

    def FetchRound(
        self, request: pb.FetchRoundRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FetchRoundResponse]:
        dtype = request.dtype or DTYPE_FLOAT32
        specs = tensor_specs(self.omega, dtype)
        yield pb.FetchRoundResponse(
            header=pb.RoundHeader(
                status=pb.ROUND_STATUS_OPEN,
                round=3,
                deadline_unix_seconds=1e10,
                tensors=specs,
                total_bytes=payload_nbytes(specs),
            )
        )
        for data in iter_chunks(self.omega, dtype, self.chunk_bytes):
            yield pb.FetchRoundResponse(chunk=tensor_pb2.TensorChunk(data=data))

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext
    ) -> pb.SubmitUpdateResponse:
        first = next(request_iterator)
        if first.WhichOneof("payload") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a header")
        try:
            asm = TensorAssembler.from_header(first.header, self.omega, max_bytes=1 << 20, check_finite=True)
            for message in request_iterator:
                asm.feed(message.chunk.data)
            gradient = asm.finish()
        except WireError as err:
            context.abort(wire_status(err), str(err))
        with self.lock:
            self.received, self.header = gradient, first.header
        return pb.SubmitUpdateResponse(accepted=True, round=first.header.round)


def _submit_stream(
    header: pb.SubmitHeader, tensors: dict[str, torch.Tensor], dtype: DType
) -> Iterator[pb.SubmitUpdateRequest]:
    yield pb.SubmitUpdateRequest(header=header)
    for data in iter_chunks(tensors, dtype, 333):
        yield pb.SubmitUpdateRequest(chunk=tensor_pb2.TensorChunk(data=data))


def test_streams_through_a_real_grpc_server() -> None:
    omega = model(5)
    servicer = _Servicer(omega, chunk_bytes=100)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.AggregatorStub(channel)

        # omega_k down, in bfloat16.
        responses = stub.FetchRound(pb.FetchRoundRequest(node_id="n1", dtype=DTYPE_BFLOAT16), timeout=30)
        first = next(responses)
        assert first.WhichOneof("payload") == "header" and first.header.status == pb.ROUND_STATUS_OPEN
        asm = TensorAssembler.from_header(first.header, omega, allowed_dtypes=[DTYPE_BFLOAT16])
        for message in responses:
            assert len(message.chunk.data) <= 100
            asm.feed(message.chunk.data)
        fetched = asm.finish()
        assert all(torch.equal(fetched[k], omega[k].bfloat16().float()) for k in omega)

        # g_k up, in float16.
        gradient = {k: torch.randn_like(v) for k, v in omega.items()}
        specs = tensor_specs(gradient, DTYPE_FLOAT16)
        header = pb.SubmitHeader(
            node_id="n1",
            round=first.header.round,
            tensors=specs,
            total_bytes=payload_nbytes(specs),
            loss=0.5,
            initial_loss=1.0,
            loss_ratio=0.5,
            num_samples=100,
            test_loss=0.6,
            test_metrics={"accuracy": 0.9},
        )
        reply = stub.SubmitUpdate(_submit_stream(header, gradient, DTYPE_FLOAT16), timeout=30)
        assert reply.accepted and reply.round == 3
        assert servicer.header is not None and servicer.header.test_metrics["accuracy"] == 0.9
        assert servicer.header.HasField("test_loss")
        assert all(torch.equal(servicer.received[k], gradient[k].half().float()) for k in omega)

        # A gradient with a wrong shape is refused from its header, with the WireError code.
        wrong = {**gradient, "fc.bias": torch.zeros(8)}
        wrong_specs = tensor_specs(wrong, DTYPE_FLOAT32)
        bad_header = pb.SubmitHeader(
            node_id="n1", round=3, tensors=wrong_specs, total_bytes=payload_nbytes(wrong_specs)
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitUpdate(_submit_stream(bad_header, wrong, DTYPE_FLOAT32), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("shape_mismatch: ")
    finally:
        channel.close()
        server.stop(grace=None).wait()


# ---------------------------------------------------------------------------------------------
# Pre-serialized chunk messages (the aggregator's FetchRound cache, the edge node's SubmitUpdate)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", [pb.FetchRoundResponse, pb.SubmitUpdateRequest])
@pytest.mark.parametrize("dtype", [DTYPE_FLOAT32, DTYPE_FLOAT16])
@pytest.mark.parametrize("chunk_bytes", [1, 7, 127, 128, 130, 16_383, 16_384, 16_390, 1 << 20])
def test_chunk_messages_are_byte_identical_to_protobufs(message: type, dtype: int, chunk_bytes: int) -> None:
    """Sizes straddle the varint boundaries of the lengths (127/128, 16383/16384 bytes)."""
    g = torch.Generator().manual_seed(chunk_bytes)
    tensors = {
        "a": torch.randn(40, 250, generator=g),
        "b": torch.randn(3, generator=g),
        "c": torch.randn(9000, generator=g),
    }
    field = message.DESCRIPTOR.fields_by_name["chunk"].number
    if chunk_bytes == 1:
        tensors = {"b": tensors["b"]}  # a byte per message: keep it short
    ours = list(wire.iter_chunk_messages(tensors, dtype, chunk_bytes, field))
    theirs = [
        message(chunk=tensor_pb2.TensorChunk(data=d)).SerializeToString()
        for d in wire.iter_chunks(tensors, dtype, chunk_bytes)
    ]
    assert ours == theirs
    assert b"".join(message.FromString(m).chunk.data for m in ours) == b"".join(
        wire.iter_chunks(tensors, dtype, chunk_bytes)
    )


def test_chunk_message_prefix_matches_protobuf_for_large_lengths() -> None:
    for n in (1, 2_097_151, 2_097_152, 3 << 20, (1 << 28) + 5):
        prefix = wire.chunk_message_prefix(2, n)
        data = b"\x00" * n if n <= 3 << 20 else None
        if data is not None:
            assert prefix + data == pb.FetchRoundResponse(chunk=tensor_pb2.TensorChunk(data=data)).SerializeToString()
        else:  # parse the prefix alone: outer key, outer length, inner key, inner length
            assert prefix[0] == (2 << 3 | 2)
            inner_len, pos = _read_varint(prefix, 1)
            assert prefix[pos] == (1 << 3 | 2)
            data_len, end = _read_varint(prefix, pos + 1)
            assert data_len == n and end == len(prefix) and inner_len == len(prefix) - pos + n


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
