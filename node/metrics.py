"""Prometheus metrics of a stage node, read from its live state when Prometheus scrapes, served by
common.http's endpoint (the coordinator's web page uses the same one).

A custom collector rather than prometheus Counter objects: the node already keeps its numbers
(step, loss, per-link byte counts, its `errors` and `stats` Counters), so mirroring them into
metric objects on every change would only add work on the data path; the collector reads them
when asked. Each node has its own CollectorRegistry (several nodes may share a test process).

Links come and go (a dead replica's link is replaced), yet counters must never go down: the
collector keeps every link it has seen until it is gone, then folds its final counts into a base.
Names and meanings: docs/observability.md.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    SummaryMetricFamily,
)

from common.http import HttpEndpoint, metrics_response, split_host_port

log = logging.getLogger(__name__)

DIRECTIONS = ("forward", "backward", "other")
RATE_WINDOW_S = 60.0  # tokens/s is measured over (about) the last minute of scrapes


def metrics_app(registry: CollectorRegistry) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return metrics_response(request, registry)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


# ---- the node's collector --------------------------------------------------------------------
class NodeCollector:
    """Reads a StageNode (daemon.py) at scrape time. Runs on the node's event loop thread, the
    one that mutates what it reads, so no locks are needed."""

    def __init__(self, node: Any):
        self.node = node
        self._samples: deque[tuple[float, float]] = deque()  # (monotonic time, tokens so far)
        self._samples.append((time.monotonic(), 0.0))
        cfg = node.cfg
        self.tokens_per_mb = cfg.batch_size * cfg.model.seq_len
        # a plain pipeline's boundary tensor: (B, T, d) in bf16
        self.bf16_tensor_bytes = cfg.batch_size * cfg.model.seq_len * cfg.model.d_model * 2

    def _tokens_per_s(self, tokens: float) -> float:
        now = time.monotonic()
        self._samples.append((now, tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (tokens - n0) / (now - t0) if now > t0 else 0.0

    def collect(self):
        n, cfg = self.node, self.node.cfg
        stats, errors = n.stats, n.errors
        info = InfoMetricFamily("resbm_node", "this node: id, stage, swarm, codec, version")
        from node.version import VERSION

        info.add_metric(
            [],
            {
                "node": str(n.node_id),
                "stage": str(n.k),
                "swarm": str(cfg.swarm or ""),
                "codec": str(getattr(cfg.wire_codec, "value", cfg.wire_codec)),
                "version": VERSION,
            },
        )
        yield info
        yield GaugeMetricFamily("resbm_stage", "pipeline stage this node serves", value=n.k)
        yield GaugeMetricFamily("resbm_step", "the step this node is working on", value=n.step)
        yield CounterMetricFamily(
            "resbm_steps", "optimizer steps this process applied", value=stats["steps"]
        )
        yield GaugeMetricFamily(
            "resbm_synced", "1 once in sync with the stage's replicas", value=int(n.synced)
        )
        if n.last_loss is not None:  # the last stage's replicas
            yield GaugeMetricFamily(
                "resbm_loss", "training loss of the last step applied", value=n.last_loss
            )
        tokens = stats["counted"] * self.tokens_per_mb
        yield CounterMetricFamily(
            "resbm_microbatches", "microbatches this node computed", value=stats["counted"]
        )
        yield CounterMetricFamily("resbm_tokens", "tokens this node computed", value=tokens)
        yield GaugeMetricFamily(
            "resbm_tokens_per_second",
            f"tokens this node computed per second, over about {RATE_WINDOW_S:.0f} s",
            value=self._tokens_per_s(tokens),
        )
        yield GaugeMetricFamily(
            "resbm_throughput_microbatches_per_second",
            "measured compute throughput announced in the DHT",
            value=n.mb_per_s,
        )
        yield CounterMetricFamily(
            "resbm_compute_seconds", "time spent in torch compute", value=n.compute_s
        )
        yield GaugeMetricFamily(
            "resbm_pending_microbatches",
            "forwards waiting for their backward",
            value=len(n.runtime.pending),
        )
        yield from self._wire(n)
        yield CounterMetricFamily(
            "resbm_microbatches_recomputed",
            "microbatches of a dead replica recomputed here",
            value=stats["recomputed"],
        )
        yield CounterMetricFamily(
            "resbm_microbatches_lost",
            "microbatches that could not be recovered",
            value=stats["lost"],
        )
        yield CounterMetricFamily(
            "resbm_peer_deaths", "neighbours seen dying mid-run", value=stats["deaths_seen"]
        )
        errs = CounterMetricFamily(
            "resbm_errors", "refused messages and errors, by kind", labels=["kind"]
        )
        for kind, count in sorted(errors.items()):
            errs.add_metric([str(kind)], count)
        yield errs
        yield SummaryMetricFamily(
            "resbm_averaging_round_seconds",
            "averaging rounds with the stage's replicas (attempts) and their time",
            count_value=stats["rounds"],
            sum_value=stats["round_s"],
        )

    def _wire(self, n):
        totals = {f: Counter() for f in ("bytes_sent", "bytes_received", "messages_sent")}
        for lk in n.peers.counted():  # monotonic: pruned links' counts stay (peering.py)
            for f, c in totals.items():
                c.update(getattr(lk, f))
        for field, name, doc in (
            ("bytes_sent", "resbm_bytes_sent", "wire bytes sent, by direction"),
            ("bytes_received", "resbm_bytes_received", "wire bytes received, by direction"),
            ("messages_sent", "resbm_messages_sent", "messages sent, by direction"),
        ):
            fam = CounterMetricFamily(name, doc, labels=["direction"])
            for d in DIRECTIONS:
                fam.add_metric([d], totals[field][d])
            yield fam
        tensors = totals["messages_sent"]["forward"] + totals["messages_sent"]["backward"]
        wire = totals["bytes_sent"]["forward"] + totals["bytes_sent"]["backward"]
        if tensors and wire:
            yield GaugeMetricFamily(
                "resbm_wire_compression_ratio",
                "bf16 bytes of a full-width (B, T, d) boundary tensor, per tensor sent, over "
                "the wire bytes sent for them (framing included)",
                value=tensors * self.bf16_tensor_bytes / wire,
            )
        peers = GaugeMetricFamily(
            "resbm_peers_linked", "live links to neighbour replicas, by stage", labels=["stage"]
        )
        by_stage = Counter(lk.peer_stage for lk in n.peers.links() if not lk.closed.is_set())
        for stage in sorted(s for s in by_stage if s is not None):
            peers.add_metric([str(stage)], by_stage[stage])
        yield peers


class NodeMetrics:
    """A node's /metrics endpoint: start() inside the node's loop, stop() on shutdown."""

    def __init__(self, node: Any):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node))
        self.endpoint = HttpEndpoint(metrics_app(self.registry))

    @property
    def port(self) -> int:
        return self.endpoint.port

    async def start(self, listen: str) -> int:
        from node.errors import NodeFailed

        try:
            port = await self.endpoint.start(listen)
        except OSError as err:
            raise NodeFailed(f"metrics endpoint (--metrics-listen): {err}") from None
        log.info("metrics on http://%s:%d/metrics", split_host_port(listen)[0], port)
        return port

    async def stop(self) -> None:
        await self.endpoint.stop()
