"""Text generation from a trained ResBM, so a user can see what the model learned.

The prompt is encoded and the output decoded with the tokenizer the model was trained with:
`generate_from_checkpoint` reads it from the checkpoint directory (`checkpoint.load_tokenizer`;
bytes for a checkpoint that has none, as every older one was trained on bytes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from node.model.resbm import ResBM
from node.tokenizer import ByteTokenizer, Tokenizer


@torch.no_grad()
def generate(
    model: ResBM,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> str:
    if temperature < 0:
        raise ValueError("temperature must be >= 0 (0 = greedy)")
    tok = tokenizer or ByteTokenizer()
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tok.spec} has {tok.vocab_size} tokens but the model only "
            f"{model.cfg.vocab_size}: it was not trained with this tokenizer"
        )
    ids = tok.encode(prompt) or (tok.separator or tok.encode("\n"))
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
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
            probs = torch.softmax(logits.float(), -1).cpu()  # the seeded generator is the CPU's
            nxt = torch.multinomial(probs, 1, generator=g).to(x.device)
        x = torch.cat([x, nxt], dim=1)
    return tok.decode(x[0].tolist())


def generate_from_checkpoint(
    directory: str | Path, prompt: str, max_new_tokens: int = 200, **kw
) -> tuple[str, int]:
    """Load the model and its tokenizer from a checkpoint (or export) directory and sample;
    returns (text, step)."""
    from node.checkpoint import load_model, load_tokenizer

    model, step = load_model(directory)
    return generate(model, prompt, max_new_tokens, tokenizer=load_tokenizer(directory), **kw), step
