"""Replicas of a stage pool their gradients, and joiners download a stage's state, through
hivemind's DecentralizedAverager (its matchmaking, its p2p layer, its state serving), with an
all-gather in place of its all-reduce (node/swarm/gather.py): each member gets every member's
whole vector and computes the update itself (node/protocol/robust.py), so no member writes
another's result (#10 C1). A joiner downloads from the replica it chose (`load_state_from`:
bounded in bytes and time), not from whoever declares the highest priority, and checks what
came against what replicas vouch for (node/protocol/vouching.py, #10 C2).

The averager runs in a child process that hivemind forks, on a shared-memory buffer: create this
before any torch compute or gRPC object in the process. Its buffer is the stage's gradients as one
flat fp32 vector plus the loss sum; every replica joins every round (a replica that processed
nothing sends zeros). Each round all-gathers which microbatch ids every member counted: a round
is valid only if those are disjoint and cover the whole step (stepend.check_round).

A member's round info is signed by its node key, over the stage, its hivemind peer id (which
hivemind's p2p layer authenticates) and the whole info: its step, ids, throughput, and a commitment
to its vector (its SHA-256), fixed before the group forms. A member that cannot prove the node id
it claims, or whose vector is not the one it committed to, is left out of the update; two members
committed to the same vector void the round. So a member cannot answer with a copy of what an
honest member sent it (a copy shrank the robust aggregate's radius and clipped the others): it
committed before it saw any vector, and the only copy it can commit to is an exact one, whose
hash the group's leader saw, which voids the round (members that counted no microbatch send
zeros, alike, and weigh nothing). Within one attempt, that is: a member that makes an attempt
fail after it got the vectors can commit to a near copy in the next (node/swarm/commitments.py,
open). Nor can a relay (gather.py) forge another member's vector or digest to a client behind
NAT: digests are signed too, and a member's peer id is its node key's (node/swarm/p2p_key.py),
so a relay that is also the leader cannot put a member of its own making in an honest member's
slot either (it can still show a client a group of its own: docs/security.md, open).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MPFuture
from hivemind.utils.streaming import combine_from_streaming

from common.identity import Identity, verify
from node.swarm.commitments import round_claim
from node.swarm.gather import GatheringAverager, strict_loads, vector_of
from node.swarm.p2p_key import peer_id_of

log = logging.getLogger(__name__)

StateFn = Callable[[], tuple[dict[str, Any], list[torch.Tensor]]]


class _Averager(GatheringAverager):
    """hivemind calls get_current_state in our process when a joiner asks for our state."""

    def __init__(self, *args, **kwargs):
        self.state_fn: StateFn | None = None
        super().__init__(*args, **kwargs)

    def get_current_state(self):
        fn = self.state_fn
        if fn is None:
            return {"ready": False}, [], None
        meta, tensors = fn()
        return {"ready": True, **meta}, tensors, None

    def download_from(self, peer: str, timeout_s: float, max_bytes: int, max_tensors: int):
        """One replica's state, from its averager (`peer`, base58), in hivemind's child
        process: (meta, tensors), or why not (a string)."""
        future = MPFuture()
        kwargs = dict(peer=peer, timeout_s=timeout_s, limits=(max_bytes, max_tensors))
        self._outer_pipe.send(("_download_from", [], {**kwargs, "future": future}))
        return future.result(timeout=timeout_s + 10.0)  # bounded: the child may have died

    async def _download_from(self, peer: str, timeout_s: float, limits, future):
        """hivemind's own download bounded only each chunk's wait, kept every byte that came
        and decoded the donor's metadata with its recursive decoder: a donor could drip for
        ever, fill our memory, or crash the child (#10 C2). Here the call is bounded whole,
        in bytes and in time; the tensors are plain (no compression) and the metadata is
        decoded strictly. Nothing here is trusted: the node checks what came (vouching.py)."""
        got: Any = "cancelled: the averager is shutting down"
        try:
            async with asyncio.timeout(timeout_s):
                got = await self._download(PeerID.from_base58(peer), *limits)
        except Exception as err:  # a peer's input, or a dead peer: why, never raised
            got = f"{type(err).__name__}: {err}"[:500]
        finally:  # always answered, else the node waits out its timeout (review)
            if not future.done():
                try:
                    future.set_result(got)
                except Exception as err:  # too large to pass back, say
                    future.set_result(f"could not pass the state on: {type(err).__name__}")

    async def _download(self, peer: PeerID, max_bytes: int, max_tensors: int):
        if peer == self.peer_id:
            return "that is our own averager"
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        async with contextlib.aclosing(stream):  # what we refuse to read is not left open
            return await self._read_state(stream, max_bytes, max_tensors)

    async def _read_state(self, stream, max_bytes: int, max_tensors: int):
        meta, parts, tensors, total = None, [], [], 0
        async for message in stream:
            total += message.ByteSize()
            if total > max_bytes:
                return f"the donor sent more than {max_bytes} bytes"
            if message.metadata:
                if meta is not None:
                    return "the donor sent its metadata twice"
                meta = strict_loads(message.metadata)
            part = message.tensor_part
            if part.compression != runtime_pb2.CompressionType.NONE:
                return "the donor sent a compressed tensor"
            if part.dtype and parts:
                if len(tensors) >= max_tensors:  # a flood of tiny tensors (review)
                    return f"the donor sent more than {max_tensors} tensors"
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            parts.append(part)
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        if len(tensors) > max_tensors:
            return f"the donor sent more than {max_tensors} tensors"
        if not isinstance(meta, dict) or not meta.get("ready"):
            return "the donor shared no state"
        return meta, tensors


@dataclass(frozen=True)
class Round:
    """One all-gather: every admitted member's round info and vector (gradients, then the loss
    sum), sorted by node id."""

    members: list[dict[str, Any]]
    vectors: list[torch.Tensor]


class StageAverager:
    averager_class: type[GatheringAverager] = _Averager  # tests' hostile members replace it

    def __init__(
        self,
        dht,
        prefix: str,
        numel: int,
        target_group_size: int | None,
        matchmaking_s: float = 1.0,
        allreduce_timeout_s: float = 60.0,
        *,
        identity: Identity,  # the key the DHT was started with (start_dht(identity=))
    ):
        self.numel, self.prefix, self.allreduce_timeout_s = numel, prefix, allreduce_timeout_s
        self.identity = identity
        self._check_key(dht)
        self._lock = threading.Lock()
        from node.swarm.dht import forking

        with forking():  # it forks too: see there
            self.averager = self.averager_class(
                [torch.zeros(numel + 1)],
                dht,
                start=True,
                prefix=prefix,
                target_group_size=target_group_size,
                min_group_size=2,
                min_matchmaking_time=matchmaking_s,
                request_timeout=max(matchmaking_s / 2, 0.2),
                allreduce_timeout=allreduce_timeout_s,
                allow_state_sharing=False,
                declare_state_period=5.0,
                identity=self.identity,  # it signs our digests in the averager's process
            )
        self.peer_id = self.averager.peer_id.to_bytes()
        self.address = self.averager.peer_id.to_base58()  # where joiners download our state
        self.last_failure = ""  # why the last round failed (hivemind's error), for logs and tests

    def _check_key(self, dht) -> None:
        """Our averager's peer id (the DHT's) must be our node key's, or every other member
        leaves us out of its rounds."""
        if dht.peer_id.to_bytes() != peer_id_of(self.identity.public_key):
            raise ValueError(
                f"the DHT's peer id {dht.peer_id} is not node {self.identity.node_id}'s: "
                "start it with start_dht(identity=) (node/swarm/p2p_key.py)"
            )

    def set_state_provider(self, fn: StateFn) -> None:
        self.averager.state_fn = fn

    def share_state(self, allow: bool) -> None:
        """Offer our state to joiners. A client-mode averager (behind NAT) cannot be reached:
        joiners download from a reachable replica instead."""
        if not self.averager.client_mode:
            self.averager.allow_state_sharing = allow

    def round(
        self, grads: torch.Tensor, loss_sum: float, info: dict[str, Any], timeout_s: float
    ) -> Round | None:
        """Blocking (run it off the event loop). None when no group formed in time, or the
        all-gather failed (a member left, or sent different vectors to different members)."""
        self.last_failure = ""
        with self._lock:
            with self.averager.get_tensors() as (buf,):
                buf[: self.numel].copy_(grads)
                buf[self.numel] = loss_sum
                commit = _sha(buf.numpy().tobytes())  # what the averager's process sends
            info = {**info, "node": self.identity.node_id, "key": self.identity.public_key}
            info["commit"] = commit
            info["sig"] = self.identity.sign(round_claim(self.prefix, self.peer_id, info))
            try:
                control = self.averager.step(
                    gather=info, weight=1.0, timeout=timeout_s, allow_retries=False, wait=False
                )
                # bounded: hivemind's future never resolves if its child process died
                gathered = control.result(timeout=timeout_s + self.allreduce_timeout_s + 10.0)
            except Exception as err:  # hivemind raises on a failed group; that is "no round"
                self.last_failure = f"{type(err).__name__}: {err}"
                log.info("averaging round failed: %s", self.last_failure)
                return None
        return self.admit(gathered) if gathered else None

    def admit(self, gathered: dict) -> Round | None:
        """The members that prove their node id, and their vectors; None unless we are one."""
        members = {}
        for peer, got in gathered.items():
            try:
                member, raw = got["info"], got["vector"]
                vector = vector_of(raw, self.numel + 1)
                problem = None if vector is not None else "a malformed vector"
                claim = round_claim(self.prefix, peer.to_bytes(), member)
                problem = problem or verify(member["node"], member["key"], claim, member["sig"])
                if not problem and peer.to_bytes() != peer_id_of(member["key"]):
                    problem = "its peer id is not its node key's (a member in another's slot)"
                if not problem and _sha(raw) != member["commit"]:
                    problem = "its vector is not the one it committed to"
            except Exception as err:  # a peer's input
                member, problem = None, f"malformed round info ({type(err).__name__})"
            if problem:
                log.warning("averaging: a member (peer %s) left out of the round: %s",
                            str(peer)[:16], problem)  # fmt: skip
                continue
            if member["node"] in members:
                log.warning("averaging: node %s came twice: round void", member["node"])
                return None
            members[member["node"]] = (member, vector)
        # a copy of another member's vector (#10 C1); members that counted nothing send zeros,
        # alike and harmless (the aggregate leaves them out)
        commits = [m["commit"] for m, _ in members.values() if m.get("ids")]
        if len(set(commits)) != len(commits):
            self.last_failure = "two members committed to the same vector: round void"
            log.warning("averaging: %s", self.last_failure)
            return None
        if self.identity.node_id not in members:
            return None
        order = sorted(members)
        return Round([members[n][0] for n in order], [members[n][1] for n in order])

    def load_state_from(
        self, peer: str, timeout_s: float, max_bytes: int, max_tensors: int = 1 << 16
    ) -> tuple[dict[str, Any], list[torch.Tensor]] | str:
        """A replica's state from its averager `peer` (blocking): (meta, tensors), or why not.
        Unchecked: the caller checks it against what replicas vouch for (vouching.py)."""
        try:
            return self.averager.download_from(peer, timeout_s, max_bytes, max_tensors)
        except Exception as err:  # the child died, or did not answer in time
            return f"{type(err).__name__}: {err}"[:500]

    def shutdown(self) -> None:
        try:
            self.averager.shutdown()
        except Exception as err:
            log.debug("averager shutdown: %s", err)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
