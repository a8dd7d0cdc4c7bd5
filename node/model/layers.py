"""The GPT-style transformer pieces: RMSNorm, rotary attention, MLP, block.

Rotary positions (not learned absolute embeddings) because position information added once at
the embedding could not survive a 2-channel bottleneck; RoPE re-injects it in every attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from node.model.config import ModelConfig

# The learned gain of a normalised boundary (`boundary_norm`) scales the identity path J_bᵀ z
# only, and starts at the embedding's init std: the scale of the residual stream that J_b h
# carries at init without the norm. The decoder reads the unit-RMS z its fan-in init expects.
GAIN_INIT = 0.02


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


def identity_gain(cfg: ModelConfig, b: int) -> nn.Parameter | None:
    """The receiver's gain on J_bᵀ z when z arrives normalised (see GAIN_INIT), else None."""
    if not (cfg.boundary_norm and cfg.identity_path):
        return None
    return nn.Parameter(torch.full((b,), GAIN_INIT))


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x): IOTA's feed-forward, used here where it is the encoder."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.gate = nn.Linear(d_in, d_hidden, bias=False)
        self.up = nn.Linear(d_in, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(norm h), then + mlp(norm h).

    With `out_dim` < d_model this is a fused ResBM encoder (the `fused` and `iota` E/D forms):
    the feed-forward projects to b channels (a SwiGLU in the `iota` form) and the residual skip
    becomes J_b, the first b channels (or nothing at all when the identity path is ablated).

    With `in_dim` < d_model this is IOTA's receiving block (the `iota` form): it takes z itself,
    ReLU(W z) feeds only its attention, and its residual stream starts as J_bᵀ z:
    h = J_bᵀ z + attn(norm ReLU(W z)), then + mlp(norm h) as usual.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        rotary: Rotary,
        out_dim: int | None = None,
        in_dim: int | None = None,
        swiglu: bool = False,
    ):
        super().__init__()
        d = cfg.d_model
        self.d, self.in_dim, self.out_dim = d, in_dim or d, out_dim or d
        self.skip = self.out_dim == d or cfg.identity_path
        self.in_skip = self.in_dim == d or cfg.identity_path
        if self.in_dim < d:  # the decoder's W of the iota form
            self.lift = nn.Linear(self.in_dim, d, bias=False)
        gain = identity_gain(cfg, self.in_dim) if self.in_dim < d else None
        self.register_parameter("gain", gain)
        self.attn_norm = RMSNorm(d)
        self.attn = Attention(cfg, rotary)
        self.mlp_norm = RMSNorm(d)
        if swiglu:
            self.mlp = SwiGLU(d, cfg.swiglu_hidden, self.out_dim)
        else:
            self.mlp = MLP(d, cfg.mlp_ratio * d, self.out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, in_dim) -> (B, T, out_dim)
        if self.in_dim < self.d:
            a = self.attn(self.attn_norm(F.relu(self.lift(h))))
            z = h if self.gain is None else h * self.gain
            h = F.pad(z, (0, self.d - self.in_dim)) + a if self.in_skip else a
        else:
            h = h + self.attn(self.attn_norm(h))
        m = self.mlp(self.mlp_norm(h))
        return h[..., : self.out_dim] + m if self.skip else m
