"""Named model sizes, and the arithmetic that says what one costs before anything is built.

The presets (ModelConfig overrides; `--model NAME`, explicit flags win):

- `tiny`   d=256, 4 layers, 4 heads, T=128: today's ModelConfig defaults, the CPU test model.
- `small`  d=512, 8 layers, 8 heads, T=256: the largest that still trains a few hundred steps on a
  laptop CPU; the first size where b = d/128 = 4 channels is more than a token's worth of noise.
- `base`   d=768, 12 layers, 12 heads, T=1024: GPT-2 small's shape (~85M in blocks).
- `medium` d=1024, 24 layers, 16 heads, T=1024: GPT-2 medium's shape; 24 blocks of 12·d² are
  302M parameters, so it is >= 300M whatever the tokenizer.
- `large`  d=2048, 24 layers, 16 heads, T=1024: GPT-3 XL / Pythia-1.4B's shape (~1.2B in blocks,
  ~1.4B with a GPT-2 vocabulary); head_dim 128 there (fewer, wider heads run flash attention
  closer to peak), 64 everywhere else as in GPT-2. T=1024 from `base` up is GPT-2's context.

No preset sets the vocabulary (the tokenizer's), the stages or the compression: those are the
run's. Every preset keeps b = d/128 >= 2 at the paper's compression 128 (b = d/32 >= 8 at the
default 32).

The arithmetic is by formula, exact for parameters (the unit tests compare against the built
model), and an estimate for FLOPs and memory (each function says which). Torch-free except
`stage_*`, which import `node.model.resbm.stage_spans` (and so torch) when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from node.model.config import ModelConfig

PresetName = Literal["tiny", "small", "base", "medium", "large"]

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 256, "n_layers": 4, "n_heads": 4, "seq_len": 128},
    "small": {"d_model": 512, "n_layers": 8, "n_heads": 8, "seq_len": 256},
    "base": {"d_model": 768, "n_layers": 12, "n_heads": 12, "seq_len": 1024},
    "medium": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "seq_len": 1024},
    "large": {"d_model": 2048, "n_layers": 24, "n_heads": 16, "seq_len": 1024},
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's ModelConfig; `overrides` win, as explicit flags do over `--model`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (--model): use one of {list(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def fill_from_preset(data: Any) -> Any:
    """TrainConfig's before-validator: the preset fills only the `model` settings not given.

    pydantic-settings hands it the merged flags, env and TOML, so whatever is there is explicit
    and wins. load_settings validates a second time from a full dump; by then every model key
    is present and this changes nothing, so the preset never overrides an explicit value."""
    if not isinstance(data, dict) or data.get("preset") not in PRESETS:
        return data  # no preset, or an unknown one that the field's check reports (--model)
    model = data.get("model") or {}
    if isinstance(model, ModelConfig):
        model = model.model_dump(exclude_unset=True)
    if not isinstance(model, dict):
        return data
    return {**data, "model": {**PRESETS[data["preset"]], **model}}


# ---- parameters ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Counts:
    """Parameters of a piece of the model, split the ways the estimates below need."""

    params: int = 0  # every parameter
    matmul: int = 0  # weights of matmuls: 6 training FLOPs per token each
    hidden: int = 0  # Muon's share: 2-D weights other than the embedding and the head
    layers: int = 0  # transformer blocks

    def __add__(self, o: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(self._t(), o._t(), strict=True)))

    def __mul__(self, k: int) -> Counts:
        return Counts(*(a * k for a in self._t()))

    def _t(self) -> tuple[int, int, int, int]:
        return self.params, self.matmul, self.hidden, self.layers


def _matrices(*sizes: int) -> Counts:
    n = sum(sizes)
    return Counts(params=n, matmul=n, hidden=n)


def _block(cfg: ModelConfig, out_dim: int, swiglu: bool = False) -> Counts:
    """layers.Block: two RMSNorms, qkv + proj, the feed-forward (down to b in a fused encoder;
    a SwiGLU there in the iota form)."""
    d, up = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    if swiglu:
        h = cfg.swiglu_hidden
        ffn = _matrices(d * h, d * h, h * out_dim)
    else:
        ffn = _matrices(d * up, up * out_dim)
    return _matrices(3 * d * d, d * d) + ffn + Counts(params=2 * d, layers=1)


def _fused(cfg: ModelConfig) -> bool:
    """The encoder lives in the stage's last block (the fused and iota forms)."""
    return cfg.bottleneck and cfg.encoder in ("fused", "iota")


