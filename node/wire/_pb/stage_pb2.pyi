from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    FP32: _ClassVar[Codec]
    BF16: _ClassVar[Codec]
    FP16: _ClassVar[Codec]
    INT8_TENSOR: _ClassVar[Codec]
    INT8_CHANNEL: _ClassVar[Codec]
    INT4_CHANNEL: _ClassVar[Codec]
CODEC_UNSPECIFIED: Codec
FP32: Codec
BF16: Codec
FP16: Codec
INT8_TENSOR: Codec
INT8_CHANNEL: Codec
INT4_CHANNEL: Codec

class Tensor(_message.Message):
    __slots__ = ("codec", "shape", "data", "scales", "chunks", "total_bytes")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    codec: Codec
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scales: _containers.RepeatedScalarFieldContainer[float]
    chunks: int
    total_bytes: int
    def __init__(self, codec: _Optional[_Union[Codec, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scales: _Optional[_Iterable[float]] = ..., chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class MicrobatchId(_message.Message):
    __slots__ = ("step", "index")
    STEP_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    step: int
    index: int
    def __init__(self, step: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class Forward(_message.Message):
    __slots__ = ("id", "z", "offsets", "data_fingerprint", "replay_of", "grad_needed")
    ID_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REPLAY_OF_FIELD_NUMBER: _ClassVar[int]
    GRAD_NEEDED_FIELD_NUMBER: _ClassVar[int]
    id: MicrobatchId
    z: Tensor
    offsets: _containers.RepeatedScalarFieldContainer[int]
    data_fingerprint: str
    replay_of: str
    grad_needed: bool
    def __init__(self, id: _Optional[_Union[MicrobatchId, _Mapping]] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ..., offsets: _Optional[_Iterable[int]] = ..., data_fingerprint: _Optional[str] = ..., replay_of: _Optional[str] = ..., grad_needed: _Optional[bool] = ...) -> None: ...

class Backward(_message.Message):
    __slots__ = ("id", "grad", "replay_of")
    ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    REPLAY_OF_FIELD_NUMBER: _ClassVar[int]
    id: MicrobatchId
    grad: Tensor
    replay_of: str
    def __init__(self, id: _Optional[_Union[MicrobatchId, _Mapping]] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., replay_of: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "seq")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    seq: int
    def __init__(self, data: _Optional[bytes] = ..., seq: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("id", "code", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: MicrobatchId
    code: str
    message: str
    def __init__(self, id: _Optional[_Union[MicrobatchId, _Mapping]] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("stage", "model_fingerprint", "peer_id", "version", "public_key", "nonce", "signature")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    stage: int
    model_fingerprint: str
    peer_id: str
    version: str
    public_key: bytes
    nonce: bytes
    signature: bytes
    def __init__(self, stage: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., peer_id: _Optional[str] = ..., version: _Optional[str] = ..., public_key: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("kind", "step", "ids", "peer")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Notice.Kind]
        STEP_DONE: _ClassVar[Notice.Kind]
        LEAVING: _ClassVar[Notice.Kind]
        REPLAY_END: _ClassVar[Notice.Kind]
        FORWARDED: _ClassVar[Notice.Kind]
    KIND_UNSPECIFIED: Notice.Kind
    STEP_DONE: Notice.Kind
    LEAVING: Notice.Kind
    REPLAY_END: Notice.Kind
    FORWARDED: Notice.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    kind: Notice.Kind
    step: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    peer: str
    def __init__(self, kind: _Optional[_Union[Notice.Kind, str]] = ..., step: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., peer: _Optional[str] = ...) -> None: ...

class LinkMessage(_message.Message):
    __slots__ = ("hello", "forward", "backward", "chunk", "error", "notice")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    forward: Forward
    backward: Backward
    chunk: Chunk
    error: Error
    notice: Notice
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., forward: _Optional[_Union[Forward, _Mapping]] = ..., backward: _Optional[_Union[Backward, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., notice: _Optional[_Union[Notice, _Mapping]] = ...) -> None: ...
