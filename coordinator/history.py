"""What the coordinator remembers over time, and the figures the status page, `/api/status` and
`resbm status` derive from a status (throughput, model summary, the text loss curve).

The coordinator keeps no state outside the DHT, by design; the loss curve is the one exception,
and only a cache. The DHT holds each last-stage replica's loss for its latest step alone, so the
coordinator samples it every `SAMPLE_S` seconds into memory: a restarted coordinator starts an
empty curve (the page and `resbm status` say since when), and steps that finish between two
samples are not in it. The nodes' event logs have every step; this is a view, not a record.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from node.model.config import ModelConfig

if TYPE_CHECKING:
    from coordinator.messages import SwarmStatus

SAMPLE_S = 2.0  # seconds between two reads of the swarm map
MAX_POINTS = 1000  # beyond this the curve is thinned to every other point
RATE_WINDOW_S = 60.0  # measured throughput: over the history's last minute
SPARKS = "▁▂▃▄▅▆▇█"


class LossHistory:
    """(step, loss, unix time) points, one per step seen, in step order."""

    def __init__(self, max_points: int = MAX_POINTS):
        self.max_points = max_points
        self.points: list[tuple[int, float, float]] = []
        self.since = time.time()

    def observe(self, st: SwarmStatus, now: float | None = None) -> bool:
        """Add the last stage's loss from a status; True if it was a new step. A replica's
        record carries the swarm's loss at its step - 1 (node/swarm/records.py)."""
        last = [r for r in st.stages[-1] if r.loss is not None] if st.stages else []
        if not last:
            return False
        top = max(r.step for r in last)
        losses = [r.loss for r in last if r.step == top and math.isfinite(r.loss)]
        if top < 1 or not losses:
            return False
        step, loss = top - 1, sum(losses) / len(losses)
        if self.points and step <= self.points[-1][0]:
            if step == self.points[-1][0]:
                return False
            # the swarm went back (it resumed from an older checkpoint): that run's curve now
            self.points = [p for p in self.points if p[0] < step]
        self.points.append((step, loss, time.time() if now is None else now))
        if len(self.points) > self.max_points:
            self.points = [*self.points[:-1][::2], self.points[-1]]
        return True


def count_params(model: ModelConfig) -> int:
    """Parameters of the whole model, built on torch's meta device (no memory, no compute)."""
    import torch

    from node.model.resbm import ResBM

    with torch.device("meta"):
        return sum(p.numel() for p in ResBM(model).parameters())


class SwarmWatch:
    """The coordinator's observations: the loss history, the latest sampled status (what its
    /metrics reads, so a scrape never waits on the DHT) and event counts since it started."""

    def __init__(self, model: ModelConfig):
        self.history = LossHistory()
        self.latest: SwarmStatus | None = None
        self.latest_at: float | None = None
        self.counts: Counter[str] = Counter()  # join, leave, move, refused
        self.model_params = count_params(model)
        self.highest_step = 0  # the highest step any status showed: nodes leave when done
        self._stalled: list[int] = []
        self._left: set[int] = set()  # stages a node left deliberately (Leave)

    def annotate(self, st: SwarmStatus) -> SwarmStatus:
        """With what this coordinator saw: the loss history, and the highest step it has seen
        (after a run ends its nodes leave, and their records with them: the swarm is still at
        the step it reached, not at 0)."""
        last_loss = self.history.points[-1][1] if self.history.points else None
        return dataclasses.replace(
            st,
            current_step=max(st.current_step, self.highest_step),
            recent_loss=st.recent_loss if st.recent_loss is not None else last_loss,
            loss_history=list(self.history.points),
            history_since=self.history.since,
            model_params=self.model_params,
        )

    def left(self, stage: int) -> None:
        """A node of `stage` left through the coordinator (a stop or a move, not a crash)."""
        self._left.add(stage)

    def observe(self, st: SwarmStatus) -> list[tuple[str, bool]]:
        """Take in a sampled status; returns what changed about stalled stages, to log, each
        with whether it is bad news: a stage whose replicas left through the coordinator
        (a stop: `resbm simulate` on Ctrl-C, a swarm shut down) is said, not warned about."""
        self.highest_step = max(self.highest_step, st.current_step)
        self.history.observe(st)
        before = set(stalls(self.latest)) if self.latest is not None else set()
        self.latest, self.latest_at = self.annotate(st), time.time()
        stalled = stalled_stages(self.latest)
        back = [k for k in self._stalled if k not in stalled]
        self._stalled = stalled
        news = [
            (line, k not in self._left)
            for k, line in zip(stalled, stalls(self.latest), strict=True)
            if line not in before
        ]
        news += [(f"stage {k} has a replica online again: training goes on", False) for k in back]
        self._left -= set(back)  # a stage back online: a later loss is news again
        return news


# ---- derived figures (pure: the page, /api/status and `resbm status` share them) -------------
def finished(st: SwarmStatus) -> bool:
    """The run reached its last step (its nodes then leave, taking their records along)."""
    return st.current_step >= st.manifest.steps


