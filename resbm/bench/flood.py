"""`resbm bench flood`: one node of a training swarm under a flood of hostile peers (#10).

A 3-stage swarm (coordinator, one node a stage, loopback) trains; the middle node is the victim.
First `--calm` seconds undisturbed, then `--duration` seconds in which this process floods the
victim's public port with what one stranger can send, through real gRPC and signed Hellos:

- `bans`: a fresh key, a signed Hello, a Notice naming every id a notice may (refused: banned);
  again, with a new key: the ban table, the handshakes, the link caps;
- `decode`: a fresh key, a signed Hello, then full-size forwards of a far step, back to back
  (each was decoded, then made the node resync; now refused from its header, and the peer
  banned past limits.max_refused a minute): the event loop's CPU;
- `idle`: links that never say Hello, up to the per-host cap, held, dropped, opened again;
- `ping`: the largest Ping, back to back (the byte budgets).

Then `--after` seconds calm again: the calm speed is the mean of the two calm phases, which
bracket the flood, so a machine that speeds up or slows down over the run (this one's calm speed
drifted from 18 to 13 steps/s over three runs in a row) moves both sides of the ratio alike.

It measures the victim's resident memory and CPU time (its own process, /proc) and the swarm's
steps a second (the last stage's step events) in each phase, and prints, writes and plots them.
Goals (issue #10): RSS growth under 50 MB, and at least half the calm speed. The attackers run
elsewhere: on a machine with two or more cores the flooder (this process) keeps its last core
and the swarm the others, in both phases, so the speed ratio is what the victim's own handling
of the flood costs, not the flooder's CPU taken from the swarm.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from resbm.bench import add_out_args, out_path, say_where, setting_of

KINDS = ("bans", "decode", "idle", "ping")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flood",
        help="a training node's memory and the swarm's speed under a flood of hostile peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--calm", type=float, default=60.0, help="seconds without flood (default 60)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of flood (default 600)")
    p.add_argument(
        "--after", type=float, default=60.0, help="seconds calm after the flood (default 60)"
    )
    p.add_argument("--flooders", type=int, default=4, help="concurrent loops per kind (default 4)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated ({', '.join(KINDS)})")
    add_out_args(p, "flood")
    p.set_defaults(handler=run)


def split_cores() -> dict[str, list[int]] | None:
    """The swarm's cores and the flooder's (its own one), or None with a single core."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return {"swarm": cpus[:-1], "flooder": cpus[-1:]} if len(cpus) >= 2 else None


