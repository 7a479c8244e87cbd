from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as _aggregator_pb2
from fedgradnorm._proto.fedgradnorm.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WeightsStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHTS_STATUS_UNSPECIFIED: _ClassVar[WeightsStatus]
    WEIGHTS_STATUS_READY: _ClassVar[WeightsStatus]
    WEIGHTS_STATUS_NOT_YET: _ClassVar[WeightsStatus]
    WEIGHTS_STATUS_CLOSED: _ClassVar[WeightsStatus]
WEIGHTS_STATUS_UNSPECIFIED: WeightsStatus
WEIGHTS_STATUS_READY: WeightsStatus
WEIGHTS_STATUS_NOT_YET: WeightsStatus
WEIGHTS_STATUS_CLOSED: WeightsStatus

class RelaySession(_message.Message):
    __slots__ = ("relay_id", "session_token")
    RELAY_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    relay_id: str
    session_token: str
    def __init__(self, relay_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class AttachRelayRequest(_message.Message):
    __slots__ = ("enrollment_token", "relay_name", "federation", "network")
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RELAY_NAME_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    enrollment_token: str
    relay_name: str
    federation: str
    network: _aggregator_pb2.NetworkArchitecture
    def __init__(self, enrollment_token: _Optional[str] = ..., relay_name: _Optional[str] = ..., federation: _Optional[str] = ..., network: _Optional[_Union[_aggregator_pb2.NetworkArchitecture, _Mapping]] = ...) -> None: ...

class RelayMember(_message.Message):
    __slots__ = ("node_id", "token_sha256", "initial_loss")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SHA256_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    token_sha256: str
    initial_loss: float
    def __init__(self, node_id: _Optional[str] = ..., token_sha256: _Optional[str] = ..., initial_loss: _Optional[float] = ...) -> None: ...

class AttachRelayResponse(_message.Message):
    __slots__ = ("session", "settings", "hyperparameters", "members", "members_version", "relay_timeout_seconds")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_VERSION_FIELD_NUMBER: _ClassVar[int]
    RELAY_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session: RelaySession
    settings: _aggregator_pb2.RegisterResponse
    hyperparameters: _aggregator_pb2.Hyperparameters
    members: _containers.RepeatedCompositeFieldContainer[RelayMember]
    members_version: int
    relay_timeout_seconds: float
    def __init__(self, session: _Optional[_Union[RelaySession, _Mapping]] = ..., settings: _Optional[_Union[_aggregator_pb2.RegisterResponse, _Mapping]] = ..., hyperparameters: _Optional[_Union[_aggregator_pb2.Hyperparameters, _Mapping]] = ..., members: _Optional[_Iterable[_Union[RelayMember, _Mapping]]] = ..., members_version: _Optional[int] = ..., relay_timeout_seconds: _Optional[float] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("session", "request", "peer")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    session: RelaySession
    request: _aggregator_pb2.RegisterRequest
    peer: str
    def __init__(self, session: _Optional[_Union[RelaySession, _Mapping]] = ..., request: _Optional[_Union[_aggregator_pb2.RegisterRequest, _Mapping]] = ..., peer: _Optional[str] = ...) -> None: ...

class RelayHeartbeatRequest(_message.Message):
    __slots__ = ("session", "seen", "members_version")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_VERSION_FIELD_NUMBER: _ClassVar[int]
    session: RelaySession
    seen: _containers.RepeatedScalarFieldContainer[str]
    members_version: int
    def __init__(self, session: _Optional[_Union[RelaySession, _Mapping]] = ..., seen: _Optional[_Iterable[str]] = ..., members_version: _Optional[int] = ...) -> None: ...

class RelayHeartbeatResponse(_message.Message):
    __slots__ = ("round", "members_changed", "members", "members_version")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_VERSION_FIELD_NUMBER: _ClassVar[int]
    round: int
    members_changed: bool
    members: _containers.RepeatedCompositeFieldContainer[RelayMember]
    members_version: int
    def __init__(self, round: _Optional[int] = ..., members_changed: _Optional[bool] = ..., members: _Optional[_Iterable[_Union[RelayMember, _Mapping]]] = ..., members_version: _Optional[int] = ...) -> None: ...

class FetchRelayRoundRequest(_message.Message):
    __slots__ = ("session", "after_opening", "wait_seconds")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    AFTER_OPENING_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session: RelaySession
    after_opening: int
    wait_seconds: float
    def __init__(self, session: _Optional[_Union[RelaySession, _Mapping]] = ..., after_opening: _Optional[int] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class RelayParticipant(_message.Message):
    __slots__ = ("node_id", "initial_loss")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    initial_loss: float
    def __init__(self, node_id: _Optional[str] = ..., initial_loss: _Optional[float] = ...) -> None: ...

class RelayRoundHeader(_message.Message):
    __slots__ = ("status", "round", "deadline_unix_seconds", "participants", "tensors", "total_bytes", "opening")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPENING_FIELD_NUMBER: _ClassVar[int]
    status: _aggregator_pb2.RoundStatus
    round: int
    deadline_unix_seconds: float
    participants: _containers.RepeatedCompositeFieldContainer[RelayParticipant]
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    total_bytes: int
    opening: int
    def __init__(self, status: _Optional[_Union[_aggregator_pb2.RoundStatus, str]] = ..., round: _Optional[int] = ..., deadline_unix_seconds: _Optional[float] = ..., participants: _Optional[_Iterable[_Union[RelayParticipant, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., opening: _Optional[int] = ...) -> None: ...

class FetchRelayRoundResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RelayRoundHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[RelayRoundHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class RelayedUpdate(_message.Message):
    __slots__ = ("node_id", "loss", "initial_loss", "loss_ratio", "num_samples", "test_loss", "test_metrics", "norm", "tilde_norm")
    class TestMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_RATIO_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    TILDE_NORM_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    loss: float
    initial_loss: float
    loss_ratio: float
    num_samples: int
    test_loss: float
    test_metrics: _containers.ScalarMap[str, float]
    norm: float
    tilde_norm: float
    def __init__(self, node_id: _Optional[str] = ..., loss: _Optional[float] = ..., initial_loss: _Optional[float] = ..., loss_ratio: _Optional[float] = ..., num_samples: _Optional[int] = ..., test_loss: _Optional[float] = ..., test_metrics: _Optional[_Mapping[str, float]] = ..., norm: _Optional[float] = ..., tilde_norm: _Optional[float] = ...) -> None: ...

class ReportUpdatesRequest(_message.Message):
    __slots__ = ("session", "round", "updates")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    session: RelaySession
    round: int
    updates: _containers.RepeatedCompositeFieldContainer[RelayedUpdate]
    def __init__(self, session: _Optional[_Union[RelaySession, _Mapping]] = ..., round: _Optional[int] = ..., updates: _Optional[_Iterable[_Union[RelayedUpdate, _Mapping]]] = ...) -> None: ...

class RefusedUpdate(_message.Message):
    __slots__ = ("node_id", "reason", "message")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    message: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ReportUpdatesResponse(_message.Message):
    __slots__ = ("accepted", "refused")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    refused: _containers.RepeatedCompositeFieldContainer[RefusedUpdate]
    def __init__(self, accepted: _Optional[int] = ..., refused: _Optional[_Iterable[_Union[RefusedUpdate, _Mapping]]] = ...) -> None: ...

class FetchWeightsRequest(_message.Message):
    __slots__ = ("session", "opening", "after_attempt", "wait_seconds")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OPENING_FIELD_NUMBER: _ClassVar[int]
    AFTER_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session: RelaySession
    opening: int
    after_attempt: int
    wait_seconds: float
    def __init__(self, session: _Optional[_Union[RelaySession, _Mapping]] = ..., opening: _Optional[int] = ..., after_attempt: _Optional[int] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class NodeScale(_message.Message):
    __slots__ = ("node_id", "scale", "weight")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    scale: float
    weight: float
    def __init__(self, node_id: _Optional[str] = ..., scale: _Optional[float] = ..., weight: _Optional[float] = ...) -> None: ...

class FetchWeightsResponse(_message.Message):
    __slots__ = ("status", "attempt", "scales")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    status: WeightsStatus
    attempt: int
    scales: _containers.RepeatedCompositeFieldContainer[NodeScale]
    def __init__(self, status: _Optional[_Union[WeightsStatus, str]] = ..., attempt: _Optional[int] = ..., scales: _Optional[_Iterable[_Union[NodeScale, _Mapping]]] = ...) -> None: ...

class PartialSumHeader(_message.Message):
    __slots__ = ("session", "opening", "attempt", "tensors", "total_bytes")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OPENING_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    session: RelaySession
    opening: int
    attempt: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    total_bytes: int
    def __init__(self, session: _Optional[_Union[RelaySession, _Mapping]] = ..., opening: _Optional[int] = ..., attempt: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class SubmitPartialSumRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PartialSumHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[PartialSumHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class SubmitPartialSumResponse(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
