"""Text generation from a trained ResBM, so a user can see what the model learned."""

from __future__ import annotations

import torch

from node.data import ByteTokenizer
from node.model.resbm import ResBM


@torch.no_grad()
def generate(
    model: ResBM,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> str:
    if temperature < 0:
        raise ValueError("temperature must be >= 0 (0 = greedy)")
    tok = ByteTokenizer()
    ids = tok.encode(prompt) or tok.encode("\n")
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long)
    window = model.cfg.seq_len
    for _ in range(max_new_tokens):
        logits = model(x[:, -window:])[:, -1, :]  # (1, V)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        x = torch.cat([x, nxt], dim=1)
    return tok.decode(x[0].tolist())
