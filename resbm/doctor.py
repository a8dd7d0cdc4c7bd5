"""`resbm doctor`: before (or while) running a node on the internet, check what usually goes
wrong and say how to fix it: the listen port, whether peers can dial the announced address, DHT
bootstrap and the swarm's manifest, and the latency and bandwidth to a peer.

Reachability is asked of a peer (`Diagnostics.DialBack`, node/transport/diagnostics.py): only
something outside this machine's network can tell whether the port is open from the internet.
The DHT check runs in a spawned child process: hivemind forks, and this process holds gRPC
objects, which must not be forked. Every network call has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import socket
import statistics
import threading
from dataclasses import asdict, dataclass

OK, FAIL, SKIP = "ok", "FAIL", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | FAIL | skip
    detail: str
    fix: str = ""
    value: float | None = None  # latency and round trips in ms, bandwidth in Mbit/s


def add_parser(sub: argparse._SubParsersAction) -> None:
    from node.ops_config import SECURITY_FLAGS
    from node.settings import add_flags

    p = sub.add_parser(
        "doctor",
        help="check ports, reachability, DHT bootstrap, latency and bandwidth; say what to fix",
        description="Check what a node on the internet needs: that --listen can be bound, that "
        "a peer can dial --announce (asked of --peer or --coordinator), that the DHT "
        "bootstraps from --initial-peers (or the coordinator's) and holds the swarm's manifest, "
        "and the latency and bandwidth to the peer. Exit 0 when every check passes, 1 if one "
        "fails, 2 on bad arguments. Security flags (or RESBM_SECURITY__*) as for `resbm node`.",
    )
    p.add_argument("--peer", metavar="HOST:PORT", help="a node's (or any resbm server's) address")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="the swarm's coordinator")
    p.add_argument(
        "--initial-peers",
        nargs="+",
        metavar="MULTIADDR",
        default=[],
        help="DHT bootstrap peers, /ip4/HOST/tcp/PORT/p2p/ID (default: the --coordinator's)",
    )
    p.add_argument("--swarm", help="swarm id whose manifest to look up in the DHT")
    p.add_argument(
        "--coordinator-id",
        metavar="ID",
        help="take only this coordinator's manifest (default: the manifests must agree)",
    )
    p.add_argument("--announce", metavar="HOST:PORT", help="the address peers will dial")
    p.add_argument("--listen", metavar="HOST:PORT", help="where the node will listen")
    p.add_argument("--health", metavar="HOST:PORT", help="only ask the gRPC health service there")
    p.add_argument("--pings", type=int, default=10, help="latency samples (default 10)")
    p.add_argument("--bandwidth-mib", type=float, default=2.0, help="MiB each way (default 2)")
    p.add_argument("--min-mbps", type=float, default=1.0, help="slowest link that passes (1)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_flags(p, SECURITY_FLAGS)
    p.set_defaults(handler=run)


def _security(args: argparse.Namespace):
    """The same SecurityConfig a node resolves: flags over RESBM_SECURITY__* environment."""
    from pydantic_settings import BaseSettings, SettingsConfigDict

    from node.ops_config import SECURITY_FLAGS, SecurityConfig
    from node.settings import ENV_NESTED, ENV_PREFIX, from_args

    class DoctorSettings(BaseSettings):
        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED, extra="ignore"
        )
        security: SecurityConfig = SecurityConfig()

    return from_args(DoctorSettings, args, SECURITY_FLAGS).security


def _validate(args: argparse.Namespace) -> None:
    from node.ops_config import MULTIADDR, check_host_port
    from node.wire.kinds import NODE_ID_PATTERN

    for name in ("peer", "coordinator", "announce", "listen", "health"):
        value = getattr(args, name)
        if value is not None:
            check_host_port(value, allow_zero=False)  # ValueError -> exit 2 with the reason
    for maddr in args.initial_peers:
        if not MULTIADDR.match(maddr) or "/p2p/" not in maddr:
            raise ValueError(f"{maddr!r} is not a multiaddr like /ip4/1.2.3.4/tcp/7200/p2p/Qm..")
    if args.coordinator_id is not None and not re.match(NODE_ID_PATTERN, args.coordinator_id):
        raise ValueError(f"--coordinator-id {args.coordinator_id!r} is not a node id (n-...)")
    if args.pings < 1 or args.bandwidth_mib < 0 or args.timeout <= 0:
        raise ValueError("--pings must be >= 1, --bandwidth-mib >= 0 and --timeout > 0")
    if not (args.peer or args.coordinator or args.initial_peers or args.listen or args.health):
        raise ValueError("nothing to check: give --peer, --coordinator or --initial-peers")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    security = _security(args)
    if args.health:
        checks = [asyncio.run(health_check(args.health, security, args.timeout))]
    else:
        checks = asyncio.run(run_checks(args, security))
    ok = all(c.status != FAIL for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}), flush=True)
    else:
        print(format_checks(checks))
    return 0 if ok else 1


def _why(err: Exception) -> str:
    """An RPC's failure in a few words."""
    code = getattr(err, "code", None)
    return f"{code().name}: {err.details()}" if callable(code) else str(err) or "no answer in time"


