"""The coordinator on loopback: a real hivemind DHT (two peers) and a real grpc.aio server in
this process, driven through the client. Each test uses its own swarm id on the shared DHT.

The DHT peers are created before any gRPC object of this module (hivemind forks)."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest

from common.identity import Identity
from coordinator.client import CoordinatorRefused, JoinRefused, join, leave, status
from coordinator.config import CoordinatorConfig
from coordinator.messages import JoinRequest, LeaveRequest, join_request_to_pb
from coordinator.service import PLACEHOLDER_ADDRESS, Coordinator, serve
from coordinator.signing import sign
from node.data import Corpus
from node.swarm.dht import SwarmDHT, start_dht, visible_maddrs
from node.swarm.manifest import ManifestMismatch, manifest_for, swarm_settings
from node.swarm.records import NodeRecord
from node.version import VERSION
from node.wire._pb import coordinator_pb2 as pb
from node.wire._pb import coordinator_pb2_grpc as pb_grpc
from tests.helpers import key, nid, tiny_model

TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def dhts():
    """Two DHT peers: the coordinators' and "the rest of the swarm"."""
    first = start_dht([])
    second = start_dht(visible_maddrs(first))
    yield first, second
    second.shutdown()
    first.shutdown()


@pytest.fixture(scope="module")
def corpus_fp() -> str:
    return Corpus.load(None).fingerprint


@pytest.fixture
def swarm_id(request) -> str:
    return re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60]


def config(swarm: str, **over) -> CoordinatorConfig:
    base = dict(
        model=tiny_model(n_stages=2, n_layers=2),
        swarm=swarm,
        listen="127.0.0.1:0",
        rebalance_every_s=0,
        dht_timeout_s=5.0,
    )
    return CoordinatorConfig(**{**base, **over})


class Running:
    """A coordinator serving on loopback."""

    def __init__(self, coord: Coordinator, server, port: int):
        self.coord, self.server, self.port = coord, server, port
        self.address = f"127.0.0.1:{port}"

    async def close(self) -> None:
        await self.coord.stop()
        await self.server.stop(grace=1.0)


async def start(cfg: CoordinatorConfig, dht, corpus_fp: str, identity=None) -> Running:
    coord = Coordinator(
        cfg,
        SwarmDHT(dht, cfg.swarm, cfg.dht_timeout_s, identity=identity or Identity.generate()),
        manifest_for(cfg, corpus_fp, cfg.swarm),
        visible_maddrs(dht),
    )
    await coord.publish_manifest()
    server, port = await serve(coord, cfg.listen)
    coord.start()
    return Running(coord, server, port)


@pytest.fixture
async def running(dhts, corpus_fp, swarm_id):
    r = await start(config(swarm_id), dhts[0], corpus_fp)
    yield r
    await r.close()


def join_request(r: Running, name: str, **over) -> JoinRequest:
    """A Join of node `name` (its key: tests.helpers.key), signed as a node signs it."""
    m = r.coord.manifest
    base = dict(
        node_id=nid(name), swarm=m.swarm, version=VERSION, fingerprint=m.fingerprint, throughput=1.0
    )
    return sign(JoinRequest(**{**base, **over}), m.swarm, key(name))


def leave_request(r: Running, name: str, stage: int) -> LeaveRequest:
    return sign(LeaveRequest(nid(name), stage), r.coord.manifest.swarm, key(name))


async def announce(dht, swarm: str, stage: int, record: NodeRecord, ttl: float, name: str) -> bool:
    """Announce `record` as node `name` does: sealed by its key (node/swarm/owned.py)."""
    return await SwarmDHT(dht, swarm, 5.0, identity=key(name)).announce(stage, record, ttl)


def online(peer: str, throughput: float, step: int = 0, loss: float | None = None) -> NodeRecord:
    return NodeRecord(
        peer_id=nid(peer),
        address="127.0.0.1:7000",
        state="online",
        throughput=throughput,
        load=0,
        version=VERSION,
        config_hash="0123456789abcdef",
        step=step,
        loss=loss,
    )


async def test_joins_in_a_row_are_spread_across_stages(running, dhts):
    stages = []
    for i in range(4):
        res = await join(running.address, join_request(running, f"n{i}"), TIMEOUT_S)
        stages.append(res.stage)
        assert res.manifest == running.coord.manifest
        assert res.initial_peers == visible_maddrs(dhts[0])
    assert stages == [0, 1, 0, 1]

    st = await status(running.address, TIMEOUT_S)
    ids = [sorted(r.node_id for r in s) for s in st.stages]
    assert ids == [sorted([nid("n0"), nid("n2")]), sorted([nid("n1"), nid("n3")])]
    assert all(r.state == "joining" and r.address == PLACEHOLDER_ADDRESS for r in st.stages[0])
    # a node that asks for a stage gets it; one re-joining does not count itself
    assert (await join(running.address, join_request(running, "n4", wanted_stage=1))).stage == 1
    assert (await join(running.address, join_request(running, "n4"))).stage == 0


