"""Corpus, byte-level tokenizer, and the rule that makes every microbatch reproducible anywhere.

A microbatch's data is a pure function of (seed, step, microbatch index). Stage 0 derives its
tokens from it and the last stage derives its targets from it, so no tokens and no targets ever
cross a boundary: only the sample offsets travel with a microbatch, and the corpus fingerprint
lets the last stage refuse to train on a different corpus or tokenizer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

TOKENIZER_NAME = "bytes-v1"
VAL_FRACTION = 0.1


def bundled_corpus_path() -> Path:
    """Tiny Shakespeare (public domain), shipped inside the package."""
    return Path(str(resources.files("node") / "corpus" / "tinyshakespeare.txt"))


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, lossless, nothing to download or train."""

    name = TOKENIZER_NAME
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


class DataMismatchError(RuntimeError):
    """Raised when a microbatch was cut from another corpus or tokenizer than ours."""


@dataclass(frozen=True)
class MicrobatchId:
    step: int
    index: int


@dataclass(frozen=True)
class Microbatch:
    id: MicrobatchId
    offsets: torch.Tensor  # (B,) int64 start positions in the train split
    fingerprint: str  # corpus + tokenizer hash of whoever cut it


class Corpus:
    """Token stream split deterministically into train (first 90%) and val (last 10%)."""

    def __init__(self, tokens: torch.Tensor, source: str = "<memory>"):
        if tokens.dim() != 1 or tokens.numel() < 64:
            raise ValueError(f"corpus {source} is too small: {tokens.numel()} tokens")
        self.tokens, self.source = tokens.to(torch.int64), source
        n_val = max(int(tokens.numel() * VAL_FRACTION), 1)
        self.train, self.val = self.tokens[:-n_val], self.tokens[-n_val:]
        digest = hashlib.sha256(TOKENIZER_NAME.encode())
        digest.update(self.tokens.to(torch.uint8).numpy().tobytes())
        self.fingerprint = digest.hexdigest()[:16]

    @classmethod
    def load(cls, path: str | Path | None = None) -> Corpus:
        p = Path(path) if path else bundled_corpus_path()
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p} (set --data to a text file)")
        raw = p.read_bytes()  # byte tokenizer: the file's bytes are the tokens
        return cls(torch.frombuffer(bytearray(raw), dtype=torch.uint8), source=str(p))

    @staticmethod
    def fingerprint_of(path: str | Path | None = None) -> str:
        """The fingerprint `load(path)` would have, without torch (for a process that must not
        compute before it forks its DHT)."""
        p = Path(path) if path else bundled_corpus_path()
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p} (set --data to a text file)")
        digest = hashlib.sha256(TOKENIZER_NAME.encode())
        digest.update(p.read_bytes())
        return digest.hexdigest()[:16]

    def check_window(self, seq_len: int) -> None:
        if min(self.train.numel(), self.val.numel()) <= seq_len + 1:
            raise ValueError(
                f"corpus {self.source} is too small for seq_len {seq_len}: "
                f"{self.train.numel()} train / {self.val.numel()} val tokens"
            )


def _generator(*key: int) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


class Batches:
    """Cuts microbatches from a corpus: the same (seed, step, index) gives the same data."""

    def __init__(self, corpus: Corpus, seq_len: int, batch_size: int, seed: int):
        corpus.check_window(seq_len)
        self.corpus, self.seq_len, self.batch_size, self.seed = corpus, seq_len, batch_size, seed

    def microbatch(self, step: int, index: int) -> Microbatch:
        high = self.corpus.train.numel() - self.seq_len - 1
        g = _generator(self.seed, step, index)
        offsets = torch.randint(0, high + 1, (self.batch_size,), generator=g)
        return Microbatch(MicrobatchId(step, index), offsets, self.corpus.fingerprint)

    def _windows(self, split: torch.Tensor, offsets: torch.Tensor, shift: int) -> torch.Tensor:
        idx = offsets[:, None] + torch.arange(self.seq_len)[None, :] + shift
        return split[idx]  # (B, T)

    def inputs(self, mb: Microbatch) -> torch.Tensor:
        self.check(mb)
        return self._windows(self.corpus.train, mb.offsets, 0)

    def targets(self, mb: Microbatch) -> torch.Tensor:
        self.check(mb)
        return self._windows(self.corpus.train, mb.offsets, 1)

    def check(self, mb: Microbatch) -> None:
        """A microbatch from a peer: same corpus, right batch size, offsets inside the split."""
        if mb.offsets.shape != (self.batch_size,) or mb.offsets.dtype != torch.int64:
            raise ValueError(
                f"microbatch {mb.id} has offsets of shape {tuple(mb.offsets.shape)}, "
                f"expected ({self.batch_size},)"
            )
        high = self.corpus.train.numel() - self.seq_len - 1
        if bool(((mb.offsets < 0) | (mb.offsets > high)).any()):
            raise ValueError(f"microbatch {mb.id} has sample offsets outside [0, {high}]")
        if mb.fingerprint != self.corpus.fingerprint:
            raise DataMismatchError(
                f"microbatch {mb.id} was cut from corpus {mb.fingerprint}, this process holds "
                f"{self.corpus.fingerprint} ({self.corpus.source}): "
                "every stage needs the same --data"
            )

    def val_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of val windows (independent of the training seed), evenly spread."""
        high = self.corpus.val.numel() - self.seq_len - 1
        starts = torch.linspace(0, high, n * self.batch_size).long().view(n, self.batch_size)
        return [
            (self._windows(self.corpus.val, s, 0), self._windows(self.corpus.val, s, 1))
            for s in starts
        ]
