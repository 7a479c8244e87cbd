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

#: A sensible chunk size: well under gRPC's default 4 MiB message limit.
DEFAULT_CHUNK_BYTES = 1 << 20
