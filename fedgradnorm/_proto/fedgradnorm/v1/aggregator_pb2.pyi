from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATUS_UNSPECIFIED: _ClassVar[RoundStatus]
    ROUND_STATUS_OPEN: _ClassVar[RoundStatus]
    ROUND_STATUS_NOT_YET: _ClassVar[RoundStatus]
    ROUND_STATUS_FINISHED: _ClassVar[RoundStatus]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_WAITING_FOR_NODES: _ClassVar[Phase]
    PHASE_ROUND_OPEN: _ClassVar[Phase]
    PHASE_STEPPING: _ClassVar[Phase]
    PHASE_DONE: _ClassVar[Phase]
    PHASE_HALTED: _ClassVar[Phase]
ROUND_STATUS_UNSPECIFIED: RoundStatus
ROUND_STATUS_OPEN: RoundStatus
ROUND_STATUS_NOT_YET: RoundStatus
ROUND_STATUS_FINISHED: RoundStatus
PHASE_UNSPECIFIED: Phase
PHASE_WAITING_FOR_NODES: Phase
PHASE_ROUND_OPEN: Phase
PHASE_STEPPING: Phase
PHASE_DONE: Phase
PHASE_HALTED: Phase

class RegisterRequest(_message.Message):
    __slots__ = ("enrollment_token", "node_name", "federation", "task", "num_samples", "node_id", "session_token", "network")
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    enrollment_token: str
    node_name: str
    federation: str
    task: str
    num_samples: int
    node_id: str
    session_token: str
    network: NetworkArchitecture
    def __init__(self, enrollment_token: _Optional[str] = ..., node_name: _Optional[str] = ..., federation: _Optional[str] = ..., task: _Optional[str] = ..., num_samples: _Optional[int] = ..., node_id: _Optional[str] = ..., session_token: _Optional[str] = ..., network: _Optional[_Union[NetworkArchitecture, _Mapping]] = ...) -> None: ...

class NetworkArchitecture(_message.Message):
    __slots__ = ("fingerprint", "parameters")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterShape]
    def __init__(self, fingerprint: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[ParameterShape, _Mapping]]] = ...) -> None: ...

class ParameterShape(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class RoundConfig(_message.Message):
    __slots__ = ("tau_h", "tau_omega", "beta", "batch_size")
    TAU_H_FIELD_NUMBER: _ClassVar[int]
    TAU_OMEGA_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    tau_h: int
    tau_omega: int
    beta: float
    batch_size: int
    def __init__(self, tau_h: _Optional[int] = ..., tau_omega: _Optional[int] = ..., beta: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node_id", "session_token", "network", "algorithm", "omega_tilde", "round_config", "seed", "wire_dtype", "accepted_dtypes", "max_chunk_bytes", "max_update_bytes", "heartbeat_interval_seconds", "initial_loss", "weight", "resumed", "network_fingerprint")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    OMEGA_TILDE_FIELD_NUMBER: _ClassVar[int]
    ROUND_CONFIG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    network: str
    algorithm: str
    omega_tilde: _containers.RepeatedScalarFieldContainer[str]
    round_config: RoundConfig
    seed: int
    wire_dtype: _tensor_pb2.DType
    accepted_dtypes: _containers.RepeatedScalarFieldContainer[_tensor_pb2.DType]
    max_chunk_bytes: int
    max_update_bytes: int
    heartbeat_interval_seconds: float
    initial_loss: float
    weight: float
    resumed: bool
    network_fingerprint: str
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ..., network: _Optional[str] = ..., algorithm: _Optional[str] = ..., omega_tilde: _Optional[_Iterable[str]] = ..., round_config: _Optional[_Union[RoundConfig, _Mapping]] = ..., seed: _Optional[int] = ..., wire_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., accepted_dtypes: _Optional[_Iterable[_Union[_tensor_pb2.DType, str]]] = ..., max_chunk_bytes: _Optional[int] = ..., max_update_bytes: _Optional[int] = ..., heartbeat_interval_seconds: _Optional[float] = ..., initial_loss: _Optional[float] = ..., weight: _Optional[float] = ..., resumed: _Optional[bool] = ..., network_fingerprint: _Optional[str] = ...) -> None: ...

class FetchRoundRequest(_message.Message):
    __slots__ = ("node_id", "session_token", "wait_seconds", "dtype", "without_final_model")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WITHOUT_FINAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    wait_seconds: float
    dtype: _tensor_pb2.DType
    without_final_model: bool
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ..., wait_seconds: _Optional[float] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., without_final_model: _Optional[bool] = ...) -> None: ...

