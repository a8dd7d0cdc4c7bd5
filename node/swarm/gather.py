"""An all-gather on hivemind's averager: every member of a group gets every other member's whole
vector, so each computes the stage's update itself (node/protocol/robust.py).

This runs in the averager's child process. hivemind's matchmaking forms the group (and
all-gathers each member's small info); `_aggregate_with_group`, hivemind's hook for the
aggregation itself, is replaced: instead of its butterfly all-reduce, in which each member
reduces one slice for everyone (a hostile one could return anything for its slice), each pair of
members swaps vectors on one stream of hivemind's p2p layer, whose peer ids are authenticated.

Then the members swap a digest of everything they received: a member that sent different
vectors to different members (so that honest replicas would apply different updates) makes every
honest member's round fail, and none applies it.

A member behind NAT (hivemind's client mode) serves no streams: it calls every reachable member,
and the first reachable member in the group's order (its relay) passes it the other clients'
vectors and digests, tagged with their peer ids. It cannot forge either: each member's signed
round info commits to its vector (averaging.py), and each member signs its digest with its node
key (over the group id, its peer id and the digest), checked against the key its info names.

Cost: each member sends its vector to each other member, (n - 1) x its size, where the
all-reduce sent about 2x; replicas of a stage are few.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

# typing's AsyncIterator, not collections.abc's: hivemind finds stream handlers by its _name
from typing import Any, AsyncIterator  # noqa: UP035

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import enter_asynchronously

from common.identity import id_of, transcript, verify
from node.swarm.p2p_key import peer_id_of

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # of a vector, per message
SERVICE = "ResbmAverager/1"  # the p2p handlers' name: only members of this protocol meet
VECTOR = "float32"  # the dtype tag of a vector chunk
DIGEST = "sha256"  # the dtype tag of the digest message
DIGEST_BYTES = 32
SIGNATURE_BYTES = 64  # Ed25519, after the digest in a digest message
DIGEST_DOMAIN = "resbm-digest/1"  # what a member's digest signature is for
MAX_GROUP = 64  # members: a leader listing thousands would have us open a stream to each
MAX_INFO_BYTES = 1 << 20  # one member's gathered bytes


class Refused(AllreduceException):
    """A member broke the protocol: this round is void (the next is a fresh group)."""


class Gathering:
    """One group's all-gather: our vector, the members' vectors as they arrive, their digests."""

    def __init__(
        self, group: GroupInfo, me: PeerID, own: bytes, modes: list[AveragingMode],
        keys: dict[PeerID, Any] | None = None, identity=None,
    ):  # fmt: skip
        """`keys`: each member's node key, as its round info names it (its digest must be
        signed by it); `identity`: ours, to sign our digest."""
        self.group_id, self.order, self.me, self.own = group.group_id, list(group.peer_ids), me, own
        self.keys, self.identity = keys or {}, identity
        self.modes = dict(zip(self.order, modes, strict=True))
        self.index = {p: i for i, p in enumerate(self.order)}
        # the group as the leader showed it to us: members, modes and everyone's round info. A
        # leader that shows members different groups or infos fails the digest comparison
        pairs = zip(self.order, group.gathered, strict=True)
        seen = b"".join(p.to_bytes() + hashlib.sha256(info).digest() for p, info in pairs)
        self.view = hashlib.sha256(seen + group.group_id).digest()
        self.vectors: dict[PeerID, bytes] = {me: own}
        self.digests: dict[PeerID, bytes] = {}
        self.signed: dict[PeerID, bytes] = {}  # the digest messages as sent (a relay passes them)
        self.complete = asyncio.Event()  # every member's vector is here
        self.done = asyncio.Event()  # ... and every member's digest (or a failure)
        self.failure: str | None = None
        self.tasks: list[asyncio.Task] = []  # our calls to the members we open streams to
        # a member's peer id is its node key's (p2p_key.py): one that is not was made up (a
        # leader's member in an honest member's slot), and the whole round is void
        for peer, key in self.keys.items():
            with contextlib.suppress(ValueError, TypeError):  # malformed: admit leaves it out
                if peer_id_of(key) != peer.to_bytes():
                    self.fail(f"member {str(peer)[:16]}'s peer id is not its node key's")

    def finalize(self, cancel: bool = True) -> set:
        """What hivemind's shutdown calls on each running group: our calls, cancelled."""
        self.fail("the averager is shutting down")
        for t in self.tasks:
            t.cancel()
        return set(self.tasks)

    def calls(self, a: PeerID, b: PeerID) -> bool:
        """Does member `a` open a stream to `b`? A client calls every reachable member; of two
        reachable members, the earlier in the group's order calls the later; two clients never
        meet (the relay passes their vectors on)."""
        if self.modes[b] == AveragingMode.CLIENT:
            return False
        if self.modes[a] == AveragingMode.CLIENT:
            return True
        return self.index[a] < self.index[b]

    @property
    def relay(self) -> PeerID | None:
        """The first reachable member: it passes clients each other's vectors and digests."""
        return next((p for p in self.order if self.modes[p] != AveragingMode.CLIENT), None)

    def relays_to(self, client: PeerID) -> list[PeerID]:
        """The members whose vector and digest we pass on to `client` (we are its relay)."""
        if self.me != self.relay or self.modes[client] != AveragingMode.CLIENT:
            return []
        return [p for p in self.order if self.modes[p] == AveragingMode.CLIENT and p != client]

    def relayed_from(self, peer: PeerID) -> list[PeerID]:
        """The members whose vector and digest `peer` passes on to us."""
        if peer != self.relay or self.modes[self.me] != AveragingMode.CLIENT:
            return []
        return [p for p in self.order if self.modes[p] == AveragingMode.CLIENT and p != self.me]

    def got_vector(self, peer: PeerID, data: bytes) -> None:
        if peer in self.vectors:
            return self.fail(f"{peer} sent its vector twice")
        self.vectors[peer] = data
        if len(self.vectors) == len(self.order):
            self.complete.set()

    def got_digest(self, peer: PeerID, signed: bytes) -> None:
        """A member's digest and its signature (whoever passed it on: a relay cannot forge it,
        so it cannot hide from two clients behind NAT that they saw different vectors)."""
        if peer in self.digests or peer == self.me:
            return self.fail(f"{peer} sent its digest twice")
        digest, signature = signed[:DIGEST_BYTES], signed[DIGEST_BYTES:]
        key = self.keys.get(peer)
        why = "no key in its round info"
        if isinstance(key, bytes):
            message = transcript(DIGEST_DOMAIN, self.group_id, peer.to_bytes(), digest)
            why = verify(id_of(key), key, message, signature)
        if why:
            return self.fail(f"{peer}'s digest: {why}")
        self.digests[peer], self.signed[peer] = digest, signed
        if len(self.digests) == len(self.order) - 1:
            self.done.set()

    def signed_digest(self) -> bytes:
        """Our digest, then our signature over it."""
        digest = self.digest()
        message = transcript(DIGEST_DOMAIN, self.group_id, self.me.to_bytes(), digest)
        return digest + self.identity.sign(message)

    def digest(self) -> bytes:
        h = hashlib.sha256(self.view)
        for peer in self.order:
            h.update(peer.to_bytes())
            h.update(hashlib.sha256(self.vectors[peer]).digest())
        return h.digest()

    def fail(self, why: str) -> None:
        self.failure = self.failure or why
        self.complete.set()
        self.done.set()