def format_checks(checks: list[Check]) -> str:
    lines = [f"{'check':<16} {'result':<6} detail"]
    for c in checks:
        lines.append(f"{c.name:<16} {c.status:<6} {c.detail}")
        if c.fix and c.status != OK:
            lines.append(f"{'':<16} {'':<6} -> {c.fix}")
    return "\n".join(lines)


# ---- the checks -----------------------------------------------------------------------------
async def run_checks(args: argparse.Namespace, security) -> list[Check]:
    checks: list[Check] = []
    swarm, peers = args.swarm, list(args.initial_peers)
    if args.coordinator:
        check, status = await coordinator_check(args.coordinator, security, args.timeout)
        checks.append(check)
        if status is not None:
            swarm = swarm or status.manifest.swarm
            peers = peers or list(status.initial_peers)
    stop = threading.Event()  # set: the DHT child is killed (we are done, or interrupted)
    token = security.token_value() if security is not None else None
    dht = asyncio.create_task(
        asyncio.to_thread(dht_checks, peers, swarm, args.timeout, stop, token, args.coordinator_id)
    )
    try:
        checks += await peer_checks(args, security)
        return checks + await dht  # bounded: the child is killed after its own deadline
    finally:
        stop.set()


async def peer_checks(args: argparse.Namespace, security) -> list[Check]:
    """The listen port, then (with a probe served on it) reachability, latency, bandwidth."""
    checks, server = [], None
    try:
        if args.listen:
            check, server = await listen_check(args.listen, security)
            checks.append(check)
        target = args.peer or args.coordinator
        probing = server is not None
        reach = await reachability_check(target, args.announce, security, args.timeout, probing)
        checks.append(reach)
        return checks + await path_checks(target, args, security)
    finally:
        if server is not None:
            await server.stop(0)


async def health_check(address: str, security, timeout_s: float) -> Check:
    """What a container HEALTHCHECK asks: is the server at `address` SERVING?"""
    import grpc

    from node.transport.diagnostics import health_status

    try:
        status = await health_status(address, security, timeout_s)
    except (grpc.aio.AioRpcError, TimeoutError) as err:
        return Check("health", FAIL, f"{address}: {_why(err)}", "is a node running there?")
    return Check("health", OK if status == "SERVING" else FAIL, f"{address}: {status}")


async def coordinator_check(address: str, security, timeout_s: float):
    from coordinator.client import CoordinatorError, CoordinatorUnreachable, status

    try:
        st = await status(address, timeout_s, security)
    except CoordinatorError as err:
        fix = f"check the address, that the coordinator runs and that {address} is open to you"
        if "UNAUTHENTICATED" in str(err):
            fix = "this swarm is private: pass its token with --token-file"
        # the unreachable error's own hint is "try resbm doctor": this is doctor
        detail = f"{err.address}: {err.cause}" if isinstance(err, CoordinatorUnreachable) else err
        return Check("coordinator", FAIL, str(detail), fix), None
    nodes, m = sum(len(reps) for reps in st.stages), st.manifest
    detail = f"swarm {m.swarm}: {st.n_stages} stages, {nodes} nodes, step {st.current_step}"
    return _version_check("coordinator", detail, st.manifest.version), st


def _version_check(name: str, detail: str, swarm_version: str) -> Check:
    from node.version import VERSION

    theirs = swarm_version.split(".")[:2]
    if theirs == VERSION.split(".")[:2]:
        return Check(name, OK, detail)
    why = f"{detail}; the swarm runs resbm {swarm_version}, this is {VERSION}"
    return Check(name, FAIL, why, f"install resbm {'.'.join(theirs)}.x to join this swarm")


async def listen_check(listen: str, security):
    """Bind --listen as a node would, then serve Diagnostics there for the dial-back."""
    from node.transport import security as sec
    from node.transport.diagnostics import CHANNEL_OPTIONS, add_diagnostics

    host, port = listen.strip("[]").rsplit(":", 1)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            s.bind((host, int(port)))
        except OSError as err:
            fix = BIND_FIXES.get(err.errno, "check the --listen address")
            return Check("listen", FAIL, f"cannot bind {listen}: {err.strerror}", fix), None
    server = sec.new_server(CHANNEL_OPTIONS, security)
    add_diagnostics(server, security)
    try:
        if sec.add_port(server, listen, security) == 0:
            raise OSError(f"gRPC could not bind {listen}")
        await server.start()
    except OSError as err:
        return Check("listen", FAIL, str(err), "pick another --listen port"), None
    return Check("listen", OK, f"{listen} can be bound (serving a probe there now)"), server


