"""#10 C1: a hostile replica in a stage's averaging group, on real hivemind averagers (their own
DHT peers and p2p streams) on loopback. Before, each member of hivemind's all-reduce reduced a
slice of the vector for everyone, so a hostile one could write any value into the stage's update.
Now every member gets every member's whole vector (node/swarm/gather.py) and computes the update
itself (node/protocol/robust.py):

- a hostile third member's huge vector is outvoted: both honest replicas hold the same three
  vectors, and the update they compute is within the clip bound of their own;
- a member that sends different vectors to different members voids the round for every honest
  member (none applies an update the others do not);
- a member that claims an honest node's id without its key is left out of the round.

In a spawned process: the averagers fork, and this test process has gRPC and torch threads."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from tests.helpers import in_spawned_process

pytestmark = pytest.mark.timeout(300)

NUMEL = 5000
PREFIX = "hostile_avg"
IDS = {"a": [0, 1], "b": [2, 3], "h": [4, 5]}  # every member's microbatches of the step (M = 6)


def _play(conn) -> None:
    multiprocessing.set_start_method("fork", force=True)  # as in a node

    from common.identity import Identity
    from node.swarm.averaging import StageAverager, _Averager
    from node.swarm.dht import start_dht, visible_maddrs

    class Equivocating(_Averager):
        """Sends each member a different vector."""

        def _outgoing(self, g, peer):
            sent = bytearray(g.own)
            sent[:4] = g.order.index(peer).to_bytes(4, "little")  # a different first value
            return [bytes(sent)]

    class Equivocator(StageAverager):
        averager_class = Equivocating

    class Impostor(Identity):
        """Signs with its own key, claims another node's id."""

        victim = ""

        @property
        def node_id(self) -> str:
            return self.victim

    first = start_dht([])
    dhts = [first] + [start_dht(visible_maddrs(first)) for _ in range(4)]
    a, b, liar, equivocator, impostor = (
        StageAverager(dhts[0], PREFIX, NUMEL, target_group_size=3, matchmaking_s=1.0),
        StageAverager(dhts[1], PREFIX, NUMEL, target_group_size=3, matchmaking_s=1.0),
        StageAverager(dhts[2], PREFIX, NUMEL, target_group_size=3, matchmaking_s=1.0),
        Equivocator(dhts[3], PREFIX, NUMEL, target_group_size=3, matchmaking_s=1.0),
        StageAverager(dhts[4], PREFIX, NUMEL, 3, matchmaking_s=1.0, identity=Impostor.generate()),
    )
    impostor.identity.victim = a.identity.node_id
    import torch

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(NUMEL, generator=g)
    grads = {n: 2 * mu + torch.randn(NUMEL, generator=g) for n in "abh"}
    out: dict = {"a": a.identity.node_id, "b": b.identity.node_id}

    def scenario(name: str, hostile, sent: torch.Tensor) -> None:
        """One round of a, b and `hostile` (retried while no group of three forms)."""
        results: dict = {}

        def go(who: str, avg, vector) -> None:
            for _ in range(4):
                got = avg.round(vector, 5.0, {"step": 0, "ids": IDS[who]}, timeout_s=20.0)
                why = avg.last_failure
                if got is not None or "could not find a group" not in why:
                    results[who] = (got, why)
                    return
            results[who] = (None, "no group")

        players = [("a", a, grads["a"]), ("b", b, grads["b"]), ("h", hostile, sent)]
        threads = [threading.Thread(target=go, args=p) for p in players]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        out[name] = {
            who: (
                None
                if got is None
                else (
                    [m["node"] for m in got.members],
                    [v.tolist() for v in got.vectors],
                    [m["ids"] for m in got.members],
                ),
                why,
            )
            for who, (got, why) in results.items()
            if who != "h"
        }

    try:
        scenario("outvoted", liar, torch.full((NUMEL,), 1e6))
        scenario("equivocation", equivocator, grads["h"])
        scenario("impostor", impostor, grads["h"])
        out["grads"] = {n: v.tolist() for n, v in grads.items()}
        out["liar"] = liar.identity.node_id
        conn.send(out)
    finally:
        for avg in (a, b, liar, equivocator, impostor):
            avg.shutdown()
        for d in reversed(dhts):
            d.shutdown()


@pytest.fixture(scope="module")
def played():
    return in_spawned_process(_play, 280)


def test_a_hostile_members_huge_vector_is_outvoted_by_the_honest_two(played):
    import torch

    from node.protocol.robust import aggregate

    got = played["outvoted"]
    (names_a, vectors_a, ids_a), _ = got["a"]
    (names_b, vectors_b, _), _ = got["b"]
    assert names_a == names_b and len(names_a) == 3 and played["liar"] in names_a
    assert vectors_a == vectors_b  # both honest replicas hold the very same three vectors
    vectors = [torch.tensor(v) for v in vectors_a]
    result = aggregate(vectors, [len(i) for i in ids_a], 6)
    liar = names_a.index(played["liar"])
    assert result.clipped == [liar] and result.total is not None
    honest = [i for i in range(3) if i != liar]
    estimate = sum(vectors[i] for i in honest) * 6 / 4  # the honest members' own estimate
    limit = 6 / 4 * 2**0.5 * result.radius  # robust.py: M / m_H x sqrt(m_liar) x R
    assert float((result.total - estimate).norm()) <= limit * (1 + 1e-5)
    undefended = float((sum(vectors) - estimate).norm())
    assert limit < 1e-3 * undefended  # what hivemind's all-reduce would have applied


def test_a_member_sending_different_vectors_to_each_voids_the_round_for_all(played):
    got = played["equivocation"]
    for who in ("a", "b"):
        result, why = got[who]
        assert result is None, who
        assert "members saw different vectors" in why, why


def test_a_member_claiming_another_nodes_id_is_left_out(played):
    got = played["impostor"]
    for who in ("a", "b"):
        (names, vectors, _), why = got[who]
        assert not why  # the round succeeded, without the impostor
        assert names == sorted([played["a"], played["b"]]), names
        assert len(vectors) == 2


def test_round_info_is_decoded_strictly():
    """A kilobyte of nested msgpack tuples overflowed the C stack of hivemind's decoder and
    killed the averager's process (review): round info allows one level of tuple, no more."""
    import msgpack
    from hivemind.utils.serializer import MSGPackSerializer

    from node.swarm.gather import strict_loads

    info = MSGPackSerializer.dumps((1.0, 0, MSGPackSerializer.dumps({"step": 3, "ids": [1, 2]})))
    bandwidth, mode, user = strict_loads(info)
    assert (bandwidth, mode, strict_loads(user)) == (1.0, 0, {"step": 3, "ids": [1, 2]})
    nested = msgpack.packb(1)
    for _ in range(300):
        nested = msgpack.packb(msgpack.ExtType(0x40, nested))
    with pytest.raises(ValueError, match="extension"):
        strict_loads(nested)
    with pytest.raises(ValueError):
        strict_loads(b"\x00" * (2 << 20))
