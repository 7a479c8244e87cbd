"""The wire's vocabulary without torch: the dtypes a tensor may travel in, by the names the
configuration uses, and the default chunk size. fedgradnorm.wire builds on it; configurations
import it alone, so listing their flags loads no torch."""

from __future__ import annotations

from collections.abc import Mapping

from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2
from fedgradnorm._proto.fedgradnorm.v1.tensor_pb2 import DType

DTYPE_FLOAT32: DType = tensor_pb2.DTYPE_FLOAT32
DTYPE_FLOAT16: DType = tensor_pb2.DTYPE_FLOAT16
DTYPE_BFLOAT16: DType = tensor_pb2.DTYPE_BFLOAT16

#: Names used in configuration (``--wire-dtype float16``) -> wire DType values.
DTYPE_BY_NAME: Mapping[str, DType] = {"float32": DTYPE_FLOAT32, "float16": DTYPE_FLOAT16, "bfloat16": DTYPE_BFLOAT16}

#: A sensible chunk size: well under the message limit below.
DEFAULT_CHUNK_BYTES = 1 << 20

#: The largest gRPC message every server and channel of the project sends or accepts (gRPC's own
#: default, stated once): payloads travel in chunks well under it.
MAX_MESSAGE_BYTES = 4 << 20
MESSAGE_LIMITS: tuple[tuple[str, object], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)
