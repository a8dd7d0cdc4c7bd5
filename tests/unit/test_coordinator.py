"""The coordinator's pure parts: its config, request validation and admission, protobuf
conversion, the status summary and table, and assignment with joiners' placeholders."""

from __future__ import annotations

import argparse
import json
import math
import pickle

import pytest

from coordinator.assignment import assign, rebalance
from coordinator.client import CoordinatorUnavailable, JoinRefused, format_status
from coordinator.config import COORDINATOR_FLAGS, CoordinatorConfig
from coordinator.messages import (
    JoinRequest,
    JoinResult,
    Refused,
    admit,
    join_request_from_pb,
    join_request_to_pb,
    join_result_from_pb,
    join_result_to_pb,
    leave_request_from_pb,
    status_from_pb,
    status_to_pb,
    summarize,
)
from node.settings import ConfigError, add_flags, from_args
from node.swarm.manifest import manifest_for, swarm_settings
from node.swarm.records import NodeRecord
from node.version import VERSION
from node.wire._pb import coordinator_pb2 as pb
from tests.helpers import tiny_model

CORPUS_FP = "00112233aabbccdd"


def config(**over) -> CoordinatorConfig:
    return CoordinatorConfig(**{"model": tiny_model(), "swarm": "s1", **over})


def parse(*argv: str) -> CoordinatorConfig:
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_flags(p, COORDINATOR_FLAGS)
    return from_args(CoordinatorConfig, p.parse_args(list(argv)), COORDINATOR_FLAGS)


def request(cfg: CoordinatorConfig | None = None, **over) -> JoinRequest:
    cfg = cfg or config()
    m = manifest_for(cfg, CORPUS_FP, cfg.swarm)
    base = dict(
        node_id="node-a", swarm=m.swarm, version=VERSION, fingerprint=m.fingerprint, throughput=2.0
    )
    return JoinRequest(**{**base, **over})


def rec(peer: str, throughput: float = 1.0, state: str = "online", **over) -> NodeRecord:
    base = dict(
        peer_id=peer,
        address="127.0.0.1:7000",
        state=state,
        throughput=throughput,
        load=0,
        version=VERSION,
        config_hash="0123456789abcdef",
    )
    return NodeRecord(**{**base, **over})


# ---- config ------------------------------------------------------------------------------------
def test_config_flags_and_defaults():
    cfg = parse("--swarm", "tiny.v1", "--initial-peers", "/ip4/10.0.0.1/tcp/4000/p2p/Qm1", "/ip4/x")
    assert cfg.swarm == "tiny.v1" and len(cfg.initial_peers) == 2
    assert cfg.dht_listen == ["/ip4/0.0.0.0/tcp/0"] and cfg.wire_codec == "int4-channel"
    assert cfg.rebalance_every_s > 0 and cfg.placeholder_ttl_s <= cfg.record_ttl_s


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--swarm", "Has Space"], "setting 'swarm' (--swarm, RESBM_SWARM)"),
        (["--listen", "nowhere"], "setting 'listen' (--listen, RESBM_LISTEN)"),
        (["--dht-listen", "ip4/1.2.3.4"], "setting 'dht_listen' (--dht-listen"),
        (["--initial-peers", "garbage"], "setting 'initial_peers' (--initial-peers"),
        (["--imbalance", "0.5"], "setting 'imbalance' (--imbalance, RESBM_IMBALANCE)"),
        (["--placeholder-ttl", "90"], "placeholder_ttl_s (90.0) must not exceed record_ttl_s"),
        (["--stages", "1", "--n-layers", "1"], "n_stages >= 2"),
    ],
)
def test_config_errors_name_the_setting(argv, needle):
    with pytest.raises(ConfigError) as err:
        parse(*argv)
    assert needle in str(err.value)


# ---- request validation ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("node_id", "", "node_id"),
        ("node_id", "has space", "node_id"),
        ("node_id", "x" * 129, "node_id"),
        ("swarm", "UPPER", "swarm"),
        ("version", "", "version"),
        ("version", "latest", "version"),
        ("fingerprint", "0123", "fingerprint"),
        ("fingerprint", "0123456789ABCDEF", "fingerprint"),
        ("throughput", math.nan, "throughput"),
        ("throughput", -1.0, "throughput"),
        ("throughput", math.inf, "throughput"),
        ("wanted_stage", -2, "wanted_stage"),
        ("settings_json", "{not json", "settings_json"),
        ("settings_json", "[1, 2]", "settings_json"),
        ("settings_json", "x" * 20_000, "settings_json"),
    ],
)
def test_malformed_join_requests_are_invalid_arguments_naming_the_field(field, value, needle):
    msg = join_request_to_pb(request())
    setattr(msg, field, value)
    with pytest.raises(Refused) as err:
        join_request_from_pb(msg)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.message.startswith(needle)