def _iota(cfg: ModelConfig) -> bool:
    """The decoder lives in the next stage's first block too (`Block(in_dim=b)`)."""
    return cfg.bottleneck and cfg.encoder == "iota"


def _gain(cfg: ModelConfig) -> Counts:
    """The receiver's gain on the identity path, with boundary_norm (layers.identity_gain)."""
    return Counts(params=cfg.boundary_dim) if cfg.boundary_norm and cfg.identity_path else Counts()


def _encoder(cfg: ModelConfig) -> Counts:
    """A boundary's sending half (bottleneck.py). The fused forms' lives in the block."""
    if not cfg.bottleneck or _fused(cfg):
        return Counts()
    d, m, b = cfg.d_model, cfg.hidden, cfg.boundary_dim
    return _matrices(d * m, m * b) + Counts(params=d)  # norm, up, down


def _decoder(cfg: ModelConfig) -> Counts:
    """A boundary's receiving half (the identity path J_b has no parameters in any form), with
    the receiving stage's own token embedding under `reembed`."""
    reembed = Counts(params=cfg.vocab_size * cfg.d_model) if cfg.reembed else Counts()
    if not cfg.bottleneck:
        return reembed
    d, m, b = cfg.d_model, cfg.hidden, cfg.boundary_dim
    if _iota(cfg):  # W of ReLU(W z), inside the receiving block
        return reembed + _gain(cfg) + _matrices(b * d)
    return reembed + _gain(cfg) + (_matrices(b * d) if _fused(cfg) else _matrices(b * m, m * d))


def _ends(cfg: ModelConfig) -> tuple[Counts, Counts]:
    """(embedding, final norm + head): the head is a matmul but AdamW's, like the embedding."""
    v, d = cfg.vocab_size, cfg.d_model
    return Counts(params=v * d), Counts(params=d + d * v, matmul=d * v)


def _narrow(cfg: ModelConfig) -> Counts:
    """The block fused with the encoder."""
    return _block(cfg, cfg.boundary_dim, swiglu=_iota(cfg))


def total_counts(cfg: ModelConfig) -> Counts:
    """The whole model, torch-free: every boundary sits after a different block (each stage
    holds at least one), so the fused forms narrow exactly n_stages - 1 blocks' MLP."""
    cuts = cfg.n_stages - 1
    fused_blocks = cuts if _fused(cfg) else 0
    blocks = _block(cfg, cfg.d_model) * (cfg.n_layers - fused_blocks) + _narrow(cfg) * fused_blocks
    head_in, head_out = _ends(cfg)
    return head_in + blocks + (_encoder(cfg) + _decoder(cfg)) * cuts + head_out


def stage_counts(cfg: ModelConfig) -> list[Counts]:
    """Per stage, as `ResBM.stage(k)` holds them: [embed | decoder], blocks, [encoder | head]."""
    from node.model.resbm import stage_spans  # imports torch: only when asked per stage

    head_in, head_out = _ends(cfg)
    out = []
    for k, span in enumerate(stage_spans(cfg.n_layers, cfg.n_stages)):
        last = k == cfg.n_stages - 1
        c = head_in if k == 0 else _decoder(cfg)
        narrow = 1 if _fused(cfg) and not last else 0  # the block fused with the encoder
        c = c + _block(cfg, cfg.d_model) * (len(span) - narrow) + _narrow(cfg) * narrow
        out.append(c + (head_out if last else _encoder(cfg)))
    return out


def parameter_count(cfg: ModelConfig) -> int:
    return total_counts(cfg).params


def stage_parameter_counts(cfg: ModelConfig) -> list[int]:
    """Sums to `parameter_count`: stages share no parameters (the rotary tables are buffers)."""
    return [c.params for c in stage_counts(cfg)]


