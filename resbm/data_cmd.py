"""`resbm data prepare`: turn text files into a verified, sharded token dataset for `--data`.

    resbm data prepare corpus/*.txt --tokenizer bytes --out data/shakespeare
    resbm data prepare web/*.jsonl --text-key text --tokenizer bpe:8192 --out data/web
    resbm data prepare train-*.parquet --tokenizer my/tokenizer.json --out data/pq

Inputs are `.txt` (one document per file), `.jsonl` (one document per line, its `--text-key`
field) or `.parquet` (one document per row, its `--text-column`; needs the `data` extra), as
files or globs, in the order given. Documents are joined with the tokenizer's separator: nothing
for `bytes` (so one .txt gives exactly its bytes as tokens), `<|endoftext|>` for a BPE.

Memory stays bounded whatever the input size: files are read in 1 MiB pieces (a .txt cut after
a newline), encoded piece by piece and appended to the shards as they come; `bpe:VOCAB` first
trains the tokenizer in one streaming pass over the same pieces. The format of DIR is in
docs/data.md and node/shards.py.
"""

from __future__ import annotations

import argparse
import codecs
import glob
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 1 << 20  # bytes read (and chars encoded) at a time
KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare token datasets for --data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    q = data_sub.add_parser(
        "prepare",
        help="tokenize text into verified shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt/.jsonl/.parquet files or globs")
    q.add_argument(
        "--tokenizer",
        default="bytes",
        help="bytes (default), bpe:VOCAB (train a byte-level BPE on the inputs), "
        "or the path of an existing tokenizer.json",
    )
    q.add_argument("--out", required=True, help="the dataset directory to write")
    q.add_argument("--text-key", default="text", help="the text field of .jsonl lines")
    q.add_argument("--text-column", default="text", help="the text column of .parquet files")
    q.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (100M)")
    q.add_argument(
        "--val-fraction", type=float, default=0.1, help="the last fraction kept for val (0.1)"
    )
    q.add_argument("--force", action="store_true", help="replace a dataset already in --out")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(handler=prepare_main)


def prepare_main(args: argparse.Namespace) -> int:
    m = prepare(
        args.inputs,
        args.tokenizer,
        Path(args.out),
        text_key=args.text_key,
        text_column=args.text_column,
        shard_tokens=args.shard_tokens,
        val_fraction=args.val_fraction,
        force=args.force,
        progress=not args.no_progress,
    )
    n_train, n = m["split"]["train"][1], m["split"]["val"][1]
    print(
        f"prepared {n:,} tokens ({n_train:,} train / {n - n_train:,} val) in "
        f"{len(m['shards'])} shard(s), tokenizer {m['tokenizer']['spec']} "
        f"(vocab {m['vocab_size']}), fingerprint {m['fingerprint']}: {args.out}\n"
        f"train on it with --data {args.out}"
    )
    return 0


