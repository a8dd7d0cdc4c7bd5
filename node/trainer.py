"""The reference trainer: every stage in one process, driven exactly as a swarm drives them.

Each microbatch runs stage 0 -> ... -> last stage (loss + backward) -> ... -> stage 0, passing only
the detached boundary tensor z and its gradient between StageRuntimes, just as the network would.
The distributed run must reproduce this one's per-step losses with an fp32 wire.

`schedule` is the update rule across steps. `1f1b`: step t's gradients are computed at the
weights w_t and give w_{t+1}. `overlapped`: on stage k the first D_k microbatches of step t are
computed at w_{t-1}, the stage's weights before step t-1's update, the others at w_t, and their
sum is applied to w_t. That is what a pipeline computes whose stage 0 starts step t's first
D = D_0 (`overlap`) microbatches while step t-1's last gradients are still coming back: each
stage runs a microbatch's backward at the weights its forward used (PipeDream's weight
stashing), so a stage holds an earlier version besides the current weights (two while the
early microbatches of two steps are in flight). Stage k's last gradient of step t-1 is back
2 (S-1-k) hops after its last microbatch of that step left it, so only D_k = ceil(D (S-1-k)/(S-1))
of step t reach it by then, and only those run early (the last stage none;
runtime.stage_overlap): the later stages' staleness costs the most. With D = M and every
stage early it would be PipeDream-2BW's rule (Narayanan et al., ICML 2021: every gradient one
update stale); a smaller D is stale only where the pipeline would otherwise wait; its cost in
loss, measured per D, is in benchmarks/README.md. With `predict_weights` the stale microbatches run
at w_{t-1} extrapolated along the update before it, w_{t-1} + a (w_{t-1} - w_{t-2}), as SpecTrain
(Chen et al., 2018) and PipeMare (Yang et al., 2021) predict the weights a delayed gradient
should have been taken at: a = `predict_scale` = 1 (the default), the next update is the last.
Here (Muon, 4,096 tokens a step) consecutive updates are less alike: the scale of the last
update that best predicts the next one is 0.54-0.89 along a run (`resbm bench prediction`), yet
a = 0.5 was not shown to cost less val loss than a = 1 at D = 6 over 12 paired seeds (+0.80%
and +0.76%; the paired difference +0.04 points, 95% CI [-0.56, +0.64], as wide as the cost
itself: benchmarks/README.md). Step 0 has no
earlier weights: all of it is at w_0 in both rules. The rule lives in StageRuntime
(node/runtime.py), which a node uses too. A checkpoint of an overlapped run holds the early
version and the last update besides the weights (StageRuntime.versions), so it resumes exactly,
as a joiner takes a replica's state.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from node import checkpoint
from node import device as devices
from node.config import TrainConfig
from node.data import Batches, Corpus
from node.model.resbm import ResBM
from node.runtime import StageRuntime


@torch.no_grad()
def evaluate(model: ResBM, batches: Batches, n_batches: int, precision: str = "fp32") -> float:
    """Mean val loss over a fixed set of val windows (the same for every run and process), on
    the model's device and in the training precision."""
    dev = next(model.parameters()).device
    total = 0.0
    pairs = batches.val_batches(n_batches)
    for x, y in pairs:
        with devices.autocast(dev, precision):
            total += model.loss(x.to(dev), y.to(dev)).item()
    return total / len(pairs)


class ReferenceTrainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = devices.resolve(cfg.device)
        devices.configure(self.device)
        self.corpus = Corpus.load(cfg.data)
        self.batches = Batches(self.corpus, cfg.model.seq_len, cfg.batch_size, cfg.seed)
        torch.manual_seed(cfg.seed)  # model init is the only randomness
        self.model = ResBM(cfg.model).to(self.device)
        self.runtimes = [
            StageRuntime(
                stage,
                cfg.optim,
                self.batches,
                cfg.microbatches,
                device=self.device,
                precision=cfg.precision,
                compile=cfg.compile,
                wire_codec=cfg.wire_codec,
                qat=cfg.qat,
                overlap=cfg.overlap_mbs,
                predict=cfg.prediction,
            )
            for stage in self.model.stages()
        ]
        devices.reset_peak_memory(self.device)
        self.step = 0
        self.start_step = 0  # where this process began (tokens/s counts only its own steps)
        self.loss_history: list[float] = []
        self.grad_norm_history: list[list[float]] = []  # per step, per stage (before clipping)
        self.val_history: list[tuple[int, float]] = []
        self.train_seconds = 0.0
        if cfg.resume:
            self._resume()

    # ---- one optimizer step ----------------------------------------------------------------
    def accumulate(self, step: int, order: list[int] | None = None) -> None:
        """`step`'s microbatches forward and back through every stage, in order (or in
        `order`: the protocol harness measures what summation order alone changes), each at
        the version of the weights its schedule gives it (StageRuntime.is_early)."""
        *senders, last = self.runtimes
        for i in range(self.cfg.microbatches) if order is None else order:
            mb = self.batches.microbatch(step, i)
            z = None
            for rt in senders:
                z = rt.forward(mb, z)
            grad = last.forward_backward(mb, z).grad_input
            for rt in reversed(self.runtimes[:-1]):
                grad = rt.backward(mb.id, grad)

    def train_step(self, order: list[int] | None = None) -> float:
        self.accumulate(self.step, order)
        stats = [rt.step(self.step) for rt in self.runtimes]
        loss = sum(stats[-1].losses) / len(stats[-1].losses)
        self.loss_history.append(loss)
        self.grad_norm_history.append([s.grad_norm for s in stats])
        self.step += 1
        return loss

    def evaluate(self) -> float:
        return evaluate(self.model, self.batches, self.cfg.eval_batches, self.cfg.precision)

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
            desc="train",
        )
        val = self.val_history[-1][1] if self.val_history else None  # "-" until the first eval
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            loss = self.train_step()
            self.train_seconds += time.perf_counter() - t0
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                val = self._eval_and_record()
            if (
                cfg.checkpoint_dir
                and cfg.checkpoint_every
                and self.step % cfg.checkpoint_every == 0
            ):
                self.save()
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.3f}",
                val="-" if val is None else f"{val:.3f}",
                tok_s=f"{self._tok_s():.0f}",
            )
        bar.close()
        if not self.val_history or self.val_history[-1][0] != self.step:
            self._eval_and_record()
        if cfg.checkpoint_dir:
            self.save()
        return self.result()

    def _eval_and_record(self) -> float:
        val = self.evaluate()
        self.val_history.append((self.step, val))
        return val

    def _wire_bytes_per_token(self) -> float | None:
        """Bytes per token that one boundary carries in one direction (z forward, dL/dz back),
        counted from the wire messages this process's boundary tensors make (protobuf framing
        of the tensor included; a link's chunking and gRPC framing are not)."""
        boundaries = self.cfg.model.n_stages - 1
        done = len(self.loss_history) - self.start_step
        if not boundaries or not done:
            return None
        total = sum(rt.wire_bytes for rt in self.runtimes)
        return total / (2 * boundaries * done * self.cfg.tokens_per_step)

    def _tok_s(self) -> float:
        done = len(self.loss_history) - self.start_step
        return done * self.cfg.tokens_per_step / self.train_seconds if self.train_seconds else 0.0

    def result(self) -> dict[str, Any]:
        m = self.cfg.model
        tok_s = self._tok_s()
        return {
            "steps": self.step,
            "tokens": self.step * self.cfg.tokens_per_step,
            "train_loss": self.loss_history[-1] if self.loss_history else None,
            "val_loss": self.val_history[-1][1] if self.val_history else None,
            "loss_history": self.loss_history,
            "val_history": self.val_history,
            "grad_norm_history": self.grad_norm_history,
            "tokens_per_s": tok_s,
            "params": (n_params := sum(p.numel() for p in self.model.parameters())),
            "wire_codec": self.cfg.wire_codec.value,
            "qat": self.cfg.qat,
            "wire_bytes_per_token": self._wire_bytes_per_token(),
            **devices.run_facts(self.device, self.cfg.precision, m, tok_s, n_params),
            "d_model": m.d_model,
            "boundary_dim": m.boundary_dim,
            "compression": m.compression,
            # bytes of one token's boundary tensor, uncompressed over compressed, same wire dtype
            "wire_bytes_ratio": m.d_model / m.boundary_dim,
            "identity_path": m.identity_path,
            "encoder": m.encoder,
            "stages": m.n_stages,
            "optimizer": self.cfg.optim.name,
            "schedule": self.cfg.schedule,
            "overlap": self.cfg.overlap_mbs,
            "predict_weights": self.cfg.schedule == "overlapped" and self.cfg.predict_weights,
            "predict_scale": self.cfg.prediction,
            "seed": self.cfg.seed,
        }

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self) -> None:
        d = self.cfg.checkpoint_dir
        for rt in self.runtimes:
            checkpoint.save_stage(d, rt, self.step)
        checkpoint.save_run(
            d,
            {
                "step": self.step,
                "config": self.cfg.model_dump(mode="json"),
                "corpus_fingerprint": self.corpus.fingerprint,
                "loss_history": self.loss_history,
                "val_history": self.val_history,
                "grad_norm_history": self.grad_norm_history,
            },
        )

    def _resume(self) -> None:
        run = checkpoint.load_run(self.cfg.checkpoint_dir)
        if (rule := _rule(run.get("config", {}))) != _rule(self.cfg.model_dump(mode="json")):
            schedule, overlap, predict = rule
            flags = f"--schedule {schedule}"
            if schedule == "overlapped":
                flags += f" --overlap {overlap} " + (
                    f"--predict-weights --predict-scale {predict}"
                    if predict
                    else "--no-predict-weights"
                )
            raise ValueError(  # the update rule is part of the run (a checkpoint's versions too)
                f"checkpoint in {self.cfg.checkpoint_dir} is of a {flags} run: resume it with "
                "those settings"
            )
        if run["corpus_fingerprint"] != self.corpus.fingerprint:
            raise ValueError(
                f"checkpoint in {self.cfg.checkpoint_dir} was trained on another corpus; "
                "pass the same --data"
            )
        steps = {checkpoint.load_stage(self.cfg.checkpoint_dir, rt) for rt in self.runtimes}
        if steps != {run["step"]}:
            raise ValueError(f"stage checkpoints disagree on the step: {sorted(steps)}")
        self.step = run["step"]
        self.loss_history = list(run["loss_history"])
        self.grad_norm_history = list(run.get("grad_norm_history", []))
        self.val_history = [tuple(v) for v in run["val_history"]]
        self.start_step = self.step


def _rule(config: dict) -> tuple:
    """(schedule, overlap, prediction) of a run's config (a checkpoint's, as JSON). A checkpoint
    from before predict_scale extrapolated by the whole update (1.0)."""
    if config.get("schedule", "1f1b") != "overlapped":
        return ("1f1b", None, None)
    overlap = config.get("overlap")
    predict = config.get("predict_weights", True) and config.get("predict_scale", 1.0)
    return ("overlapped", config["microbatches"] if overlap is None else overlap,
            float(predict) if overlap != 0 else 0.0)  # fmt: skip