# ---- compute --------------------------------------------------------------------------------
def _flops(cfg: ModelConfig, c: Counts) -> float:
    """PaLM appendix B / nanoGPT's MFU: 6 per matmul weight (forward 2, backward 4) plus
    attention's 12·d·T per layer (QKᵀ and AV, 2·2·d·T forward, x3), not halved for the causal
    mask, so numbers compare with published MFUs. The embedding is a lookup: no FLOPs."""
    return 6.0 * c.matmul + 12.0 * c.layers * cfg.d_model * cfg.seq_len


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward) of the whole model."""
    return _flops(cfg, total_counts(cfg))


def stage_flops_per_token(cfg: ModelConfig) -> list[float]:
    return [_flops(cfg, c) for c in stage_counts(cfg)]


# ---- the wire -------------------------------------------------------------------------------
VALUE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int8-channel": 1, "int4-channel": 0.5}
SCALE_BYTES = 4  # node/wire/codec.py: int8/int4 scales travel as fp32


def wire_bytes_per_token(cfg: ModelConfig, codec: str = "bf16", batch_size: int = 16) -> float:
    """Payload bytes per token that cross one boundary in one direction (z forward, dL/dz back,
    same size): b values (half a byte each in int4), plus the int codecs' scales (one per tensor,
    or one per channel) spread over a microbatch of batch_size·seq_len tokens. Message framing
    (~tens of bytes) and int4's padding nibble of an odd count are left out."""
    codec = str(codec)
    if codec not in VALUE_BYTES:
        raise ValueError(f"unknown wire codec {codec!r} (--wire-codec): use {list(VALUE_BYTES)}")
    b = cfg.boundary_dim
    scales = {"int8": 1, "int8-channel": b, "int4-channel": b}.get(codec, 0)
    return b * VALUE_BYTES[codec] + scales * SCALE_BYTES / (batch_size * cfg.seq_len)


# ---- memory ---------------------------------------------------------------------------------
ACT_BYTES = {"fp32": 4, "bf16": 2}


def _act_bytes(cfg: ModelConfig, c: Counts, first: bool, last: bool, size: int) -> float:
    """Activation bytes per token that a stage's autograd graph keeps for one microbatch, with
    `size` bytes per value at the compute precision.

    Counted from what autograd saves in this model (the unit tests check it against torch's
    saved-tensor hooks), not from a generic GPT formula: Korthikanti et al. 2022's 34·d bytes
    per block (fp16, no rotary) undercounts it by a third. Per block: each RMSNorm keeps its
    input and output in fp32, even under autocast (4 x 4·d bytes); at the compute precision the
    three d-wide matmul inputs, q, k, v, the rotated q and k and the attention output (9·d) and
    the GELU's input and output (2·r·d). Nothing of size heads·T: SDPA's flash and memory-
    efficient kernels keep one log-sum-exp per row, not the TxT scores. E/D (mlp): the encoder's
    norm (8·d) and d + 2·m inputs, the decoder's b + 2·m; the fused decoder's b + d, and the
    iota form's too, plus its SwiGLU encoder's four hidden-wide tensors (iota is counted
    roughly: within 5% of torch's count, where the other forms are within 2%). Last stage:
    the final norm, the head's input and the loss's fp32 log-probabilities (4·V); the logits
    themselves are not kept."""
    d, m, b, f32 = cfg.d_model, cfg.hidden, cfg.boundary_dim, 4
    total = c.layers * (4 * d * f32 + (9 + 2 * cfg.mlp_ratio) * d * size)
    if cfg.bottleneck and not _fused(cfg):
        total += 0 if last else 2 * d * f32 + (d + 2 * m) * size
        total += 0 if first else (b + 2 * m) * size
    elif cfg.bottleneck and not first:  # fused: D's input and ReLU; iota: the same in the block
        total += (b + d) * size
    if _iota(cfg) and not last:  # the SwiGLU encoder keeps gate, up, silu and product outputs
        total += (4 * cfg.swiglu_hidden - 2 * cfg.mlp_ratio * d) * size
    if last:
        total += 2 * d * f32 + d * size + cfg.vocab_size * f32
    return total