BIND_FIXES = {
    errno.EADDRINUSE: "the port is taken: stop what uses it (`ss -ltnp`) or pick another port",
    errno.EADDRNOTAVAIL: "not an address of this machine: listen on 0.0.0.0, announce the public",
    errno.EACCES: "ports below 1024 need root: use a port >= 1024",
}


async def reachability_check(target, announce, security, timeout_s, probing=True) -> Check:
    """`probing`: this process serves a probe at the announced port (else a node must)."""
    import grpc

    from node.transport.diagnostics import DiagnosticsClient

    if announce is None or target is None:
        return Check("reachable", SKIP, "give --announce and --peer (or --coordinator) to test")
    public = f"announce this machine's public address, not {announce}"
    try:
        async with DiagnosticsClient(target, security, timeout_s) as client:
            found = await client.dial_back(announce)
    except (grpc.aio.AioRpcError, TimeoutError) as err:
        why = f"could not ask {target} to dial back: {_why(err)}"
        denied = getattr(err, "code", lambda: None)() == grpc.StatusCode.PERMISSION_DENIED
        return Check("reachable", FAIL, why, public if denied else f"check the address {target}")
    if found.reachable:
        note = f" ({found.error})" if found.error else ""
        detail = f"{target} reached {announce} in {found.rtt_ms:.0f} ms{note}"
        return Check("reachable", OK, detail, "", found.rtt_ms)
    port = announce.rsplit(":", 1)[1]
    fix = (
        f"let TCP port {port} in: forward it on your router to this machine, open it in the "
        f"firewall (e.g. `ufw allow {port}/tcp`), and {public}; or run the node with "
        "--no-reachable (it then dials out to its neighbours)"
    )
    if not probing:
        fix = f"is your node running? (or pass --listen 0.0.0.0:{port} to serve a probe); " + fix
    return Check("reachable", FAIL, f"{target} could not reach {announce}: {found.error}", fix)


async def path_checks(target: str | None, args: argparse.Namespace, security) -> list[Check]:
    """Latency (median of small pings) and bandwidth each way (PING_CHUNK-sized pings)."""
    import grpc

    from node.transport.diagnostics import DiagnosticsClient

    if target is None:
        why = "give --peer (or --coordinator) to measure"
        return [Check(n, SKIP, why) for n in ("latency", "bandwidth up", "bandwidth down")]
    fix = f"check the address, that a resbm node or coordinator runs at {target}, its firewall"
    async with DiagnosticsClient(target, security, args.timeout) as client:
        try:
            rtts = await client.round_trips(args.pings)
        except (grpc.aio.AioRpcError, TimeoutError, ValueError) as err:
            fail = Check("latency", FAIL, f"no answer from {target}: {_why(err)}", fix)
            return [fail, *(Check(n, SKIP, "no path") for n in ("bandwidth up", "bandwidth down"))]
        rtt = statistics.median(rtts)
        ms = f"median {rtt * 1e3:.1f} ms (min {min(rtts) * 1e3:.1f}, max {max(rtts) * 1e3:.1f})"
        checks = [Check("latency", OK, f"{ms} over {len(rtts)} pings to {target}", "", rtt * 1e3)]
        total = int(args.bandwidth_mib * (1 << 20))
        for name, up in (("bandwidth up", True), ("bandwidth down", False)):
            checks.append(await _bandwidth(client, name, up, total, rtt, args))
    return checks


async def _bandwidth(client, name: str, up: bool, total: int, rtt: float, args) -> Check:
    import grpc

    if total == 0:
        return Check(name, SKIP, "--bandwidth-mib 0")
    try:
        mbps = await client.throughput(total, up, rtt) / 1e6
    except (grpc.aio.AioRpcError, TimeoutError, ValueError) as err:
        return Check(name, FAIL, f"a transfer failed: {_why(err)}", "retry; is the link stable?")
    detail = f"{mbps:.1f} Mbit/s over {total / (1 << 20):.1f} MiB"
    if mbps < args.min_mbps:
        fix = "a node's deadlines assume --min-bandwidth-mbps: lower it, or use a faster link"
        return Check(name, FAIL, f"{detail}, under {args.min_mbps:g} Mbit/s", fix)
    return Check(name, OK, detail, "", mbps)


