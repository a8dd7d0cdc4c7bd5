"""The residual bottleneck at a stage boundary (ResBM, Aboudib et al. 2026).

The sender transmits  z  = J_b h + E(h)      (B, T, d) -> (B, T, b)
the receiver rebuilds h' = J_bᵀ z + D(z)     (B, T, b) -> (B, T, d)

J_b keeps the first b channels (parameter-free); its transpose zero-pads them back. It is an
explicit low-rank identity path, so even an untrained E/D passes something useful, and E/D only
have to learn the residual. Only z (and dL/dz on the way back) ever crosses the network.

Three E/D forms, chosen by `ModelConfig.encoder`:
- "mlp":   E = norm -> Linear(d, m) -> GELU -> Linear(m, b)
           D = Linear(b, m) -> GELU -> Linear(m, d)
- "fused": the encoder is fused into the last block of the stage: that block's MLP projects to
           b and its residual skip is J_b (see `Block(out_dim=b)`), so E is the identity here;
           D(z) = ReLU(W z) feeds the next stage's first block like any residual stream.
- "iota":  Macrocosmos IOTA's form: E as in "fused" with a SwiGLU feed-forward; on the receiving
           side ReLU(W z) feeds only the first block's attention, and the residual stream starts
           as J_bᵀ z + that attention's output (see `Block(in_dim=b)`): D is the identity here.

With `boundary_norm` (any form) the sender scales each token's z to unit RMS before it leaves,
and the receiver multiplies the identity path J_bᵀ z by a learned per-channel gain. The wire
then carries values of one known scale (what a quantizer wants: int8/int4 scales stop tracking
the residual stream's growth), the decoder sees the unit-scale input its fan-in init assumes
(the raw J_b h is ~0.02 RMS at init), and the gain starts at that 0.02 (`GAIN_INIT`), so the
residual stream the receiver rebuilds starts at the scale it would have without the norm. (A
gain on all of D's input, started at 1, put unit-RMS values in b residual channels next to
~0.02 ones, and trained worse: benchmarks/results/gap-quick.json.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from node.model.config import ModelConfig
from node.model.layers import RMSNorm, identity_gain


def truncate(h: torch.Tensor, b: int) -> torch.Tensor:
    """J_b: (B, T, d) -> (B, T, b), the first b channels."""
    return h[..., :b]


def zero_pad(z: torch.Tensor, d: int) -> torch.Tensor:
    """J_bᵀ: (B, T, b) -> (B, T, d), zeros in channels b..d-1."""
    return F.pad(z, (0, d - z.shape[-1]))


class MLPEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.b, self.identity_path = cfg.boundary_dim, cfg.identity_path
        self.norm = RMSNorm(cfg.d_model)
        self.up = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.boundary_dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, b)
        e = self.down(F.gelu(self.up(self.norm(h))))
        return truncate(h, self.b) + e if self.identity_path else e


class MLPDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d, self.identity_path = cfg.d_model, cfg.identity_path
        self.up = nn.Linear(cfg.boundary_dim, cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.d_model, bias=False)
        self.register_parameter("gain", identity_gain(cfg, cfg.boundary_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, T, b) -> (B, T, d)
        r = self.down(F.gelu(self.up(z)))
        return zero_pad(_scaled(z, self.gain), self.d) + r if self.identity_path else r


def _scaled(z: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    return z if gain is None else z * gain


class ReLUDecoder(nn.Module):
    """The fused form's decoder: h' = J_bᵀ z + ReLU(W z)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d, self.identity_path = cfg.d_model, cfg.identity_path
        self.proj = nn.Linear(cfg.boundary_dim, cfg.d_model, bias=False)
        self.register_parameter("gain", identity_gain(cfg, cfg.boundary_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, T, b) -> (B, T, d)
        r = F.relu(self.proj(z))
        return zero_pad(_scaled(z, self.gain), self.d) + r if self.identity_path else r


class UnitRMS(nn.Module):
    """The sender's normalisation: z / rms(z) per token, no parameters (nothing to learn on the
    sending side: the receiver's gain restores the identity path's scale)."""

    def __init__(self, encoder: nn.Module, eps: float = 1e-8):
        super().__init__()
        self.inner, self.eps = encoder, eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.inner(h)
        return F.rms_norm(z, (z.shape[-1],), None, self.eps)


class Boundary(nn.Module):
    """One stage boundary: `encode` runs on the sending stage, `decode` on the receiving one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.bottleneck:  # compression 1: the uncompressed baseline sends h itself
            self.encoder, self.decoder = nn.Identity(), nn.Identity()
        elif cfg.encoder == "mlp":
            self.encoder, self.decoder = MLPEncoder(cfg), MLPDecoder(cfg)
        elif cfg.encoder == "fused":  # encoding happens inside the stage's last block
            self.encoder, self.decoder = nn.Identity(), ReLUDecoder(cfg)
        else:  # iota: encoding and decoding both happen inside blocks
            self.encoder, self.decoder = nn.Identity(), nn.Identity()
        if cfg.bottleneck and cfg.boundary_norm:
            self.encoder = UnitRMS(self.encoder)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.encoder(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)
