"""ResBM: a GPT-style decoder cut into pipeline stages with a residual bottleneck at every cut.

Read top to bottom: how layers are split into stages, the whole model, then a stage cut from it.

Every process builds the *whole* model from the same seed and keeps only its stage. That is what
makes a distributed run start from exactly the reference trainer's weights without shipping any.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from node.model.bottleneck import Boundary
from node.model.config import ModelConfig
from node.model.layers import Block, RMSNorm, Rotary


def stage_spans(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous, balanced layer ranges, one per stage.

    Every stage gets floor(L/S) blocks; the L mod S leftover blocks go to the stages with the least
    other work: middle stages first (in order), then stage 0 (embedding lookup is cheap), then the
    last stage (it already pays for the head and the loss).
    """
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"need 1 <= n_stages ({n_stages}) <= n_layers ({n_layers})")
    counts = [n_layers // n_stages] * n_stages
    order = [*range(1, n_stages - 1), 0, n_stages - 1] if n_stages > 1 else [0]
    for k in order[: n_layers % n_stages]:
        counts[k] += 1
    spans, start = [], 0
    for c in counts:
        spans.append(range(start, start + c))
        start += c
    return spans


class ResBM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.spans = stage_spans(cfg.n_layers, cfg.n_stages)
        # layer index j -> boundary index after it
        self.boundary_after = {span[-1]: k for k, span in enumerate(self.spans[:-1])}
        fused = cfg.bottleneck and cfg.encoder in ("fused", "iota")  # E inside the last block
        iota = cfg.bottleneck and cfg.encoder == "iota"  # and D inside the next first block
        receives = {span[0] for span in self.spans[1:]}
        b = cfg.boundary_dim

        self.rotary = Rotary(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(
                cfg,
                self.rotary,
                out_dim=b if fused and j in self.boundary_after else None,
                in_dim=b if iota and j in receives else None,
                swiglu=iota and j in self.boundary_after,
            )
            for j in range(cfg.n_layers)
        )
        self.boundaries = nn.ModuleList(Boundary(cfg) for _ in range(cfg.n_stages - 1))
        # beyond the paper (`reembed`): stage k > 0 adds its own embedding of the tokens
        self.reembeds = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, cfg.d_model)
            for _ in range(cfg.n_stages - 1 if cfg.reembed else 0)
        )
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        self._tag_boundary_params()

    def _tag_boundary_params(self) -> None:
        """Mark E/D weights so optimizers can treat them apart (see OptimSettings)."""
        tagged = [p for b in self.boundaries for p in b.parameters()]
        for block in self.blocks:
            if block.out_dim < self.cfg.d_model:  # a fused encoder
                tagged.append(block.mlp.down.weight)
            if block.in_dim < self.cfg.d_model:  # the iota form's decoder
                tagged += [p for p in (block.lift.weight, block.gain) if p is not None]
        for p in tagged:
            p.resbm_boundary = True

    def _init_weights(self) -> None:
        # GPT-2 init; projections that write into the residual stream scaled by 1/sqrt(2L).
        # The decoder's first layer reads only b channels: it gets a fan-in init (1/sqrt(b)), or
        # at 0.02 its output, and so its gradient, starts ~30x too small (measured: -1.7% val
        # loss at 128x, see benchmarks/README.md).
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                std = resid_std
            elif (
                (".decoder." in name or name.endswith(".lift.weight"))
                and p.shape[1] == self.cfg.boundary_dim
                and self.cfg.decoder_init == "fan_in"
            ):
                std = 1.0 / math.sqrt(self.cfg.boundary_dim)
            else:
                std = 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) tokens -> (B, T, V) logits
        h = self.embed(idx)  # (B, T, d)
        for j, block in enumerate(self.blocks):
            h = block(h)
            if j in self.boundary_after:  # what a pipeline does across the network, in place
                k = self.boundary_after[j]
                h = self.boundaries[k].decode(self.boundaries[k].encode(h))  # via (B, T, b)
                if self.reembeds:
                    h = h + self.reembeds[k](idx)
        return self.head(self.norm(h))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def stage(self, k: int) -> Stage:
        return Stage(self, k)

    def stages(self) -> list[Stage]:
        return [Stage(self, k) for k in range(self.cfg.n_stages)]


class Stage(nn.Module):
    """Stage k of a ResBM, sharing its parameters with the whole model it was cut from.

    stage 0:      tokens (B, T)  -> embed -> blocks -> encode      -> z (B, T, b)
    stage 0<k<S-1: z (B, T, b)   -> decode -> blocks -> encode     -> z (B, T, b)
    stage S-1:    z (B, T, b)    -> decode -> blocks -> norm, head -> logits (B, T, V)

    With `reembed`, stage k > 0 also takes the microbatch's tokens and adds its own embedding
    of them to what it decodes.
    """

    def __init__(self, model: ResBM, k: int):
        super().__init__()
        cfg = model.cfg
        if not 0 <= k < cfg.n_stages:
            raise ValueError(f"stage {k} does not exist: the model has {cfg.n_stages} stages")
        self.cfg, self.index = cfg, k
        self.is_first, self.is_last = k == 0, k == cfg.n_stages - 1
        self.layers = model.spans[k]
        self.rotary = model.rotary
        self.embed = model.embed if self.is_first else None
        self.decoder = None if self.is_first else model.boundaries[k - 1].decoder
        self.reembed = model.reembeds[k - 1] if model.reembeds and not self.is_first else None
        self.blocks = nn.ModuleList(model.blocks[j] for j in self.layers)
        self.encoder = None if self.is_last else model.boundaries[k].encoder
        self.norm = model.norm if self.is_last else None
        self.head = model.head if self.is_last else None

    @property
    def needs_tokens(self) -> bool:
        """Whether forward needs the microbatch's tokens beside z (stage 0 takes only them)."""
        return self.reembed is not None

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x) if self.is_first else self.decoder(x)  # (B, T, d); iota: (B, T, b)
        if self.reembed is not None:
            if tokens is None:
                raise ValueError(f"stage {self.index} re-embeds its tokens: pass them to forward")
            h = h + self.reembed(tokens)
        for block in self.blocks:
            h = block(h)
        if self.is_last:
            return self.head(self.norm(h))  # (B, T, V)
        return self.encoder(h)  # (B, T, b)