async def test_a_joiner_slower_to_start_than_its_placeholder_lives_still_counts(
    dhts, corpus_fp, swarm_id
):
    """Its placeholder lapsed before the node announced itself (a slow start: CUDA, a loaded
    machine); the next joiner still goes to the other stage, not onto the first one's (CI: a
    third node was sent to stage 0 again while stage 2 had none)."""
    r = await start(config(swarm_id, placeholder_ttl_s=0.5), dhts[0], corpus_fp)
    try:
        assert (await join(r.address, join_request(r, "slow"), TIMEOUT_S)).stage == 0
        await asyncio.sleep(1.5)  # its placeholder is gone from the DHT
        assert nid("slow") not in await r.coord.dht.placeholders(0, r.coord.id)
        assert (await join(r.address, join_request(r, "next"), TIMEOUT_S)).stage == 1
    finally:
        await r.close()


async def test_refusals_name_what_differs(running, corpus_fp):
    async def refused(**over) -> JoinRefused:
        with pytest.raises(JoinRefused) as err:
            await join(running.address, join_request(running, "x", **over), TIMEOUT_S)
        assert err.value.code == "FAILED_PRECONDITION", err.value
        return err.value

    assert "install resbm " + VERSION in (await refused(version="9.1.0")).message
    assert (
        f"serves swarm '{running.coord.manifest.swarm}', not 'elsewhere'"
        in (await refused(swarm="elsewhere")).message
    )
    other = config("x", seed=3, microbatches=4)
    fp = manifest_for(other, corpus_fp, "x").fingerprint
    msg = (await refused(fingerprint=fp, settings=swarm_settings(other, corpus_fp))).message
    assert "seed: swarm 0, yours 3" in msg and "microbatches: swarm 1, yours 4" in msg
    assert running.coord.manifest.fingerprint in (await refused(fingerprint=fp)).message
    assert (await status(running.address, TIMEOUT_S)).stages == [[], []]  # nobody got in


