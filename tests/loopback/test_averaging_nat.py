"""The all-gather of a stage's round (node/swarm/gather.py) with replicas behind NAT, on real
hivemind averagers on loopback: a client-mode member serves no streams, so two of them never meet;
the first reachable member relays their vectors and digests, and all three hold the same vectors.
In a spawned process: the averagers fork, and this test process has gRPC and torch threads."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from tests.helpers import in_spawned_process

pytestmark = pytest.mark.timeout(240)
NUMEL = 3000


def _pool(conn) -> None:
    multiprocessing.set_start_method("fork", force=True)  # as in a node

    from common.identity import Identity
    from node.swarm.averaging import StageAverager
    from node.swarm.dht import start_dht, visible_maddrs

    keys = [Identity.generate() for _ in range(3)]
    first = start_dht([], identity=keys[0])
    peers = visible_maddrs(first)
    dhts = [first] + [start_dht(peers, client_mode=True, identity=k) for k in keys[1:]]
    avgs = [
        StageAverager(d, "nat_avg", NUMEL, 3, matchmaking_s=1.0, identity=k)
        for d, k in zip(dhts, keys, strict=True)
    ]
    import torch

    results: list = [None] * 3
    together = threading.Barrier(3, timeout=60)

    def go(i: int) -> None:
        """A group may miss on a busy 2-core machine: all three try again, together (a round
        is not atomic: one member's broken stream failed it for that member alone, the others
        went on, and its retry found no group, a CI run)."""
        vector = torch.full((NUMEL,), float(i + 1))
        for _ in range(4):
            together.wait()
            got = avgs[i].round(vector, float(i), {"step": 0, "ids": [i]}, timeout_s=20.0)
            results[i] = [v.tolist() for v in got.vectors] if got else avgs[i].last_failure
            together.wait()
            if all(isinstance(r, list) for r in results):
                return

    try:
        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        conn.send({"results": results, "clients": [a.averager.client_mode for a in avgs]})
    finally:
        for a in avgs:
            a.shutdown()
        for d in reversed(dhts):
            d.shutdown()


def test_two_replicas_behind_nat_pool_through_the_reachable_one():
    got = in_spawned_process(_pool, 220)
    assert got["clients"] == [False, True, True]
    results = got["results"]
    assert all(isinstance(r, list) for r in results), results  # else: why the round failed
    assert results[0] == results[1] == results[2]  # every member holds the same three vectors
    firsts = sorted(v[0] for v in results[0])
    assert firsts == [1.0, 2.0, 3.0] and all(len(v) == NUMEL + 1 for v in results[0])
