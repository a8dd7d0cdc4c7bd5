"""A private swarm on the wire: mutual TLS, the access token on every RPC, the health service.

TLS identity is "signed by this swarm's CA", never a hostname: peers dial each other by IP
addresses that change, so every certificate `resbm certs` makes carries the one DNS name
SWARM_SAN and every client asks to verify that name (`grpc.ssl_target_name_override`). Servers
require a client certificate signed by the same CA.

The token travels as `authorization: Bearer <token>` metadata and is checked by a server
interceptor before any handler runs, so a refused call never reaches (or changes) the node. The
gRPC health service is exempt: a container orchestrator probing liveness holds no token, and
health reveals nothing but "SERVING". With no token set there is no interceptor (an open swarm).

`security` arguments accept None or an empty SecurityConfig alike: both mean "open, plaintext".
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

import grpc

from node.transport.decoding import DecodeGuard

log = logging.getLogger(__name__)

SWARM_SAN = "resbm-swarm"  # the DNS name in every swarm certificate; clients verify this name
HEALTH_PREFIX = "/grpc.health.v1.Health/"
TOKEN_HINT = "set the swarm's token with --token-file or RESBM_SECURITY__TOKEN"
_LOG_EVERY_S = 60.0  # a refused peer is logged at most this often (a flood must not fill logs)


def _token(security) -> str | None:
    return None if security is None else security.token_value()


def _tls(security) -> bool:
    return security is not None and security.tls


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _tls_files(security) -> tuple[bytes | None, bytes | None, bytes]:
    """(key, cert, ca) PEM bytes, checked here: gRPC itself only says "cannot bind" or fails
    each handshake when a file is not what it should be."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = _read(security.tls_ca)
    try:
        x509.load_pem_x509_certificates(ca)
    except ValueError:
        raise ValueError(f"tls_ca: {security.tls_ca} holds no PEM certificate") from None
    if not security.tls:
        return None, None, ca
    key, cert = _read(security.tls_key), _read(security.tls_cert)
    try:
        public = x509.load_pem_x509_certificate(cert).public_key()
    except ValueError:
        raise ValueError(f"tls_cert: {security.tls_cert} is not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise ValueError(
            f"tls_key: {security.tls_key} is not an unencrypted PEM private key"
        ) from None
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(der, spki) != public.public_bytes(der, spki):
        raise ValueError(f"tls_key: {security.tls_key} is not the key of {security.tls_cert}")
    return key, cert, ca


# ---- server side ---------------------------------------------------------------------------
class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC (but health) whose bearer token is missing or not the swarm's."""

    def __init__(self, token: str):
        self._token = token.encode()
        self._last_logged: dict[str, float] = {}

    def problem(self, metadata) -> str | None:
        """Why a call's metadata does not prove the token; None when it does."""
        sent = None
        for key, value in metadata or ():
            if key == "authorization":
                sent = value if isinstance(value, bytes) else str(value).encode()
        if sent is None:
            return f"this swarm is private and the call carried no access token: {TOKEN_HINT}"
        scheme, _, given = sent.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token):
            return f"wrong access token (it is not this swarm's): {TOKEN_HINT}"
        return None

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        problem = self.problem(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if problem is None or handler is None:
            return handler
        return self._refusal(handler, handler_call_details.method, problem)

    def _note(self, peer: str, method: str, problem: str) -> None:
        now = time.monotonic()
        host = peer.rsplit(":", 1)[0]
        if now - self._last_logged.get(host, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            if len(self._last_logged) > 4096:
                self._last_logged.clear()
            self._last_logged[host] = now
            log.warning("refused %s from %s: %s", method, peer, problem.split(":")[0])

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str, problem: str):
        """A handler of the same kind that aborts at once; requests stay undecoded bytes."""

        async def abort(request_or_iterator, context):
            self._note(context.peer() or "?", method, problem)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        kind = (handler.request_streaming, handler.response_streaming)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kind]
        return make(abort)


def server_interceptors(security) -> list[grpc.aio.ServerInterceptor]:
    token = _token(security)  # the token first: a stranger's bytes are never decoded
    return [DecodeGuard()] if token is None else [TokenInterceptor(token), DecodeGuard()]


def new_server(
    options: list[tuple[str, Any]], security, max_rpcs: int | None = None, first=()
) -> grpc.aio.Server:
    """A grpc.aio server with the token check (if any); warns when the token would be plain.
    `max_rpcs`: calls at once; past it, RESOURCE_EXHAUSTED (gRPC's own answer). `first`:
    interceptors that see a call before the others (a call budget)."""
    if _token(security) is not None and not _tls(security):
        log.warning(
            "the swarm token is checked over plaintext gRPC: anyone on the path can read it; "
            "add --tls-cert/--tls-key/--tls-ca (see `resbm certs`)"
        )
    return grpc.aio.server(
        options=options,
        interceptors=[*first, *server_interceptors(security)],
        maximum_concurrent_rpcs=max_rpcs,
    )


def server_credentials(security) -> grpc.ServerCredentials | None:
    if not _tls(security):
        return None
    key, cert, ca = _tls_files(security)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def add_port(server: grpc.aio.Server, listen: str, security) -> int:
    """Bind HOST:PORT (TLS when configured); returns the port, 0 if it could not bind."""
    creds = server_credentials(security)
    try:
        if creds is None:
            return server.add_insecure_port(listen)
        return server.add_secure_port(listen, creds)
    except RuntimeError as err:  # grpc raises instead of returning 0 on some failures
        raise OSError(f"cannot listen on {listen}: {err}") from None


async def add_health(server: grpc.aio.Server, *services: str):
    """Register the standard health service, SERVING for the server ("") and each service."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *services):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


# ---- client side ---------------------------------------------------------------------------
def client_options(security) -> list[tuple[str, Any]]:
    return [("grpc.ssl_target_name_override", SWARM_SAN)] if _tls_client(security) else []


def _tls_client(security) -> bool:
    return security is not None and security.tls_ca is not None


def channel_credentials(security) -> grpc.ChannelCredentials | None:
    """Verify the server against the swarm's CA; present our certificate when we have one."""
    if not _tls_client(security):
        return None
    key, cert, ca = _tls_files(security)
    return grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)


def open_channel(address: str, options: list[tuple[str, Any]], security) -> grpc.aio.Channel:
    creds = channel_credentials(security)
    options = [*options, *client_options(security)]
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, creds, options=options)


def call_metadata(security) -> tuple[tuple[str, str], ...] | None:
    token = _token(security)
    return None if token is None else (("authorization", f"Bearer {token}"),)


async def auth_refusal(call) -> str | None:
    """If a finished call was refused for its token, why (the server's words); else None.
    Such a refusal is permanent: callers must not retry it."""
    try:
        if not call.done() or await call.code() != grpc.StatusCode.UNAUTHENTICATED:
            return None
        return f"UNAUTHENTICATED: {await call.details()}"
    except Exception:  # a call object that cannot tell: not an auth refusal we know of
        return None
