"""The GPT-style transformer pieces: RMSNorm, rotary attention, MLP, block.

Rotary positions (not learned absolute embeddings) because position information added once at
the embedding could not survive a 2-channel bottleneck; RoPE re-injects it in every attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from node.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, each (T, head_dim/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); rotate the two halves of the head dimension as pairs
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Rotary(nn.Module):
    """Holds the cos/sin tables as non-persistent buffers (rebuilt, never checkpointed)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self._rotary = [rotary]  # shared tables; a list keeps them out of this module's state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        rot = self._rotary[0]
        q, k = apply_rotary(q, rot.cos, rot.sin), apply_rotary(k, rot.cos, rot.sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(norm h), then + mlp(norm h).

    With `out_dim` < d_model this is the fused ResBM encoder (the `fused` E/D form): the MLP
    projects to b channels and the residual skip becomes J_b, the first b channels (or nothing
    at all when the identity path is ablated).
    """

    def __init__(self, cfg: ModelConfig, rotary: Rotary, out_dim: int | None = None):
        super().__init__()
        self.out_dim = out_dim or cfg.d_model
        self.skip = self.out_dim == cfg.d_model or cfg.identity_path
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, rotary)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model, self.out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, out_dim)
        h = h + self.attn(self.attn_norm(h))
        m = self.mlp(self.mlp_norm(h))
        return h[..., : self.out_dim] + m if self.skip else m
