"""The coordinator's status page, /api/status and /metrics on loopback: a real coordinator with
a real hivemind DHT, records stored in that DHT the way nodes (or a hostile peer) store them,
the page fetched over HTTP. The DHT is created before any gRPC object of this module."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from common.identity import Identity
from coordinator.client import format_status, status
from coordinator.config import CoordinatorConfig
from coordinator.history import LossHistory, sparkline
from coordinator.messages import summarize
from coordinator.service import Coordinator, serve
from coordinator.web import CoordinatorWeb, loss_svg
from node.data import Corpus
from node.swarm.dht import SwarmDHT, dht_now, start_dht, visible_maddrs
from node.swarm.manifest import manifest_for
from node.swarm.records import PENDING_ADDRESS, NodeRecord, Placeholder
from node.version import VERSION
from tests.helpers import nid, tiny_model
from tests.loopback.test_coordinator import announce
from tests.loopback.test_metrics import one, parse_metrics

HOSTILE = "<script>alert(1)</script>"
TIMEOUT = aiohttp.ClientTimeout(total=20)


@pytest.fixture(scope="module")
def dht():
    d = start_dht([])
    yield d
    d.shutdown()


def record(peer: str, step: int, loss: float | None = None, **over) -> NodeRecord:
    base = dict(
        peer_id=peer,
        address="127.0.0.1:7000",
        state="online",
        throughput=2.0,
        load=1,
        version=VERSION,
        config_hash="0123456789abcdef",
        step=step,
        loss=loss,
    )
    return NodeRecord(**{**base, **over})


@pytest.fixture
async def coordinator(dht, request):
    swarm = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60]
    cfg = CoordinatorConfig(
        model=tiny_model(n_stages=2, n_layers=2),
        swarm=swarm,
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        rebalance_every_s=0,
        dht_timeout_s=5.0,
    )
    manifest = manifest_for(cfg, Corpus.load(None).fingerprint, swarm)
    coord = Coordinator(
        cfg, SwarmDHT(dht, swarm, 5.0, identity=Identity.generate()), manifest,
        visible_maddrs(dht),
    )  # fmt: skip
    await coord.publish_manifest()
    server, port = await serve(coord, cfg.listen)
    coord.start()
    page = CoordinatorWeb(coord)
    await page.start(cfg.http_listen)
    yield coord, page.port, f"127.0.0.1:{port}"
    await page.stop()
    await coord.stop()
    await server.stop(grace=1.0)


async def get(port: int, path: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as http,
        http.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, resp.content_type, await resp.text()


async def test_the_page_shows_the_swarm_and_escapes_what_peers_stored(coordinator, dht):
    coord, port, grpc_address = coordinator
    swarm = coord.dht.swarm
    assert await announce(dht, swarm, 0, record(nid("n0"), 3), 60, "n0")
    # any DHT peer may store anything a record allows under its own id (markup in its
    # version), and a joiner's placeholder under any id (markup in the id)
    bad_version = '"><img src=x onerror=alert(1)>'
    assert await announce(dht, swarm, 1, record(nid("h"), 3, 2.5, version=bad_version), 60, "h")
    fake = dict(state="joining", address=PENDING_ADDRESS, throughput=0.0, version=HOSTILE[:32])
    until = dht_now() + 60  # (the coordinator's own placeholders: no one else's count)
    ghost = Placeholder(record=record(nid("ghost"), 0, **fake), until=until)
    # a placeholder's id must be a derived node id: markup there is dropped at the read
    hostile = Placeholder(record=record(HOSTILE, 0, **fake), until=until)
    assert await coord.dht.announce_placeholders(1, [ghost, hostile])
    await coord._sample()  # what the background sampler does every few seconds
    assert await announce(dht, swarm, 1, record(nid("h"), 5, 2.25, version=bad_version), 60, "h")
    await coord._sample()

    code, ctype, page = await get(port, "/")
    assert code == 200 and ctype == "text/html"
    assert "<script" not in page and "<img" not in page  # inert: escaped, not markup
    assert html_escaped(HOSTILE) in page and "&quot;&gt;&lt;img src=x" in page
    assert 'id="stage-0"' in page and 'id="stage-1"' in page and f">{nid('n0')}<" in page
    assert f"swarm <code>{coord.manifest.swarm}</code>" in page and "recent loss <b>2.2500" in page
    points = re.search(r'<polyline [^>]*points="([^"]+)"', page)
    assert points is not None and len(points.group(1).split()) == 2  # steps 2 and 4
    assert "starts empty again after a restart" in page

    code, ctype, body = await get(port, "/api/status")
    assert code == 200 and ctype == "application/json"
    data = json.loads(body)
    assert [p[:2] for p in data["loss_history"]] == [[2, 2.5], [4, 2.25]]
    stages = [[r["node_id"] for r in s] for s in data["stages"]]
    assert stages == [[nid("n0")], sorted([nid("h"), nid("ghost")])]
    assert data["current_step"] == 5 and data["model_params"] > 0 and not data["stale"]
    assert data["tokens_per_s_capacity"] == pytest.approx(2.0 * 16 * 16)  # mb/s x B x T

    code, _, text = await get(port, "/metrics")
    m = parse_metrics(text)
    assert code == 200
    assert one(m, "resbm_coordinator_nodes", stage="1", state="online") == 1
    assert one(m, "resbm_coordinator_nodes", stage="0", state="joining") == 0
    assert one(m, "resbm_coordinator_nodes", stage="1", state="joining") == 1  # the ghost
    assert one(m, "resbm_coordinator_step") == 5 and one(m, "resbm_coordinator_loss") == 2.25
    assert one(m, "resbm_coordinator_joins_total") == 0

    # `resbm status`: the same over gRPC, history included, terminal-safe
    st = await status(grpc_address, 10)
    assert [(s, v) for s, v, _ in st.loss_history] == [(2, 2.5), (4, 2.25)]
    table = format_status(st)
    assert "loss curve  █▁  2.500 -> 2.250" in table and nid("ghost") in table


async def test_an_empty_swarm_renders_and_says_so(coordinator):
    _, port, _ = coordinator
    code, _, page = await get(port, "/")
    assert code == 200 and "no loss reported yet" in page and "(no replicas)" in page
    assert "<polyline" not in page
    code, _, text = await get(port, "/metrics")  # nothing sampled yet: only the counts
    assert code == 200 and "resbm_coordinator_joins_total 0.0" in text


def html_escaped(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---- pure parts --------------------------------------------------------------------------------
def test_the_loss_curve_is_numbers_only_and_thinned_when_long():
    assert "<polyline" not in loss_svg([])
    svg = loss_svg([(0, 3.0, 0.0), (10, 2.0, 1.0), (20, float("nan"), 2.0)])
    xs = [float(p.split(",")[0]) for p in re.search(r'points="([^"]+)"', svg).group(1).split()]
    assert len(xs) == 2 and xs[0] < xs[1]  # left to right; a non-finite loss is skipped

    cfg = CoordinatorConfig(model=tiny_model(n_stages=2, n_layers=2), swarm="pure")
    manifest = manifest_for(cfg, "0" * 16, "pure")
    h = LossHistory(max_points=10)
    for step in range(1, 40):  # each record: the loss of the step before its own
        st = summarize({1: {"x": record("x", step, 1.0 / step)}}, manifest, 2, [])
        assert h.observe(st, now=float(step))
        assert not h.observe(st)  # the same step again adds nothing
    assert len(h.points) <= 10 and h.points[0][0] == 0 and h.points[-1] == (38, 1 / 39, 39.0)
    back = summarize({1: {"x": record("x", 20, 0.5)}}, manifest, 2, [])
    assert h.observe(back)  # resumed from an older checkpoint: the curve follows
    assert h.points[-1][0] == 19 and all(p[0] < 19 for p in h.points[:-1])

    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁" and sparkline([]) == ""
    assert len(sparkline([float(i) for i in range(500)], width=40)) == 40


async def test_the_page_answers_from_the_last_sample_when_the_dht_does_not(coordinator, dht):
    coord, _, _ = coordinator
    assert await announce(dht, coord.dht.swarm, 1, record(nid("n1"), 4, 2.0), 60, "n1")
    await coord._sample()
    coord.watch.latest_at -= 60  # an old sample: a fresh one is served without asking the DHT
    page = CoordinatorWeb(coord)
    page.timeout_s = 0.0  # a handler deadline no DHT read can meet
    await page.start("127.0.0.1:0")
    try:
        code, _, body = await get(page.port, "/")
        assert code == 200 and "this is the map sampled at" in body and f">{nid('n1')}<" in body
        code, _, body = await get(page.port, "/api/status")
        assert code == 200 and json.loads(body)["stale"] is True
    finally:
        await page.stop()


def test_resbm_status_prints_no_terminal_escapes_from_the_dht():
    cfg = CoordinatorConfig(model=tiny_model(n_stages=2, n_layers=2), swarm="pure")
    manifest = manifest_for(cfg, "0" * 16, "pure")
    st = summarize({0: {"\x1b[2J": record("\x1b[2J", 1)}}, manifest, 2, [])
    table = format_status(st)
    assert "\x1b" not in table and "?[2J" in table and "(no loss yet)" in table
