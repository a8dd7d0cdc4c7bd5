"""The coordinator's HTTP side (`--http-listen`): `/` the status page, `/api/status` its JSON
(what `resbm status --json` prints) and `/metrics` for Prometheus.

Records in the DHT are untrusted input (any peer can store anything under a stage key), so every
string on the page is HTML-escaped and only numbers go into the SVG; the page runs no script (it
reloads itself). Handlers are time-bounded: when the DHT does not answer in time the page shows
the last sampled map and says so, and /metrics reads only that sample, so a scrape never waits on
the DHT. Endpoints and metric names: docs/observability.md.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import math
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.http import HttpEndpoint, metrics_response
from coordinator.history import (
    SAMPLE_S,
    capacity_tokens_per_s,
    finished,
    human,
    measured_tokens_per_s,
    model_summary,
    report,
    stalls,
    utc,
)
from coordinator.messages import SwarmStatus

log = logging.getLogger(__name__)

PAGE_REFRESH_S = 10
STATES = ("joining", "online", "draining")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{human(v)} tokens/s"


# ---- the loss curve --------------------------------------------------------------------------
def loss_svg(points: list[tuple[int, float, float]], width: int = 640, height: int = 220) -> str:
    """Inline SVG of loss against step, numbers only; no points -> a placeholder text."""
    pts = [(s, v) for s, v, _ in points if math.isfinite(v)]
    pad_l, pad_r, pad_t, pad_b = 56, 12, 12, 28
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="loss" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="loss curve">',
        f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="#fafafa" stroke="#ccc"/>',
    ]
    if not pts:
        parts.append(
            f'<text x="{pad_l + w / 2:.0f}" y="{pad_t + h / 2:.0f}" text-anchor="middle" '
            'fill="#888">no loss reported yet</text></svg>'
        )
        return "".join(parts)
    s0, s1 = pts[0][0], pts[-1][0]
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(s: int, v: float) -> tuple[float, float]:
        x = pad_l + (w * (s - s0) / (s1 - s0) if s1 > s0 else w / 2)
        return x, pad_t + h * (hi - v) / (hi - lo)

    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in pts))
    parts.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{coords}"/>')
    x, y = xy(*pts[-1])
    parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#1f77b4"/>')
    label = 'font-size="11" fill="#555"'
    parts += [
        f'<text x="{pad_l - 4}" y="{pad_t + 10}" text-anchor="end" {label}>{hi:.3f}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + h}" text-anchor="end" {label}>{lo:.3f}</text>',
        f'<text x="{pad_l}" y="{height - 8}" {label}>step {s0}</text>',
        f'<text x="{pad_l + w}" y="{height - 8}" text-anchor="end" {label}>step {s1}</text>',
        "</svg>",
    ]
    return "".join(parts)


# ---- the page --------------------------------------------------------------------------------
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}
td,th{padding:.2em .7em;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.stage td{background:#f3f3f3;font-weight:600}
.online{color:#1a7f37}.joining{color:#9a6700}.draining{color:#888}.unknown{color:#c00}
.note{background:#fff3cd;padding:.4em .8em}.small{color:#666;font-size:.9em}
"""


def _map_rows(st: SwarmStatus) -> list[str]:
    rows = []
    for k, reps in enumerate(st.stages):
        online = [r for r in reps if r.state == "online"]
        mb_s = sum(r.throughput for r in online)
        rows.append(
            f'<tr class="stage" id="stage-{k}"><td>stage {k}</td><td colspan="8">'
            f"{len(reps)} replica(s), {len(online)} online, {mb_s:.2f} mb/s</td></tr>"
        )
        if not reps:
            rows.append('<tr><td></td><td colspan="8">(no replicas)</td></tr>')
        for r in reps:
            state = r.state if r.state in STATES else "unknown"
            loss = "" if r.loss is None else f"{r.loss:.4f}"
            rows.append(
                f'<tr><td></td><td class="node">{esc(r.node_id)}</td>'
                f'<td class="{state}">{esc(r.state)}</td><td>{esc(r.address)}</td>'
                f'<td class="n">{r.throughput:.2f}</td><td class="n">{r.load}</td>'
                f'<td class="n">{r.step}</td><td class="n">{loss}</td>'
                f"<td>{esc(r.version)}</td></tr>"
            )
    return rows