class RoundHeader(_message.Message):
    __slots__ = ("status", "round", "deadline_unix_seconds", "tensors", "total_bytes", "last_used_round")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_ROUND_FIELD_NUMBER: _ClassVar[int]
    status: RoundStatus
    round: int
    deadline_unix_seconds: float
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    total_bytes: int
    last_used_round: int
    def __init__(self, status: _Optional[_Union[RoundStatus, str]] = ..., round: _Optional[int] = ..., deadline_unix_seconds: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., last_used_round: _Optional[int] = ...) -> None: ...

class FetchRoundResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RoundHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[RoundHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class SubmitHeader(_message.Message):
    __slots__ = ("node_id", "session_token", "round", "tensors", "total_bytes", "loss", "initial_loss", "loss_ratio", "num_samples", "test_loss", "test_metrics")
    class TestMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_RATIO_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    total_bytes: int
    loss: float
    initial_loss: float
    loss_ratio: float
    num_samples: int
    test_loss: float
    test_metrics: _containers.ScalarMap[str, float]
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ..., round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., loss: _Optional[float] = ..., initial_loss: _Optional[float] = ..., loss_ratio: _Optional[float] = ..., num_samples: _Optional[int] = ..., test_loss: _Optional[float] = ..., test_metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SubmitHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[SubmitHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("accepted", "round", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round: int
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., round: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("node_id", "session_token")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "session_token")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("round", "registered")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    round: int
    registered: bool
    def __init__(self, round: _Optional[int] = ..., registered: _Optional[bool] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("gamma", "alpha", "beta", "tau_h", "tau_omega", "batch_size", "min_nodes", "round_timeout_seconds")
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    TAU_H_FIELD_NUMBER: _ClassVar[int]
    TAU_OMEGA_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_NODES_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    gamma: float
    alpha: float
    beta: float
    tau_h: int
    tau_omega: int
    batch_size: int
    min_nodes: int
    round_timeout_seconds: float
    def __init__(self, gamma: _Optional[float] = ..., alpha: _Optional[float] = ..., beta: _Optional[float] = ..., tau_h: _Optional[int] = ..., tau_omega: _Optional[int] = ..., batch_size: _Optional[int] = ..., min_nodes: _Optional[int] = ..., round_timeout_seconds: _Optional[float] = ...) -> None: ...

class NodeState(_message.Message):
    __slots__ = ("node_id", "node_name", "task", "weight", "loss_ratio", "grad_norm", "train_loss", "initial_loss", "test_loss", "test_metrics", "num_samples", "active", "last_round", "registered_unix_seconds", "relay")
    class TestMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LOSS_RATIO_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_name: str
    task: str
    weight: float
    loss_ratio: float
    grad_norm: float
    train_loss: float
    initial_loss: float
    test_loss: float
    test_metrics: _containers.ScalarMap[str, float]
    num_samples: int
    active: bool
    last_round: int
    registered_unix_seconds: float
    relay: str
    def __init__(self, node_id: _Optional[str] = ..., node_name: _Optional[str] = ..., task: _Optional[str] = ..., weight: _Optional[float] = ..., loss_ratio: _Optional[float] = ..., grad_norm: _Optional[float] = ..., train_loss: _Optional[float] = ..., initial_loss: _Optional[float] = ..., test_loss: _Optional[float] = ..., test_metrics: _Optional[_Mapping[str, float]] = ..., num_samples: _Optional[int] = ..., active: _Optional[bool] = ..., last_round: _Optional[int] = ..., registered_unix_seconds: _Optional[float] = ..., relay: _Optional[str] = ...) -> None: ...

class GetStateResponse(_message.Message):
    __slots__ = ("round", "phase", "algorithm", "federation", "network", "hyperparameters", "nodes", "halted_reason", "last_committed_round", "next_page_token", "total_nodes", "network_fingerprint")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    HALTED_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NODES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: Phase
    algorithm: str
    federation: str
    network: str
    hyperparameters: Hyperparameters
    nodes: _containers.RepeatedCompositeFieldContainer[NodeState]
    halted_reason: str
    last_committed_round: int
    next_page_token: str
    total_nodes: int
    network_fingerprint: str
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., algorithm: _Optional[str] = ..., federation: _Optional[str] = ..., network: _Optional[str] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., nodes: _Optional[_Iterable[_Union[NodeState, _Mapping]]] = ..., halted_reason: _Optional[str] = ..., last_committed_round: _Optional[int] = ..., next_page_token: _Optional[str] = ..., total_nodes: _Optional[int] = ..., network_fingerprint: _Optional[str] = ...) -> None: ...
