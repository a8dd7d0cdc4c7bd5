"""Typed link messages, and the only place that converts them to and from protobuf.

Above this module nothing sees protobuf: a link yields Forward/Backward/ErrorReport/Hello/Notice
objects with decoded, validated tensors. Tensors bigger than `chunk_bytes` travel as a header
followed by Chunk messages on the same ordered stream; `Reassembler` joins them back, with a cap
on the total so a peer cannot make us buffer unbounded data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from node.data import MicrobatchId
from node.wire._pb import stage_pb2 as pb
from node.wire.codec import WireCodec, WireError, decode, encode
from node.wire.kinds import MAX_MICROBATCHES

GRPC_FRAME_OVERHEAD = 5  # gRPC length-prefixed message header, per message on the wire


@dataclass(frozen=True)
class Hello:
    stage: int
    model_fingerprint: str
    peer_id: str = ""
    version: str = ""
    public_key: bytes = b""  # the handshake (node/handshake.py) checks these three
    nonce: bytes = b""
    signature: bytes = b""


@dataclass(frozen=True)
class Forward:
    id: MicrobatchId
    z: torch.Tensor | None  # (B, T, b) fp32 after decoding
    offsets: torch.Tensor  # (B,) int64
    data_fingerprint: str
    replay_of: str = ""  # recovery: re-sent because node `replay_of` died
    grad_needed: bool = True  # recovery: False when the sender already has the dL/dz


@dataclass(frozen=True)
class Backward:
    id: MicrobatchId
    grad: torch.Tensor | None  # (B, T, b); None only in a recovery claim (grad not ready yet)
    replay_of: str = ""  # recovery: the dead node this microbatch had come through


class NoticeKind(IntEnum):
    step_done = 1  # the sender holds the gradients of `ids` of `step`, and will get no more
    leaving = 2  # the sender drains: route no new microbatches to it
    replay_end = 3  # the sender has re-sent everything it held of dead node `peer`
    forwarded = 4  # the sender has forwarded `ids` of `step`, and will forward no more


NOTICE_KINDS = frozenset(k.value for k in NoticeKind)  # what this version decodes


@dataclass(frozen=True)
class Notice:
    kind: NoticeKind
    step: int
    ids: tuple[int, ...] = ()
    peer: str = ""


@dataclass(frozen=True)
class ErrorReport:
    id: MicrobatchId | None
    code: str
    message: str


Message = Hello | Forward | Backward | ErrorReport | Notice


HELD_MIN = 1024  # bytes a decoded message holds at least (the objects around its tensors)


def held_bytes(msg) -> int:
    """What a decoded message holds in memory, for byte budgets (the inbox, the early buffer,
    adoptions): its tensors as decoded (an int8 wire tensor is fp32 here), and HELD_MIN."""
    n = HELD_MIN + 8 * len(getattr(msg, "ids", ()) or ())
    for name in ("z", "grad", "offsets"):
        t = getattr(msg, name, None)
        if isinstance(t, torch.Tensor):
            n += t.element_size() * t.numel()
    return n


# ---- domain -> protobuf --------------------------------------------------------------------
def step_of(msg) -> int | None:
    """The step a link message is about: its microbatch's, or a notice's."""
    return getattr(getattr(msg, "id", None), "step", getattr(msg, "step", None))


def _mid(mid: MicrobatchId | None) -> pb.MicrobatchId | None:
    return None if mid is None else pb.MicrobatchId(step=mid.step, index=mid.index)


def to_pb(msg: Message, codec: WireCodec) -> pb.LinkMessage:
    if isinstance(msg, Forward):
        z = encode(msg.z, codec) if msg.z is not None else None
        return pb.LinkMessage(
            forward=pb.Forward(
                id=_mid(msg.id),
                z=z,
                offsets=msg.offsets.tolist(),
                data_fingerprint=msg.data_fingerprint,
                replay_of=msg.replay_of,
                grad_needed=msg.grad_needed,
            )
        )
    if isinstance(msg, Backward):
        grad = encode(msg.grad, codec) if msg.grad is not None else None
        return pb.LinkMessage(
            backward=pb.Backward(id=_mid(msg.id), grad=grad, replay_of=msg.replay_of)
        )
    if isinstance(msg, Notice):
        return pb.LinkMessage(
            notice=pb.Notice(kind=int(msg.kind), step=msg.step, ids=list(msg.ids), peer=msg.peer)
        )
    if isinstance(msg, ErrorReport):
        return pb.LinkMessage(error=pb.Error(id=_mid(msg.id), code=msg.code, message=msg.message))
    if isinstance(msg, Hello):
        return pb.LinkMessage(
            hello=pb.Hello(
                stage=msg.stage,
                model_fingerprint=msg.model_fingerprint,
                peer_id=msg.peer_id,
                version=msg.version,
                public_key=msg.public_key,
                nonce=msg.nonce,
                signature=msg.signature,
            )
        )
    raise TypeError(f"not a link message: {type(msg).__name__}")


def split(msg: pb.LinkMessage, chunk_bytes: int) -> list[pb.LinkMessage]:
    """One message, or a header + Chunk messages when its tensor is bigger than chunk_bytes."""
    kind = msg.WhichOneof("body")
    tensor = (
        msg.forward.z if kind == "forward" else msg.backward.grad if kind == "backward" else None
    )
    if tensor is None or len(tensor.data) <= chunk_bytes:
        return [msg]
    data = tensor.data
    parts = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    tensor.data = b""
    tensor.chunks, tensor.total_bytes = len(parts), len(data)
    return [msg] + [pb.LinkMessage(chunk=pb.Chunk(data=p, seq=i)) for i, p in enumerate(parts)]


def wire_size(msg: pb.LinkMessage) -> int:
    return msg.ByteSize() + GRPC_FRAME_OVERHEAD


# ---- protobuf -> domain --------------------------------------------------------------------
class Reassembler:
    """Joins chunked tensors back, per stream. Holds at most one partial message at a time."""

    def __init__(self, max_tensor_bytes: int):
        self.max_tensor_bytes = max_tensor_bytes
        self._head: pb.LinkMessage | None = None
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, msg: pb.LinkMessage) -> pb.LinkMessage | None:
        """Returns a complete message, or None while chunks are still due."""
        kind = msg.WhichOneof("body")
        if kind == "chunk":
            if self._head is None:
                raise WireError("INVALID_ARGUMENT", "chunk without a preceding tensor header")
            if not msg.chunk.data:
                self._reset()
                raise WireError("INVALID_ARGUMENT", "empty chunk")
            if msg.chunk.seq != len(self._parts):
                self._reset()
                raise WireError("INVALID_ARGUMENT", "chunks out of order")
            self._size += len(msg.chunk.data)
            if self._size > self.max_tensor_bytes:
                self._reset()
                raise WireError("RESOURCE_EXHAUSTED", f"tensor over {self.max_tensor_bytes} bytes")
            self._parts.append(msg.chunk.data)
            t = _tensor_of(self._head)
            if len(self._parts) < t.chunks:
                return None
            t.data, t.chunks = b"".join(self._parts), 0
            head = self._head
            self._reset()
            return head
        if self._head is not None:
            self._reset()
            raise WireError("INVALID_ARGUMENT", f"{kind} arrived while chunks were still due")
        t = _tensor_of(msg)
        if t is not None and t.chunks:
            if t.chunks > t.total_bytes:
                raise WireError("INVALID_ARGUMENT", f"{t.chunks} chunks for {t.total_bytes} bytes")
            if t.total_bytes > self.max_tensor_bytes:
                raise WireError(
                    "RESOURCE_EXHAUSTED",
                    f"tensor of {t.total_bytes} bytes over {self.max_tensor_bytes}",
                )
            self._head = msg
            return None
        return msg

    def _reset(self) -> None:
        self._head, self._parts, self._size = None, [], 0


def _tensor_of(msg: pb.LinkMessage) -> pb.Tensor | None:
    kind = msg.WhichOneof("body")
    if kind == "forward" and msg.forward.HasField("z"):
        return msg.forward.z
    if kind == "backward" and msg.backward.HasField("grad"):
        return msg.backward.grad
    return None


def _id(m: pb.MicrobatchId) -> MicrobatchId:
    return MicrobatchId(int(m.step), int(m.index))


def printable(text: str, limit: int = 1000) -> str:
    """A peer's text as our logs may show it: cut to `limit`, every character that is not
    printable (newlines, escapes, bidi controls) replaced by '?' (a peer's words went into the
    logs verbatim: #10 L)."""
    text = text[:limit]
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def from_pb(
    msg: pb.LinkMessage,
    tensor_shape: tuple[int, ...],
    batch_size: int,
    allowed: frozenset[WireCodec] | None = None,
) -> Message:
    """Validate and convert; raises WireError (with the microbatch id when known)."""
    kind = msg.WhichOneof("body")
    if kind == "forward":
        f = msg.forward
        if len(f.offsets) != batch_size:
            raise MessageError(
                _id(f.id),
                "INVALID_ARGUMENT",
                f"{len(f.offsets)} sample offsets, expected {batch_size}",
            )
        z = _decode_for(_id(f.id), f.z, tensor_shape, allowed) if f.HasField("z") else None
        return Forward(
            _id(f.id),
            z,
            torch.tensor(list(f.offsets), dtype=torch.int64),
            f.data_fingerprint,
            printable(f.replay_of, 200),
            f.grad_needed,
        )
    if kind == "backward":
        b = msg.backward
        if not b.HasField("grad") and not b.replay_of:
            raise MessageError(_id(b.id), "INVALID_ARGUMENT", "backward without a gradient")
        grad = _decode_for(_id(b.id), b.grad, tensor_shape, allowed) if b.HasField("grad") else None
        return Backward(_id(b.id), grad, printable(b.replay_of, 200))
    if kind == "notice":
        n = msg.notice
        ids = n.ids
        if n.kind not in NOTICE_KINDS or len(ids) > MAX_MICROBATCHES:
            raise WireError("INVALID_ARGUMENT", f"bad notice (kind {n.kind}, {len(ids)} ids)")
        if ids and not (min(ids) >= 0 and max(ids) < MAX_MICROBATCHES):
            raise WireError("INVALID_ARGUMENT", "a notice names a microbatch id out of range")
        return Notice(NoticeKind(n.kind), int(n.step), tuple(ids), printable(n.peer, 200))
    if kind == "error":
        e = msg.error
        return ErrorReport(
            _id(e.id) if e.HasField("id") else None, printable(e.code, 40), printable(e.message)
        )
    if kind == "hello":
        h = msg.hello
        return Hello(
            h.stage, printable(h.model_fingerprint, 100), printable(h.peer_id, 200),
            printable(h.version, 50), bytes(h.public_key[:64]), bytes(h.nonce[:64]),
            bytes(h.signature[:128]),
        )  # fmt: skip
    raise WireError("INVALID_ARGUMENT", f"unexpected message kind {kind!r}")


class MessageError(WireError):
    """A WireError about one known microbatch: the sender can be told which one."""

    def __init__(self, mid: MicrobatchId, code: str, message: str):
        super().__init__(code, f"microbatch ({mid.step}, {mid.index}): {message}")
        self.id = mid


def _decode_for(mid, tensor, shape, allowed) -> torch.Tensor:
    try:
        return decode(tensor, shape, allowed)
    except WireError as err:
        raise MessageError(mid, err.code, str(err)) from None


def uncompressed_bf16_bytes(
    shape: tuple[int, int, int], chunk_bytes: int, mid: MicrobatchId, offset: int
) -> int:
    """Wire bytes one microbatch costs across one boundary (forward + backward) in a plain bf16
    pipeline: the same messages and framing as ours (ids and offsets of the same size), but with
    (B, T, d) tensors. The baseline of `wire_compression_vs_bf16`."""
    full = torch.zeros(shape)
    offsets = torch.full((shape[0],), offset, dtype=torch.int64)
    fwd = to_pb(Forward(mid, full, offsets, "f" * 16), WireCodec.bf16)
    bwd = to_pb(Backward(mid, full), WireCodec.bf16)
    return sum(wire_size(p) for m in (fwd, bwd) for p in split(m, chunk_bytes))