def render_page(st: SwarmStatus, note: str = "", join_command: str = "") -> str:
    m = st.manifest
    loss = "-" if st.recent_loss is None else f"{st.recent_loss:.4f}"
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in model_summary(st))
    n_points = len(st.loss_history)
    head = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f'<meta http-equiv="refresh" content="{PAGE_REFRESH_S}">',
        f"<title>resbm swarm {esc(m.swarm)}</title><style>{STYLE}</style></head><body>",
        f"<h1>swarm <code>{esc(m.swarm)}</code></h1>",
        f'<p class="note">{esc(note)}</p>' if note else "",
        *(f'<p class="note"><b>Stalled:</b> {esc(line)}</p>' for line in stalls(st)),
        f"<p>resbm {esc(m.version)} &middot; fingerprint <code>{esc(m.fingerprint)}</code> "
        f"&middot; step <b>{st.current_step}</b> / {m.steps}{' (finished)' if finished(st) else ''}"
        f" &middot; recent loss <b>{loss}</b>"
        f" &middot; throughput <b>{_rate(measured_tokens_per_s(st))}</b> measured, "
        f"{_rate(capacity_tokens_per_s(st))} capacity</p>",
    ]
    body = [
        "<h2>Loss</h2>",
        loss_svg(st.loss_history),
        f'<p class="small">{n_points} point(s): the last stage\'s loss, sampled from the DHT '
        f"every {SAMPLE_S:g} s since {utc(st.history_since)}. An in-memory cache of this "
        "coordinator: it starts empty again after a restart. Measured throughput: steps over "
        "the curve's last minute; capacity: the slowest stage's announced compute rate.</p>",
        "<h2>Swarm map</h2><table><tr><th>stage</th><th>node</th><th>state</th>"
        "<th>address</th><th>mb/s</th><th>load</th><th>step</th><th>loss</th>"
        "<th>version</th></tr>",
        *_map_rows(st),
        "</table>",
        f"<h2>Model</h2><table>{summary}</table>",
        "<h2>Join</h2>",
        # what a volunteer pastes on their machine (coordinator.process.join_command)
        f"<p>From another machine: <code>{esc(join_command)}</code></p>" if join_command else "",
        "<p class='small'>DHT bootstrap peers:</p><ul>",
        *(f"<li><code>{esc(p)}</code></li>" for p in st.initial_peers),
        f"</ul><p class='small'>JSON: <a href='/api/status'>/api/status</a> &middot; "
        f"<a href='/metrics'>/metrics</a> &middot; rendered {utc(time.time())}</p>",
        "</body></html>",
    ]
    return "".join(head + body)


# ---- /metrics --------------------------------------------------------------------------------
class CoordinatorCollector:
    """Reads the coordinator's latest sampled status and its counts at scrape time."""

    def __init__(self, coord: Any):
        self.coord = coord

    def collect(self):
        watch = self.coord.watch
        for what, doc in (
            ("join", "nodes the coordinator placed"),
            ("leave", "nodes that left through the coordinator"),
            ("move", "rebalancing moves the coordinator asked for"),
        ):
            yield CounterMetricFamily(f"resbm_coordinator_{what}s", doc, value=watch.counts[what])
        st = watch.latest
        if st is None:  # nothing sampled yet
            return
        yield GaugeMetricFamily(
            "resbm_coordinator_status_age_seconds",
            "age of the sampled swarm map these metrics show",
            value=time.time() - watch.latest_at,
        )
        nodes = GaugeMetricFamily(
            "resbm_coordinator_nodes", "nodes per stage, by state", labels=["stage", "state"]
        )
        for k, reps in enumerate(st.stages):
            for state in STATES:
                nodes.add_metric([str(k), state], sum(r.state == state for r in reps))
        yield nodes
        yield GaugeMetricFamily(
            "resbm_coordinator_step", "the highest step any node reports", value=st.current_step
        )
        if st.recent_loss is not None:
            yield GaugeMetricFamily(
                "resbm_coordinator_loss", "the last stage's recent loss", value=st.recent_loss
            )
        for name, value, doc in (
            ("tokens_per_second", measured_tokens_per_s(st), "swarm tokens/s, measured"),
            ("capacity_tokens_per_second", capacity_tokens_per_s(st), "slowest stage, tokens/s"),
        ):
            if value is not None:
                yield GaugeMetricFamily(f"resbm_coordinator_{name}", doc, value=value)


# ---- the server ------------------------------------------------------------------------------
class CoordinatorWeb:
    """The HTTP endpoint, inside the coordinator's event loop: start() after the coordinator
    started, stop() before it stops."""

    def __init__(self, coord: Any, join_command: str = ""):
        self.coord, self.join_command = coord, join_command
        self.timeout_s = coord.cfg.dht_timeout_s + 2.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(CoordinatorCollector(coord))
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/api/status", self._api)
        app.router.add_get("/metrics", self._metrics)
        self.endpoint = HttpEndpoint(app)

    @property
    def port(self) -> int:
        return self.endpoint.port

    async def start(self, listen: str) -> int:
        port = await self.endpoint.start(listen)
        log.info("status page on http://%s:%d/", listen.rsplit(":", 1)[0], port)
        return port

    async def stop(self) -> None:
        await self.endpoint.stop()

    async def _status(self) -> tuple[SwarmStatus, str]:
        watch = self.coord.watch
        if watch.latest is not None and time.time() - watch.latest_at < 2 * SAMPLE_S:
            return watch.latest, ""  # fresh enough: a flood of page loads is no flood of DHT reads
        try:
            return await asyncio.wait_for(self.coord.status(), self.timeout_s), ""
        except Exception as err:  # TimeoutError, a DHT failure: the last sample, if any
            log.warning("status page: no fresh swarm map: %s", err or type(err).__name__)
            latest = self.coord.watch.latest
            if latest is None:
                raise web.HTTPServiceUnavailable(
                    text=f"the swarm's DHT did not answer within {self.timeout_s:g} s; retry"
                ) from None
            when = utc(self.coord.watch.latest_at)
            return latest, f"The DHT did not answer in time: this is the map sampled at {when}."

    async def _page(self, request: web.Request) -> web.Response:
        st, note = await self._status()
        page = render_page(st, note, self.join_command)
        return web.Response(text=page, content_type="text/html")

    async def _api(self, request: web.Request) -> web.Response:
        st, note = await self._status()
        body = {**report(st), "stale": bool(note)}
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return metrics_response(request, self.registry)
