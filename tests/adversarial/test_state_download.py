"""#10 C2: a stranger serving the state a joiner downloads, on real hivemind averagers and DHT
peers on loopback, with sealed records. Before, hivemind's state sharing asked whichever peer
declared the highest priority and took what it sent. Now a joiner asks only replicas whose
records vouch for a state digest, and takes a state only if two replicas vouch for its digest
(node/protocol/vouching.py, node/membership.py):

- two honest replicas vouch for one state; a stranger vouches for its own (finite, plausible:
  every weight 0.1% off) at a newer step, with hivemind's top priority: the joiner takes the
  honest state, bit for bit;
- the stranger's state, downloaded, is refused: no other replica vouches for it;
- a stranger that copies the honest vouches but serves its own state of that step is refused
  at once (replicas vouch for another), and joiners still end with the honest state;
- a donor that sends more than the joiner's byte budget is cut off.

In a spawned process: the averagers and DHT peers fork, and this test process has gRPC and
torch threads."""

from __future__ import annotations

import multiprocessing

import pytest

from tests.helpers import in_spawned_process, once_per_run

pytestmark = pytest.mark.timeout(300)

SWARM = "hostile-state"
FINGERPRINT = "0123456789abcdef"
MODEL = {"d_model": 64, "n_heads": 2, "n_layers": 2, "n_stages": 2, "seq_len": 16}


def _state(step: int, scale: float, numel: int = 4096):
    """A stage state as StepEnd.snapshot serves one (its tensors made up, its form real)."""
    import json

    import torch

    g = torch.Generator().manual_seed(1)
    tensors = {
        "param.w": torch.randn(numel, generator=g) * scale,
        "optim.0.0.momentum_buffer": torch.randn(numel, generator=g),
    }
    inner = {
        "stage": "0",
        "step": str(step),
        "model": "{}",
        "optim": json.dumps([{"scalars": {}, "param_groups": []}]),
    }
    names = sorted(tensors)
    return {"step": step, "names": names, "meta": inner, "group0": None}, [
        tensors[n] for n in names
    ]


def _play(conn) -> None:
    multiprocessing.set_start_method("fork", force=True)  # as in a node

    import asyncio
    import types
    from collections import Counter

    import torch

    from common.identity import Identity
    from node.membership import Membership
    from node.node_config import NodeConfig
    from node.protocol.vouching import Vouches, snapshot_digest
    from node.swarm.averaging import StageAverager
    from node.swarm.dht import SwarmDHT, start_dht, visible_maddrs
    from node.swarm.records import NodeRecord, NodeState, Vouch, averaging_prefix
    from node.version import VERSION

    prefix = averaging_prefix(SWARM, 0)
    ids = [Identity.generate() for _ in range(4)]  # a, b (honest), h (hostile), j (joiner)
    first = start_dht([], swarm=SWARM, identity=ids[0])
    dhts = [first] + [start_dht(visible_maddrs(first), swarm=SWARM, identity=i) for i in ids[1:]]
    avgs = [StageAverager(d, prefix, 10, 2, identity=i) for d, i in zip(dhts, ids, strict=True)]
    a, b, h, j = avgs
    honest, poisoned = _state(7, 1.0), _state(8, 1.001)
    huge = _state(8, 1.0, numel=1 << 20)  # 8 MiB: over the joiner's budget below
    served = {"h": poisoned}
    a.set_state_provider(lambda: honest)
    b.set_state_provider(lambda: honest)
    h.set_state_provider(lambda: served["h"])
    h.averager.state_sharing_priority = 1e9  # what hivemind's own download asked first
    for avg in (a, b, h):
        avg.share_state(True)
    digest = {"honest": snapshot_digest(*honest)[1], "poisoned": snapshot_digest(*poisoned)[1]}
    out: dict = {}

    async def announce(i: int, vouches: list[tuple[int, str]]) -> None:
        record = NodeRecord(
            peer_id=ids[i].node_id, address="127.0.0.1:1", state=NodeState.online,
            throughput=1.0, load=0, version=VERSION, config_hash=FINGERPRINT, step=8,
            averager=avgs[i].address, vouches=[Vouch(step=s, digest=d) for s, d in vouches],
        )  # fmt: skip
        assert await SwarmDHT(dhts[i], SWARM, identity=ids[i]).announce(0, record, 60.0)

    async def main() -> None:
        cfg = NodeConfig(model=MODEL, swarm=SWARM, stage=0, refresh_s=0.5, state_timeout_s=20)
        peers = types.SimpleNamespace(identity=ids[3], errors=Counter())  # all download reads
        joiner = Membership(
            cfg, dhts[3], peers, ids[3].node_id, FINGERPRINT, None, None, None,
            max_state_bytes=1 << 20,
        )  # fmt: skip
        for i in (0, 1):
            await announce(i, [(7, digest["honest"])])
        await announce(2, [(7, "0" * 64), (8, digest["poisoned"])])  # newest, and its own

        # the honest state, though the stranger's record is newest and it has the top priority
        got = await joiner.download(j, None)
        out["took"] = None if got is None else got[1][0].tolist() == honest[1][0].tolist()
        out["took_bits"] = got is not None and all(
            torch.equal(x, y) for x, y in zip(got[1], honest[1], strict=True)
        )

        # the stranger's state, downloaded: nobody else vouches for it (waited on, refused)
        from_h = j.load_state_from(h.address, 20.0, 1 << 20)
        out["alone"] = await joiner._judge(Vouches(ids[3].node_id), from_h, None)

        # it copies the honest vouches but serves its own state of that step: refused at once
        await announce(2, [(7, digest["honest"])])
        served["h"] = _state(7, 1.001)
        from_h = j.load_state_from(h.address, 20.0, 1 << 20)
        out["copying"] = await joiner._judge(Vouches(ids[3].node_id), from_h, None)
        results = []  # and a joiner asks it first as often as an honest replica
        for _ in range(3):
            got = await joiner.download(j, None)
            results.append(None if got is None else torch.equal(got[1][0], honest[1][0]))
        out["copying_downloads"] = results

        # more bytes than the budget: cut off
        served["h"] = huge
        out["huge"] = j.load_state_from(h.address, 20.0, 1 << 20)

    try:
        asyncio.run(main())
        conn.send(out)
    except BaseException as err:
        conn.send({"error": f"{type(err).__name__}: {err}"})
        raise
    finally:
        for avg in avgs:
            avg.shutdown()
        for d in reversed(dhts):
            d.shutdown()


@pytest.fixture(scope="module")
def played(request):
    return once_per_run(request, "state-download", lambda: in_spawned_process(_play, 240))


def test_a_joiner_takes_the_state_two_replicas_vouch_for_not_the_top_priority(played):
    assert "error" not in played, played
    assert played["took"] is True and played["took_bits"] is True


def test_a_state_no_other_replica_vouches_for_is_refused(played):
    assert played["alone"] == "fewer than 2 replicas vouch for its state of step 8", played


def test_a_stranger_copying_the_vouches_but_serving_its_own_state_is_refused(played):
    assert played["copying"] == "replicas vouch for another state at step 7", played
    assert played["copying_downloads"] == [True] * 3, played


def test_a_donor_over_the_byte_budget_is_cut_off(played):
    assert isinstance(played["huge"], str) and "more than" in played["huge"], played["huge"]