class GatheringAverager(DecentralizedAverager):
    """hivemind's averager with the all-gather in place of the all-reduce. `identity`: the
    node's key, which signs our digests (set before hivemind forks its process)."""

    _rpc_handlers = None  # hivemind caches these per class (and a subclass inherits the cache)

    def __init__(self, *args, identity=None, **kwargs):
        self.identity = identity
        super().__init__(*args, **kwargs)

    _stub_type = None

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        """One name for every class of this protocol (hivemind uses the class's name)."""
        name = f"{SERVICE}.{method_name}"
        return name if namespace is None else f"{namespace}::{name}"

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        try:
            if len(group_info.peer_ids) > MAX_GROUP:
                raise ValueError(f"{len(group_info.peer_ids)} members, over {MAX_GROUP}")
            gathered = [strict_loads(g) for g in group_info.gathered]
            modes = [AveragingMode(int(mode)) for _, mode, _ in gathered]
            peers = group_info.peer_ids
            infos = {p: strict_loads(g[2]) for p, g in zip(peers, gathered, strict=True)}
        except Exception as err:  # the leader's bytes: a peer's input
            self._running_groups[group_info.group_id].set_exception(Refused("malformed group"))
            raise Refused(f"malformed group info: {err}") from None
        async with enter_asynchronously(self.get_tensors()) as (buf,):
            own = buf.numpy().tobytes()
        keys = {p: info.get("key") if isinstance(info, dict) else None for p, info in infos.items()}
        g = Gathering(group_info, self.peer_id, own, modes, keys, self.identity)
        self._running_groups[group_info.group_id].set_result(g)  # before any raise: see rpc
        if g.relay is None:
            raise Refused("every member is behind NAT: nobody can serve the others")
        g.tasks = [
            asyncio.create_task(self._call(g, peer))
            for peer in g.order
            if peer != g.me and g.calls(g.me, peer)
        ]
        try:
            await g.done.wait()  # hivemind's _step bounds the whole with allreduce_timeout
        finally:
            if not g.done.is_set():  # cancelled (timed out): every handler of ours stops too
                g.fail("the round timed out")
            for t in g.tasks:
                t.cancel()
            await asyncio.gather(*g.tasks, return_exceptions=True)
        if g.failure:
            raise Refused(g.failure)
        ours = g.digest()
        differ = [str(p) for p, d in g.digests.items() if d != ours]
        if differ:
            raise Refused(f"members saw different vectors (digests differ: {', '.join(differ)})")
        return {p: {"info": infos[p], "vector": g.vectors[p]} for p in g.order}

    # ---- the two ends of a pair's stream ----------------------------------------------------
    async def _call(self, g: Gathering, peer: PeerID) -> None:
        try:
            stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
            stream = await stub.rpc_gather(self._send(g, peer))
            await self._receive(g, peer, stream)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            return g.fail(f"the stream to {peer} failed: {err!r}")
        # we have all we wanted from `peer`. Read on to the end of the call, which ends once
        # it has our digest (hivemind cancels what we have not yet written when we stop
        # reading: found by the tests); an error now is only the peer's to see (it closed
        # first: writing our end of the stream breaks the pipe)
        try:
            async with asyncio.timeout(self._allreduce_timeout):
                async for _ in stream:
                    return g.fail(f"{peer} sent more than it should")
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.debug("the end of the stream to %s: %r", peer, err)

    async def rpc_gather(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A member of our group calls with its vector; we answer with ours."""
        peer = context.remote_id
        try:
            first = await asyncio.wait_for(anext(stream), self._allreduce_timeout)
            if first.group_id not in self._running_groups:
                await asyncio.wait_for(self._pending_groups_registered.wait(), 10.0)
            future = self._running_groups.get(first.group_id)
            g = await asyncio.wait_for(asyncio.shield(future), 10.0) if future else None
        except Exception:  # TimeoutError included
            g = None
        if not isinstance(g, Gathering) or peer not in g.index or not g.calls(peer, g.me):
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        try:
            async with asyncio.timeout(self._allreduce_timeout):  # the whole call, too
                async for msg in self._serve(g, peer, first, stream):
                    yield msg
        except asyncio.CancelledError:
            raise
        except Exception as err:
            g.fail(f"{peer}'s stream failed: {err!r}")

    async def _serve(self, g: Gathering, peer: PeerID, first, stream):
        await self._receive(g, peer, _chain(first, stream), vector_only=True)
        if g.failure:
            return
        async for msg in self._send(g, peer):
            yield msg
        msg = await asyncio.wait_for(anext(stream), self._allreduce_timeout)
        if _origin(msg, peer) != peer:
            g.fail(f"{peer} sent a digest out of turn")
            return
        self._take_digest(g, peer, msg)
        if g.relays_to(peer):  # then the other clients' digests, once we have them all
            await asyncio.wait_for(g.done.wait(), self._allreduce_timeout)
            for origin in g.relays_to(peer):
                if origin not in g.digests:
                    return
                yield _message(g, g.signed[origin], DIGEST, origin)

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """hivemind's all-reduce call, which this protocol does not use."""
        yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)

    async def _send(self, g: Gathering, peer: PeerID):
        """Our vector (`_outgoing`); once every member's vector is here, the other clients' (if
        we are `peer`'s relay); then our digest."""
        for chunk in self._outgoing(g, peer):
            yield _message(g, chunk, VECTOR)
        await g.complete.wait()
        if g.failure is not None:
            return
        for origin in g.relays_to(peer):
            data = g.vectors[origin]
            for i in range(0, len(data), CHUNK_BYTES):
                yield _message(g, data[i : i + CHUNK_BYTES], VECTOR, origin)
        yield _message(g, g.signed_digest(), DIGEST)

    def _outgoing(self, g: Gathering, peer: PeerID) -> list[bytes]:
        """Our vector for `peer`, in chunks (the same for every member, unless a test's hostile
        member overrides this)."""
        return [g.own[i : i + CHUNK_BYTES] for i in range(0, len(g.own), CHUNK_BYTES)] or [b""]

    async def _receive(self, g: Gathering, peer: PeerID, stream, vector_only: bool = False):
        """A member's vector, checked chunk by chunk (exactly our size, in float32); on the
        caller's end, then the vectors it relays to us, its digest and the digests it relays."""
        relayed = g.relayed_from(peer)
        for origin in [peer] if vector_only else [peer, *relayed]:
            want, parts, size = len(g.own), [], 0
            while size < want:
                msg = await asyncio.wait_for(anext(stream), self._allreduce_timeout)
                part = msg.tensor_part
                if msg.code != averaging_pb2.PART_FOR_AVERAGING or part.dtype != VECTOR:
                    return g.fail(f"{peer} sent {averaging_pb2.MessageCode.Name(msg.code)}, "
                                  "not a vector")  # fmt: skip
                if _origin(msg, peer) != origin:
                    return g.fail(f"{peer} sent a vector out of turn")
                if not part.buffer:
                    return g.fail(f"{peer} sent an empty chunk")
                size += len(part.buffer)
                if size > want:
                    return g.fail(f"{peer} sent a vector over {want} bytes")
                parts.append(part.buffer)
            g.got_vector(origin, b"".join(parts))
        if vector_only:
            return
        for origin in [peer, *relayed]:
            msg = await asyncio.wait_for(anext(stream), self._allreduce_timeout)
            if _origin(msg, peer) != origin:
                return g.fail(f"{peer} sent a digest out of turn")
            self._take_digest(g, origin, msg)

    @staticmethod
    def _take_digest(g: Gathering, origin: PeerID, msg: Any) -> None:
        part = msg.tensor_part
        ok = msg.code == averaging_pb2.AVERAGED_PART and part.dtype == DIGEST
        if not ok or len(part.buffer) != DIGEST_BYTES + SIGNATURE_BYTES:
            return g.fail(f"no digest from {origin}")
        g.got_digest(origin, bytes(part.buffer))


