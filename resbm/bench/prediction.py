"""`resbm bench prediction`: how far to extrapolate the overlapped rule's early weights.

The overlapped schedule runs a step's first microbatches at the weights before the last update,
extrapolated along the update before that: w_{t-1} + a (w_{t-1} - w_{t-2}) (node/trainer.py).
SpecTrain and PipeMare take a = 1, which assumes the next update repeats the last. This bench
measures, along one run of the reference trainer on that rule, at a few points of the run:
- the weight error of each a, |w_{t-1} + a u_{t-1} - w_t| / |u_t| (u_t = w_t - w_{t-1}), and the
  a that minimises it, <u_t, u_{t-1}> / |u_{t-1}|^2 (how alike consecutive updates are);
- what counts: each stage's gradient of the step with its early microbatches at that a, against
  the exact gradient (every microbatch at w_t), relative error |g_a - g| / |g|.
The loss cost of a rule is `resbm bench latency --loss-only` (paired seeds, a CI); this is the
why behind the default `predict_scale`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from typing import Any

from resbm.bench import add_model_args, add_out_args, out_path, say_where, setting_of


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prediction",
        help="the overlapped rule's weight prediction: gradient error against the scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(
        p, stages=4, steps=300, d_model=128, n_layers=4, n_heads=4, seq_len=64,
        batch_size=4, microbatches=16, compression=32,
    )  # fmt: skip
    p.add_argument("--overlap", type=int, default=6, help="D, stage 0's early microbatches")
    p.add_argument(
        "--scales", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="the scales a whose early weights are measured (default 0 0.25 0.5 0.75 1)",
    )  # fmt: skip
    p.add_argument(
        "--predict-scale", type=float, help="the run's own rule (default: the default, 1)"
    )
    p.add_argument("--every", type=int, default=25, help="steps between measurements")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    add_out_args(p, "prediction")
    p.set_defaults(handler=run)


def trainer_for(args):
    from node.config import TrainConfig
    from node.trainer import ReferenceTrainer

    model = {
        "d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads,
        "seq_len": args.seq_len, "n_stages": args.stages, "compression": args.compression,
    }  # fmt: skip
    cfg = TrainConfig(
        model=model, steps=args.steps, batch_size=args.batch_size,
        microbatches=args.microbatches, eval_every=0, eval_batches=1, seed=args.seed,
        threads=1, schedule="overlapped", overlap=args.overlap,
        **({} if args.predict_scale is None else {"predict_scale": args.predict_scale}),
    )  # fmt: skip
    return ReferenceTrainer(cfg, progress=False)


class History:
    """The last weights and update of each stage, for the next step's early version: before a
    step t >= 2, `before` is each stage's (w_{t-1}, u_{t-1}), u taken as StageRuntime.step
    takes it (bit for bit), whatever the run's own prediction."""

    def __init__(self):
        self.before: list | None = None
        self._older: list | None = None

    def step(self, trainer) -> None:
        now = [rt.weights() for rt in trainer.runtimes]
        if self._older is not None:
            self.before = [(w, [a - b for a, b in zip(w, o, strict=True)])
                           for w, o in zip(now, self._older, strict=True)]  # fmt: skip
        self._older = now
        trainer.train_step()


def step_grads(trainer, scale: float | None, before: list) -> list[list]:
    """Each stage's gradient of the trainer's next step, on a copy: `scale` None runs every
    microbatch at the current weights (exact); else the early ones at w_{t-1} + scale u_{t-1}
    (`before`: each stage's (w_{t-1}, u_{t-1})), whatever the run itself predicts (at its own
    scale, the version it made, bit for bit: StageRuntime.open_early's arithmetic)."""
    import torch

    t = copy.deepcopy(trainer)
    with torch.no_grad():
        for rt, (prev, u) in zip(t.runtimes, before, strict=True):
            if scale is None:
                rt.overlap = 0
            elif t.step in rt.early:
                for w, p, e in zip(rt.early[t.step], prev, u, strict=True):
                    w.copy_(p.clone().add_(e, alpha=scale))
    t.accumulate(t.step)
    out = []
    for rt in t.runtimes:
        rt.fold_early(t.step)
        out.append([p.grad for p in rt.stage.parameters() if p.grad is not None])
    return out


