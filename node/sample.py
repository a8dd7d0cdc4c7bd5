"""Text generation from a trained ResBM, so a user can see what the model learned.

The prompt is encoded and the output decoded with the tokenizer the model was trained with:
`generate_from_checkpoint` reads it from the checkpoint directory (`checkpoint.load_tokenizer`;
bytes for a checkpoint that has none, as every older one was trained on bytes).
"""

from __future__ import annotations

from collections.abc import Callable
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
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The prompt and `max_new_tokens` sampled after it, as text. `on_text`: called with each
    new piece of that text as soon as it decodes (the prompt first, then token by token; a
    character split over several byte tokens waits for its last byte), so a caller can stream
    it; the pieces joined are the text returned."""
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
    stream = _Stream(tok, on_text) if on_text is not None else None
    if stream is not None:
        stream.push(x[0].tolist())
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
        if stream is not None:
            stream.push(x[0].tolist())
    text = tok.decode(x[0].tolist())
    if stream is not None:
        stream.finish(text)
    return text


class _Stream:
    """Hands out the text of a growing token sequence piece by piece: what decodes to whole
    characters now, holding back a trailing incomplete one (U+FFFD while its bytes arrive)."""

    def __init__(self, tok: Tokenizer, emit: Callable[[str], None]):
        self.tok, self.emit, self.sent = tok, emit, ""

    def push(self, ids: list[int]) -> None:
        text = self.tok.decode(ids).rstrip("\ufffd")
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit(text[len(self.sent) :])
            self.sent = text

    def finish(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.emit(text[len(self.sent) :])  # what was held back, U+FFFD included
        self.sent = text


def generate_from_checkpoint(
    directory: str | Path, prompt: str, max_new_tokens: int = 200, **kw
) -> tuple[str, int]:
    """Load the model and its tokenizer from a checkpoint (or export) directory and sample;
    returns (text, step)."""
    from node.checkpoint import load_model, load_tokenizer

    model, step = load_model(directory)
    return generate(model, prompt, max_new_tokens, tokenizer=load_tokenizer(directory), **kw), step
