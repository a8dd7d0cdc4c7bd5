"""Process plumbing for `resbm node`: start-up order, signals, parent death, the event loop.

Start-up order in every process: anything that forks (hivemind's DHT, from issue #4) first, then
torch compute and gRPC objects, all created inside the running uvloop loop: gRPC is not fork-safe
and a child forked after multithreaded torch work can hang.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import uvloop

from common.identity import Identity, IdentityError
from common.logs import setup_logging
from common.process import STOP_GRACE_S, bound_heap, die_with_parent, dump_tasks, hard_exit
from node.errors import EXIT_CONFIG, EXIT_TEMPFAIL, Unreachable


class StartupError(RuntimeError):
    """The node cannot join: the message says why (and what to change)."""


def stage_numel(cfg) -> int:
    """Parameter count of our stage, from the model definition on the meta device: no compute
    (the averager's shared buffer must exist before torch does any work in this process)."""
    import torch

    from node.model.resbm import ResBM

    with torch.device("meta"):
        stage = ResBM(cfg.model).stage(cfg.stage)
    return sum(p.numel() for p in stage.parameters())


def pin_coordinator(
    pinned: str | None, answered: str, address: str, learned: bool = False
) -> str | None:
    """The coordinator id this node takes moves and the manifest from: the one the user pinned,
    which the coordinator at `address` must then hold, else the one its Join answer names
    (#10 M1). A pin `learned` from an earlier answer (a restart after a move) gives way: the
    coordinator may have restarted with a new key (it is only as strong as that channel)."""
    if pinned is not None and pinned != answered and learned:
        logging.getLogger(__name__).warning(
            "the coordinator at %s is now %s (was %s)", address, answered or "unnamed", pinned
        )
    elif pinned is not None and pinned != answered:
        raise StartupError(
            f"the coordinator at {address} is {answered or 'unnamed'}, not {pinned} "
            "(coordinator_id, --coordinator-id): is it this swarm's coordinator?"
        )
    return answered or None


def join_swarm(cfg, identity: Identity, dht=None):
    """Swarm mode, before anything else: ask the coordinator for a stage (in a spawned child,
    see coordinator.client), start the DHT (unless `resbm join` already did), check the
    manifest, start the averager. Returns the (possibly updated) config, the DHT and the
    averager."""
    from node.shards import data_info
    from node.swarm.manifest import (
        ManifestConflict,
        ManifestMismatch,
        check_manifest,
        manifest_for,
    )
    from node.swarm.p2p_key import peer_id_of

    ours = manifest_for(cfg, cfg.swarm_data or data_info(cfg.data).fingerprint, cfg.swarm)
    joined = None
    if cfg.coordinator:
        from coordinator.client import (
            CoordinatorUnavailable,
            CoordinatorUnreachable,
            JoinRefused,
        )
        from coordinator.messages import JoinRequest

        request = JoinRequest(
            node_id=cfg.node_id,
            swarm=cfg.swarm,
            version=ours.version,
            fingerprint=ours.fingerprint,
            throughput=1.0,
            wanted_stage=-1 if cfg.wanted_stage is None else cfg.wanted_stage,
            settings=ours.settings,
        )
        try:
            joined = _join(cfg, request, identity)
        except JoinRefused as err:
            raise StartupError(f"the coordinator refused this node: {err}") from None
        except CoordinatorUnreachable as err:  # it says why, and what to check
            raise Unreachable(str(err)) from None
        except CoordinatorUnavailable as err:  # connected, but no answer in time
            raise Unreachable(f"{err}: try again later") from None
        pinned = pin_coordinator(
            cfg.coordinator_id, joined.coordinator_id, cfg.coordinator, cfg.coordinator_learned
        )
        learned = cfg.coordinator_learned or cfg.coordinator_id is None
        cfg = cfg.model_copy(
            update={
                "stage": joined.stage,
                "initial_peers": list(cfg.initial_peers) or list(joined.initial_peers),
                "coordinator_id": pinned,  # only its manifest and moves count (#10 M1)
                "coordinator_learned": learned,
            }
        )
        logging.getLogger(__name__).info("coordinator assigned stage %d", joined.stage)
    if dht is not None and dht.peer_id.to_bytes() != peer_id_of(identity.public_key):
        # `resbm join` read the swarm before it knew our key (it lives under the swarm's
        # state dir): our averager's peer id must be our key's (node/swarm/p2p_key.py)
        dht.shutdown()
        dht = None
    if dht is None:
        from node.swarm.dht import start_dht

        dht = start_dht(
            cfg.initial_peers, cfg.dht_listen, cfg.security.token_value(), not cfg.reachable,
            cfg.swarm, identity,
        )  # fmt: skip
        if not cfg.initial_peers:  # nobody to bootstrap from: this node starts the swarm
            from node.swarm.dht import visible_maddrs

            logging.getLogger(__name__).warning(
                "started a new swarm %r (no --initial-peers given): it trains once every stage "
                "has a node; others join with: resbm join --swarm %s --initial-peers %s",
                cfg.swarm,
                cfg.swarm,
                " ".join(visible_maddrs(dht)[:1]) or "<this node's DHT address>",
            )
    try:
        from node.swarm.dht import DHTUnavailable, SwarmDHT

        swarm = SwarmDHT(dht, cfg.swarm, identity=identity)
        try:
            theirs = asyncio.run(swarm.get_manifest(strict=True, signer=cfg.coordinator_id))
        except DHTUnavailable as err:
            raise Unreachable(f"{err}: check --initial-peers and the network") from None
        except ManifestConflict as err:
            raise StartupError(str(err)) from None
        if theirs is None and joined is not None:  # not in the DHT yet: its Join answer's
            theirs = joined.manifest
        if theirs is None and cfg.coordinator_id is not None:  # never a founder's: wait
            raise Unreachable(
                f"no manifest of coordinator {cfg.coordinator_id} (coordinator_id) in the "
                "DHT yet: is it up? check --initial-peers"
            )
        if theirs is None:
            asyncio.run(swarm.put_manifest(ours))
        else:
            try:
                check_manifest(theirs, ours)
            except ManifestMismatch as err:
                raise StartupError(str(err)) from None
        cfg = fetch_data(cfg, theirs or ours)
        from node.swarm.averaging import StageAverager
        from node.swarm.records import averaging_prefix

        averager = StageAverager(
            dht,
            averaging_prefix(cfg.swarm, cfg.stage),
            stage_numel(cfg),
            # no fixed group size: a round waits `matchmaking_s` for whoever comes (replicas,
            # joiners), so a group never closes on a replica that would then fall behind
            target_group_size=None,
            matchmaking_s=cfg.matchmaking_s,
            allreduce_timeout_s=cfg.allreduce_timeout_s,
            identity=identity,
        )
    except BaseException:
        dht.shutdown()
        raise
    return cfg, dht, averager


def _join(cfg, request, identity: Identity):
    """The Join. A coordinator that cannot be reached fails at once, with its cause, for a node
    that knows no peer (a mistyped address, a coordinator not started: found by hand, where a
    join sat silent for a minute); a node given --initial-peers knows the swarm is there and
    waits up to --connect-timeout for its coordinator to come back (a restart)."""
    import time

    from coordinator.client import CoordinatorUnreachable, join_in_subprocess
    from coordinator.signing import sign

    deadline, said = time.monotonic() + cfg.connect_timeout_s, False
    while True:
        try:
            signed = sign(request, cfg.swarm, identity)  # each try: within the clock window
            return join_in_subprocess(
                cfg.coordinator, signed, cfg.connect_timeout_s, security=cfg.security
            )
        except CoordinatorUnreachable as err:
            if not cfg.initial_peers or time.monotonic() > deadline:
                raise
            if not said:  # once: a line, not one per attempt
                logging.getLogger(__name__).warning(
                    "%s; the swarm's peers are known: waiting for it up to %.0f s "
                    "(--connect-timeout)",
                    err,
                    cfg.connect_timeout_s,
                )
                said = True
            time.sleep(1.0)


def fetch_data(cfg, manifest):
    """Stage 0 and the last stage cut microbatches from the data; when this machine has not got
    it (`swarm_data` set by `resbm join`), fetch the manifest's data_source into the state dir
    and check every shard against the swarm's fingerprint. Middle stages never download it,
    unless the model re-embeds tokens on every stage (`reembed`)."""
    if cfg.swarm_data is None or not cfg.model.needs_tokens(cfg.stage):
        return cfg
    if not manifest.data_source:
        raise StartupError(
            f"stage {cfg.stage} needs the swarm's data (fingerprint {cfg.swarm_data}) and the "
            "swarm's manifest names no data_source: pass --data DIR with a copy of it"
        )
    from node.datasource import fetch
    from node.joining import default_state_dir
    from node.shards import data_info

    if getattr(cfg, "state_dir", None):
        home = Path(cfg.state_dir) / cfg.swarm
    elif cfg.checkpoint_dir is not None:  # a joiner re-executed as a node keeps its checkpoints
        home = Path(cfg.checkpoint_dir).parent  # under STATE_DIR/SWARM/ (joining.local_defaults)
    else:
        home = default_state_dir() / cfg.swarm
    logging.getLogger(__name__).info(
        "stage %d needs the data: fetching %s", cfg.stage, manifest.data_source
    )
    try:
        path = fetch(manifest.data_source, home / "data" / cfg.swarm_data)
    except FileNotFoundError as err:  # a local source that is not there: a config problem
        raise StartupError(f"the swarm's data_source: {err}") from None
    except OSError as err:  # the network or the source's host: worth a later retry
        msg = f"cannot fetch the swarm's data from {manifest.data_source}: {err}"
        raise Unreachable(msg) from None
    except ValueError as err:  # a shard that fails its hash: nothing trains on it
        raise StartupError(f"the swarm's data from {manifest.data_source}: {err}") from None
    got = data_info(path).fingerprint
    if got != cfg.swarm_data:
        raise StartupError(
            f"the data at {manifest.data_source} has fingerprint {got}, the swarm trains on "
            f"{cfg.swarm_data}: the swarm's data_source is stale; pass --data DIR"
        )
    return cfg.model_copy(update={"data": path, "swarm_data": None})


def run_node(cfg) -> int:
    """Run one stage node until the run ends or a signal stops it; returns the exit code."""
    die_with_parent()
    bound_heap()
    parent = os.getppid()
    dht = averager = None
    try:
        cfg, identity = with_identity(cfg)
    except IdentityError as err:
        return startup_failed(err)
    if cfg.swarm:
        setup_logging(cfg.ops.log_level, f"[{cfg.node_id}] ", cfg.ops.log_file, hivemind=True)
        try:
            cfg, dht, averager = join_swarm(cfg, identity)
        except (StartupError, Unreachable) as err:
            return startup_failed(err)
    else:
        setup_logging(cfg.ops.log_level, f"[stage {cfg.stage}] ", cfg.ops.log_file)
        if cfg.next is None and cfg.stage < cfg.model.n_stages - 1:  # it would wait forever
            return startup_failed(
                StartupError(
                    f"stage {cfg.stage} of a fixed pipeline dials the next stage: give --next "
                    "HOST:PORT (or --swarm ID to find its neighbours in a DHT)"
                )
            )
    return serve(cfg, dht, averager, parent, identity)


HANDOVER_PREFIX = "resbm-restart-"  # restart_at hands a fresh key over in such a directory


def _handed_over(path) -> bool:
    path = Path(path)
    return path.parent.name.startswith(HANDOVER_PREFIX) and path.parent.parent == Path(
        tempfile.gettempdir()
    )


def with_identity(cfg):
    """The node's key (common/identity.py), and its config with the id derived from it."""
    identity = Identity.for_node(cfg.identity_file, cfg.node_id)
    if cfg.identity_file is not None and _handed_over(cfg.identity_file):
        shutil.rmtree(Path(cfg.identity_file).parent, ignore_errors=True)  # read: not kept
        cfg = cfg.model_copy(update={"identity_file": None})
    return cfg.model_copy(update={"node_id": identity.node_id}), identity


def run_join(cfg) -> int:
    """`resbm join`: learn the swarm (coordinator or DHT), take its manifest's settings, pick
    a stage, then run as `resbm node` does."""
    from node.joining import JoinError, prepare_join, remember_stage

    die_with_parent()
    bound_heap()
    parent = os.getppid()
    setup_logging(cfg.ops.log_level, "[join] ")
    dht = None
    try:
        cfg, dht = prepare_join(cfg)  # now we know our key and log file (under --state-dir)
        cfg, identity = with_identity(cfg)
        setup_logging(cfg.ops.log_level, f"[{cfg.node_id}] ", cfg.ops.log_file, hivemind=True)
        cfg, dht, averager = join_swarm(cfg, identity, dht)
        remember_stage(cfg)
    except (StartupError, JoinError, Unreachable, ValueError) as err:  # ValueError: log file
        if dht is not None:  # (IdentityError is a ValueError)
            dht.shutdown()
        return startup_failed(err)
    return serve(cfg, dht, averager, parent, identity)


def startup_failed(err: Exception) -> int:
    """Say why, and exit so that a service manager does the right thing: restart later when the
    swarm did not answer (75), never when the configuration cannot work (2)."""
    logging.getLogger(__name__).error("%s", err)
    print(f"error: {err}", file=sys.stderr)
    return EXIT_TEMPFAIL if isinstance(err, Unreachable) else EXIT_CONFIG


def serve(cfg, dht, averager, parent: int, identity: Identity) -> int:
    """Run the stage node in uvloop until the run ends or a signal stops it."""
    moved: list[int] = []

    async def amain() -> int:
        from node.daemon import StageNode  # torch + grpc: only after anything that forks

        node = StageNode(cfg, dht, averager, identity)
        loop = asyncio.get_running_loop()
        stops = []

        def on_stop_signal() -> None:
            # first signal: a clean stop (drain); if that hangs, or on a second signal, or when
            # our launcher died (the kernel's parent-death signal), exit now with our children
            stops.append(1)
            if len(stops) > 1 or os.getppid() != parent:
                hard_exit(1)
            node.request_stop()
            loop.call_later(STOP_GRACE_S, hard_exit, 1)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_stop_signal)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        code = await node.run()
        if node.move_to is not None and code == 0:
            moved.append(node.move_to)
        return code

    try:
        code = uvloop.run(amain())
    finally:
        if averager is not None:
            averager.shutdown()
        if dht is not None:
            dht.shutdown()
    if moved:
        restart_at(cfg, moved[0], identity)
    return code