def _norm(ts) -> float:
    return float(sum(float(x.pow(2).sum()) for x in ts) ** 0.5)


def measure(trainer, scales: list[float], before: list) -> dict[str, Any]:
    """One point of the run (the trainer about to run step t >= 2)."""
    exact = step_grads(trainer, None, before)
    row: dict[str, Any] = {"step": trainer.step, "grad_error": {}, "weight_error": {}}
    for a in scales:
        got = step_grads(trainer, a, before)
        row["grad_error"][str(a)] = [
            _norm([x - y for x, y in zip(g, e, strict=True)]) / _norm(e)
            for g, e in zip(got, exact, strict=True)
        ]
    best = []
    for rt, (prev, u) in zip(trainer.runtimes, before, strict=True):
        if not rt.overlap:
            continue
        last = [p.detach() - w for p, w in zip(rt.stage.parameters(), prev, strict=True)]  # u_t
        dot = sum(float((x * y).sum()) for x, y in zip(last, u, strict=True))
        best.append(dot / _norm(u) ** 2)
        for a in scales:
            miss = _norm([a * y - x for x, y in zip(last, u, strict=True)]) / _norm(last)
            row["weight_error"].setdefault(str(a), []).append(miss)
    row["best_scale"] = best
    return row


def run(args: argparse.Namespace) -> int:
    if args.every < 2 or args.steps < 3:
        print("bench prediction: --every must be >= 2 and --steps >= 3", file=sys.stderr)
        return 2
    out = out_path(args, "prediction")
    say_where("prediction", out)
    trainer = trainer_for(args)
    history, rows = History(), []
    while trainer.step < args.steps:
        if trainer.step >= 2 and trainer.step % args.every == 0:
            rows.append(measure(trainer, args.scales, history.before))
            mean = {a: statistics.fmean(e) for a, e in rows[-1]["grad_error"].items()}
            print(f"  step {trainer.step}: grad error {mean}", file=sys.stderr, flush=True)
        history.step(trainer)
    doc = {"setting": setting_of(args), "predict_scale": trainer.cfg.prediction, "points": rows}
    print(table(doc))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


def table(doc: dict[str, Any]) -> str:
    scales = list(doc["points"][0]["grad_error"]) if doc["points"] else []
    head = f"{'step':>5} " + " ".join(f"{'a=' + a:>8}" for a in scales) + f" {'best a':>7}"
    lines = [
        "the step's gradient error |g_a - g| / |g| (mean over stages), early microbatches at "
        f"w_(t-1) + a u_(t-1); the run's own a = {doc['predict_scale']}",
        head,
        "-" * len(head),
    ]
    for r in doc["points"]:
        errs = " ".join(f"{statistics.fmean(r['grad_error'][a]):>8.4f}" for a in scales)
        lines.append(f"{r['step']:>5} {errs} {statistics.fmean(r['best_scale']):>7.2f}")
    if doc["points"]:
        means = [statistics.fmean(statistics.fmean(r["grad_error"][a]) for r in doc["points"])
                 for a in scales]  # fmt: skip
        lines.append(f"{'mean':>5} " + " ".join(f"{m:>8.4f}" for m in means))
    lines.append("(best a: the least-squares scale of the last update onto the next one)")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in doc["points"]]
    for a in doc["points"][0]["grad_error"] if doc["points"] else []:
        ax.plot(steps, [statistics.fmean(r["grad_error"][a]) for r in doc["points"]],
                marker="o", label=f"a = {a}")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("gradient error of the step, mean over stages")
    ax.set_title(f"overlapped rule, D = {doc['setting']['overlap']}: early weights "
                 "w(t-1) + a u(t-1)")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
