"""The coordinator: Join / Leave / Status computed from the DHT, the rebalancing loop, and the gRPC
servicer that puts them on the wire.

Stateless by design: everything it decides from comes from the DHT (the swarm map, open move
requests, the manifest, which equals its own config once `publish_manifest` has checked it). So a
coordinator that is killed and restarted, or a second one on the same DHT, makes the same
decisions, and while none runs the swarm trains on; only new joins wait. What a Join decides is
written back to the DHT at once (a placeholder record of the joiner, under `{swarm}/joins/{k}`)
so the next Join sees it. Soft state only: the replay table of signed requests and which nodes
just said Leave (coordinator/signing.py).

Never on the data path; every DHT call has a deadline (SwarmDHT) and every RPC an overall one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from coordinator.assignment import Move, SwarmMap, assign, rebalance
from coordinator.config import CoordinatorConfig
from coordinator.history import SAMPLE_S, SwarmWatch
from coordinator.messages import (
    JoinRequest,
    JoinResult,
    LeaveRequest,
    Refused,
    SwarmStatus,
    admit,
    join_request_from_pb,
    join_result_to_pb,
    leave_request_from_pb,
    status_to_pb,
    summarize,
)
from coordinator.signing import Replays, check
from node.events import EventLog
from node.swarm.dht import SwarmDHT, dht_now
from node.swarm.manifest import check_manifest
from node.swarm.records import (
    PENDING_ADDRESS,
    Manifest,
    MoveRecord,
    NodeRecord,
    NodeState,
    Placeholder,
)
from node.transport.callbudget import CallBudget
from node.transport.diagnostics import MAX_PING_BYTES
from node.wire._pb import coordinator_pb2 as pb
from node.wire._pb import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

PLACEHOLDER_ADDRESS = PENDING_ADDRESS  # a joiner's record until the node announces itself
MAX_PLACEHOLDERS = 256  # live ones per stage: ~190 bytes each, in one sealed record
# how long a joiner this coordinator placed counts in its placements while the node has not
# announced itself: a node may take longer than a placeholder's TTL to start (CUDA, hivemind's
# fork, a loaded machine: CI saw 16 s, and a third node was sent to stage 0 again while stage 2
# had none). Bounded: one that died starting up skews placement this long at most
JOIN_GRACE_S = 60.0
IGNORED_MOVES = 10  # a node that ignored a move is not asked again for this many move TTLs


def _move_is_open(move: MoveRecord, swarm: SwarmMap) -> bool:
    """A move is done once its node serves, online, at the new stage."""
    record = swarm.get(move.to_stage, {}).get(move.peer_id)
    return record is None or record.state is not NodeState.online


class Coordinator:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        swarm: SwarmDHT,
        manifest: Manifest,
        initial_peers: list[str],
        events: EventLog | None = None,
    ):
        self.cfg, self.dht, self.manifest = cfg, swarm, manifest
        if swarm.identity is None:
            raise ValueError("a coordinator seals the manifest and moves: SwarmDHT(identity=)")
        self.id = swarm.identity.node_id  # what nodes pin at Join (#10 M1)
        self.initial_peers = list(initial_peers)
        self.n_stages = cfg.model.n_stages
        self.events = events or EventLog(None)
        # serializes this process's read-assign-write of joins, so each sees its predecessor's
        # placeholder; not state (nothing survives a restart, nothing needs to)
        self._join_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self.watch = SwarmWatch(cfg.model)  # loss-curve cache and counts: coordinator/history.py
        self.replays = Replays()  # soft state: after a restart the clock window still holds
        self._left: dict[str, float] = {}  # node id -> until when its Leave hides it
        self._placed: dict[int, dict[str, Placeholder]] = {}  # our live placeholders, by stage
        self._joined: dict[str, tuple[int, NodeRecord, float]] = {}  # node -> (stage, its
        # placeholder, when): JOIN_GRACE_S
        self._issued: dict[str, tuple[MoveRecord, float]] = {}  # our moves, until they lapse
        self._ignored: dict[str, float] = {}  # nodes that did not move: not asked until then

    # ---- manifest ------------------------------------------------------------------------
    async def publish_manifest(self) -> bool:
        """Check our manifest against the DHT's and store (refresh) it. Returns whether the swarm
        already had one; raises ManifestMismatch (naming every differing setting) if it differs."""
        found = await self.dht.manifests()  # by signer: ours from before a restart, the
        theirs = found.get(self.id)  # node's that started the swarm, a stranger's...
        if theirs is None and found:  # the swarm's is any with our settings, else we differ
            same = [m for m in found.values() if m.fingerprint == self.manifest.fingerprint]
            theirs = same[0] if same else next(iter(found.values()))
        if theirs is not None:
            check_manifest(theirs, self.manifest)
        if not await self.dht.put_manifest(self.manifest, self.cfg.manifest_ttl_s):
            log.warning("could not store the swarm manifest (is the DHT reachable?)")
        return theirs is not None

    # ---- requests ------------------------------------------------------------------------
    async def swarm_map(self) -> SwarmMap:
        """Every stage's records, plus joiners' placeholders where the node has not announced
        itself yet, less the nodes that said Leave (until their own records lapse: only a node
        can write under its id, node/swarm/owned.py, so no tombstone of ours would count)."""
        stages = await self.dht.swarm_map(self.n_stages)
        pending = await asyncio.gather(
            *(self.dht.placeholders(k, self.id) for k in range(self.n_stages))
        )
        now = time.monotonic()
        self._left = {p: t for p, t in self._left.items() if t > now}
        sealed = {p for recs in stages.values() for p in recs}  # a node's own word wins
        self._joined = {
            p: j for p, j in self._joined.items() if now - j[2] < JOIN_GRACE_S and p not in sealed
        }
        for p, (k, record, _) in self._joined.items():  # placed, not started yet
            pending[k].setdefault(p, record)
        return {
            k: {
                p: r
                for p, r in {
                    **{p: r for p, r in pending[k].items() if p not in sealed},
                    **stages.get(k, {}),
                }.items()
                if p not in self._left
            }
            for k in range(self.n_stages)
        }

    async def choose_stage(self, req: JoinRequest) -> int:
        """Where `req`'s node should go; reads the DHT, writes nothing. The stage it asks for
        if any, else the one an open move request sends it to, else `assign` on the swarm map
        without the node's own (stale) records."""
        if req.wanted_stage >= 0:
            return req.wanted_stage
        move = (await self.dht.moves(self.id)).get(req.node_id)
        if move is not None and move.to_stage < self.n_stages:
            return move.to_stage
        swarm = await self.swarm_map()
        others = {k: {p: r for p, r in rs.items() if p != req.node_id} for k, rs in swarm.items()}
        return assign(others, self.n_stages)

    def _authentic(self, req: JoinRequest | LeaveRequest) -> None:
        """Only a node's own key joins or leaves as that node (coordinator/signing.py); the
        caller takes the request (`replays.take`) once it acts on it."""
        why = check(req, self.cfg.swarm) or self.replays.stale(req)
        if why is not None:
            code = "RESOURCE_EXHAUSTED" if "its limit" in why else "UNAUTHENTICATED"
            raise Refused(code, why)

    async def join(self, req: JoinRequest) -> JoinResult:
        admit(req, self.manifest, self.n_stages)  # first: an old node hears "upgrade"
        self._authentic(req)
        self.replays.take(req)
        self._left.pop(req.node_id, None)
        async with self._join_lock:
            stage = await self.choose_stage(req)
            placeholder = NodeRecord(
                peer_id=req.node_id,
                address=PLACEHOLDER_ADDRESS,
                state=NodeState.joining,
                throughput=req.throughput,
                load=0,
                version=req.version,
                config_hash=req.fingerprint,
                step=0,
            )
            # best effort: it only spreads later joins; the node's own record replaces it
            if not await self._place(stage, placeholder):
                log.warning("join %s: could not store its placeholder record", req.node_id)
            self._joined[req.node_id] = (stage, placeholder, time.monotonic())
        log.info("join: %s -> stage %d (%.2f mb/s)", req.node_id, stage, req.throughput)
        self.events.write("join", node_id=req.node_id, stage=stage)
        self.watch.counts["join"] += 1
        return JoinResult(stage, self.manifest, self.initial_peers, self.id)

    async def _place(self, stage: int, record: NodeRecord) -> bool:
        """Add `record` to our live placeholders of `stage` in the DHT (read, add, store: a
        restarted coordinator, or another holding our key, sees them too)."""
        mine = self._placed.setdefault(stage, {})  # ours, kept here too: a failed DHT read
        for j in await self.dht.placeholders_of(stage, self.id):  # must not wipe them (review)
            mine.setdefault(j.record.peer_id, j)
        now = dht_now()
        mine[record.peer_id] = Placeholder(record=record, until=now + self.cfg.placeholder_ttl_s)
        live = sorted((j for j in mine.values() if j.until > now), key=lambda j: j.until)
        live = live[-MAX_PLACEHOLDERS:]  # one sealed record: it must fit owned.MAX_BODY
        self._placed[stage] = {j.record.peer_id: j for j in live}
        return await self.dht.announce_placeholders(stage, live)

    async def leave(self, req: LeaveRequest) -> None:
        self._authentic(req)
        # only a node listed there leaves (a stranger's fresh key would fill our tables, and
        # its Leave of stage k would hide k's next "lost its last replica" alarm: review)
        if req.node_id not in await self.dht.stage_members(req.stage):
            raise Refused(
                "NOT_FOUND", f"node {req.node_id} has no record in stage {req.stage} to leave"
            )
        self.replays.take(req)
        # its record is its own: it withdraws it itself; until it lapses, we leave it out
        self._left[req.node_id] = time.monotonic() + self.cfg.record_ttl_s + 1.0
        log.info("leave: %s from stage %d", req.node_id, req.stage)
        self.events.write("leave", node_id=req.node_id, stage=req.stage)
        self.watch.counts["leave"] += 1
        self.watch.left(req.stage)

    async def status(self) -> SwarmStatus:
        swarm = await self.swarm_map()
        checkpoints = {}
        for k in range(self.n_stages):  # what a stage that lost every replica resumes from
            records = await self.dht.checkpoints(k)
            if records:
                checkpoints[k] = max(r.step for r in records.values())
        st = summarize(swarm, self.manifest, self.n_stages, self.initial_peers, checkpoints)
        return self.watch.annotate(st)  # with the loss history this coordinator sampled

    async def _sample(self) -> None:
        st = await self.status()
        for line, bad in self.watch.observe(st):  # a stage lost its last replica, or got one
            log.log(logging.WARNING if bad else logging.INFO, "%s", line)
            self.events.write("stall", message=line, crash=bad)

    # ---- rebalancing ---------------------------------------------------------------------
    async def rebalance_once(self) -> Move | None:
        """Ask one node to move when the stages are badly unbalanced (see assignment.rebalance
        for the hysteresis); never while an earlier move is still open, so a restarting node is
        not mistaken for a hole that calls for a second move."""
        swarm = await self.swarm_map()
        open_moves = [
            m for m in (await self.dht.moves(self.id)).values() if _move_is_open(m, swarm)
        ]
        if open_moves:
            log.debug("rebalance: %d move(s) still open", len(open_moves))
            return None
        now = time.monotonic()
        for node, (move, lapses) in list(self._issued.items()):  # ignored, or done
            if now >= lapses:
                del self._issued[node]
                stayed = swarm.get(move.from_stage, {}).get(node)
                if stayed is not None and stayed.state is NodeState.online:
                    # it did not move (it pinned no coordinator, or is a stranger's record)
                    self._ignored[node] = now + IGNORED_MOVES * self.cfg.move_ttl_s
        self._ignored = {n: t for n, t in self._ignored.items() if t > now}
        skip = frozenset(self._ignored)
        move = rebalance(swarm, self.n_stages, self.cfg.imbalance, self.cfg.min_gain, skip)
        if move is None:
            return None
        record = MoveRecord(
            peer_id=move.peer_id, from_stage=move.from_stage, to_stage=move.to_stage
        )
        if not await self.dht.announce_moves([record], self.cfg.move_ttl_s):  # sealed (M1)
            log.warning("rebalance: could not store the move of %s", move.peer_id)
            return None
        self._issued[move.peer_id] = (record, time.monotonic() + self.cfg.move_ttl_s)
        log.info(
            "rebalance: moving %s from stage %d to %d (bottleneck %.2f -> %.2f mb/s)",
            move.peer_id,
            move.from_stage,
            move.to_stage,
            move.bottleneck_before,
            move.bottleneck_after,
        )
        self.events.write(
            "move", node_id=move.peer_id, from_stage=move.from_stage, to_stage=move.to_stage
        )
        self.watch.counts["move"] += 1
        return move

    # ---- background ----------------------------------------------------------------------
    def start(self) -> None:
        """Keep the manifest from expiring and, if enabled, rebalance periodically."""
        self._tasks.append(
            asyncio.create_task(
                self._every(self.cfg.manifest_ttl_s / 3, self._refresh_manifest, "manifest"),
                name="coordinator-manifest",
            )
        )
        self._tasks.append(  # the loss curve and /metrics' swarm map (coordinator/history.py)
            asyncio.create_task(
                self._every(SAMPLE_S, self._sample, "status sample"), name="coordinator-sample"
            )
        )
        if self.cfg.rebalance_every_s > 0:
            self._tasks.append(
                asyncio.create_task(
                    self._every(self.cfg.rebalance_every_s, self.rebalance_once, "rebalance"),
                    name="coordinator-rebalance",
                )
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _refresh_manifest(self) -> None:
        if not await self.dht.put_manifest(self.manifest, self.cfg.manifest_ttl_s):
            log.warning("could not refresh the swarm manifest; will retry")

    @staticmethod
    async def _every(period_s: float, fn: Callable[[], Awaitable[object]], what: str) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await fn()
            except Exception:  # a bad round must not end the loop
                log.exception("%s round failed", what)


# ---- gRPC ------------------------------------------------------------------------------------
class _Servicer(pb_grpc.CoordinatorServicer):
    """Protobuf in, typed calls on the Coordinator, protobuf out. Every request gets an answer
    or a status; nothing a client sends can end the server."""

    def __init__(self, coord: Coordinator):
        self.coord = coord
        # a Join does at most three DHT round trips in a row
        self.deadline_s = 4 * coord.cfg.dht_timeout_s

    async def Join(self, request, context):
        async def call():
            return join_result_to_pb(await self.coord.join(join_request_from_pb(request)))

        return await self._answer(context, "Join", call)

    async def Leave(self, request, context):
        async def call():
            await self.coord.leave(leave_request_from_pb(request, self.coord.n_stages))
            return pb.LeaveReply()

        return await self._answer(context, "Leave", call)

    async def Status(self, request, context):
        async def call():
            return status_to_pb(await self.coord.status())

        return await self._answer(context, "Status", call)

    async def _answer(self, context, what: str, call: Callable[[], Awaitable[object]]):
        try:
            return await asyncio.wait_for(call(), self.deadline_s)
        except Refused as err:
            log.info("%s refused (%s): %s", what, err.code, err.message.splitlines()[0])
            await context.abort(grpc.StatusCode[err.code], err.message)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{what}: the swarm's DHT did not answer within {self.deadline_s:g} s; retry",
            )
        except Exception as err:
            log.exception("%s failed", what)
            await context.abort(grpc.StatusCode.INTERNAL, f"{what} failed: {type(err).__name__}")


SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second process must not silently share our port
    # requests are small; doctor's pings are the biggest (#10 H5: what a stream of requests
    # costs a gRPC server grows with their size, refused or not: node/transport/callbudget.py)
    ("grpc.max_receive_message_length", MAX_PING_BYTES + (64 << 10)),
    ("grpc.max_send_message_length", 8 << 20),  # a big swarm's status
    # short unary calls only (#10 L): few streams a connection, none kept idle or for long
    ("grpc.max_concurrent_streams", 16),
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.max_connection_age_ms", 600_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
]
MAX_RPCS = 256  # calls at once, all callers together


async def serve(coord: Coordinator, listen: str, security=None) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC service on HOST:PORT (port 0 = any free port); returns server and port.
    `security` (a SecurityConfig): TLS and the token check, see node.transport.security."""
    from node.transport import security as sec
    from node.transport.diagnostics import add_diagnostics

    # every call is unary: a budget of calls and request bytes per caller host, checked before
    # gRPC reads the request (#10 H5, M4), as on a node's server
    budget = CallBudget(token=security.token_value() if security is not None else None)
    server = sec.new_server(SERVER_OPTIONS, security, MAX_RPCS, [budget])
    pb_grpc.add_CoordinatorServicer_to_server(_Servicer(coord), server)
    await sec.add_health(server, "resbm.v1.Coordinator")
    add_diagnostics(server, security)  # for `resbm doctor`: Ping, DialBack
    port = sec.add_port(server, listen, security)
    if port == 0:
        raise OSError(f"cannot listen on {listen} (address in use or not local?)")
    await server.start()
    return server, port
