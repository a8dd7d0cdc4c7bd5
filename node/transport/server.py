"""The gRPC server side: accepts stage links and hands each to the node as a `Link`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

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
    listen: str, on_stream: LinkHandler, settings: LinkSettings
) -> tuple[grpc.aio.Server, int]:
    """Start serving on HOST:PORT (port 0 = any free port); returns the server and its port."""
    server = grpc.aio.server(options=server_options(settings))
    pb_grpc.add_StageServicer_to_server(_StageServicer(on_stream), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen} (address in use or not local?)")
    await server.start()
    return server, port


def dial(address: str, settings: LinkSettings) -> tuple[grpc.aio.Channel, object]:
    """Open a channel and the Link stream to a neighbour (lazy: connects on first write)."""
    channel = grpc.aio.insecure_channel(address, options=channel_options(settings))
    call = pb_grpc.StageStub(channel).Link()
    return channel, call


__all__ = ["Link", "dial", "start_server"]