def test_join_request_round_trips_through_protobuf():
    cfg = config()
    req = request(cfg, wanted_stage=1, settings=swarm_settings(cfg, CORPUS_FP))
    assert join_request_from_pb(join_request_to_pb(req)) == req
    assert join_request_from_pb(join_request_to_pb(request())).settings is None


def test_leave_requests_are_checked_against_the_stages():
    assert leave_request_from_pb(pb.LeaveRequest(node_id="a", stage=2), 3).stage == 2
    for bad in (pb.LeaveRequest(node_id="a", stage=3), pb.LeaveRequest(node_id="", stage=0)):
        with pytest.raises(Refused) as err:
            leave_request_from_pb(bad, 3)
        assert err.value.code == "INVALID_ARGUMENT"


# ---- admission --------------------------------------------------------------------------------
def test_admission_refusals_say_what_to_change():
    cfg = config()
    manifest = manifest_for(cfg, CORPUS_FP, "s1")
    admit(request(cfg), manifest, 3)  # the swarm's own config is admitted

    with pytest.raises(Refused, match="serves swarm 's1', not 'other'") as err:
        admit(request(cfg, swarm="other"), manifest, 3)
    assert err.value.code == "FAILED_PRECONDITION"

    with pytest.raises(Refused, match=f"install resbm {VERSION}") as err:
        admit(request(cfg, version="9.9.0"), manifest, 3)
    assert err.value.code == "FAILED_PRECONDITION"
    admit(request(cfg, version=VERSION.rsplit(".", 1)[0] + ".99"), manifest, 3)  # patch differs

    with pytest.raises(Refused, match="wanted_stage") as err:
        admit(request(cfg, wanted_stage=3), manifest, 3)
    assert err.value.code == "INVALID_ARGUMENT"

    other = config(model=tiny_model(d_model=64, compression=16), seed=7)
    theirs = manifest_for(other, CORPUS_FP, "s1")
    bare = request(cfg, fingerprint=theirs.fingerprint)
    with pytest.raises(Refused, match="fingerprint") as err:
        admit(bare, manifest, 3)
    assert err.value.code == "FAILED_PRECONDITION"
    assert manifest.fingerprint in err.value.message and "seed" in err.value.message

    detailed = request(
        cfg, fingerprint=theirs.fingerprint, settings=swarm_settings(other, CORPUS_FP)
    )
    with pytest.raises(Refused) as err:
        admit(detailed, manifest, 3)
    assert "model.d_model: swarm 128, yours 64" in err.value.message
    assert "seed: swarm 0, yours 7" in err.value.message


# ---- replies and status ---------------------------------------------------------------------
def test_join_result_and_status_round_trip_through_protobuf():
    cfg = config()
    manifest = manifest_for(cfg, CORPUS_FP, "s1")
    res = JoinResult(2, manifest, ["/ip4/127.0.0.1/tcp/1/p2p/Qm"])
    assert join_result_from_pb(join_result_to_pb(res)) == res

    swarm = {
        0: {"a": rec("a", 2.0, step=5), "b": rec("b", 1.0, state="joining")},
        1: {},
        2: {"c": rec("c", 3.0, step=4, loss=2.5), "d": rec("d", 1.0, step=4, loss=3.5)},
    }
    st = summarize(swarm, manifest, 3, ["/ip4/1.2.3.4/tcp/5"])
    assert st.current_step == 5 and st.recent_loss == pytest.approx(3.0)
    assert [len(s) for s in st.stages] == [2, 0, 2]
    assert status_from_pb(status_to_pb(st)) == st
    json.dumps(st.to_json())  # `resbm status --json`

    empty = summarize({}, manifest, 3, [])
    assert empty.current_step == 0 and empty.recent_loss is None
    assert status_from_pb(status_to_pb(empty)) == empty

    table = format_status(st)
    assert "recent loss 3.0000" in table and "(no replicas)" in table
    assert "stage 0: 2 replica(s), 2.00 mb/s online" in table


