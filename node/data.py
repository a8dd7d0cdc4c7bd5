"""Corpus, tokenizer, and the rule that makes every microbatch reproducible anywhere.

A microbatch's data is a pure function of (seed, step, microbatch index). Stage 0 derives its
tokens from it and the last stage derives its targets from it, so no tokens and no targets ever
cross a boundary: only the sample offsets travel with a microbatch, and the corpus fingerprint
lets the last stage refuse to train on a different corpus or tokenizer.

`--data` is either a text file (tokenized as UTF-8 bytes, held in memory: the bundled tiny
shakespeare is the default) or a directory prepared by `resbm data prepare` (token shards,
verified against their manifest and then memory-mapped, so its size is bounded by the disk, not
by RAM). A middle stage needs no tokens at all: `Corpus.without_tokens` gives it a corpus that
only knows the fingerprint, enough to check what its neighbours send.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from node.shards import (
    MANIFEST,
    VAL_FRACTION,
    DataInfo,
    ShardError,
    bundled_corpus_path,
    data_info,
    file_sha256,
    read_manifest,
    read_shard,
    val_tokens,
    verify,
)
from node.tokenizer import BYTES_NAME, ByteTokenizer, Tokenizer, from_file

TOKENIZER_NAME = BYTES_NAME
__all__ = [
    "TOKENIZER_NAME",
    "VAL_FRACTION",
    "Batches",
    "ByteTokenizer",
    "Corpus",
    "DataInfo",
    "DataMismatchError",
    "Microbatch",
    "MicrobatchId",
    "NoTokensError",
    "ShardError",
    "TokenView",
    "bundled_corpus_path",
    "data_info",
]


class DataMismatchError(RuntimeError):
    """Raised when a microbatch was cut from another corpus or tokenizer than ours."""


class NoTokensError(RuntimeError):
    """A corpus made by `Corpus.without_tokens` was asked for tokens."""


@dataclass(frozen=True)
class MicrobatchId:
    step: int
    index: int


@dataclass(frozen=True)
class Microbatch:
    id: MicrobatchId
    offsets: torch.Tensor  # (B,) int64 start positions in the train split
    fingerprint: str  # corpus + tokenizer hash of whoever cut it


class TokenView:
    """Tokens [start, stop) of the concatenated stream of memory-mapped shards.

    Only the windows asked for are read (and paged in); a window may cross a shard boundary.
    """

    def __init__(self, shards: list[np.ndarray], start: int, stop: int):
        self.shards, self.start, self.stop = shards, start, stop
        self.bounds = np.cumsum([0] + [len(s) for s in shards])

    def numel(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        return self.numel()

    def windows(self, offsets: torch.Tensor, length: int, shift: int) -> torch.Tensor:
        """(B,) offsets into this view -> (B, length) int64, window b = [off+shift, +length)."""
        out = np.empty((offsets.numel(), length), dtype=np.int64)
        for b, off in enumerate(offsets.tolist()):
            lo = off + shift
            if lo < 0 or lo + length > self.numel():
                raise IndexError(f"window [{lo}, {lo + length}) outside [0, {self.numel()})")
            out[b] = self._read(self.start + lo, self.start + lo + length)
        return torch.from_numpy(out)

    def tensor(self) -> torch.Tensor:
        """The whole view in memory as int64 (for small data and tests)."""
        return torch.from_numpy(self._read(self.start, self.stop).astype(np.int64))

    def _read(self, lo: int, hi: int) -> np.ndarray:
        i = int(np.searchsorted(self.bounds, lo, side="right")) - 1
        pieces = []
        while lo < hi:
            first = int(self.bounds[i])
            take = min(hi, int(self.bounds[i + 1])) - lo
            pieces.append(self.shards[i][lo - first : lo - first + take])
            lo, i = lo + take, i + 1
        return np.concatenate(pieces) if len(pieces) != 1 else np.asarray(pieces[0])


Split = torch.Tensor | TokenView


class Corpus:
    """Token stream split deterministically into train (first 90%) and val (last 10%)."""

    def __init__(self, tokens: torch.Tensor, source: str = "<memory>"):
        if tokens.dim() != 1 or tokens.numel() < 64:
            raise ValueError(f"corpus {source} is too small: {tokens.numel()} tokens")
        self.tokens, self.source = tokens.to(torch.int64), source
        n_val = val_tokens(tokens.numel(), VAL_FRACTION)
        self.train, self.val = self.tokens[:-n_val], self.tokens[-n_val:]
        digest = hashlib.sha256(TOKENIZER_NAME.encode())
        digest.update(self.tokens.to(torch.uint8).numpy().tobytes())
        self.fingerprint = digest.hexdigest()[:16]
        self.tokenizer: Tokenizer = ByteTokenizer()
        self.vocab_size = 256
        self.train_tokens: int | None = self.train.numel()

    @classmethod
    def load(cls, path: str | Path | None = None, progress: bool | None = None) -> Corpus:
        """A text file (bytes as tokens) or a prepared dataset directory (its manifest.json
        is enough too). A prepared dataset's every shard is checked against its sha256 first:
        a tqdm bar shows for datasets over 64 MiB unless `progress` says otherwise."""
        p = Path(path) if path else bundled_corpus_path()
        if p.is_dir() or (p.name == MANIFEST and p.is_file()):
            return cls._load_prepared(p if p.is_dir() else p.parent, progress)
        if not p.is_file():
            raise FileNotFoundError(
                f"data file not found: {p} (set --data to a text file or a directory made by "
                "`resbm data prepare`)"
            )
        raw = p.read_bytes()  # byte tokenizer: the file's bytes are the tokens
        return cls(torch.frombuffer(bytearray(raw), dtype=torch.uint8), source=str(p))

    @classmethod
    def _load_prepared(cls, directory: Path, progress: bool | None) -> Corpus:
        m = read_manifest(directory)
        verify(directory, m, progress)
        spec, file = m["tokenizer"]["spec"], m["tokenizer"].get("file")
        # the file's own bytes, not a re-serialization: another `tokenizers` version may write
        # the same tokenizer differently
        if file and not (directory / file).is_file():
            raise ShardError(f"{directory / file} is missing: {directory / MANIFEST} names it")
        got = file_sha256(directory / file) if file else ByteTokenizer().hash
        if got != m["tokenizer"]["hash"]:
            where = directory / file if file else f"tokenizer {spec!r}"
            raise ShardError(
                f"{where} has hash {got}, {directory / MANIFEST} expects "
                f"{m['tokenizer']['hash']}: prepare the dataset again"
            )
        tok = from_file(directory / file, spec=spec) if file else ByteTokenizer()
        shards = [read_shard(directory / s["file"]) for s in m["shards"]]
        n_train, n = m["split"]["train"][1], m["split"]["val"][1]
        self = cls.__new__(cls)
        self.source, self.fingerprint = str(directory), m["fingerprint"]
        self.tokenizer, self.vocab_size = tok, int(m["vocab_size"])
        self.tokens = TokenView(shards, 0, n)
        self.train, self.val = TokenView(shards, 0, n_train), TokenView(shards, n_train, n)
        self.train_tokens = n_train
        return self

    @classmethod
    def without_tokens(
        cls, fingerprint: str, source: str = "<no tokens>", train_tokens: int | None = None
    ) -> Corpus:
        """For a middle pipeline stage, which never reads a token: it only checks that the
        microbatches it relays were cut from `fingerprint` (with `train_tokens`, from
        `data_info`, also that their offsets lie inside the train split)."""
        self = cls.__new__(cls)
        self.source, self.fingerprint = source, fingerprint
        self.tokenizer, self.vocab_size = None, None
        self.tokens = self.train = self.val = None
        self.train_tokens = train_tokens
        return self

    @property
    def has_tokens(self) -> bool:
        return self.train is not None

    @staticmethod
    def fingerprint_of(path: str | Path | None = None) -> str:
        """The fingerprint `load(path)` would have, without torch work or reading the shards
        (for a process that must not compute before it forks its DHT)."""
        return data_info(path).fingerprint

    def check_window(self, seq_len: int) -> None:
        if not self.has_tokens:
            return
        if min(self.train.numel(), self.val.numel()) <= seq_len + 1:
            raise ValueError(
                f"corpus {self.source} is too small for seq_len {seq_len}: "
                f"{self.train.numel()} train / {self.val.numel()} val tokens"
            )

    def require_tokens(self, what: str) -> None:
        if not self.has_tokens:
            raise NoTokensError(
                f"{what} needs the corpus, but this stage was built without tokens "
                f"(corpus {self.fingerprint}): only stage 0 and the last stage read --data"
            )


def _generator(*key: int) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


class Batches:
    """Cuts microbatches from a corpus: the same (seed, step, index) gives the same data."""

    def __init__(self, corpus: Corpus, seq_len: int, batch_size: int, seed: int):
        corpus.check_window(seq_len)
        self.corpus, self.seq_len, self.batch_size, self.seed = corpus, seq_len, batch_size, seed

    def _high(self) -> int | None:
        n = self.corpus.train_tokens
        return None if n is None else n - self.seq_len - 1

    def microbatch(self, step: int, index: int) -> Microbatch:
        high = self._high()
        if high is None:
            self.corpus.require_tokens("drawing a microbatch")
        g = _generator(self.seed, step, index)
        offsets = torch.randint(0, high + 1, (self.batch_size,), generator=g)
        return Microbatch(MicrobatchId(step, index), offsets, self.corpus.fingerprint)

    def _windows(self, split: Split, offsets: torch.Tensor, shift: int) -> torch.Tensor:
        if isinstance(split, TokenView):
            return split.windows(offsets, self.seq_len, shift)
        idx = offsets[:, None] + torch.arange(self.seq_len)[None, :] + shift
        return split[idx]  # (B, T)

    def inputs(self, mb: Microbatch) -> torch.Tensor:
        self.corpus.require_tokens("inputs (stage 0, or any stage with --reembed)")
        self.check(mb)
        return self._windows(self.corpus.train, mb.offsets, 0)

    def targets(self, mb: Microbatch) -> torch.Tensor:
        self.corpus.require_tokens("targets (the last stage)")
        self.check(mb)
        return self._windows(self.corpus.train, mb.offsets, 1)

    def check(self, mb: Microbatch) -> None:
        """A microbatch from a peer: same corpus, right batch size, offsets inside the split
        (when we know its size: a middle stage built without tokens may not)."""
        if mb.offsets.shape != (self.batch_size,) or mb.offsets.dtype != torch.int64:
            raise ValueError(
                f"microbatch {mb.id} has offsets of shape {tuple(mb.offsets.shape)}, "
                f"expected ({self.batch_size},)"
            )
        high = self._high()
        if high is not None and bool(((mb.offsets < 0) | (mb.offsets > high)).any()):
            raise ValueError(f"microbatch {mb.id} has sample offsets outside [0, {high}]")
        if mb.fingerprint == self.corpus.fingerprint and high is not None:
            # the data is a pure function of (seed, step, index): a stage that holds the tokens
            # draws them again instead of trusting a peer's offsets (the last stage took its
            # labels from them: #10 H4)
            want = self.microbatch(mb.id.step, mb.id.index).offsets
            if not torch.equal(mb.offsets, want):
                raise ValueError(
                    f"microbatch {mb.id} has sample offsets that are not the seeded draw of its "
                    "step and index"
                )
        if mb.fingerprint != self.corpus.fingerprint:
            raise DataMismatchError(
                f"microbatch {mb.id} was cut from corpus {mb.fingerprint}, this process holds "
                f"{self.corpus.fingerprint} ({self.corpus.source}): "
                "every stage needs the same --data"
            )

    def val_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of val windows (independent of the training seed), evenly spread."""
        self.corpus.require_tokens("validation")
        high = self.corpus.val.numel() - self.seq_len - 1
        starts = torch.linspace(0, high, n * self.batch_size).long().view(n, self.batch_size)
        return [
            (self._windows(self.corpus.val, s, 0), self._windows(self.corpus.val, s, 1))
            for s in starts
        ]