def cpu_s(pid: int) -> float:
    """The process's CPU seconds so far (user + system, /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Flooder:
    """The hostile side: raw gRPC to the victim, honest in form (signed Hellos), hostile in
    content. Counts what it sent and how the victim answered."""

    def __init__(self, port: int, stage: int, fingerprint: str, cfg):
        self.address, self.stage, self.fingerprint, self.cfg = (
            f"127.0.0.1:{port}",
            stage,
            fingerprint,
            cfg,
        )
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def _linked(self, channel):
        """A Link call with a completed signed handshake (as a node of the stage before)."""
        from common.identity import Identity
        from node.handshake import Handshake
        from node.wire._pb import stage_pb2 as pb
        from node.wire._pb import stage_pb2_grpc as pb_grpc
        from node.wire.codec import WireCodec
        from node.wire.messages import from_pb, to_pb

        call = pb_grpc.StageStub(channel).Link()
        hs = Handshake(Identity.generate(), self.stage - 1, self.fingerprint)
        await asyncio.wait_for(call.write(to_pb(hs.offer(), WireCodec.fp32)), 10)
        reply = await asyncio.wait_for(call.read(), 10)
        if not isinstance(reply, pb.LinkMessage) or reply.WhichOneof("body") != "hello":
            self.count("handshake refused")
            call.cancel()
            return None
        answer = from_pb(reply, (1, 1, 1), 1)  # a Hello carries no tensor: any shape does
        await asyncio.wait_for(call.write(to_pb(hs.prove(answer), WireCodec.fp32)), 10)
        return call

    async def _repeat(self, until: float, what: str, once, pause: float = 0.1) -> None:
        """`once()` again and again until `until`; a call the victim ends is counted."""
        import grpc

        while time.monotonic() < until:
            try:
                await once()
            except (grpc.aio.AioRpcError, TimeoutError):
                self.count(f"{what}: call ended")
                await asyncio.sleep(pause)

    async def _on_link(self, body) -> None:
        """One signed link, then `body(call)` on it."""
        import grpc

        async with grpc.aio.insecure_channel(self.address) as channel:
            call = await self._linked(channel)
            if call is None:
                await asyncio.sleep(0.2)
                return
            await body(call)

    async def bans(self, until: float) -> None:
        from node.wire._pb import stage_pb2 as pb

        flood = pb.LinkMessage(
            notice=pb.Notice(kind=1, step=10**6, ids=list(range(4096)), peer="x")
        )

        async def body(call) -> None:
            await asyncio.wait_for(call.write(flood), 10)
            await asyncio.wait_for(call.read(), 10)
            self.count("banned")
            call.cancel()

        await self._repeat(until, "bans", lambda: self._on_link(body))

    async def decode(self, until: float) -> None:
        import torch

        from node.data import Batches, Corpus
        from node.wire.messages import Forward, to_pb

        cfg = self.cfg
        batches = Batches(Corpus.load(cfg.data), cfg.model.seq_len, cfg.batch_size, cfg.seed)
        shape = (cfg.batch_size, cfg.model.seq_len, cfg.model.boundary_dim)
        mb = batches.microbatch(10**5, 0)  # a far step: refused, and never a resync
        msg = to_pb(Forward(mb.id, torch.randn(shape), mb.offsets, mb.fingerprint), cfg.wire_codec)

        async def body(call) -> None:
            while time.monotonic() < until:
                await asyncio.wait_for(call.write(msg), 10)
                self.count("wrong-step forwards")

        await self._repeat(until, "decode", lambda: self._on_link(body))

    async def idle(self, until: float) -> None:
        import grpc

        async def once() -> None:
            async with grpc.aio.insecure_channel(self.address) as channel:
                calls = [channel.stream_stream("/resbm.v1.Stage/Link")() for _ in range(8)]
                for call in calls:
                    await asyncio.wait_for(call.wait_for_connection(), 10)
                self.count("idle links")
                await asyncio.sleep(2.0)
                for call in calls:
                    call.cancel()

        await self._repeat(until, "idle", once)

    async def ping(self, until: float) -> None:
        """Pings as big as the victim's server reads (past MAX_PING_BYTES they are refused,
        but only once read whole: what a flood costs is the bytes the server reads), and
        MAX_PING_BYTES ones, served until the byte budget refuses them."""
        import grpc

        from node.transport.diagnostics import MAX_PING_BYTES, DiagnosticsClient
        from node.transport.link import CHUNK_CAP, FRAMING_SLACK

        biggest = CHUNK_CAP + FRAMING_SLACK - 1024  # under the server's read limit, with framing

        async def once() -> None:
            async with DiagnosticsClient(self.address, timeout_s=10) as client:
                while time.monotonic() < until:
                    for size in (biggest, MAX_PING_BYTES):
                        try:
                            await client.ping(size, MAX_PING_BYTES)
                            self.count("pings served")
                        except grpc.aio.AioRpcError as err:
                            self.count(f"pings refused ({err.code().name})")

        await self._repeat(until, "ping", once, pause=0.5)


async def flood(flooder: Flooder, kinds: list[str], n: int, seconds: float) -> None:
    """`n` loops of each kind for `seconds`, then every loop cancelled (a loop waiting on
    the victim would otherwise flood on, into the next phase, for up to its 10 s timeout)."""
    until = time.monotonic() + seconds
    tasks = [asyncio.create_task(getattr(flooder, kind)(until)) for kind in kinds for _ in range(n)]
    try:
        await asyncio.wait(tasks, timeout=seconds)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run(args: argparse.Namespace) -> int:
    from resbm.simulate import SimulateConfig, Swarm

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if bad := set(kinds) - set(KINDS):
        print(f"bench flood: unknown kinds {sorted(bad)} (use {', '.join(KINDS)})", file=sys.stderr)
        return 2
    out = out_path(args, "flood")
    say_where("flood", out)
    with tempfile.TemporaryDirectory(prefix="resbm-flood-") as tmp:
        cfg = SimulateConfig(
            model={"d_model": 64, "n_layers": 3, "n_heads": 2, "seq_len": 32, "n_stages": 3},
            steps=1_000_000,
            batch_size=4,
            microbatches=2,
            workdir=Path(tmp),
            fixed_stages=True,
        )
        swarm = Swarm(cfg, Path(tmp))
        samples: list[dict[str, Any]] = []
        cores = split_cores()
        try:
            if cores:
                os.sched_setaffinity(0, cores["swarm"])  # its processes inherit it
            swarm.launch()
            if cores:  # this thread only; gRPC's threads of the flooder start after
                os.sched_setaffinity(0, cores["flooder"])
            victim = next(p for p in swarm.nodes if p.stage == 1)
            pid, port = victim.ready["pid"], victim.ready["port"]
            fingerprint = swarm.launcher.coordinator.ready["fingerprint"]
            flooder = Flooder(port, 1, fingerprint, swarm.node_config(1))
            t0 = time.monotonic()

            def sample(phase: str) -> None:
                steps = len(swarm.losses())
                samples.append(
                    {
                        "t": time.monotonic() - t0,
                        "phase": phase,
                        "rss_mb": rss_mb(pid),
                        "cpu_s": cpu_s(pid),
                        "steps": steps,
                    }
                )

            async def main() -> None:
                async def sampler(phase: str, seconds: float) -> None:
                    end = time.monotonic() + seconds
                    while time.monotonic() < end:
                        sample(phase)
                        print(
                            f"  {samples[-1]['t']:6.0f} s  {phase:5}  RSS "
                            f"{samples[-1]['rss_mb']:6.1f} MB  steps {samples[-1]['steps']}",
                            file=sys.stderr,
                            flush=True,
                        )
                        await asyncio.sleep(min(10.0, max(end - time.monotonic(), 0.1)))

                await sampler("calm", args.calm)
                await asyncio.gather(
                    sampler("flood", args.duration),
                    flood(flooder, kinds, args.flooders, args.duration),
                )
                sample("flood")
                if args.after > 0:
                    await sampler("after", args.after)
                    sample("after")

            asyncio.run(main())
            alive = victim.alive
        finally:
            swarm.stop_all(grace_s=30)
    result = summarize(samples, alive, flooder.counts, setting_of(args))
    result["cores"] = cores
    print(table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if result["ok"] else 1


def _rate(rows: list[dict[str, Any]]) -> float:
    if len(rows) < 2 or rows[-1]["t"] <= rows[0]["t"]:
        return float("nan")
    return (rows[-1]["steps"] - rows[0]["steps"]) / (rows[-1]["t"] - rows[0]["t"])


def _cpu_share(rows: list[dict[str, Any]]) -> float:
    """The victim's CPU seconds a second over `rows` (1.0: one core, all the time)."""
    if len(rows) < 2 or rows[-1]["t"] <= rows[0]["t"] or "cpu_s" not in rows[0]:
        return float("nan")
    return (rows[-1]["cpu_s"] - rows[0]["cpu_s"]) / (rows[-1]["t"] - rows[0]["t"])