def stalled_stages(st: SwarmStatus) -> list[int]:
    """Stages with no replica online while the run is under way (started, not finished): a
    pipeline cannot take a step without every stage."""
    if not 0 < st.current_step < st.manifest.steps:
        return []
    return [k for k, reps in enumerate(st.stages) if not any(r.state == "online" for r in reps)]


def stalls(st: SwarmStatus) -> list[str]:
    """Why training is stalled, in words: which stage has no replica, and whether a checkpoint
    announced in the DHT can restore it (a node that joins such a stage resumes from the newest
    one; with none it waits, as it never trains a stage from scratch)."""
    out = []
    for k in stalled_stages(st):
        ckpt = st.checkpoint_steps[k] if k < len(st.checkpoint_steps) else None
        joining = sum(r.state == "joining" for r in st.stages[k])
        head = f"stage {k} has no replica online: training is stalled at step {st.current_step}"
        if joining:
            head += f" ({joining} joining)"
        if ckpt is not None:
            out.append(
                f"{head}; a checkpoint of step {ckpt} is announced: a node that joins stage {k} "
                "resumes from it"
            )
        else:
            out.append(
                f"{head}; no checkpoint of stage {k} is announced: a node that joins it will wait "
                "(it never trains a stage from scratch); restart the run from a checkpoint"
            )
    return out


def model_config(st: SwarmStatus) -> ModelConfig | None:
    try:
        return ModelConfig.model_validate(st.manifest.settings.get("model"))
    except Exception:  # a manifest of an odd shape: show what we can
        return None


def _int_setting(st: SwarmStatus, name: str) -> int | None:
    value = st.manifest.settings.get(name)
    return value if type(value) is int and value > 0 else None


def tokens_per_microbatch(st: SwarmStatus) -> int | None:
    model, batch = model_config(st), _int_setting(st, "batch_size")
    return model.seq_len * batch if model is not None and batch else None


def capacity_tokens_per_s(st: SwarmStatus) -> float | None:
    """The slowest stage's online replicas' announced microbatches/s (their measured compute
    rate, so an upper bound that ignores the network), in tokens/s."""
    per_mb = tokens_per_microbatch(st)
    if per_mb is None or not st.stages:
        return None
    stage_mb_s = [sum(r.throughput for r in reps if r.state == "online") for reps in st.stages]
    return min(stage_mb_s) * per_mb


def measured_tokens_per_s(
    st: SwarmStatus, window_s: float = RATE_WINDOW_S, now: float | None = None
) -> float | None:
    """Steps per second in the history over the last `window_s`, in tokens/s; 0 when no step
    was seen for that long (the swarm is stalled)."""
    per_mb, m = tokens_per_microbatch(st), _int_setting(st, "microbatches")
    pts = st.loss_history
    if per_mb is None or m is None or len(pts) < 2:
        return None
    now = time.time() if now is None else now
    if now - pts[-1][2] > window_s:
        return 0.0
    recent = [p for p in pts if p[2] >= now - window_s]
    if len(recent) < 2:  # slower than one step per window: the last two
        recent = pts[-2:]
    (s0, _, t0), (s1, _, t1) = recent[0], recent[-1]
    return (s1 - s0) * m * per_mb / (t1 - t0) if t1 > t0 else None


def utc(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def model_summary(st: SwarmStatus) -> list[tuple[str, str]]:
    rows = [("parameters", human(st.model_params) if st.model_params else "-")]
    model = model_config(st)
    if model is not None:
        rows += [
            ("layers x d_model", f"{model.n_layers} x {model.d_model} ({model.n_heads} heads)"),
            ("context", f"{model.seq_len} tokens"),
            ("stages", str(model.n_stages)),
            (
                "boundary",
                f"{model.d_model} -> {model.boundary_dim} channels ({model.compression}x)",
            ),
        ]
    codec, batch, m = (
        st.manifest.settings.get("codec"),
        _int_setting(st, "batch_size"),
        _int_setting(st, "microbatches"),
    )
    rows += [
        ("wire codec", str(codec or "-")),
        ("batch", f"{batch} x {m} microbatches" if batch and m else "-"),
        ("steps", str(st.manifest.steps)),
    ]
    return rows


def report(st: SwarmStatus) -> dict[str, Any]:
    """`resbm status --json` and `/api/status`: the status plus what is derived from it."""
    return {
        **st.to_json(),
        "tokens_per_s_measured": measured_tokens_per_s(st),
        "tokens_per_s_capacity": capacity_tokens_per_s(st),
        "summary": dict(model_summary(st)),
        "finished": finished(st),
        "stalled": stalls(st),
    }


def sparkline(values: list[float], width: int = 60) -> str:
    """A text loss curve: `values` in at most `width` buckets (each its mean), low to high."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return ""
    if len(values) > width:
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in itertools.pairwise(edges) if b > a]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / span * len(SPARKS)))] for v in values)
