"""One stage's work on tensors: forward a microbatch, backward from a received gradient, step.

No network here. The reference trainer drives S of these in one process; a node drives one of
them from a gRPC stream. Both call the same methods in the same order, which is why a distributed
run with an fp32 wire reproduces the reference run exactly.

A step is `microbatches` microbatches, ids 0..M-1. Each microbatch's loss is divided by M so the
summed gradient is that of the step's mean loss; every stage must run its backwards in id order so
the float sums happen in the same order everywhere.

Devices: the runtime owns the device edge (node/device.py). It takes and returns host fp32
boundary tensors, so everything above it (wire, links, averaging) is device-free, and a CPU node
and a GPU node can serve neighbouring stages. Parameters, gradients and optimizer state live on
the device; with `precision="bf16"` forwards run under autocast over fp32 master weights.

Quantization-aware training (`qat`): every boundary tensor the runtime hands out (z forward,
dL/dz backward) is what the wire codec would deliver, `fake_quantize(t, codec)`, while backward
still applies the received gradient to the unquantized output: a straight-through estimator. A
swarm trains on the codec's values anyway (its wire decodes them); with `qat` the reference
trainer does the same, so it models a lossy wire exactly. `wire_bytes` counts what those tensors
take as wire messages, the run's own measure of bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from node import device as devices
from node.data import Batches, Microbatch, MicrobatchId
from node.model.config import OptimSettings
from node.model.optim import build_optimizers, set_lr
from node.model.resbm import Stage
from node.wire.codec import fake_quantize, wire_bytes
from node.wire.kinds import WireCodec


class UnknownMicrobatchError(KeyError):
    """A backward arrived for a microbatch this stage never forwarded (or already finished)."""


@dataclass
class _Pending:
    inputs: torch.Tensor | None  # leaf we received (requires grad), None on stage 0
    outputs: torch.Tensor  # what we sent downstream, still attached to the graph


@dataclass
class LastStageResult:
    loss: float  # this microbatch's mean token loss (unscaled)
    grad_input: torch.Tensor | None  # dL/dz to send upstream (B, T, b); None if single-stage


@dataclass
class StepStats:
    step: int
    lr: float
    grad_norm: float
    losses: list[float] = field(default_factory=list)


def stage_overlap(overlap: int, stage: int, n_stages: int) -> int:
    """How many of a step's first microbatches stage `stage` runs at the early version when
    stage 0 runs `overlap` (D) of them. Stage k's last gradient of step t comes back 2 (S-1-k)
    hops after its last microbatch left it, where stage 0's takes the 2 (S-1) that D is sized
    to fill: only about D (S-1-k)/(S-1) of step t+1's microbatches reach stage k by then, the
    last stage none. Rounded up. Later microbatches wait for the stage's update, which also
    waits one round trip for its upstream replicas' word that they hold its gradients
    (flow.note_done); they then run at w_{t+1} itself.

    Why not fill that round trip too: staleness costs most in the later stages. Measured by a
    helper at D = 10 of 16, 4 stages, seed 0: every stage early +4.3% val loss, all but the
    last +2.4%, stage 0 alone +1.5%, this taper +1.4%; and by `resbm bench latency` with
    D (S-k)/(S-1) on stage k > 0 (the round trip filled: D, D, 2D/3, D/3): 90.1% of the
    no-latency speed at 50 ms, at +4.12% val loss (D = 10; benchmarks/README.md), where this
    taper keeps less speed at a third of the cost."""
    if n_stages < 2:
        return overlap
    return -(-overlap * (n_stages - 1 - stage) // (n_stages - 1))


class StageRuntime:
    def __init__(
        self,
        stage: Stage,
        optim: OptimSettings,
        batches: Batches,
        microbatches: int,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        compile: bool = False,
        wire_codec: WireCodec | str = WireCodec.fp32,
        qat: bool = False,
        overlap: int = 0,
        predict: float = 0.0,
    ):
        if microbatches < 1:
            raise ValueError("microbatches must be >= 1")
        self.device = devices.resolve(device) if isinstance(device, str) else device
        self.precision = precision
        self.codec, self.qat = WireCodec(wire_codec), qat
        self.wire_bytes = 0  # boundary tensors handed out, as wire messages of `codec`
        self.edge = devices.HostEdge(self.device)
        self.stage, self.settings, self.batches = stage.to(self.device), optim, batches
        self.microbatches = microbatches
        self.optimizers = build_optimizers(stage, optim, fused=self.device.type == "cuda")
        if compile:  # per block: the stage's ends (embed, E/D, head) differ between stages
            for block in stage.blocks:
                block.compile()
        self.pending: dict[MicrobatchId, _Pending] = {}
        self.losses: dict[int, list[float]] = {}  # last stage: per step, its microbatches' losses
        # the overlapped schedule (node/protocol/schedule.py): step u's first `overlap`
        # microbatches run at an earlier version of the weights, early[u] (see open_early)
        if not 0 <= overlap <= microbatches:
            raise ValueError(f"overlap {overlap} outside 0..microbatches ({microbatches})")
        # this stage's own share of it (stage 0's is `overlap` itself)
        self.overlap = stage_overlap(overlap, stage.index, stage.cfg.n_stages)
        self.predict = float(predict)  # how far along the last update: 0 = not at all
        self.names = [n for n, _ in stage.named_parameters()]
        self.early: dict[int, list[torch.Tensor]] = {}
        self.last_update: list[torch.Tensor] | None = None  # w_t - w_{t-1}, for `predict`
        # every stage but the last: the last finished step's weights (and early version), from
        # which its forwards are redone for a dead downstream replica's adopter (forward_past)
        self.past: tuple[int, list[torch.Tensor], list[torch.Tensor] | None] | None = None
        # a swarm's node sets it (StageMachine): one more copy of the weights (two with an
        # overlapped step's early version), not of the optimizer's state
        self.keep_past = False

    @property
    def index(self) -> int:
        return self.stage.index

    # ---- forward -------------------------------------------------------------------------
    def forward(self, mb: Microbatch, z: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 0 reads its tokens from `mb`; others take the received z. Returns z to send."""
        if self.stage.is_last:
            raise RuntimeError("the last stage runs forward_backward, not forward")
        if mb.id in self.pending:
            raise ValueError(f"microbatch {mb.id} was already forwarded on stage {self.index}")
        inputs = None
        with self._autocast():
            if self.stage.is_first:
                out = self._run(mb, self._tokens(mb))
            else:
                inputs = self._leaf(z)
                out = self._run(mb, inputs, self._reembedded(mb))
        self.pending[mb.id] = _Pending(inputs, out)
        return self._outgoing(out)

    # ---- a finished step, again (recovery after the update: protocol/redo.py) ----------
    def forward_past(self, mb: Microbatch, z: torch.Tensor | None = None) -> torch.Tensor:
        """Its step `mb.id.step` applied, redo microbatch `mb`'s forward at the weights that
        step ran it at (`past`, kept by `step()` with `keep_past`; the early version for an
        early microbatch), and hand out the z it sent then. Why: a downstream replica died
        with the z of a replica of ours that died too, after our stage had applied the step;
        the downstream adopter cannot finish the step without it, and our current weights
        would give another one (two deaths in a row). Run as the first forward was (grad
        enabled), so a compiled stage takes the same graph. Raises ValueError when that step
        is not the one kept."""
        if self.stage.is_last:
            raise RuntimeError("the last stage sends no z")
        if self.past is None or self.past[0] != mb.id.step:
            raise ValueError(f"stage {self.index} keeps no weights of step {mb.id.step}")
        _, weights, early = self.past
        version = early if self.is_early(mb.id) else weights
        if version is None:
            raise ValueError(f"stage {self.index} kept no early version of step {mb.id.step}")
        params = dict(zip(self.names, version, strict=True))
        with self._autocast():
            if self.stage.is_first:
                out = functional_call(self.stage, params, (self._tokens(mb),))
            else:
                args = (self._leaf(z), self._reembedded(mb))
                out = functional_call(self.stage, params, args)
        return self._outgoing(out.detach())

    def forward_backward(self, mb: Microbatch, z: torch.Tensor | None) -> LastStageResult:
        """Last stage: loss from locally derived targets, then backward at once (1F1B)."""
        if not self.stage.is_last:
            raise RuntimeError("only the last stage computes the loss")
        targets = self.edge.to_device(self.batches.targets(mb))  # checks the fingerprint first
        inputs = self._tokens(mb) if self.stage.is_first else self._leaf(z)
        with self._autocast():
            logits = self._run(mb, inputs, None if self.stage.is_first else self._reembedded(mb))
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        (loss / self.microbatches).backward()
        value = loss.item()
        self.losses.setdefault(mb.id.step, []).append(value)
        grad = None if self.stage.is_first else self._outgoing(inputs.grad)
        return LastStageResult(value, grad)

    # ---- backward ------------------------------------------------------------------------
    def backward(self, mb_id: MicrobatchId, grad_output: torch.Tensor) -> torch.Tensor | None:
        """Backprop the received dL/dz; returns dL/dz for the stage upstream (None on stage 0)."""
        pending = self.pending.pop(mb_id, None)
        if pending is None:
            raise UnknownMicrobatchError(f"no forward of microbatch {mb_id} on stage {self.index}")
        if grad_output.shape != pending.outputs.shape:
            self.pending[mb_id] = pending  # nothing applied: the right gradient may still come
            raise ValueError(
                f"gradient shape {tuple(grad_output.shape)} != output shape "
                f"{tuple(pending.outputs.shape)} for microbatch {mb_id}"
            )
        grad = self.edge.to_device(grad_output).to(pending.outputs.dtype)
        pending.outputs.backward(grad)
        return None if pending.inputs is None else self._outgoing(pending.inputs.grad)

    def _leaf(self, z: torch.Tensor | None) -> torch.Tensor:
        if z is None:
            raise ValueError("this stage needs the boundary tensor z from upstream")
        return self.edge.to_device(z.detach()).float().clone().requires_grad_(True)

    def _outgoing(self, t: torch.Tensor) -> torch.Tensor:
        """A boundary tensor leaving this stage: on the host, and with `qat` exactly what the
        wire would deliver; counted as the wire message it makes."""
        host = self.edge.to_host(t)
        self.wire_bytes += wire_bytes(self.codec, tuple(host.shape))
        return fake_quantize(host, self.codec) if self.qat else host

    def _tokens(self, mb: Microbatch) -> torch.Tensor:
        return self.edge.to_device(self.batches.inputs(mb))

    def _reembedded(self, mb: Microbatch) -> torch.Tensor | None:
        """The tokens a `reembed` stage adds to what it decodes, cut from (seed, step, index)
        like stage 0's and checked against the data fingerprint like the last stage's targets."""
        return self._tokens(mb) if self.stage.needs_tokens else None

    def _autocast(self):
        return devices.autocast(self.device, self.precision)

    # ---- weight versions (the overlapped schedule) ---------------------------------------
    def is_early(self, mb_id: MicrobatchId) -> bool:
        """Does this microbatch run at its step's early version (not at the current weights)?
        Step 0 has none: its microbatches all run at w_0, as in 1f1b."""
        return mb_id.step > 0 and mb_id.index < self.overlap

    def _run(self, mb: Microbatch, *args) -> torch.Tensor:
        if not self.is_early(mb.id):
            return self.stage(*args)
        version = self.open_early(mb.id.step)
        return functional_call(self.stage, dict(zip(self.names, version, strict=True)), args)

    @torch.no_grad()
    def open_early(self, step: int) -> list[torch.Tensor]:
        """The weights step `step`'s early microbatches run at: the current weights, taken
        while they are still w_{step-1} (before step-1's update; `step()` takes them then if
        no early microbatch came first), extrapolated along the last update by a = `predict`:
        w_{step-1} + a (w_{step-1} - w_{step-2}) (a = 1 is SpecTrain's weight prediction). A copy
        with its own gradients, so step-1's update may change the current weights meanwhile."""
        version = self.early.get(step)
        if version is None:
            version = [p.detach().clone() for p in self.stage.parameters()]
            if self.predict and self.last_update is not None:
                for w, d in zip(version, self.last_update, strict=True):
                    w.add_(d, alpha=self.predict)
            for w in version:
                w.requires_grad_(True)
            self.early[step] = version
        return version

    @torch.no_grad()
    def fold_early(self, step: int) -> None:
        """Add `step`'s early microbatches' gradients to the current weights' (where its other
        microbatches' are): the step's gradient is their sum. Idempotent. The version itself
        stays until the step's update: it is part of the state at the step's start
        (versions(), what a joiner downloads and replicas vouch for)."""
        for p, w in zip(self.stage.parameters(), self.early.get(step, ()), strict=False):
            if w.grad is None:
                continue
            if p.grad is None:
                p.grad = w.grad
            else:
                p.grad.add_(w.grad)
            w.grad = None

    def versions(self, step: int) -> dict[str, list[torch.Tensor]]:
        """What the overlapped rule needs besides the weights at the start of `step`: the
        version its early microbatches run at (`early`) and the last update (`update`, with
        prediction), which the next step's version is cut from. Empty for 1f1b."""
        out = {}
        if step in self.early:
            out["early"] = [w.detach() for w in self.early[step]]
        if self.overlap and self.predict and self.last_update is not None:
            out["update"] = list(self.last_update)
        return out

    @torch.no_grad()
    def keep_early(self, step: int, mine: list[torch.Tensor]) -> bool:
        """After load_versions: keep `mine` (our own version of `step`, with its gradients) if
        it is the loaded one, bit for bit. Returns whether it was kept."""
        loaded = self.early.get(step)
        if loaded is None or len(loaded) != len(mine):
            return False
        if not all(torch.equal(a.detach(), b.detach()) for a, b in zip(loaded, mine, strict=True)):
            return False
        self.early[step] = mine
        return True

    @torch.no_grad()
    def load_versions(self, step: int, versions: dict[str, list[torch.Tensor]]) -> None:
        """Take a state's versions (a replica's, or a checkpoint's) for a run at `step`; what
        this runtime held of other steps is dropped. Raises ValueError on a shape mismatch."""
        params = list(self.stage.parameters())
        for kind, tensors in versions.items():
            if len(tensors) != len(params) or any(
                t.shape != p.shape for t, p in zip(tensors, params, strict=True)
            ):
                raise ValueError(f"the state's {kind} version does not fit this stage")
        self.early, self.past = {}, None
        if "early" in versions:
            self.early[step] = [
                t.to(p.device, p.dtype).clone().requires_grad_(True)
                for t, p in zip(versions["early"], params, strict=True)
            ]
        update = versions.get("update")
        self.last_update = (
            None
            if update is None
            else [t.to(p.device, p.dtype).clone() for t, p in zip(update, params, strict=True)]
        )

    def weights(self) -> list[torch.Tensor]:
        """A copy of the stage's weights (tests write the overlapped rule out by hand with it)."""
        return [p.detach().clone() for p in self.stage.parameters()]

    @torch.no_grad()
    def load_weights(self, version: list[torch.Tensor]) -> None:
        """Put a version from `weights()` in place. The parameters stay the same objects, so
        their gradients and the optimizer's state are untouched."""
        for p, w in zip(self.stage.parameters(), version, strict=True):
            p.copy_(w)

    # ---- optimizer step ------------------------------------------------------------------
    def step(self, step: int) -> StepStats:
        """Clip this stage's own grad norm, apply the schedule, step, and clear for the next.
        Overlapped: step+1's early microbatches may be in flight (at their own weights)."""
        if busy := [mid for mid in self.pending if mid.step <= step]:
            raise RuntimeError(
                f"stage {self.index} cannot step with {len(busy)} microbatches in flight"
            )
        self.fold_early(step)
        if self.overlap:  # step+1's early version is w_step: take it before the update
            self.open_early(step + 1)
        keep = self.keep_past and not self.stage.is_last  # the step's weights: forward_past
        if keep:
            self.past = None  # the older one goes before the copy (peak memory)
        before = self.weights() if keep or (self.overlap and self.predict) else None
        params = [p for p in self.stage.parameters() if p.grad is not None]
        clip = self.settings.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        lr = set_lr(self.optimizers, step, self.settings)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.overlap and self.predict:
            with torch.no_grad():
                self.last_update = [
                    p.detach() - w for p, w in zip(self.stage.parameters(), before, strict=True)
                ]
        early = self.early.pop(step, None)
        if keep:  # leaves that require grad, as the step's own parameters did (a compiled
            # stage then runs forward_past on the graph it ran the step on)
            weights = [w.detach().requires_grad_(True) for w in before]
            self.past = (step, weights, early)
        return StepStats(step, lr, float(norm), self.losses.pop(step, []))