def test_a_finished_run_keeps_its_last_step_after_its_nodes_leave():
    """Found by hand: once a run ended, `resbm status` said step 0/120 (no records left)."""
    from coordinator.history import SwarmWatch

    cfg = config(steps=120)
    manifest = manifest_for(cfg, CORPUS_FP, "s1")
    watch = SwarmWatch(cfg.model)
    swarm = {0: {"a": rec("a", step=120)}, 1: {}, 2: {"c": rec("c", step=120, loss=2.5)}}
    watch.observe(summarize(swarm, manifest, 3, []))
    gone = watch.annotate(summarize({}, manifest, 3, []))  # every node left
    assert gone.current_step == 120 and gone.recent_loss == pytest.approx(2.5)
    assert "step 120/120 (finished)" in format_status(gone)
    running = watch.annotate(summarize({0: {"a": rec("a", step=7)}}, manifest, 3, []))
    assert "step 120/120" in format_status(running)  # never goes back
    assert "(finished)" not in format_status(
        summarize(swarm, manifest_for(config(), CORPUS_FP, "s1"), 3, [])
    )


def test_a_stage_without_replicas_is_named_with_what_can_restore_it():
    """Found by hand: the lone stage-1 replica died at step 27 and `resbm status` kept showing
    step 27/120 with no word of why."""
    from coordinator.history import SwarmWatch, stalls

    cfg = config(steps=120)
    manifest = manifest_for(cfg, CORPUS_FP, "s1")
    alive = {0: {"a": rec("a", step=27)}, 1: {"b": rec("b", step=27)}, 2: {"c": rec("c", step=27)}}
    dead = {**alive, 1: {"j": rec("j", state="joining")}}
    watch = SwarmWatch(cfg.model)
    assert watch.observe(summarize(alive, manifest, 3, [])) == []
    st = summarize(dead, manifest, 3, [], checkpoints={1: 20, 2: 25})
    assert st.checkpoint_steps == [None, 20, 25]
    assert status_from_pb(status_to_pb(st)) == st
    (line,) = stalls(st)
    assert line.startswith("stage 1 has no replica online: training is stalled at step 27")
    assert "(1 joining)" in line and "a checkpoint of step 20 is announced" in line
    assert "STALLED  stage 1 has no replica online" in format_status(st)
    assert watch.observe(st) == [(line, True)]  # logged once, when it happens, as bad news
    assert watch.observe(st) == []
    lost = summarize(dead, manifest, 3, [], checkpoints={2: 25})
    assert "no checkpoint of stage 1 is announced" in stalls(lost)[0]
    assert watch.observe(summarize(alive, manifest, 3, [])) == [
        ("stage 1 has a replica online again: training goes on", False)
    ]
    watch.left(1)  # its replica left through the coordinator: a stop, not a crash
    assert watch.observe(st) == [(line, False)]
    fresh = summarize({0: {}, 1: {}, 2: {}}, manifest, 3, [])  # not started yet: not a stall
    assert stalls(fresh) == [] and "STALLED" not in format_status(fresh)


def test_a_malformed_manifest_from_the_coordinator_is_a_clear_error():
    with pytest.raises(ValueError, match="malformed manifest"):
        join_result_from_pb(pb.JoinReply(stage=0, manifest_json='{"swarm": 1}'))


def test_client_errors_survive_pickling():
    """join_in_subprocess sends them across a process boundary."""
    err = pickle.loads(pickle.dumps(JoinRefused("FAILED_PRECONDITION", "install resbm 0.2.0")))
    assert isinstance(err, JoinRefused) and err.code == "FAILED_PRECONDITION"
    assert err.message == "install resbm 0.2.0"
    assert isinstance(pickle.loads(pickle.dumps(CoordinatorUnavailable("x"))), Exception)


# ---- assignment with placeholders -----------------------------------------------------------
def test_joiners_in_quick_succession_spread_across_stages():
    """Each join sees its predecessors' `joining` placeholders (which add no capacity yet)."""
    swarm: dict[int, dict[str, NodeRecord]] = {0: {}, 1: {}, 2: {}}
    stages = []
    for i in range(6):
        k = assign(swarm, 3)
        swarm[k][f"n{i}"] = rec(f"n{i}", 1.0, state="joining")
        stages.append(k)
    assert stages == [0, 1, 2, 0, 1, 2]
    # with 2 replicas everywhere, online capacity decides first: the weakest stage gets the joiner
    live = {
        k: {f"{k}a": rec(f"{k}a", c), f"{k}b": rec(f"{k}b", c)} for k, c in enumerate([5, 1, 3])
    }
    live[1]["j"] = rec("j", 9.0, state="joining")
    assert assign(live, 3) == 1


