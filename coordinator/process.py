"""Process plumbing for `resbm coordinator`: start-up order, the manifest check, signals.

Start-up order: the hivemind DHT first (it forks, and gRPC is not fork-safe), then torch (the
corpus fingerprint that goes into the manifest), then the grpc.aio server inside the uvloop loop.
A coordinator whose config differs from the manifest already in the DHT refuses to start
(ManifestMismatch, exit 2): nobody can fork a swarm by starting another config.

When it is ready it writes a `ready` event to `--events`: {"event": "ready", "port": gRPC port,
"dht_maddrs": [its DHT's visible multiaddrs], "swarm", "fingerprint", "n_stages", "version",
"manifest": "found" | "stored", "pid", "http_port" (with --http-listen), "join": the command a
volunteer pastes (see join_command)}; failures write an `error` event with the message. The same
command is printed on stdout and shown on the status page: the one thing a person starting a
swarm needs to tell the people who join it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

import uvloop

from common.identity import Identity
from common.logs import setup_logging
from common.process import STOP_GRACE_S, bound_heap, die_with_parent, dump_tasks, hard_exit
from coordinator.config import CoordinatorConfig
from node.events import EventLog
from node.swarm.dht import SwarmDHT, start_dht, visible_maddrs
from node.swarm.manifest import manifest_for
from node.swarm.records import Manifest
from node.version import VERSION

log = logging.getLogger("coordinator")


class StartError(ValueError):
    """The coordinator cannot start with this config (a DHT it cannot join, a port in use)."""


class _Stopped(BaseException):
    """SIGINT/SIGTERM before the event loop runs: unwind, so the DHT child is shut down."""


def _stop_starting(signum, frame) -> None:
    raise _Stopped


def run_coordinator(cfg: CoordinatorConfig) -> int:
    """Run the coordinator until SIGINT/SIGTERM (exit 0). Raises ManifestMismatch or StartError
    (both ValueErrors: `resbm` prints them and exits 2)."""
    die_with_parent()
    bound_heap()
    setup_logging(cfg.ops.log_level, "[coordinator] ", cfg.ops.log_file, hivemind=True)
    events = EventLog(cfg.events)
    dht = None
    try:
        try:
            # forks: before torch and gRPC
            dht = start_dht(
                cfg.initial_peers, cfg.dht_listen, cfg.security.token_value(), swarm=cfg.swarm
            )
        except Exception as err:
            raise StartError(
                f"cannot start a DHT node on {cfg.dht_listen} (--dht-listen) with initial peers "
                f"{cfg.initial_peers or 'none'} (--initial-peers): {err}"
            ) from None
        for sig in (signal.SIGINT, signal.SIGTERM):  # until the loop installs its own
            signal.signal(sig, _stop_starting)
        from node.shards import data_info  # torch-free: reads the data's manifest

        manifest = manifest_for(cfg, data_info(cfg.data).fingerprint, cfg.swarm)
        return uvloop.run(_amain(cfg, dht, manifest, events))
    except _Stopped:
        log.info("stopped while starting")
        return 0
    except (ValueError, OSError) as err:
        events.write("error", message=str(err))
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            raise StartError(str(err)) from None
        raise
    finally:
        events.close()
        if dht is not None:
            dht.shutdown()


WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]", "*")
UNKNOWN_HOST = "<this machine's address>"


def outward_address() -> str | None:
    """This machine's address on the interface its default route leaves by (connecting a UDP
    socket sends nothing), or None without a route. Not necessarily what the internet sees:
    behind NAT it is a private address."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routed like any remote host, never contacted
            host = s.getsockname()[0]
    except OSError:
        return None
    return None if host.startswith("127.") or host == "0.0.0.0" else host


def join_command(listen: str, port: int, security=None) -> str:
    """What a volunteer runs on another machine to join this swarm: `resbm join --coordinator
    HOST:PORT` with the port actually bound (--listen may say 0) and, when listening on every
    interface, this machine's outward address (a placeholder when it has none). A private swarm
    also needs its token (and, with TLS, certificates): never printed, the command names the
    flags that take them."""
    host = listen.rsplit(":", 1)[0]
    if host in WILDCARD_HOSTS:
        host = outward_address() or UNKNOWN_HOST
    line = f"resbm join --coordinator {host}:{port}"
    if security is not None and security.token_value() is not None:
        line += " --token-file TOKEN_FILE"
    if security is not None and security.tls_ca is not None:  # mutual TLS: a cert of its CA
        line += " --tls-cert NODE_PEM --tls-key NODE_KEY --tls-ca CA_PEM"
    if host in ("127.0.0.1", "localhost", "::1", "[::1]"):  # a comment: still pasteable
        line += "  # this machine only: --listen 0.0.0.0:PORT lets others join"
    return line


async def _amain(cfg: CoordinatorConfig, dht, manifest: Manifest, events: EventLog) -> int:
    from coordinator.service import Coordinator, serve  # gRPC: only after the DHT's fork

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[int] = []

    def on_stop_signal() -> None:
        # first signal: a clean stop; a second one, or a stop that hangs, exits anyway
        signals.append(1)
        if len(signals) > 1:
            hard_exit(1)
        stop.set()
        loop.call_later(STOP_GRACE_S, hard_exit, 1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop_signal)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)

    identity = Identity.for_node(cfg.identity_file)  # seals the manifest and moves (#10 M1)
    swarm = SwarmDHT(dht, cfg.swarm, cfg.dht_timeout_s, identity=identity)
    coord = Coordinator(cfg, swarm, manifest, visible_maddrs(dht), events)
    starting = asyncio.ensure_future(coord.publish_manifest())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not starting.done():  # stopped while reading the DHT: a clean exit
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return 0
    found = starting.result()  # raises ManifestMismatch
    server, port = await serve(coord, cfg.listen, cfg.security)
    coord.start()
    join = join_command(cfg.listen, port, cfg.security)
    page = None
    try:
        if cfg.http_listen:  # status page, /api/status, /metrics (coordinator/web.py)
            from coordinator.web import CoordinatorWeb

            page = CoordinatorWeb(coord, join_command=join)
            await page.start(cfg.http_listen)
        events.write(
            "ready",
            port=port,
            http_port=page.port if page else None,
            dht_maddrs=coord.initial_peers,
            swarm=cfg.swarm,
            fingerprint=manifest.fingerprint,
            n_stages=cfg.model.n_stages,
            version=VERSION,
            manifest="found" if found else "stored",
            coordinator_id=identity.node_id,
            pid=os.getpid(),
            join=join,
        )
        log.info(
            "swarm %r (%s manifest %s): coordinator %s serving on port %d; DHT at %s",
            cfg.swarm,
            "found" if found else "stored",
            manifest.fingerprint,
            identity.node_id,
            port,
            " ".join(coord.initial_peers),
        )
        print(f"ready: to join this swarm from another machine, run\n  {join}", flush=True)
        await stop.wait()
        log.info("stop requested")
    finally:
        if page is not None:
            await page.stop()
        await coord.stop()
        await server.stop(grace=2.0)
    events.write("exit", code=0)
    return 0