def _message(g: Gathering, buffer: bytes, kind: str, origin: PeerID | None = None):
    """A chunk of a vector (VECTOR) or a digest (DIGEST): the sender's own, or `origin`'s."""
    return averaging_pb2.AveragingData(
        code=averaging_pb2.PART_FOR_AVERAGING if kind == VECTOR else averaging_pb2.AVERAGED_PART,
        group_id=g.group_id,
        peer_id=origin.to_bytes() if origin is not None else b"",
        tensor_part=runtime_pb2.Tensor(buffer=buffer, dtype=kind),
    )


def _origin(msg, sender: PeerID) -> PeerID | None:
    """Whose vector or digest a message carries: the sender's own, or one it relays."""
    if not msg.peer_id:
        return sender
    try:
        return PeerID(msg.peer_id)
    except Exception:
        return None


def strict_loads(data: bytes):
    """hivemind's msgpack, with tuples one level deep and no other extension: its own decoder
    recurses once per nested tuple, and a kilobyte of them overflows the C stack (review)."""
    import msgpack

    if not isinstance(data, bytes) or len(data) > MAX_INFO_BYTES:
        raise ValueError("round info of another type or over the size limit")

    def refuse(code: int, _data: bytes):
        raise ValueError(f"msgpack extension {code} in round info")

    def tuples(code: int, data: bytes):
        if code != 0x40:  # hivemind's MSGPackSerializer: a tuple
            refuse(code, data)
        return tuple(msgpack.unpackb(data, ext_hook=refuse, raw=False, strict_map_key=False))

    return msgpack.unpackb(data, ext_hook=tuples, raw=False, strict_map_key=False)


async def _chain(first, rest: AsyncIterator):
    yield first
    async for item in rest:
        yield item


def vector_of(data: Any, numel: int) -> torch.Tensor | None:
    """A member's vector from the bytes the all-gather returned, or None if malformed."""
    if not isinstance(data, bytes | bytearray) or len(data) != 4 * numel:
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.float32)
