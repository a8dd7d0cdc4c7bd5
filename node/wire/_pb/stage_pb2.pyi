from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    FP32: _ClassVar[Codec]
    BF16: _ClassVar[Codec]
    FP16: _ClassVar[Codec]
    INT8_TENSOR: _ClassVar[Codec]
    INT8_CHANNEL: _ClassVar[Codec]
CODEC_UNSPECIFIED: Codec
FP32: Codec
BF16: Codec
FP16: Codec
INT8_TENSOR: Codec
INT8_CHANNEL: Codec

class Tensor(_message.Message):
    __slots__ = ("chunks", "codec", "data", "scales", "shape", "total_bytes")
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
    def __init__(self, codec: Codec | str | None = ..., shape: _Iterable[int] | None = ..., data: bytes | None = ..., scales: _Iterable[float] | None = ..., chunks: int | None = ..., total_bytes: int | None = ...) -> None: ...

class MicrobatchId(_message.Message):
    __slots__ = ("index", "step")
    STEP_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    step: int
    index: int
    def __init__(self, step: int | None = ..., index: int | None = ...) -> None: ...

class Forward(_message.Message):
    __slots__ = ("data_fingerprint", "id", "offsets", "z")
    ID_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    id: MicrobatchId
    z: Tensor
    offsets: _containers.RepeatedScalarFieldContainer[int]
    data_fingerprint: str
    def __init__(self, id: MicrobatchId | _Mapping | None = ..., z: Tensor | _Mapping | None = ..., offsets: _Iterable[int] | None = ..., data_fingerprint: str | None = ...) -> None: ...

class Backward(_message.Message):
    __slots__ = ("grad", "id")
    ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    id: MicrobatchId
    grad: Tensor
    def __init__(self, id: MicrobatchId | _Mapping | None = ..., grad: Tensor | _Mapping | None = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "seq")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    seq: int
    def __init__(self, data: bytes | None = ..., seq: int | None = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "id", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: MicrobatchId
    code: str
    message: str
    def __init__(self, id: MicrobatchId | _Mapping | None = ..., code: str | None = ..., message: str | None = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("model_fingerprint", "peer_id", "stage", "version")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    stage: int
    model_fingerprint: str
    peer_id: str
    version: str
    def __init__(self, stage: int | None = ..., model_fingerprint: str | None = ..., peer_id: str | None = ..., version: str | None = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    def __init__(self, steps: int | None = ...) -> None: ...

class LinkMessage(_message.Message):
    __slots__ = ("backward", "chunk", "done", "error", "forward", "hello")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    forward: Forward
    backward: Backward
    chunk: Chunk
    error: Error
    done: Done
    def __init__(self, hello: Hello | _Mapping | None = ..., forward: Forward | _Mapping | None = ..., backward: Backward | _Mapping | None = ..., chunk: Chunk | _Mapping | None = ..., error: Error | _Mapping | None = ..., done: Done | _Mapping | None = ...) -> None: ...
