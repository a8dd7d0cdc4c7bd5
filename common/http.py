"""A small aiohttp endpoint on the running event loop, and the Prometheus text response: what a
node's /metrics and the coordinator's web page are both served with."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

SHUTDOWN_S = 2.0


def split_host_port(listen: str) -> tuple[str, int]:
    host, port = listen.rsplit(":", 1)
    return host.strip("[]") or "0.0.0.0", int(port)


def metrics_response(request: web.Request, registry: CollectorRegistry) -> web.Response:
    """The registry in the text format the scraper asked for (Prometheus or OpenMetrics)."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(registry), headers={"Content-Type": content_type})


class HttpEndpoint:
    """An aiohttp app served on HOST:PORT from the running event loop (port 0: any free port).
    `stop` closes the socket and every open connection; nothing outlives it."""

    def __init__(self, app: web.Application):
        self.app = app
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, listen: str) -> int:
        host, port = split_host_port(listen)
        # keep-alive bounded, and a handler whose client hangs up is cancelled
        runner = web.AppRunner(
            self.app,
            access_log=None,
            shutdown_timeout=SHUTDOWN_S,
            keepalive_timeout=15.0,
            handler_cancellation=True,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_port=False)
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise OSError(f"cannot serve HTTP on {listen}: {err.strerror or err}") from None
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