def memory_estimate(
    cfg: ModelConfig,
    stage: int,
    *,
    batch_size: int = 16,
    in_flight: int | None = None,
    precision: str = "bf16",
    optimizer: str = "muon",
) -> dict[str, float]:
    """Bytes one node serving `stage` needs on its device, before allocator slack and the CUDA
    context (~0.5-1 GB). `in_flight`: microbatches whose graph is alive at once; default
    n_stages - stage, what 1F1B keeps (the reference trainer: 1).

    fp32 master weights and gradients (4 + 4 bytes per parameter in both precisions, see
    node/device.py); AdamW keeps two fp32 moments, Muon one momentum buffer for its hidden
    matrices and AdamW's two for the rest (node/model/optim.py). Under bf16 autocast every
    in-flight microbatch's graph also holds its own bf16 copy of the matmul weights (the cast
    cache is cleared at the end of each forward)."""
    if precision not in ACT_BYTES:
        raise ValueError(f"unknown precision {precision!r} (--precision): use fp32 or bf16")
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r} (--optimizer): use muon or adamw")
    if not 0 <= stage < cfg.n_stages:
        raise ValueError(f"stage {stage} does not exist: the model has {cfg.n_stages} stages")
    c = stage_counts(cfg)[stage]
    in_flight = cfg.n_stages - stage if in_flight is None else in_flight
    tokens = in_flight * batch_size * cfg.seq_len
    first, last = stage == 0, stage == cfg.n_stages - 1
    adam = 8 * c.params if optimizer == "adamw" else 4 * c.hidden + 8 * (c.params - c.hidden)
    out = {
        "weights": 4.0 * c.params,
        "grads": 4.0 * c.params,
        "optimizer": float(adam),
        "activations": 1.0 * tokens * _act_bytes(cfg, c, first, last, ACT_BYTES[precision]),
        "weight_copies": 2.0 * c.matmul * in_flight if precision == "bf16" else 0.0,
    }
    out["total"] = sum(out.values())
    return out


# ---- utilization ----------------------------------------------------------------------------
# Dense (no 2:4 sparsity) peak TFLOPS from NVIDIA's datasheets, matched by substring of
# torch.cuda.get_device_name(), first match wins (so "H100 PCIe" before "H100", "A100" before
# "A10"). bf16: tensor cores with fp32 accumulation (GeForce cards run that at half their fp16
# rate). fp32: the TF32 tensor-core rate, because node/device.py turns TF32 on for every CUDA
# run; GPUs without TF32 (V100, T4) get plain fp32 and no bf16.
PEAK_TFLOPS: list[tuple[str, float | None, float]] = [
    # (name substring, bf16, fp32 as run)
    ("GH200", 989.4, 494.7),
    ("H200 NVL", 835.5, 417.5),
    ("H200", 989.4, 494.7),
    ("H100 NVL", 835.5, 417.5),
    ("H100 PCIe", 756.5, 378.0),
    ("H100", 989.4, 494.7),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", 312.0, 156.0),
    ("A10G", 70.0, 35.0),  # AWS's A10 variant: no datasheet; its commonly quoted dense rate
    ("A10", 125.0, 62.5),
    ("L40S", 362.05, 183.0),
    ("L40", 181.05, 90.5),
    ("L4", 121.0, 60.0),
    ("RTX 4090", 165.2, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", None, 15.7),
    ("T4", None, 8.1),
]


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU at `precision` (fp32 or bf16); None when unknown (CPUs,
    Apple, AMD, newer GPUs), so callers print no MFU rather than a wrong one."""
    if precision not in ACT_BYTES:
        raise ValueError(f"unknown precision {precision!r} (--precision): use fp32 or bf16")
    for name, bf16, fp32 in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            tflops = bf16 if precision == "bf16" else fp32
            return None if tflops is None else tflops * 1e12
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the device's peak (None without one).
    For a pipeline stage pass that stage's FLOPs per token and its own tokens/s."""
    if peak is None or peak <= 0:
        return None
    return flops_per_token * tokens_per_s / peak