def prepare(
    inputs: list[str],
    tokenizer: str,
    out: Path,
    *,
    text_key: str = "text",
    text_column: str = "text",
    shard_tokens: int = 100_000_000,
    val_fraction: float = 0.1,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the dataset; returns its manifest. Importable for tests and scripts."""
    from node.shards import ShardWriter, make_manifest, write_manifest
    from node.tokenizer import TOKENIZER_FILE, ByteTokenizer, from_file, parse_bpe_spec, train_bpe

    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    paths = expand_inputs(inputs)
    source = Source(paths, text_key, text_column)
    tok_info: dict[str, str] = {}
    if tokenizer == "bytes":
        tok = ByteTokenizer()
    elif tokenizer.startswith("bpe:"):
        vocab, tok = parse_bpe_spec(tokenizer), None  # trained below, once --out is ready
    else:
        tok = from_file(tokenizer, spec=TOKENIZER_FILE)  # the copy in DIR is what gets used
        tok_info["source"] = str(tokenizer)
    _prepare_out(out, force)
    if tok is None:
        with _bar(source.total, "train tokenizer", progress) as bar:
            tok = train_bpe((t for _, t in source.pieces(bar, raw=False)), vocab)
    if not isinstance(tok, ByteTokenizer):
        tok_info["file"] = tok.save(out / TOKENIZER_FILE).name
    writer = ShardWriter(out, tok.vocab_size, shard_tokens)
    sep = np.asarray(tok.separator, dtype=np.int64)
    raw = isinstance(tok, ByteTokenizer)
    with _bar(source.total, "tokenize", progress) as bar:
        first, batch, size = True, [], 0
        for new_doc, piece in source.pieces(bar, raw=raw):
            if new_doc and not first and sep.size:
                batch.append(sep)
            first = False
            if raw:
                data = piece if isinstance(piece, bytes) else piece.encode("utf-8")
                writer.write(np.frombuffer(data, dtype=np.uint8))
                continue
            batch.append(piece)
            size += len(piece)
            if size >= CHUNK:
                _flush(tok, batch, writer)
                batch, size = [], 0
        _flush(tok, batch, writer)
    shards = writer.close()
    manifest = make_manifest(
        {"spec": tok.spec, "hash": tok.hash, **tok_info},
        tok.vocab_size,
        shards,
        val_fraction,
    )
    write_manifest(out, manifest)
    return manifest


def _flush(tok, batch: list, writer) -> None:
    """Encode the text pieces in `batch` together (the Rust side runs them in parallel) and
    append them, separators included, in order."""
    texts = [b for b in batch if isinstance(b, str)]
    encoded = iter(tok.encode_batch(texts)) if texts else iter(())
    for b in batch:
        writer.write(np.asarray(next(encoded), dtype=np.int64) if isinstance(b, str) else b)


def _prepare_out(out: Path, force: bool) -> None:
    from node.shards import MANIFEST

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    old = [out / MANIFEST, out / "tokenizer.json", *out.glob("shard-*.bin")]
    old = [p for p in old if p.exists()]
    if old and not force:
        raise ValueError(
            f"--out {out} already holds a dataset ({old[0].name}); pass --force to replace it "
            "or pick another --out"
        )
    for p in old:
        p.unlink() if p.is_file() else shutil.rmtree(p)


def expand_inputs(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        matches = (
            [Path(pattern)] if Path(pattern).is_file() else sorted(map(Path, glob.glob(pattern)))
        )
        matches = [p for p in matches if p.is_file()]
        if not matches:
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        for p in matches:
            if p.suffix.lower() not in KINDS:
                raise ValueError(
                    f"input {p}: unsupported type {p.suffix!r}; use .txt, .jsonl or .parquet"
                )
        paths.extend(matches)
    return paths


class Source:
    """The inputs as a stream of (starts a new document, piece) in order; a piece is at most
    about CHUNK long. `raw=True` gives .txt pieces as bytes (the byte tokenizer keeps them
    exact, even if they are not UTF-8); everything else is str."""

    def __init__(self, paths: list[Path], text_key: str, text_column: str):
        self.paths, self.text_key, self.text_column = paths, text_key, text_column
        self.total = sum(p.stat().st_size for p in paths)
        if any(KINDS[p.suffix.lower()] == "parquet" for p in paths):
            _pyarrow()  # fail before any work

    def pieces(self, bar, raw: bool) -> Iterator[tuple[bool, str | bytes]]:
        for path in self.paths:
            kind = KINDS[path.suffix.lower()]
            if kind == "txt":
                yield from _txt(path, bar, raw)
            elif kind == "jsonl":
                yield from _docs(_jsonl(path, self.text_key, bar))
            else:
                yield from _docs(_parquet(path, self.text_column, bar))


def _txt(path: Path, bar, raw: bool) -> Iterator[tuple[bool, str | bytes]]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    first = True
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            if not block.endswith(b"\n"):
                block += f.readline(CHUNK)  # end the piece at a line break when one is near
            bar.update(len(block))
            try:
                piece = block if raw else decoder.decode(block)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path} is not UTF-8 text ({err.reason}); --tokenizer bytes takes any bytes"
                ) from None
            yield first, piece
            first = False
        if not raw:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise ValueError(f"{path} ends inside a UTF-8 character: not UTF-8 text") from None
    if first:
        yield True, b"" if raw else ""  # an empty file is still a document


def _docs(texts: Iterator[str]) -> Iterator[tuple[bool, str]]:
    """Documents, each cut into pieces of about CHUNK chars (after a newline when possible)."""
    for text in texts:
        start = 0
        while True:
            end = len(text) if len(text) - start <= CHUNK else start + CHUNK
            if end < len(text):
                nl = text.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            yield start == 0, text[start:end]
            start = end
            if start >= len(text):
                break


def _jsonl(path: Path, key: str, bar) -> Iterator[str]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            bar.update(len(line))
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{n} is not a JSON line: {err}") from None
            text = obj.get(key) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(
                    f"{path}:{n} has no string field {key!r} (it has {found}); "
                    "set --text-key to the field that holds the text"
                )
            yield text


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(".parquet inputs need pyarrow: pip install 'resbm-swarm[data]'") from None
    return pq


def _parquet(path: Path, column: str, bar) -> Iterator[str]:
    pq = _pyarrow()
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if column not in names:
        raise ValueError(
            f"{path} has no column {column!r} (it has {names[:8]}); "
            "set --text-column to the column that holds the text"
        )
    per_row = path.stat().st_size / max(pf.metadata.num_rows, 1)
    done, reported = 0.0, 0
    for batch in pf.iter_batches(batch_size=256, columns=[column]):
        values = batch.column(0).to_pylist()
        for v in values:
            if v is None:
                continue
            if not isinstance(v, str):
                raise ValueError(
                    f"{path}: column {column!r} holds {type(v).__name__}, not text; "
                    "set --text-column to a string column"
                )
            yield v
        done += len(values) * per_row
        bar.update(int(done) - reported)
        reported = int(done)


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress)