def test_every_stage_gets_a_second_replica_before_any_gets_a_third():
    """Found by hand: 4 joins over 2 stages went 3 to stage 0 and 1 to stage 1, and killing
    that lone replica stopped the swarm for good."""
    fast = {0: {"a": rec("a", 9.0), "b": rec("b", 9.0)}, 1: {"c": rec("c", 1.0)}}
    assert assign(fast, 2) == 1  # stage 0 is faster, but stage 1 has a single replica
    slow = {0: {"a": rec("a", 1.0), "b": rec("b", 1.0)}, 1: {"c": rec("c", 9.0)}}
    assert assign(slow, 2) == 1  # and even when stage 1 is the faster stage
    joining = {**slow, 1: {"c": rec("c", 9.0), "d": rec("d", 1.0, state="joining")}}
    assert assign(joining, 2) == 0  # both have 2: throughput decides again
    draining = {**slow, 1: {"c": rec("c", 9.0), "d": rec("d", 9.0, state="draining")}}
    assert assign(draining, 2) == 1  # a draining replica is leaving: it does not count
    swarm: dict[int, dict[str, NodeRecord]] = {0: {}, 1: {}}
    for i in range(4):  # joins 2 s apart: each sees the others online by then
        swarm[assign(swarm, 2)][f"n{i}"] = rec(f"n{i}", 1.0 + i)
    assert sorted(len(r) for r in swarm.values()) == [2, 2]


def test_rebalance_counts_a_restarting_node_so_one_move_is_not_followed_by_another():
    lopsided = {0: {p: rec(p, 2.0) for p in "abc"}, 1: {"d": rec("d", 1.0)}}
    move = rebalance(lopsided, 2)
    assert move is not None
    # the moved node restarts at its new stage: joining, announcing its throughput
    after = {
        0: {p: r for p, r in lopsided[0].items() if p != move.peer_id},
        1: {**lopsided[1], move.peer_id: rec(move.peer_id, 2.0, state="joining")},
    }
    assert rebalance(after, 2) is None


# ---- the join command a coordinator hands out ------------------------------------------------
def test_the_join_command_names_the_bound_port_and_this_machines_address(monkeypatch):
    """Found by hand: a started coordinator only logged DHT multiaddrs; whoever started it had
    to work out what volunteers should type."""
    from coordinator import process
    from node.ops_config import SecurityConfig

    monkeypatch.setattr(process, "outward_address", lambda: "192.168.1.5")
    assert process.join_command("0.0.0.0:0", 7100) == "resbm join --coordinator 192.168.1.5:7100"
    assert process.join_command("[::]:7100", 7100).endswith(" 192.168.1.5:7100")
    assert process.join_command("10.0.0.2:0", 41234) == "resbm join --coordinator 10.0.0.2:41234"
    assert "this machine only" in process.join_command("127.0.0.1:0", 7100)  # loopback
    monkeypatch.setattr(process, "outward_address", lambda: None)  # no route: say what to fill
    assert process.join_command("0.0.0.0:7100", 7100) == (
        "resbm join --coordinator <this machine's address>:7100"
    )
    private = process.join_command("127.0.0.1:0", 7100, SecurityConfig(token="s3cret" * 4))
    assert private.startswith("resbm join --coordinator 127.0.0.1:7100 --token-file TOKEN_FILE  #")
    assert "s3cret" not in private  # the token itself is never printed


def test_the_status_page_shows_the_join_command_escaped():
    from coordinator.web import render_page

    manifest = manifest_for(config(), CORPUS_FP, "s1")
    st = summarize({}, manifest, 3, ["/ip4/1.2.3.4/tcp/5/p2p/Qm"])
    page = render_page(st, join_command="resbm join --coordinator <this machine's address>:7100")
    join = page[page.index("<h2>Join</h2>") :]
    assert "<code>resbm join --coordinator &lt;this machine&#x27;s address&gt;:7100</code>" in join
    assert "/ip4/1.2.3.4/tcp/5/p2p/Qm" in join  # the DHT peers are still listed
    assert "resbm join" not in render_page(st)  # nothing made up when it is not known
