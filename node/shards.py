"""Prepared datasets on disk: token shards, their manifest, and how both are verified.

A prepared dataset is a directory made by `resbm data prepare`:

    DIR/manifest.json        what the dataset is (below); written last, so a half-written
                             directory is never mistaken for a dataset
    DIR/shard-00000.bin ...  the token stream, cut every `shard_tokens` tokens
    DIR/tokenizer.json       the tokenizer's definition (BPE or a given tokenizer.json only)

A shard is a fixed 32-byte header followed by the tokens, like nanoGPT's and llm.c's `.bin`
files, so a reader can `np.memmap` the tokens without parsing anything:

    bytes 0-7    magic b"RESBMTOK"
    bytes 8-11   format version, uint32 little-endian (1)
    bytes 12-15  token width in bytes, uint32 (2: uint16 tokens when vocab_size <= 65536, else 4)
    bytes 16-23  token count, uint64
    bytes 24-31  zero
    then         count tokens, little-endian unsigned ints of that width

manifest.json: `format` (1), `tokenizer` ({spec, hash, file?}), `vocab_size`, `shards` ([{file,
tokens, sha256}] in stream order), `split` ({"train": [0, n_train], "val": [n_train, n]}: the val
split is the last `val_fraction` of the concatenated stream, the same rule as for a text file),
`val_fraction`, and `fingerprint`: the first 16 hex chars of a sha256 over the tokenizer hash, the
shard hashes and the split. The fingerprint is what peers compare, so it changes whenever a token
or the tokenizer does. A shard whose sha256 or size differs from the manifest is refused with a
`ShardError` that names the file and both values, before any training starts.

Also `data_info`: what a process needs to know about its `--data` (fingerprint, vocab, split
sizes) without reading the tokens or importing torch, e.g. before it forks its DHT.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from node.tokenizer import BYTES_NAME

MAGIC = b"RESBMTOK"
FORMAT = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, token width, token count
MANIFEST = "manifest.json"
SHARD_NAME = "shard-{i:05d}.bin"
VAL_FRACTION = 0.1
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
_CHUNK = 1 << 20


class ShardError(ValueError):
    """A prepared dataset that is incomplete or not what its manifest says."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def val_tokens(n: int, val_fraction: float = VAL_FRACTION) -> int:
    """The val split's size: the last `val_fraction` of the stream, at least one token."""
    return max(int(n * val_fraction), 1)