def summarize(samples, alive: bool, counts: dict[str, int], setting: dict) -> dict[str, Any]:
    calm = [s for s in samples if s["phase"] == "calm"]
    hit = [s for s in samples if s["phase"] == "flood"]
    after = [s for s in samples if s["phase"] == "after"]
    base = calm[-1]["rss_mb"] if calm else float("nan")
    growth = max(s["rss_mb"] for s in hit) - base if hit else float("nan")
    # the calm speed brackets the flood where a calm phase follows it (the machine drifts)
    calms = [r for r in (_rate(calm), _rate(after)) if r == r]
    calm_rate = sum(calms) / len(calms) if calms else float("nan")
    speed = _rate(hit) / calm_rate if hit else float("nan")
    return {
        "setting": setting,
        "victim_alive": alive,
        "rss_calm_mb": base,
        "rss_growth_mb": growth,
        "steps_per_s_calm": calm_rate,
        "steps_per_s_before": _rate(calm),
        "steps_per_s_after": _rate(after),
        "steps_per_s_flood": _rate(hit),
        "speed_under_flood": speed,
        "victim_cpu_calm": _cpu_share(calm),
        "victim_cpu_flood": _cpu_share(hit),
        "victim_cpu_after": _cpu_share(after),
        "sent": counts,
        "goals": {"rss_growth_mb_below": 50.0, "speed_at_least": 0.5},
        "ok": bool(alive and growth < 50.0 and speed >= 0.5),
        "samples": samples,
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"victim alive              {r['victim_alive']}",
        f"RSS calm / growth         {r['rss_calm_mb']:.1f} MB / {r['rss_growth_mb']:+.1f} MB "
        "(goal < 50)",
        f"steps/s calm / flood      {r['steps_per_s_calm']:.2f} / {r['steps_per_s_flood']:.2f} "
        f"({r['speed_under_flood']:.0%} of calm; goal >= 50%); calm before "
        f"{r['steps_per_s_before']:.2f}, after {r['steps_per_s_after']:.2f}",
        f"victim CPU calm / flood   {r['victim_cpu_calm']:.2f} / {r['victim_cpu_flood']:.2f} "
        f"cores (after: {r['victim_cpu_after']:.2f})",
        "sent                      " + ", ".join(f"{k} {v}" for k, v in sorted(r["sent"].items())),
        f"verdict                   {'ok' if r['ok'] else 'FAILS a goal'}",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = r["samples"]
    t = [s["t"] for s in rows]
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    a.plot(t, [s["rss_mb"] for s in rows], marker=".")
    a.set_ylabel("victim RSS (MB)")
    b.plot(t, [s["steps"] for s in rows], marker=".")
    b.set_ylabel("swarm steps")
    if all("cpu_s" in s for s in rows) and len(rows) > 1:  # per interval, in cores
        pairs = list(itertools.pairwise(rows))
        mid = [(p["t"] + q["t"]) / 2 for p, q in pairs]
        use = [(q["cpu_s"] - p["cpu_s"]) / max(q["t"] - p["t"], 1e-9) for p, q in pairs]
        c.plot(mid, use, marker=".")
    c.set_ylabel("victim CPU (cores)")
    c.set_xlabel("seconds")
    start = next((s["t"] for s in rows if s["phase"] == "flood"), None)
    end = next((s["t"] for s in rows if s["phase"] == "after"), None)
    for ax in (a, b, c):
        if start is not None:
            ax.axvline(start, color="red", linestyle="--", label="flood starts")
        if end is not None:
            ax.axvline(end, color="green", linestyle="--", label="flood ends")
    a.legend()
    a.set_title("one node under a flood of hostile peers (resbm bench flood)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
