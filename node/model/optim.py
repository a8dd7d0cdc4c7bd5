"""Optimizers for one stage: Muon on hidden matrices, AdamW on everything else.

Each stage builds its own optimizers over its own parameters and clips its own gradient norm, so
no optimizer state or norm ever has to cross the network, and a distributed node steps exactly
like the same stage inside the reference trainer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from node.model.config import OptimSettings


def newton_schulz(g: torch.Tensor, coeffs: tuple[float, float, float], steps: int, eps: float):
    """Quintic Newton-Schulz orthogonalization (Muon's), in fp32 on CPU and bf16 on GPUs.

    torch.optim.Muon always runs it in bf16, which CPUs without bf16 matmul units execute ~100x
    slower than fp32: that made a CPU training step 20x slower than forward+backward.
    """
    a, b, c = coeffs
    x = g.float() if g.device.type == "cpu" else g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


def adjusted_lr(lr: float, rule: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-shape lr rule ("original" or "match_rms_adamw")."""
    a, b = shape[:2]
    if rule == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    return lr * math.sqrt(max(1.0, a / b))


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same hyper-parameters, state and maths) with a device-aware NS step."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, mom = float(group["lr"]), group["momentum"]
            for p, g, buf in zip(params, grads, bufs, strict=True):
                buf.lerp_(g, 1 - mom)
                update = g.lerp(buf, mom) if group["nesterov"] else buf
                update = newton_schulz(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    """Muon's domain: 2-D weights inside the network, not the embeddings (the input one and,
    with `reembed`, each stage's own) or the output head."""
    return p.dim() == 2 and not name.startswith(("embed.", "head.", "reembed.", "reembeds."))


def is_boundary(p: nn.Parameter) -> bool:
    return getattr(p, "resbm_boundary", False)


def param_groups(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, everything else), each parameter in exactly one, in a stable order."""
    hidden, rest, seen = [], [], set()
    for name, p in module.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (hidden if is_hidden_matrix(name, p) else rest).append(p)
    return hidden, rest


def _groups(params: list[nn.Parameter], s: OptimSettings, **extra) -> list[dict]:
    """Split into main and boundary (E/D) groups; each group carries its lr multiplier."""
    main = [p for p in params if not is_boundary(p)]
    edge = [p for p in params if is_boundary(p)]
    groups = [
        {"params": main, "lr_scale": 1.0, **extra},
        {"params": edge, "lr_scale": s.boundary_lr_scale, **extra},
    ]
    return [g for g in groups if g["params"]]


def build_optimizers(
    module: nn.Module, s: OptimSettings, fused: bool = False
) -> list[torch.optim.Optimizer]:
    """`fused`: AdamW's one-kernel CUDA implementation (many small launches otherwise); the
    parameters must already be on the GPU."""
    hidden, rest = param_groups(module)
    opts: list[torch.optim.Optimizer] = []
    adamw = {"fused": True} if fused else {}
    if s.name == "adamw":
        groups = _groups(hidden, s, weight_decay=s.weight_decay)
        groups += _groups(rest, s, weight_decay=0.0)
        return [torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), **adamw)]
    if hidden:
        opts.append(
            Muon(
                _groups(hidden, s),
                lr=s.lr,
                weight_decay=s.weight_decay,
                adjust_lr_fn="match_rms_adamw",
            )
        )
    if rest:
        opts.append(
            torch.optim.AdamW(
                _groups(rest, s), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0, **adamw
            )
        )
    return opts


def lr_factor(step: int, s: OptimSettings) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio at total_steps."""
    warmup = min(s.warmup_steps, s.total_steps // 2)  # short runs still get a decay phase
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, s.total_steps - warmup))
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizers: list[torch.optim.Optimizer], step: int, s: OptimSettings) -> float:
    """Stateless schedule: the lr is a function of the step alone, so resume needs no scheduler."""
    lr = s.lr * lr_factor(step, s)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr
