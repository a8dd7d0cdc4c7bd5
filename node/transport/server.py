"""The gRPC server side: accepts stage links and hands each to the node as a `Link`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from node.transport import security as sec
from node.transport.callbudget import CallBudget
from node.transport.diagnostics import add_diagnostics
from node.transport.link import Link, LinkSettings, channel_options, server_options
from node.wire._pb import stage_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

LinkHandler = Callable[[object], Awaitable[None]]  # gets the servicer context; returns at close


class _StageServicer(pb_grpc.StageServicer):
    def __init__(self, on_stream: LinkHandler):
        self._on_stream = on_stream

    async def Link(self, request_iterator, context):
        # reader/writer API: the handler reads with context.read() and writes with context.write()
        await self._on_stream(context)


async def start_server(
    listen: str, on_stream: LinkHandler, settings: LinkSettings, security=None
) -> tuple[grpc.aio.Server, int]:
    """Start serving on HOST:PORT (port 0 = any free port); returns the server and its port.
    `security` (a SecurityConfig): TLS and the token check, see node.transport.security."""
    # unary calls (Ping, DialBack, health) per caller host, before reading
    budget = CallBudget(token=security.token_value() if security is not None else None)
    server = sec.new_server(server_options(settings), security, settings.max_rpcs, [budget])
    pb_grpc.add_StageServicer_to_server(_StageServicer(on_stream), server)
    await sec.add_health(server, "resbm.v1.Stage")
    add_diagnostics(server, security)  # for `resbm doctor`: Ping, DialBack
    port = sec.add_port(server, listen, security)
    if port == 0:
        raise OSError(f"cannot listen on {listen} (address in use or not local?)")
    await server.start()
    return server, port


async def refuse_invalid(context, why: str) -> None:
    """End an incoming Link call with INVALID_ARGUMENT (what did not parse, or no Hello),
    rather than with OK."""
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)


async def refuse_crowded(context, why: str) -> None:
    """End an incoming Link call with RESOURCE_EXHAUSTED (too many links)."""
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)


def dial(address: str, settings: LinkSettings, security=None) -> tuple[grpc.aio.Channel, object]:
    """Open a channel and the Link stream to a neighbour (lazy: connects on first write)."""
    channel = sec.open_channel(address, channel_options(settings), security)
    call = pb_grpc.StageStub(channel).Link(metadata=sec.call_metadata(security))
    return channel, call


__all__ = ["Link", "dial", "refuse_crowded", "refuse_invalid", "start_server"]