def file_sha256(path: Path, progress: Callable[[int], Any] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


class ShardWriter:
    """Appends tokens to shard files, starting a new one every `shard_tokens` tokens; memory
    stays at one `write` call's array whatever the dataset's size."""

    def __init__(self, directory: Path, vocab_size: int, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens < 1:
            raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
        self.directory, self.shard_tokens = Path(directory), shard_tokens
        self.dtype, self.vocab_size = token_dtype(vocab_size), vocab_size
        self.shards: list[dict[str, Any]] = []
        self._file, self._count = None, 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids outside [0, {self.vocab_size}) from the tokenizer")
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._count
            self._file.write(tokens[:room].tobytes())
            self._count += min(room, tokens.size)
            tokens = tokens[room:]
            if self._count == self.shard_tokens:
                self._close()

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._close()
        return self.shards

    def _open(self) -> None:
        path = self.directory / SHARD_NAME.format(i=len(self.shards))
        self._file, self._count = open(path, "wb"), 0  # noqa: SIM115 -- spans write calls
        self._file.write(HEADER.pack(MAGIC, FORMAT, self.dtype.itemsize, 0))

    def _close(self) -> None:
        f, self._file = self._file, None
        f.seek(0)
        f.write(HEADER.pack(MAGIC, FORMAT, self.dtype.itemsize, self._count))
        f.close()
        path = Path(f.name)
        self.shards.append({"file": path.name, "tokens": self._count, "sha256": file_sha256(path)})


def read_shard(path: Path) -> np.memmap:
    """The tokens of one shard, memory-mapped (read-only) past its header."""
    size = path.stat().st_size if path.is_file() else None
    if size is None:
        raise ShardError(f"shard {path} is missing")
    if size < HEADER.size:
        raise ShardError(f"shard {path} is truncated: {size} bytes, less than its header")
    with open(path, "rb") as f:
        magic, version, width, count = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC or version != FORMAT or width not in (2, 4):
        raise ShardError(
            f"{path} is not a format-{FORMAT} token shard (magic {magic!r}, version {version}, "
            f"width {width}): prepare it with `resbm data prepare`"
        )
    if size != HEADER.size + count * width:
        raise ShardError(
            f"shard {path} is truncated: {size} bytes, its header says "
            f"{HEADER.size + count * width} ({count} tokens)"
        )
    dtype = np.dtype("<u2") if width == 2 else np.dtype("<u4")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


# ---- manifest ------------------------------------------------------------------------------
def fingerprint(tokenizer_hash: str, shard_hashes: list[str], split: dict[str, list[int]]) -> str:
    body = json.dumps(
        {"tokenizer": tokenizer_hash, "shards": shard_hashes, "split": split}, sort_keys=True
    )
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def make_manifest(
    tokenizer: dict[str, str], vocab_size: int, shards: list[dict[str, Any]], val_fraction: float
) -> dict[str, Any]:
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    n = sum(s["tokens"] for s in shards)
    if n < 2:
        raise ValueError(f"the inputs gave {n} tokens: nothing to train on")
    n_train = n - val_tokens(n, val_fraction)
    split = {"train": [0, n_train], "val": [n_train, n]}
    return {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "shards": shards,
        "split": split,
        "val_fraction": val_fraction,
        "fingerprint": fingerprint(tokenizer["hash"], [s["sha256"] for s in shards], split),
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Atomically (temp file + rename): the manifest's presence means the dataset is complete."""
    path, tmp = Path(directory) / MANIFEST, Path(directory) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def parse_manifest(text: str, where: str) -> dict[str, Any]:
    """A manifest's JSON, checked for shape and for a fingerprint that matches its contents."""
    try:
        m = json.loads(text)
        shards, split, tok = m["shards"], m["split"], m["tokenizer"]
        if m["format"] != FORMAT:
            raise ShardError(f"{where}: format {m['format']}, this version reads {FORMAT}")
        for s in shards:
            if Path(s["file"]).name != s["file"] or s["file"] in ("", ".", ".."):
                raise ShardError(f"{where}: shard file {s['file']!r} is not a plain file name")
            int(s["tokens"]), str(s["sha256"])
        expected = fingerprint(tok["hash"], [s["sha256"] for s in shards], split)
        n = sum(int(s["tokens"]) for s in shards)
        if split["train"][0] != 0 or split["train"][1] != split["val"][0] or split["val"][1] != n:
            raise ShardError(f"{where}: split {split} does not cover the {n} tokens of its shards")
    except (KeyError, TypeError, ValueError, IndexError) as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"{where} is not a valid manifest: {err!r}") from err
    if m.get("fingerprint") != expected:
        raise ShardError(
            f"{where}: fingerprint {m.get('fingerprint')} does not match its contents "
            f"({expected}): the manifest was edited"
        )
    return m


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {MANIFEST}: not a prepared dataset (make one with "
            "`resbm data prepare INPUT... --out DIR`, or set --data to a text file)"
        )
    return parse_manifest(path.read_text(), str(path))


def verify_shard(path: Path, expected: dict[str, Any], width: int, progress=None) -> None:
    """Size first (cheap, and names a truncation as such), then the sha256."""
    if not path.is_file():
        raise ShardError(f"shard {path} is missing (expected sha256 {expected['sha256']})")
    want = HEADER.size + int(expected["tokens"]) * width
    size = path.stat().st_size
    if size != want:
        raise ShardError(
            f"shard {path} has {size} bytes, expected {want} ({expected['tokens']} tokens): "
            "truncated or not this dataset's; prepare or fetch it again"
        )
    actual = file_sha256(path, progress)
    if actual != expected["sha256"]:
        raise ShardError(
            f"shard {path} has sha256 {actual}, the manifest expects {expected['sha256']}: "
            "the file is corrupt or not this dataset's; prepare or fetch it again"
        )


def verify(directory: Path, manifest: dict[str, Any], progress: bool | None = None) -> None:
    """Every shard's size and sha256; a tqdm bar (by bytes) for datasets over 64 MiB."""
    from tqdm import tqdm

    directory = Path(directory)
    width = token_dtype(int(manifest["vocab_size"])).itemsize
    total = sum(
        (directory / s["file"]).stat().st_size
        for s in manifest["shards"]
        if (directory / s["file"]).is_file()
    )
    show = progress if progress is not None else total >= 64 << 20
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="verify shards", disable=not show
    ) as bar:
        for s in manifest["shards"]:
            verify_shard(directory / s["file"], s, width, bar.update)


# ---- what --data is, cheaply ---------------------------------------------------------------
def bundled_corpus_path() -> Path:
    """Tiny Shakespeare (public domain), shipped inside the package."""
    return Path(str(resources.files("node") / "corpus" / "tinyshakespeare.txt"))


@dataclass(frozen=True)
class DataInfo:
    fingerprint: str
    vocab_size: int
    train_tokens: int
    val_tokens: int
    tokenizer_spec: str
    source: str


def text_fingerprint(path: Path) -> str:
    """A text file's fingerprint: byte tokenizer name + its bytes (streamed)."""
    digest = hashlib.sha256(BYTES_NAME.encode())
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()[:16]


def data_info(path: str | Path | None = None) -> DataInfo:
    """For a prepared directory: from its manifest (no shard is read). For a text file: its
    size and fingerprint (one streaming read). Needs neither torch nor the tokens in memory."""
    p = Path(path) if path else bundled_corpus_path()
    if p.is_dir() or p.name == MANIFEST:
        d = p if p.is_dir() else p.parent
        m = read_manifest(d)
        n_train, n = m["split"]["train"][1], m["split"]["val"][1]
        spec = m["tokenizer"]["spec"]
        return DataInfo(m["fingerprint"], int(m["vocab_size"]), n_train, n - n_train, spec, str(d))
    if not p.is_file():
        raise FileNotFoundError(
            f"data not found: {p} (set --data to a text file or a prepared dataset directory)"
        )
    n = p.stat().st_size
    n_val = val_tokens(n)
    return DataInfo(text_fingerprint(p), 256, n - n_val, n_val, "bytes", str(p))
