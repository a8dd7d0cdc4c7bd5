"""A private swarm on loopback: the token interceptor, mutual TLS with `resbm certs`
certificates, and the health service, on a real stage server and a real coordinator.

The stage server's handler records every call that reaches it: a refused caller must never get
there (nothing it sent is applied). The coordinator's DHT forks: it is created (autouse, module
scope) before any gRPC object of this module."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.identity import Identity
from coordinator.client import CoordinatorRefused, JoinRefused, join, join_in_subprocess, status
from coordinator.config import CoordinatorConfig
from coordinator.messages import JoinRequest
from coordinator.service import Coordinator, serve
from node.ops_config import SecurityConfig
from node.peering import Neighbours, PeeringError
from node.swarm.dht import SwarmDHT, start_dht, visible_maddrs
from node.swarm.manifest import manifest_for
from node.transport.link import Link, LinkClosed, LinkSettings
from node.transport.security import auth_refusal, open_channel
from node.transport.server import dial, start_server
from node.version import VERSION
from node.wire.messages import Hello
from resbm.certs import make_certs
from tests.helpers import tiny_model

TOKEN = "the-swarm-token-0123456789"
WRONG = "not-the-token-9876543210"
TIMEOUT_S = 10.0
SHAPE = (2, 16, 1)
SETTINGS = LinkSettings(base_timeout_s=5.0)


@pytest.fixture(scope="module", autouse=True)
def dht():
    node = start_dht([], token=TOKEN)  # forks: before any gRPC object
    yield node
    node.shutdown()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    swarm = tmp_path_factory.mktemp("pki")
    make_certs(swarm, "tiny", ["node-0", "node-1", "coordinator", "admin"])
    rogue = tmp_path_factory.mktemp("rogue")
    make_certs(rogue, "tiny", ["node-x"])  # same names, another CA
    return {"swarm": swarm, "rogue": rogue}


def sec(pki=None, name=None, token=None, ca="swarm", where="swarm") -> SecurityConfig:
    """token only, TLS only, or both; `where`/`ca`: whose certificate and whose CA."""
    tls = {}
    if name is not None:
        d = pki[where]
        tls = dict(tls_cert=d / f"{name}.pem", tls_key=d / f"{name}-key.pem")
    if ca is not None and pki is not None:
        tls["tls_ca"] = pki[ca] / "ca.pem"
    return SecurityConfig(token=token, **tls)


class EchoServer:
    """A real stage server whose handler echoes the first message and records every call."""

    def __init__(self):
        self.calls = 0

    async def handle(self, context) -> None:
        self.calls += 1
        link = Link(context, SETTINGS, SHAPE, SHAPE[0], "echo")
        link.start()
        try:
            link.post(await link.recv())
            await link.drain()
        except LinkClosed:
            pass
        await link.aclose()

    async def __aenter__(self):
        return self

    async def start(self, security) -> str:
        self.server, port = await start_server("127.0.0.1:0", self.handle, SETTINGS, security)
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc):
        await self.server.stop(grace=1.0)


async def round_trip(address: str, security):
    """Send a Hello over a plain transport link; returns (echoed message or None, call)."""
    channel, call = dial(address, SETTINGS, security)
    link = Link(call, SETTINGS, SHAPE, SHAPE[0], "client")
    link.start()
    try:
        link.post(Hello(0, "fp", "client", VERSION))
        return await asyncio.wait_for(link.recv(), TIMEOUT_S), call
    except LinkClosed:
        return None, call
    finally:
        await link.aclose()
        await channel.close()


# ---- the token on the Stage Link RPC --------------------------------------------------------
@pytest.mark.parametrize("client_token", [None, WRONG], ids=["missing", "wrong"])
async def test_bad_token_is_unauthenticated_and_never_reaches_the_handler(client_token):
    async with EchoServer() as srv:
        address = await srv.start(SecurityConfig(token=TOKEN))
        reply, call = await round_trip(address, SecurityConfig(token=client_token))
        assert reply is None
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
        details = await call.details()
        assert ("no access token" if client_token is None else "wrong access token") in details
        assert TOKEN not in details and WRONG not in details
        assert srv.calls == 0  # nothing the caller sent was read, let alone applied


async def test_right_token_links():
    async with EchoServer() as srv:
        address = await srv.start(SecurityConfig(token=TOKEN))
        reply, _ = await round_trip(address, SecurityConfig(token=TOKEN))
        assert reply == Hello(0, "fp", "client", VERSION)
        assert srv.calls == 1


def neighbours(stage: int, security) -> Neighbours:
    return Neighbours(stage, 2, "fp", SETTINGS, SHAPE, SHAPE[0], Counter(), security=security)


async def test_peering_stops_at_once_on_a_token_refusal_and_links_with_the_right_one():
    server, good, bad = (
        neighbours(1, SecurityConfig(token=TOKEN)),
        neighbours(0, SecurityConfig(token=TOKEN)),
        neighbours(0, SecurityConfig(token=WRONG)),
    )
    try:
        port = await server.listen("127.0.0.1:0")
        # dial retries a dead or not-yet-started neighbour for `timeout_s`; a refused token is
        # final: it must come back at once (well inside the retry window), naming the cause
        with pytest.raises(PeeringError, match="UNAUTHENTICATED: wrong access token"):
            await asyncio.wait_for(bad.dial(f"127.0.0.1:{port}", timeout_s=600), 60)
        assert not server.links()
        assert await good.dial(f"127.0.0.1:{port}", timeout_s=30) == server.node_id
        assert list(good.downs) == [server.node_id]
    finally:
        for n in (bad, good, server):
            await n.close()


# ---- mutual TLS with `resbm certs` certificates ---------------------------------------------
async def test_tls_and_token_link_through_peering(pki):
    server = neighbours(1, sec(pki, "node-1", TOKEN))
    client = neighbours(0, sec(pki, "node-0", TOKEN))
    try:
        port = await server.listen("127.0.0.1:0")
        assert await client.dial(f"127.0.0.1:{port}", timeout_s=30) == server.node_id
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize(
    "client",
    [
        dict(name="node-x", where="rogue", ca="rogue"),  # another swarm altogether
        dict(name="node-x", where="rogue", ca="swarm"),  # trusts us, but its cert is not ours
        dict(name=None, ca="swarm"),  # verifies the server but shows no certificate
        dict(name=None, ca=None),  # plaintext
    ],
    ids=["other-ca", "other-ca-cert", "no-client-cert", "plaintext"],
)
async def test_tls_refuses_what_our_ca_did_not_sign(pki, client):
    async with EchoServer() as srv:
        address = await srv.start(sec(pki, "node-1"))
        reply, call = await round_trip(address, sec(pki, **client))
        assert reply is None
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
        assert srv.calls == 0
        assert await auth_refusal(call) is None  # a transport failure, not a token refusal


async def test_tls_without_token_links(pki):
    async with EchoServer() as srv:
        address = await srv.start(sec(pki, "node-1"))
        reply, _ = await round_trip(address, sec(pki, "node-0"))
        assert isinstance(reply, Hello) and srv.calls == 1


# ---- health ---------------------------------------------------------------------------------
async def check_health(address: str, security=None, service: str = "") -> int:
    async with open_channel(address, [("grpc.so_reuseport", 0)], security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        return reply.status


async def test_health_answers_serving_without_a_token():
    async with EchoServer() as srv:
        address = await srv.start(SecurityConfig(token=TOKEN))
        for service in ("", "resbm.v1.Stage"):
            assert (
                await check_health(address, service=service)
                == health_pb2.HealthCheckResponse.SERVING
            )
        assert srv.calls == 0


# ---- the coordinator --------------------------------------------------------------------------
@pytest.fixture
async def coordinator(dht, pki):
    from node.data import Corpus

    security = sec(pki, "coordinator", TOKEN)
    cfg = CoordinatorConfig(
        model=tiny_model(n_stages=2, n_layers=2),
        swarm="private",
        listen="127.0.0.1:0",
        rebalance_every_s=0,
        dht_timeout_s=5.0,
        security=security,
    )
    manifest = manifest_for(cfg, Corpus.load(None).fingerprint, cfg.swarm)
    coord = Coordinator(
        cfg, SwarmDHT(dht, cfg.swarm, 5.0, identity=Identity.generate()), manifest,
        visible_maddrs(dht),
    )  # fmt: skip
    await coord.publish_manifest()
    server, port = await serve(coord, cfg.listen, security)
    coord.start()
    yield coord, f"127.0.0.1:{port}"
    await coord.stop()
    await server.stop(grace=1.0)


async def test_coordinator_refuses_a_wrong_token_and_admits_nobody(coordinator, pki):
    coord, address = coordinator
    m = coord.manifest
    request = JoinRequest(
        node_id="intruder", swarm=m.swarm, version=VERSION, fingerprint=m.fingerprint, throughput=1
    )
    for token in (None, WRONG):
        with pytest.raises(JoinRefused) as err:
            await join(address, request, TIMEOUT_S, sec(pki, "node-0", token))
        assert err.value.code == "UNAUTHENTICATED" and "token" in err.value.message
    with pytest.raises(JoinRefused, match="UNAUTHENTICATED: wrong access token"):
        # how a node joins (a spawned child): the security settings cross the process boundary
        await asyncio.to_thread(
            join_in_subprocess, address, request, TIMEOUT_S, security=sec(pki, "node-0", WRONG)
        )
    with pytest.raises(CoordinatorRefused, match="UNAUTHENTICATED"):
        await status(address, TIMEOUT_S, sec(pki, "admin"))
    st = await status(address, TIMEOUT_S, sec(pki, "admin", TOKEN))
    assert st.stages == [[], []]  # nobody got in
    assert await check_health(address, sec(pki, "admin")) == health_pb2.HealthCheckResponse.SERVING


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resbm.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


async def test_resbm_status_reaches_a_private_coordinator(coordinator, pki, tmp_path):
    _, address = coordinator
    d = pki["swarm"]
    tls = ["--tls-cert", str(d / "admin.pem"), "--tls-key", str(d / "admin-key.pem")]
    tls += ["--tls-ca", str(d / "ca.pem")]
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "wrong").write_text(WRONG + "\n")
    base = ["status", "--coordinator", address, "--timeout", "10"]
    code, out, err = await run_cli(*base, "--token-file", str(tmp_path / "token"), *tls)
    assert code == 0, err
    assert "swarm private" in out
    code, out, err = await run_cli(*base, "--token-file", str(tmp_path / "wrong"), *tls)
    assert code == 1 and "UNAUTHENTICATED" in err and "wrong access token" in err
    assert WRONG not in err and TOKEN not in err


async def test_bad_tls_files_are_named_before_binding(pki, tmp_path):
    d = pki["swarm"]
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = [
        (dict(tls_cert=tmp_path / "junk.pem", tls_key=d / "node-0-key.pem"), "tls_cert"),
        (dict(tls_cert=d / "node-0.pem", tls_key=tmp_path / "junk.pem"), "tls_key"),
        (dict(tls_cert=d / "node-0.pem", tls_key=d / "node-1-key.pem"), "not the key of"),
    ]
    for files, problem in cases:
        security = SecurityConfig(tls_ca=d / "ca.pem", **files)
        with pytest.raises(ValueError, match=problem):
            await start_server("127.0.0.1:0", EchoServer().handle, SETTINGS, security)
        with pytest.raises(ValueError, match=problem):
            dial("127.0.0.1:1", SETTINGS, security)
    with pytest.raises(ValueError, match="tls_ca"):
        dial("127.0.0.1:1", SETTINGS, SecurityConfig(tls_ca=tmp_path / "junk.pem"))
