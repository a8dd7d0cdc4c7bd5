"""Undecodable requests get INVALID_ARGUMENT, on every server (#10).

gRPC decodes a request before our handler sees it, and a protobuf that does not parse came back
as UNKNOWN ("Unexpected DecodeError") on unary calls, while on the Stage/Link stream it ended
the call with OK. This interceptor gives every method a decoder that does not raise: a unary
call whose request does not parse is refused with INVALID_ARGUMENT and a reason; on a stream,
the handler reads `UNDECODABLE` and refuses that message like any other garbage (node/transport/
link.py: an ErrorReport with INVALID_ARGUMENT, and a ban)."""

from __future__ import annotations

import grpc

UNDECODABLE = object()  # what a stream handler reads for a message that does not parse


def _lenient(parse):
    def decode(data: bytes):
        try:
            return parse(data)
        except Exception:  # protobuf's DecodeError, or anything a hostile payload raises
            return UNDECODABLE

    return decode


class DecodeGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        decode = _lenient(handler.request_deserializer)
        out = handler.response_serializer
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                if request is UNDECODABLE:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the request does not parse"
                    )
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, decode, out)
        if handler.stream_stream is not None:  # the handler reads UNDECODABLE and refuses it
            return grpc.stream_stream_rpc_method_handler(handler.stream_stream, decode, out)
        return handler  # no unary-stream or stream-unary methods are served