async def test_malformed_requests_are_invalid_arguments_and_the_server_goes_on(running):
    good = join_request_to_pb(join_request(running, "ok"))
    bad = [
        ("Join", pb.JoinRequest(), "node_id"),
        ("Join", _with(good, throughput=float("nan")), "throughput"),
        ("Join", _with(good, fingerprint="zz"), "fingerprint"),
        ("Join", _with(good, wanted_stage=2), "wanted_stage"),
        ("Join", _with(good, settings_json="{"), "settings_json"),
        ("Leave", pb.LeaveRequest(node_id="ok", stage=7), "stage"),
        ("Leave", pb.LeaveRequest(node_id="a b", stage=0), "node_id"),
    ]
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for method, msg, field in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(stub, method)(msg, timeout=TIMEOUT_S)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, msg)
            assert err.value.details().startswith(field)
        for method in ("Join", "Leave", "Status"):  # bytes that are no protobuf at all
            raw = channel.unary_unary(f"/resbm.v1.Coordinator/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(b"\xff\xff\xff\xff not a protobuf", timeout=TIMEOUT_S)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "does not parse" in err.value.details()
        assert (await stub.Join(good, timeout=TIMEOUT_S)).stage == 0
    with pytest.raises(CoordinatorRefused) as refused:
        await leave(running.address, leave_request(running, "ok", 5), TIMEOUT_S)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert [len(s) for s in (await status(running.address, TIMEOUT_S)).stages] == [1, 0]


async def test_status_shows_what_other_peers_announce_and_leave_withdraws(running, dhts):
    swarm = running.coord.manifest.swarm
    ttl = running.coord.cfg.record_ttl_s  # what nodes announce with
    assert await announce(dhts[1], swarm, 0, online("a", 2.0, step=7), ttl, "a")
    assert await announce(dhts[1], swarm, 1, online("b", 1.5, step=6, loss=2.25), ttl, "b")
    assert await announce(dhts[1], swarm, 1, online("c", 1.0, step=5, loss=9.0), ttl, "c")

    st = await status(running.address, TIMEOUT_S)
    assert st.current_step == 7 and st.recent_loss == 2.25  # the last stage's newest loss
    assert [[r.node_id for r in s] for s in st.stages] == [[nid("a")], sorted([nid("b"), nid("c")])]
    b = next(r for r in st.stages[1] if r.node_id == nid("b"))
    assert b.throughput == 1.5 and b.state == "online"

    await leave(running.address, leave_request(running, "b", 1), TIMEOUT_S)
    st = await status(running.address, TIMEOUT_S)
    assert [[r.node_id for r in s] for s in st.stages] == [[nid("a")], [nid("c")]]
    assert st.recent_loss == 9.0


async def test_a_second_coordinator_rebuilds_the_same_map_and_decisions(running, dhts, corpus_fp):
    swarm = running.coord.manifest.swarm
    assert await announce(dhts[1], swarm, 0, online("a", 3.0), 60, "a")
    assert await announce(dhts[1], swarm, 1, online("b", 1.0), 60, "b")
    await join(running.address, join_request(running, "j1", throughput=2.0), TIMEOUT_S)

    # a second one holding the same key (its identity_file): the swarm's coordinator
    same_key = running.coord.dht.identity
    second = await start(config(running.coord.manifest.swarm), dhts[1], corpus_fp, same_key)
    try:
        assert await second.coord.publish_manifest()  # found the swarm's manifest
        first_st = await status(running.address, TIMEOUT_S)
        second_st = await status(second.address, TIMEOUT_S)
        assert first_st.stages == second_st.stages and first_st.manifest == second_st.manifest
        nxt = join_request(running, "j2")
        expected = await running.coord.choose_stage(nxt)
        assert await second.coord.choose_stage(nxt) == expected
        assert (await join(second.address, nxt, TIMEOUT_S)).stage == expected
        # and the first coordinator sees what the second one decided
        third = join_request(running, "j3")
        assert await running.coord.choose_stage(third) == await second.coord.choose_stage(third)
    finally:
        await second.close()


async def test_a_coordinator_with_another_config_refuses_to_start(running, dhts, corpus_fp):
    swarm = running.coord.manifest.swarm
    other = config(swarm, model=tiny_model(n_stages=2, n_layers=2, d_model=64, compression=16))
    with pytest.raises(ManifestMismatch) as err:
        await start(other, dhts[1], corpus_fp)
    assert "model.d_model: swarm 128, yours 64" in str(err.value)
    assert "model.compression: swarm 128, yours 16" in str(err.value)


async def test_rebalancing_asks_one_node_to_move_and_waits_for_it(running, dhts):
    peer = SwarmDHT(dhts[1], running.coord.manifest.swarm, 5.0)
    for name in ("a", "b", "c"):
        assert await announce(dhts[1], peer.swarm, 0, online(name, 2.0), 60, name)
    assert await announce(dhts[1], peer.swarm, 1, online("d", 1.0), 60, "d")

    move = await running.coord.rebalance_once()
    assert move is not None and (move.from_stage, move.to_stage) == (0, 1)
    assert await peer.moves(None) == {}  # a node that pinned no coordinator takes none
    moves = await peer.moves(running.coord.id)
    assert list(moves) == [move.peer_id] and moves[move.peer_id].to_stage == 1
    assert await running.coord.rebalance_once() is None  # the first move is still open
    # the moved node re-joins: it is sent to its new stage
    name = next(n for n in ("a", "b", "c") if nid(n) == move.peer_id)
    res = await join(running.address, join_request(running, name, throughput=2.0))
    assert res.stage == 1
    assert res.coordinator_id == running.coord.id  # what the node pins (#10 M1)


async def test_a_node_that_ignores_a_move_is_not_asked_again_at_once(dhts, corpus_fp, swarm_id):
    """A node that pinned no coordinator (joined through the DHT alone), or a stranger's own
    record, never acts on a move; the choice is deterministic, so the same one was asked again
    at every lapse, and rebalancing stalled (review of #10 M1)."""
    r = await start(config(swarm_id, move_ttl_s=0.5), dhts[0], corpus_fp)
    try:
        for name in ("a", "b", "c"):
            assert await announce(dhts[1], swarm_id, 0, online(name, 2.0), 60, name)
        assert await announce(dhts[1], swarm_id, 1, online("d", 1.0), 60, "d")
        first = await r.coord.rebalance_once()
        assert first is not None and first.from_stage == 0
        await asyncio.sleep(1.0)  # its move lapses; it is still online in stage 0
        second = await r.coord.rebalance_once()
        assert second is not None and second.peer_id != first.peer_id
    finally:
        await r.close()


def test_a_node_pins_the_coordinator_its_join_names_and_refuses_another():
    from node.process import StartupError, pin_coordinator

    assert pin_coordinator(None, nid("c"), "h:1") == nid("c")
    assert pin_coordinator(nid("c"), nid("c"), "h:1") == nid("c")
    with pytest.raises(StartupError, match="coordinator_id"):
        pin_coordinator(nid("c"), nid("impostor"), "h:1")
    with pytest.raises(StartupError, match="unnamed"):
        pin_coordinator(nid("c"), "", "h:1")
    # a pin learned from an earlier answer gives way (a restarted coordinator, a new key)
    assert pin_coordinator(nid("c"), nid("c2"), "h:1", learned=True) == nid("c2")


def _with(msg: pb.JoinRequest, **fields) -> pb.JoinRequest:
    out = pb.JoinRequest()
    out.CopyFrom(msg)
    for k, v in fields.items():
        setattr(out, k, v)
    return out
