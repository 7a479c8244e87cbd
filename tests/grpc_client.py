"""A raw protocol client for tests: speaks the contracts directly, so tests can also misbehave."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import grpc
import torch

from fedgradnorm import wire
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
from fedgradnorm.services import serde
from fedgradnorm.wire_format import MESSAGE_LIMITS

OPTIONS = list(MESSAGE_LIMITS)


@dataclass
class RawNode:
    stub: pb_grpc.AggregatorStub
    node_id: str
    token: str
    task: str

    def fetch(
        self, wait: float = 10.0, dtype: int = 0, without_final_model: bool = False
    ) -> tuple[pb.RoundHeader, dict[str, torch.Tensor] | None]:
        """The round's header and omega_k (OPEN), or the final omega (FINISHED, unless declined), else None."""
        request = pb.FetchRoundRequest(
            node_id=self.node_id,
            session_token=self.token,
            wait_seconds=wait,
            dtype=dtype,
            without_final_model=without_final_model,
        )
        stream = self.stub.FetchRound(request, timeout=wait + 60)
        header = next(stream).header
        if not header.tensors:
            stream.cancel()
            return header, None
        specs = {s.name: tuple(s.shape) for s in header.tensors}
        asm = wire.TensorAssembler.from_header(header, specs)
        for msg in stream:
            asm.feed(msg.chunk.data)
        return header, asm.finish()

    def header(self, round_: int, gradient: Mapping[str, torch.Tensor], **kw: object) -> pb.SubmitHeader:
        specs = wire.tensor_specs(gradient, tensor_pb2.DTYPE_FLOAT32)
        fields = dict(
            node_id=self.node_id,
            session_token=self.token,
            round=round_,
            tensors=specs,
            total_bytes=wire.payload_nbytes(specs),
            loss=1.0,
            initial_loss=1.0,
            loss_ratio=1.0,
            num_samples=10,
        )
        fields.update(kw)
        return pb.SubmitHeader(**fields)  # type: ignore[arg-type]

    def submit(
        self,
        round_: int,
        gradient: Mapping[str, torch.Tensor],
        header: pb.SubmitHeader | None = None,
        chunks: Iterable[bytes] | None = None,
        **kw: object,
    ) -> pb.SubmitUpdateResponse:
        h = header if header is not None else self.header(round_, gradient, **kw)
        data = chunks if chunks is not None else wire.iter_chunks(gradient, tensor_pb2.DTYPE_FLOAT32, 1 << 20)

        def messages() -> Iterator[pb.SubmitUpdateRequest]:
            yield pb.SubmitUpdateRequest(header=h)
            for d in data:
                yield pb.SubmitUpdateRequest(chunk=tensor_pb2.TensorChunk(data=d))

        return self.stub.SubmitUpdate(messages(), timeout=120)

    def heartbeat(self) -> pb.HeartbeatResponse:
        return self.stub.Heartbeat(pb.HeartbeatRequest(node_id=self.node_id, session_token=self.token), timeout=10)

    def deregister(self) -> None:
        self.stub.Deregister(pb.DeregisterRequest(node_id=self.node_id, session_token=self.token), timeout=10)


def connect(port: int, host: str = "127.0.0.1") -> tuple[grpc.Channel, pb_grpc.AggregatorStub]:
    channel = grpc.insecure_channel(f"{host}:{port}", options=OPTIONS)
    return channel, pb_grpc.AggregatorStub(channel)


def register(stub: pb_grpc.AggregatorStub, name: str, task: str, federation: str = "mtfl", **kw: object) -> RawNode:
    resp = stub.Register(
        pb.RegisterRequest(
            node_name=name,
            federation=federation,
            network=serde.federation_network(federation),
            task=task,
            num_samples=10,
            **kw,  # type: ignore[arg-type]
        ),
        timeout=10,
    )
    node = RawNode(stub, resp.node_id, resp.session_token, task)
    node.heartbeat()  # only nodes seen since they registered take part in rounds
    return node


def state(stub: pb_grpc.AggregatorStub) -> pb.GetStateResponse:
    return stub.GetState(pb.GetStateRequest(), timeout=10)


def weights(stub: pb_grpc.AggregatorStub) -> dict[str, float]:
    return {n.node_id: n.weight for n in state(stub).nodes}