# ---- DHT (in a spawned child: hivemind forks) --------------------------------------------------
def dht_checks(
    peers: list[str],
    swarm: str | None,
    timeout_s: float,
    stop,
    token: str | None = None,
    coordinator_id: str | None = None,
) -> list[Check]:
    """Bootstrap a client-mode DHT from `peers` and read the swarm's manifest, in a child.
    `stop` (a threading.Event): set it to give up now (the child is killed)."""
    import multiprocessing
    import time
    from multiprocessing import resource_tracker
    from unittest.mock import patch

    if not peers:
        why = "give --initial-peers (or --coordinator, which hands out its DHT's addresses)"
        return [Check("dht bootstrap", SKIP, why)]
    with patch.dict(os.environ, PYTHONWARNINGS="ignore:resource_tracker:UserWarning"):
        resource_tracker.ensure_running()  # the child's DHT leaves it semaphores: no warning
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    args = (send, peers, swarm, timeout_s, token, coordinator_id)
    proc = ctx.Process(target=_dht_child, args=args)
    proc.start()
    send.close()
    deadline, got = time.monotonic() + 3 * timeout_s + 60.0, {"bootstrap": "no answer in time"}
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            if recv.poll(0.25):
                got = recv.recv()
                break
    except EOFError:
        got = {"bootstrap": f"the DHT check process died (exit code {proc.exitcode})"}
    finally:
        recv.close()
        with contextlib.suppress(OSError):  # its DHT and p2pd children, if any outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        proc.join(5.0)
    return _dht_report(got, peers, swarm)


def _dht_report(got: dict, peers: list[str], swarm: str | None) -> list[Check]:
    state = got.get("bootstrap")
    if state != "ok":
        fix = "check each multiaddr (with its /p2p/ id) and that its TCP port is open to you"
        return [Check("dht bootstrap", FAIL, f"from {len(peers)} peer(s): {state}", fix)]
    checks = [Check("dht bootstrap", OK, f"joined the DHT through {len(peers)} peer(s)")]
    manifest = got.get("manifest")
    if swarm is None:
        checks.append(Check("swarm manifest", SKIP, "give --swarm to look it up"))
    elif manifest == "absent":
        fix = "check the swarm id (--swarm); a new swarm has a manifest once its coordinator runs"
        checks.append(Check("swarm manifest", FAIL, f"no manifest for swarm {swarm!r}", fix))
    elif isinstance(manifest, dict):
        detail = f"swarm {swarm}: fingerprint {manifest['fingerprint']}, {manifest['steps']} steps"
        checks.append(_version_check("swarm manifest", detail, manifest["version"]))
    else:
        fix = "the DHT answered slowly: retry, or give more --initial-peers"
        checks.append(Check("swarm manifest", FAIL, f"lookup failed: {manifest}", fix))
    return checks


def _dht_child(
    conn, peers: list[str], swarm: str | None, timeout_s: float, token=None, signer=None
) -> None:
    from common.process import die_with_parent, hard_exit

    os.setpgrp()  # our DHT and p2pd join this group: the parent kills it when we are done
    signal.signal(signal.SIGTERM, lambda *_: hard_exit(1))  # ...or we do, if it died first
    die_with_parent()
    try:
        conn.send(_dht_probe(peers, swarm, timeout_s, token, signer))
    except TimeoutError:
        conn.send({"bootstrap": f"no DHT peer answered within {timeout_s:g} s"})
    except Exception as err:  # report anything: the parent must not hang on us
        conn.send({"bootstrap": f"failed: {str(err).split(' (set ')[0] or type(err).__name__}"})
    conn.close()


def _dht_probe(
    peers: list[str], swarm: str | None, timeout_s: float, token=None, signer=None
) -> dict:
    import hivemind

    from node.swarm.dht import DHTUnavailable, SwarmDHT

    validators = []
    if token:  # a private swarm's records are HMAC-gated: read them as its nodes do
        from node.swarm.gating import TokenRecordValidator

        validators.append(TokenRecordValidator(token))
    dht = hivemind.DHT(
        initial_peers=peers, client_mode=True, start=False, record_validators=validators
    )
    try:
        dht.run_in_background(await_ready=True, timeout=timeout_s)
        if swarm is None:
            return {"bootstrap": "ok"}
        try:
            sdht = SwarmDHT(dht, swarm, timeout_s)
            found = asyncio.run(sdht.get_manifest(strict=True, signer=signer))
        except (DHTUnavailable, ValueError) as err:  # ValueError: several manifests
            return {"bootstrap": "ok", "manifest": str(err)}
        keep = {"fingerprint", "version", "steps"}
        return {
            "bootstrap": "ok",
            "manifest": found.model_dump(include=keep) if found else "absent",
        }
    finally:
        dht.shutdown()
