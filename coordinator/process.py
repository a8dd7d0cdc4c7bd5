"""Process plumbing for `resbm coordinator`: start-up order, the manifest check, signals.

Start-up order: the hivemind DHT first (it forks, and gRPC is not fork-safe), then torch (the
corpus fingerprint that goes into the manifest), then the grpc.aio server inside the uvloop loop.
A coordinator whose config differs from the manifest already in the DHT refuses to start
(ManifestMismatch, exit 2): nobody can fork a swarm by starting another config.

When it is ready it writes a `ready` event to `--events`: {"event": "ready", "port": gRPC port,
"dht_maddrs": [its DHT's visible multiaddrs], "swarm", "fingerprint", "n_stages", "version",
"manifest": "found" | "stored", "pid", "http_port" (with --http-listen)}; failures write an
`error` event with the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import uvloop

from common.logs import setup_logging
from common.process import STOP_GRACE_S, die_with_parent, dump_tasks, hard_exit
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
    setup_logging(cfg.ops.log_level, "[coordinator] ", cfg.ops.log_file, hivemind=True)
    events = EventLog(cfg.events)
    dht = None
    try:
        try:
            # forks: before torch and gRPC
            dht = start_dht(cfg.initial_peers, cfg.dht_listen, cfg.security.token_value())
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

    swarm = SwarmDHT(dht, cfg.swarm, cfg.dht_timeout_s)
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
    page = None
    try:
        if cfg.http_listen:  # status page, /api/status, /metrics (coordinator/web.py)
            from coordinator.web import CoordinatorWeb

            page = CoordinatorWeb(coord)
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
            pid=os.getpid(),
        )
        log.info(
            "swarm %r (%s manifest %s): serving on port %d; DHT at %s",
            cfg.swarm,
            "found" if found else "stored",
            manifest.fingerprint,
            port,
            " ".join(coord.initial_peers),
        )
        await stop.wait()
        log.info("stop requested")
    finally:
        if page is not None:
            await page.stop()
        await coord.stop()
        await server.stop(grace=2.0)
    events.write("exit", code=0)
    return 0