def restart_at(cfg, stage: int, identity: Identity) -> None:
    """Become a fresh node process for `stage` (same pid and node id, so launchers and the
    coordinator still know us): a new DHT, averager and model, per the start-up order."""
    import json

    from node.joining import remember_stage
    from node.node_config import NodeConfig

    update = {"stage": stage, "wanted_stage": stage, "resume": False}
    if cfg.identity_file is None or _handed_over(cfg.identity_file):
        # a fresh key: the restart keeps it (and so our id), through a private directory that
        # the new process removes once it has read the key (with_identity)
        key = Path(tempfile.mkdtemp(prefix=HANDOVER_PREFIX)) / "identity.key"
        identity.save(key)
        update["identity_file"] = str(key)
    remember_stage(cfg.model_copy(update=update))  # a later restart of `resbm join` goes there
    data = json.loads(cfg.model_copy(update=update).model_dump_json())
    data = {k: v for k, v in data.items() if k in NodeConfig.model_fields}  # a JoinConfig too
    token = cfg.security.token_value()
    data["security"].pop("token", None)  # a JSON dump masks it: hand it on in the environment
    if token is not None:
        os.environ["RESBM_SECURITY__TOKEN"] = token
    fd, path = tempfile.mkstemp(prefix="resbm-node-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    logging.getLogger(__name__).warning("restarting as a node of stage %d", stage)
    logging.shutdown()
    argv = [sys.executable, "-m", "resbm.cli", "node", "--config", path]
    os.execv(sys.executable, argv)
