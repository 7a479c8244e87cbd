"""The tensor codec of the gRPC protocol: tensor dicts <-> header specs + a stream of byte chunks.

A payload (omega_k from the aggregator, g_k from a node) is the tensors' raw little-endian bytes,
concatenated in header order (see ``proto/fedgradnorm/v1/tensor.proto``). Both directions are
written so that the payload is never materialised a second time:

* :func:`iter_chunks` slices a memoryview of each tensor's storage; the only copy is the bytes
  object of each chunk that protobuf needs. Converting to a 16-bit wire type (or byte-swapping on
  a big-endian host) is done a block of elements at a time, never for the whole model at once.
* :class:`TensorAssembler` checks the header against the receiver's own model before any payload
  arrives, preallocates one buffer of the announced size, copies each chunk straight into place,
  and hands back float32 tensors that are views over that buffer (16-bit payloads are widened to
  float32 once).

Typical use::

    specs = tensor_specs(omega, DTYPE_FLOAT32)
    header = RoundHeader(..., tensors=specs, total_bytes=payload_nbytes(specs))
    for data in iter_chunks(omega, DTYPE_FLOAT32, max_chunk_bytes): ...  # TensorChunk(data=data)

    asm = TensorAssembler.from_header(header, expected=model_shapes, max_bytes=limit)
    for chunk in chunks: asm.feed(chunk.data)
    omega = asm.finish()
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
from fedgradnorm._proto.fedgradnorm.v1.tensor_pb2 import DType, TensorSpec
from fedgradnorm.finite import all_finite
from fedgradnorm.reasons import Reason
from fedgradnorm.wire_format import DEFAULT_CHUNK_BYTES, DTYPE_BFLOAT16, DTYPE_BY_NAME, DTYPE_FLOAT16, DTYPE_FLOAT32

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DTYPES",
    "DTYPE_BFLOAT16",
    "DTYPE_BY_NAME",
    "DTYPE_FLOAT16",
    "DTYPE_FLOAT32",
    "DType",
    "TensorAssembler",
    "TensorSpec",
    "WireError",
    "element_size",
    "iter_chunks",
    "payload_nbytes",
    "tensor_specs",
    "torch_dtype",
]

#: Wire DType enum value -> torch dtype.
DTYPES: Mapping[DType, torch.dtype] = {
    DTYPE_FLOAT32: torch.float32,
    DTYPE_FLOAT16: torch.float16,
    DTYPE_BFLOAT16: torch.bfloat16,
}

# Elements converted per block when the wire dtype differs from the tensor's (bounds the memory).
_CONVERT_ELEMENTS = 1 << 20
# The wire is little-endian; read at call time so that tests can exercise the swapping path.
_LITTLE_ENDIAN = sys.byteorder == "little"
_SWAP_DTYPES = {4: np.uint32, 2: np.uint16}


# The reasons a payload or its header is refused for (the codes of WireError).
FRAMING_REASONS = frozenset(
    {
        Reason.BAD_DTYPE,
        Reason.DUPLICATE_TENSOR,
        Reason.UNKNOWN_TENSOR,
        Reason.MISSING_TENSOR,
        Reason.ORDER_MISMATCH,
        Reason.SHAPE_MISMATCH,
        Reason.SIZE_MISMATCH,
        Reason.TOO_LARGE,
        Reason.OVERFLOW,
        Reason.TRUNCATED,
        Reason.NOT_FINITE,
    }
)


class WireError(ValueError):
    """A payload or header that the receiver refuses; ``code`` is a short machine-readable tag."""

    def __init__(self, code: Reason, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class _PayloadHeader(Protocol):
    """RoundHeader and SubmitHeader: anything with tensor specs and a total size."""

    @property
    def tensors(self) -> Sequence[TensorSpec]: ...

    @property
    def total_bytes(self) -> int: ...


def torch_dtype(dtype: DType) -> torch.dtype:
    """The torch dtype of a wire DType value; WireError ``bad_dtype`` for UNSPECIFIED or unknown."""
    try:
        return DTYPES[dtype]
    except KeyError:
        raise WireError(Reason.BAD_DTYPE, f"unsupported wire dtype {_dtype_name(dtype)}") from None


def element_size(dtype: DType) -> int:
    """Bytes per element of a wire DType value."""
    return torch_dtype(dtype).itemsize


def _dtype_name(dtype: int) -> str:
    try:
        return str(tensor_pb2.DType.Name(dtype))
    except ValueError:
        return str(dtype)


def payload_nbytes(specs: Iterable[TensorSpec]) -> int:
    """Size in bytes of the payload the specs describe (the header's total_bytes)."""
    return sum(math.prod(spec.shape) * element_size(spec.dtype) for spec in specs)


def _check_source(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise WireError(Reason.BAD_DTYPE, f"tensor {name!r} is {tensor.dtype}; only floating tensors travel")


def tensor_specs(tensors: Mapping[str, torch.Tensor], dtype: DType) -> list[TensorSpec]:
    """One TensorSpec per tensor, in mapping order, all with wire dtype ``dtype``."""
    torch_dtype(dtype)
    specs = []
    for name, tensor in tensors.items():
        _check_source(name, tensor)
        specs.append(TensorSpec(name=name, shape=list(tensor.shape), dtype=dtype))
    return specs


def _le_bytes(flat: torch.Tensor) -> memoryview:
    """Little-endian bytes of a 1-D contiguous CPU tensor: its storage, or a swapped copy."""
    if _LITTLE_ENDIAN:
        return flat.view(torch.uint8).numpy().data
    swapped = flat.view(torch.uint8).numpy().view(_SWAP_DTYPES[flat.element_size()]).byteswap()
    return swapped.view(np.uint8).data


def _byte_blocks(tensor: torch.Tensor, dtype: torch.dtype) -> Iterator[memoryview]:
    """The tensor's wire bytes as consecutive memoryviews (one, if no conversion is needed)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == dtype and _LITTLE_ENDIAN:
        yield _le_bytes(flat)
        return
    for start in range(0, flat.numel(), _CONVERT_ELEMENTS):
        yield _le_bytes(flat[start : start + _CONVERT_ELEMENTS].to(dtype))


def _chunk_pieces(
    tensors: Mapping[str, torch.Tensor], dtype: DType, chunk_bytes: int
) -> Iterator[tuple[list[memoryview], int]]:
    """Each chunk of the payload as the memoryviews it is made of, and its size (no copy yet)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    target = torch_dtype(dtype)
    pieces: list[memoryview] = []
    filled = 0
    for name, tensor in tensors.items():
        _check_source(name, tensor)
        for block in _byte_blocks(tensor, target):
            pos, size = 0, block.nbytes
            while pos < size:
                take = min(chunk_bytes - filled, size - pos)
                pieces.append(block[pos : pos + take])
                pos += take
                filled += take
                if filled == chunk_bytes:
                    yield pieces, filled
                    pieces, filled = [], 0
    if pieces:
        yield pieces, filled


def iter_chunks(tensors: Mapping[str, torch.Tensor], dtype: DType, chunk_bytes: int) -> Iterator[bytes]:
    """The payload of ``tensors`` in wire dtype ``dtype`` as chunks of ``chunk_bytes`` (the last
    may be shorter). Chunks follow the mapping order and may span tensor boundaries; their
    concatenation is exactly the payload that :func:`tensor_specs` describes.

    The generator reads float32 tensors in place, lazily: do not modify them until it is exhausted
    (e.g. the aggregator must not step omega while a FetchRound stream is still sending it).
    """
    for pieces, _ in _chunk_pieces(tensors, dtype, chunk_bytes):
        yield b"".join(pieces)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_LEN = 2  # protobuf wire type of bytes and embedded messages
_CHUNK_DATA_FIELD = tensor_pb2.TensorChunk.DESCRIPTOR.fields_by_name["data"].number


def chunk_message_prefix(chunk_field: int, nbytes: int) -> bytes:
    """The bytes that precede ``nbytes`` of payload in a serialized message whose only field set is
    ``chunk_field`` (a TensorChunk) holding them: the outer key and length, then TensorChunk.data's.
    ``nbytes`` >= 1 (proto3 leaves an empty ``data`` out; chunks are never empty)."""
    inner = _varint(_CHUNK_DATA_FIELD << 3 | _LEN) + _varint(nbytes)
    return _varint(chunk_field << 3 | _LEN) + _varint(len(inner) + nbytes) + inner


def iter_chunk_messages(
    tensors: Mapping[str, torch.Tensor], dtype: DType, chunk_bytes: int, chunk_field: int
) -> Iterator[bytes]:
    """:func:`iter_chunks`, each chunk already serialized as a message whose field ``chunk_field``
    is ``TensorChunk(data=chunk)`` (FetchRoundResponse and SubmitUpdateRequest: ``chunk = 2``).

    Byte for byte what ``Message(chunk=TensorChunk(data=chunk)).SerializeToString()`` gives, with
    one copy of the payload instead of three (protobuf copies it into the message, then out again):
    send them through a multicallable or handler whose serializer passes bytes through.
    """
    for pieces, nbytes in _chunk_pieces(tensors, dtype, chunk_bytes):
        yield b"".join([chunk_message_prefix(chunk_field, nbytes), *pieces])


def _shape_of(value: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(int(d) for d in value)


class TensorAssembler:
    """Reassemble one payload into float32 tensors, validating everything it can up front.

    ``specs`` and ``total_bytes`` come from the sender's header; ``expected`` is the receiver's own
    model (name -> tensor or shape). The header is checked when the assembler is built, before any
    payload byte is buffered: every WireError except ``overflow``, ``truncated`` and ``not_finite``
    is raised by the constructor.
    """

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        expected: Mapping[str, torch.Tensor | Sequence[int]],
        *,
        total_bytes: int,
        max_bytes: int | None = None,
        allowed_dtypes: Collection[DType] = tuple(DTYPES),
        check_finite: bool = False,
        strict_order: bool = False,
    ) -> None:
        if max_bytes is not None and total_bytes > max_bytes:
            raise WireError(Reason.TOO_LARGE, f"payload of {total_bytes} bytes exceeds the limit of {max_bytes}")
        if total_bytes < 0:
            raise WireError(Reason.SIZE_MISMATCH, f"negative total_bytes {total_bytes}")
        shapes = {name: _shape_of(value) for name, value in expected.items()}
        names = [spec.name for spec in specs]
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise WireError(Reason.DUPLICATE_TENSOR, f"tensor {name!r} appears twice in the header")
            seen.add(name)
            if name not in shapes:
                raise WireError(Reason.UNKNOWN_TENSOR, f"tensor {name!r} is not part of the model")
        missing = [name for name in shapes if name not in seen]
        if missing:
            raise WireError(Reason.MISSING_TENSOR, f"the header lacks {missing}")
        if strict_order and names != list(shapes):
            raise WireError(Reason.ORDER_MISMATCH, f"tensors arrive as {names}, expected {list(shapes)}")

        self._layout: list[tuple[str, int, int, tuple[int, ...], DType]] = []
        offset = 0
        for spec in specs:
            if spec.dtype not in DTYPES or spec.dtype not in allowed_dtypes:
                allowed = sorted(_dtype_name(d) for d in allowed_dtypes)
                got = _dtype_name(spec.dtype)
                raise WireError(Reason.BAD_DTYPE, f"tensor {spec.name!r} has dtype {got}, accepted: {allowed}")
            shape = tuple(spec.shape)
            if shape != shapes[spec.name]:
                raise WireError(
                    Reason.SHAPE_MISMATCH, f"tensor {spec.name!r} has shape {shape}, expected {shapes[spec.name]}"
                )
            nbytes = math.prod(shape) * element_size(spec.dtype)
            self._layout.append((spec.name, offset, nbytes, shape, spec.dtype))
            offset += nbytes
        if offset != total_bytes:
            raise WireError(Reason.SIZE_MISMATCH, f"header announces {total_bytes} bytes, the tensors take {offset}")

        self._order = list(shapes)
        self._check_finite = check_finite
        self._total = total_bytes
        self._received = 0
        self._buffer = torch.empty(total_bytes, dtype=torch.uint8)
        self._array = self._buffer.numpy()
        self._view = self._array.data
        self._result: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_header(
        cls,
        header: _PayloadHeader,
        expected: Mapping[str, torch.Tensor | Sequence[int]],
        *,
        max_bytes: int | None = None,
        allowed_dtypes: Collection[DType] = tuple(DTYPES),
        check_finite: bool = False,
        strict_order: bool = False,
    ) -> TensorAssembler:
        """Build from a RoundHeader or SubmitHeader (its ``tensors`` and ``total_bytes``)."""
        return cls(
            header.tensors,
            expected,
            total_bytes=header.total_bytes,
            max_bytes=max_bytes,
            allowed_dtypes=allowed_dtypes,
            check_finite=check_finite,
            strict_order=strict_order,
        )

    @property
    def total_bytes(self) -> int:
        """Payload size announced by the header."""
        return self._total

    @property
    def received(self) -> int:
        """Bytes fed so far."""
        return self._received

    @property
    def buffer(self) -> torch.Tensor:
        """The preallocated uint8 buffer the payload lands in (the float32 results are views of it)."""
        return self._buffer

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copy the next chunk into place; WireError ``overflow`` past the announced size."""
        chunk = memoryview(data).cast("B")
        end = self._received + chunk.nbytes
        if end > self._total:
            raise WireError(Reason.OVERFLOW, f"received more than the announced {self._total} bytes")
        self._view[self._received : end] = chunk
        self._received = end

    def finish(self) -> dict[str, torch.Tensor]:
        """The float32 tensors in the receiver's (``expected``) order; WireError ``truncated`` if
        the payload is incomplete, ``not_finite`` (with ``check_finite``) naming the first bad tensor.
        A second call returns the same tensors.
        """
        if self._result is not None:
            return dict(self._result)
        if self._received != self._total:
            raise WireError(Reason.TRUNCATED, f"received {self._received} of {self._total} bytes")
        out: dict[str, torch.Tensor] = {}
        for name, offset, nbytes, shape, dtype in self._layout:
            size = element_size(dtype)
            if not _LITTLE_ENDIAN:
                self._array[offset : offset + nbytes].view(_SWAP_DTYPES[size]).byteswap(inplace=True)
            raw = self._buffer[offset : offset + nbytes]
            if offset % size:
                raw = raw.clone()  # a float32 tensor after an odd count of 16-bit elements: realign
            tensor = raw.view(DTYPES[dtype]).view(shape)
            if dtype != DTYPE_FLOAT32:
                tensor = tensor.float()
            if self._check_finite and not all_finite(tensor):
                raise WireError(Reason.NOT_FINITE, f"tensor {name!r} contains NaN or infinity")
            out[name] = tensor
        self._result = {name: out[name] for name in self._order}
        return dict(self._result)
