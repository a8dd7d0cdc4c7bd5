"""#10 H2: a hostile peer tries to be another node. Before, a node id was whatever the Hello said:
a banned peer came back under any name, garbage sent "as X" got X banned, and `dial()` never
checked who answered. Now an id is derived from a key and every Hello is a signed challenge."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

import pytest

from common.identity import Identity
from node.data import Batches, Corpus
from node.handshake import Handshake
from node.peering import Neighbours, PeeringError, link_settings
from node.transport.link import Link, LinkClosed
from node.transport.server import start_server
from node.wire.codec import WireCodec
from node.wire.messages import Hello, to_pb
from tests.adversarial.test_hostile_peer import alive, linked, run_step
from tests.loopback.test_node_inputs import B, Peer, T, hello_of, key

FP32 = WireCodec.fp32


async def until(pred) -> None:
    for _ in range(250):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in 5 s")


async def refusal(peer: Peer) -> str:
    """The node's refusal after our proof: UNAUTHENTICATED, with its reason."""
    reply = await peer.recv()
    assert reply.WhichOneof("body") == "error", reply
    assert reply.error.code == "UNAUTHENTICATED", reply
    return reply.error.message


async def test_h2_a_peer_cannot_link_as_another_node_and_its_garbage_bans_no_one_else(node):
    """Three ways to claim the victim's id without its key: with our own key, with the victim's
    public key but our signature, and with a proof captured from the victim's own handshake.
    Each is refused; nothing is held against the victim, who then links and trains a step."""
    victim = key("victim")
    # 1. the victim's id, our key
    liar = Peer(node.port, claim=victim.node_id)
    assert (await liar.hello(0, node.fingerprint)).WhichOneof("body") == "hello"
    assert "is not node" in await refusal(liar)
    await liar.close()

    # 2. the victim's id and public key, our signature
    forger = Peer(node.port)
    hs = Handshake(forger.identity, 0, node.fingerprint)
    offer = replace(hs.offer(), peer_id=victim.node_id, public_key=victim.public_key)
    await forger.send(to_pb(offer, FP32))
    answer = hello_of(await forger.recv())
    proof = replace(hs.prove(answer), peer_id=victim.node_id, public_key=victim.public_key)
    await forger.send(to_pb(proof, FP32))
    assert "did not make" in await refusal(forger)
    await forger.close()

    # 3. a replay: the victim's real offer and proof from an earlier link, sent again
    honest = Peer(node.port, identity=victim)
    seen: list = []
    send = honest.send

    async def record(msg):
        seen.append(msg)
        await send(msg)

    honest.send = record
    assert (await honest.hello(0, node.fingerprint)).WhichOneof("body") == "hello"
    await until(lambda: node.peers.has_live(victim.node_id))  # the proof was taken
    await honest.close()
    await until(lambda: not node.peers.has_live(victim.node_id))  # and the hang-up seen
    replayer = Peer(node.port)
    await replayer.send(seen[0])  # the captured offer: the node answers with a new challenge
    assert (await replayer.recv()).WhichOneof("body") == "hello"
    await replayer.send(seen[1])  # the captured proof signs the old challenge
    assert "did not make" in await refusal(replayer)
    await replayer.close()

    assert not node.peers.bans and node.peers.guard.banned(victim.node_id) is None
    assert alive(node)
    batches = Batches(Corpus.load(), T, B, seed=0)
    up = await linked(node.port, 0, node.fingerprint, "victim")
    down = await linked(node.port, 2, node.fingerprint, "down")
    assert up.peer_id == victim.node_id and node.peers.has_live(victim.node_id)
    await run_step(node, up, down, batches, 0)
    for peer in (up, down):
        await peer.close()


def neighbours(node) -> Neighbours:
    """A real stage-0 peering layer, dialing `node` (stage 1) as the DHT would make it."""
    cfg = node.cfg
    shape = (cfg.batch_size, cfg.model.seq_len, cfg.model.boundary_dim)
    return Neighbours(0, 3, node.fingerprint, link_settings(cfg), shape, cfg.batch_size, Counter())


async def test_h2_dial_links_only_to_the_node_its_record_names(node):
    """`dial()` with the id a DHT record gave: a node at that address with another id (a
    record's address taken over, or reused) is refused; the right id links."""
    dialer = neighbours(node)
    address = f"127.0.0.1:{node.port}"
    try:
        with pytest.raises(PeeringError, match=f"is node {node.node_id}, not n-"):
            await dialer.dial(address, 5, stage=1, node=Identity.generate().node_id)
        assert not dialer.links()
        assert await dialer.dial(address, 5, stage=1, node=node.node_id) == node.node_id
        assert list(dialer.downs) == [node.node_id]
    finally:
        await dialer.close()


@pytest.mark.parametrize("lie", ["other-key", "copied-key", "stale-signature"])
async def test_h2_an_acceptor_that_cannot_prove_its_id_is_not_linked(node, lie):
    """A hostile server answers a dial with the victim's id but cannot sign as the victim: the
    dialer refuses it (before, it took whoever answered and sent it the victim's tensors)."""
    victim = Identity.generate()
    mine = Identity.generate()
    settings = link_settings(node.cfg)
    shape = (node.cfg.batch_size, node.cfg.model.seq_len, node.cfg.model.boundary_dim)

    async def answer(context) -> None:
        link = Link(context, settings, shape, shape[0], "hostile")
        link.start()
        try:
            offer = await asyncio.wait_for(link.recv(), 10)
            hs = Handshake(victim if lie == "stale-signature" else mine, 1, node.fingerprint)
            reply = hs.answer(offer)
            if lie == "other-key":
                reply = replace(reply, peer_id=victim.node_id)
            elif lie == "copied-key":
                reply = replace(reply, peer_id=victim.node_id, public_key=victim.public_key)
            else:  # the victim's real signature, made for another dialer's challenge
                reply = hs.answer(replace(offer, nonce=bytes(16)))
            link.post(reply)
            await asyncio.wait_for(link.recv(), 10)  # the dialer hangs up
        except (LinkClosed, TimeoutError):
            pass
        await link.aclose()

    server, port = await start_server("127.0.0.1:0", answer, settings)
    dialer = neighbours(node)
    try:
        with pytest.raises(PeeringError) as err:
            await dialer.dial(f"127.0.0.1:{port}", 5, stage=1, node=victim.node_id)
        reason = {"other-key": "is not node", "copied-key": "did not make"}
        assert reason.get(lie, "did not make") in str(err.value)
        assert not dialer.links()
    finally:
        await dialer.close()
        await server.stop(grace=1.0)


async def test_h2_an_old_unsigned_hello_is_refused_by_name(node):
    """A Hello without key and signature (an older node, or a forger) gets no link."""
    peer = Peer(node.port)
    bare = Hello(0, node.fingerprint, peer.peer_id, "0.4.0")
    await peer.send(to_pb(bare, FP32))
    reply = await peer.recv()
    assert reply.WhichOneof("body") == "error" and "upgrade the older one" in reply.error.message
    await peer.close()
    assert alive(node) and not node.peers.links()
