"""Tokenizers: how text becomes the integer ids a model trains on, and back.

Two kinds, behind one small interface (`spec`, `vocab_size`, `hash`, `separator`, `encode`,
`decode`, `definition`):

- `ByteTokenizer`: UTF-8 bytes as tokens (vocab 256). Nothing to train or download, lossless,
  and the default: the bundled tiny-shakespeare corpus is tokenized with it.
- `HFTokenizer`: a Hugging Face `tokenizers` tokenizer, either a byte-level BPE trained here
  (`train_bpe`) or any existing `tokenizer.json`. Byte-level pre-tokenizer and decoder mean
  every string encodes and decodes back to itself, whatever its script.

`hash` is the sha256 of the tokenizer's `definition` (the JSON a checkpoint or a prepared dataset
stores). It goes into a dataset's fingerprint, so two peers that tokenize differently refuse each
other's microbatches instead of training on garbage. This module needs no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

BYTES_NAME = "bytes-v1"  # what the text-corpus fingerprint has always hashed: keep it
END_OF_TEXT = "<|endoftext|>"
# special tokens an existing tokenizer.json may use to end a document, in order of preference
_SEPARATORS = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    spec: str  # how it was asked for: "bytes", "bpe:VOCAB" or a tokenizer.json path
    vocab_size: int
    hash: str  # sha256 hex of `definition()`
    separator: list[int]  # ids put between two documents

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: list[int]) -> str: ...
    def definition(self) -> str: ...


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, lossless, nothing to download or train."""

    name = BYTES_NAME
    spec = "bytes"
    vocab_size = 256
    separator: list[int] = []  # noqa: RUF012 -- documents simply follow each other, as in a file

    @property
    def hash(self) -> str:
        return _sha256(self.definition())

    def definition(self) -> str:
        return json.dumps({"spec": "bytes"})

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


def _hf():
    try:
        import tokenizers
    except ImportError as err:  # a dependency of the project; only a broken install lacks it
        raise ValueError(
            "this tokenizer needs the `tokenizers` package: pip install tokenizers"
        ) from err
    return tokenizers


class HFTokenizer:
    """A Hugging Face tokenizer (`tokenizer.json`); decode keeps special tokens, so the
    document separator shows in generated text as what it is."""

    def __init__(self, tk, spec: str):
        self._tk, self.spec = tk, spec
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.hash = _sha256(self.definition())
        vocab = tk.get_vocab(with_added_tokens=True)
        sep = next((vocab[s] for s in _SEPARATORS if s in vocab), None)
        self.separator = [] if sep is None else [sep]

    def definition(self) -> str:
        return self._tk.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path) -> Path:
        """Write `definition()` verbatim, so the file's sha256 is `hash`."""
        path = Path(path)
        path.write_text(self.definition(), encoding="utf-8")
        return path


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE learned from `texts` (any iterable: it is consumed once, streaming).

    The 256 byte symbols are always in the vocabulary (`initial_alphabet`), so text with a byte
    the training data never had still encodes; `<|endoftext|>` separates documents.
    """
    _check_bpe_vocab(vocab_size)
    hf = _hf()
    tk = hf.Tokenizer(hf.models.BPE())
    tk.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tk, spec=f"bpe:{vocab_size}")


def from_definition(text: str, spec: str | None = None) -> Tokenizer:
    """The tokenizer a `definition()` describes: {"spec": "bytes"} or a HF tokenizer.json."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"tokenizer definition is not JSON: {err}") from err
    if isinstance(data, dict) and data.get("spec") == "bytes":
        return ByteTokenizer()
    try:
        tk = _hf().Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"not a tokenizer.json the `tokenizers` package can read: {err}") from err
    return HFTokenizer(tk, spec=spec or f"bpe:{tk.get_vocab_size(with_added_tokens=True)}")


def from_file(path: str | Path, spec: str | None = None) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return from_definition(path.read_text(encoding="utf-8"), spec=spec or str(path))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def load_tokenizer(spec: str, base_dir: str | Path | None = None) -> Tokenizer:
    """`bytes`; `bpe:VOCAB` (the one trained into `base_dir/tokenizer.json`); or a path to a
    tokenizer.json (relative to `base_dir` when given)."""
    if spec == "bytes":
        return ByteTokenizer()
    base = Path(base_dir) if base_dir is not None else Path()
    if spec.startswith("bpe:"):
        vocab = parse_bpe_spec(spec)
        path = base / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{spec}: no trained tokenizer at {path} (train one with "
                f"`resbm data prepare ... --tokenizer {spec} --out {base}`)"
            )
        tok = from_file(path, spec=spec)
        if tok.vocab_size != vocab:
            raise ValueError(f"{path} has vocab {tok.vocab_size}, the spec says {spec}")
        return tok
    path = Path(spec)
    return from_file(path if path.is_absolute() else base / path, spec=spec)


def parse_bpe_spec(spec: str) -> int:
    try:
        vocab = int(spec.removeprefix("bpe:"))
    except ValueError:
        raise ValueError(
            f"--tokenizer {spec!r}: expected bpe:VOCAB with an integer VOCAB, e.g. bpe:8192"
        ) from None
    _check_bpe_vocab(vocab)
    return vocab


def _check_bpe_vocab(vocab_size: int) -> None:
    if vocab_size < 257 + 1:
        raise ValueError(
            f"a byte-level BPE needs vocab_size > 257 (256 bytes + {END_OF_TEXT}), got "
            f"{vocab_size}: use --tokenizer bpe:VOCAB with a larger VOCAB, or --tokenizer bytes"
        )
