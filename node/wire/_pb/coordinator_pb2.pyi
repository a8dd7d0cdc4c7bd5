from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("node_id", "swarm", "version", "fingerprint", "throughput", "wanted_stage", "settings_json", "signed")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SWARM_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    WANTED_STAGE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    swarm: str
    version: str
    fingerprint: str
    throughput: float
    wanted_stage: int
    settings_json: str
    signed: Signature
    def __init__(self, node_id: _Optional[str] = ..., swarm: _Optional[str] = ..., version: _Optional[str] = ..., fingerprint: _Optional[str] = ..., throughput: _Optional[float] = ..., wanted_stage: _Optional[int] = ..., settings_json: _Optional[str] = ..., signed: _Optional[_Union[Signature, _Mapping]] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ("public_key", "signed_at", "signature")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    signed_at: float
    signature: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., signed_at: _Optional[float] = ..., signature: _Optional[bytes] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("stage", "manifest_json", "initial_peers", "coordinator_id")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    stage: int
    manifest_json: str
    initial_peers: _containers.RepeatedScalarFieldContainer[str]
    coordinator_id: str
    def __init__(self, stage: _Optional[int] = ..., manifest_json: _Optional[str] = ..., initial_peers: _Optional[_Iterable[str]] = ..., coordinator_id: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id", "stage", "signed")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    stage: int
    signed: Signature
    def __init__(self, node_id: _Optional[str] = ..., stage: _Optional[int] = ..., signed: _Optional[_Union[Signature, _Mapping]] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Replica(_message.Message):
    __slots__ = ("node_id", "state", "throughput", "load", "step", "address", "version", "loss")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: str
    throughput: float
    load: int
    step: int
    address: str
    version: str
    loss: float
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[str] = ..., throughput: _Optional[float] = ..., load: _Optional[int] = ..., step: _Optional[int] = ..., address: _Optional[str] = ..., version: _Optional[str] = ..., loss: _Optional[float] = ...) -> None: ...

class StageReplicas(_message.Message):
    __slots__ = ("stage", "replicas", "checkpoint_step")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    stage: int
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    checkpoint_step: int
    def __init__(self, stage: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., checkpoint_step: _Optional[int] = ...) -> None: ...

class LossPoint(_message.Message):
    __slots__ = ("step", "loss", "time")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    time: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., time: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("manifest_json", "n_stages", "current_step", "recent_loss", "stages", "initial_peers", "loss_history", "history_since", "model_params")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    N_STAGES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    RECENT_LOSS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    LOSS_HISTORY_FIELD_NUMBER: _ClassVar[int]
    HISTORY_SINCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    manifest_json: str
    n_stages: int
    current_step: int
    recent_loss: float
    stages: _containers.RepeatedCompositeFieldContainer[StageReplicas]
    initial_peers: _containers.RepeatedScalarFieldContainer[str]
    loss_history: _containers.RepeatedCompositeFieldContainer[LossPoint]
    history_since: float
    model_params: int
    def __init__(self, manifest_json: _Optional[str] = ..., n_stages: _Optional[int] = ..., current_step: _Optional[int] = ..., recent_loss: _Optional[float] = ..., stages: _Optional[_Iterable[_Union[StageReplicas, _Mapping]]] = ..., initial_peers: _Optional[_Iterable[str]] = ..., loss_history: _Optional[_Iterable[_Union[LossPoint, _Mapping]]] = ..., history_since: _Optional[float] = ..., model_params: _Optional[int] = ...) -> None: ...
