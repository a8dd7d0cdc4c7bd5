"""Get a prepared dataset from where a swarm manifest's `data_source` says it lives.

Only stage 0 and the last stage read tokens, so only they fetch. `data_source` is one of:

- a local path (a prepared directory, or a text file): used in place, after verification;
- `file:///abs/path`: the same;
- `http://` / `https://` URL of the directory (or of its manifest.json): `manifest.json`, then each
  shard and the tokenizer file, into `dest`. Resumable: a file already in `dest` with the right
  sha256 is kept, so an interrupted download goes on where it stopped; each file is written to
  `NAME.part` and renamed only once its sha256 matched;
- `hf://datasets/ORG/NAME@REVISION[/SUBDIR]`: a Hugging Face dataset repository holding such a
  directory, through `huggingface_hub.snapshot_download` (pin REVISION to a commit so every
  peer gets the same bytes).

Errors: a wrong source or a file that fails its sha256 is a `ValueError` (`FetchError`,
`ShardError`): retrying will not help. A host that does not answer is an `OSError`
(`SourceUnreachable`): worth a retry, which resumes.

Whatever the source, every shard's sha256 has been checked against the manifest before `fetch`
returns, and `expect_fingerprint` (the swarm's) refuses a dataset that is not the swarm's, so a
node fails at start-up, with the file and both hashes named, instead of training on other data.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urljoin, urlparse
from urllib.request import url2pathname

from node.shards import (
    HEADER,
    MANIFEST,
    ShardError,
    data_info,
    file_sha256,
    parse_manifest,
    read_manifest,
    token_dtype,
    verify,
    write_manifest,
)

TIMEOUT_S = 30.0
_CHUNK = 1 << 20


class FetchError(ValueError):
    """A data source that is wrong (a bad URL, a file the server does not have): retrying will
    not help. The message names the URL."""


class SourceUnreachable(ConnectionError):
    """The source's host did not answer, timed out or failed (5xx): an OSError, worth a retry
    later; what was already fetched and verified is kept."""


def fetch(
    source: str,
    dest: str | Path,
    progress: bool = True,
    expect_fingerprint: str | None = None,
    timeout: float = TIMEOUT_S,
) -> Path:
    """The local path of `source`'s dataset, verified; downloads into `dest` when remote."""
    dest = Path(dest)
    scheme = urlparse(source).scheme if "://" in source else ""
    if scheme in ("", "file"):
        path = Path(url2pathname(urlparse(source).path)) if scheme else Path(source).expanduser()
        path = _local(path, progress)
    elif scheme in ("http", "https"):
        path = _http(source, dest, progress, timeout)
    elif scheme == "hf":
        path = _hf(source, dest, progress)
    else:
        raise FetchError(
            f"data_source {source!r}: unknown scheme {scheme!r}; use a path, file://, "
            "http(s):// or hf://datasets/ORG/NAME@REVISION"
        )
    if expect_fingerprint is not None:
        got = data_info(path).fingerprint
        if got != expect_fingerprint:
            raise ShardError(
                f"data_source {source} holds dataset {got}, the swarm trains on "
                f"{expect_fingerprint}: point data_source (or --data) at the swarm's dataset"
            )
    return path


def _local(path: Path, progress: bool) -> Path:
    if path.is_file() and path.name != MANIFEST:
        return path  # a text file: its fingerprint is its bytes, checked by the caller
    directory = path.parent if path.name == MANIFEST else path
    if not directory.is_dir():
        raise FileNotFoundError(f"data_source {path} does not exist")
    verify(directory, read_manifest(directory), progress)
    return directory


def _get(url: str, timeout: float):
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as err:
        kind = SourceUnreachable if err.code >= 500 else FetchError
        raise kind(f"GET {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise SourceUnreachable(f"GET {url}: {reason} (is the data server up?)") from None


def _download(url: str, target: Path, sha256: str, timeout: float, bar) -> None:
    """Stream `url` into target.part, hashing as it comes; rename only when the hash matches."""
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    with _get(url, timeout) as resp, open(part, "wb") as f:
        while block := resp.read(_CHUNK):
            f.write(block)
            digest.update(block)
            bar.update(len(block))
    actual = digest.hexdigest()
    if actual != sha256:
        part.unlink()
        raise ShardError(
            f"{url} (for {target.name}) has sha256 {actual}, the manifest expects {sha256}: "
            "the server holds a corrupt or different file"
        )
    os.replace(part, target)


def _have(path: Path, sha256: str, size: int | None = None) -> bool:
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    return file_sha256(path) == sha256


def _http(source: str, dest: Path, progress: bool, timeout: float) -> Path:
    from tqdm import tqdm

    base = source.removesuffix(MANIFEST)
    base = base if base.endswith("/") else base + "/"
    with _get(urljoin(base, MANIFEST), timeout) as resp:
        text = resp.read().decode("utf-8")
    m = parse_manifest(text, urljoin(base, MANIFEST))
    dest.mkdir(parents=True, exist_ok=True)
    old = dest / MANIFEST
    if old.is_file() and json.loads(old.read_text()).get("fingerprint") != m["fingerprint"]:
        old.unlink()  # another dataset was here: never leave its manifest over our shards
    width = token_dtype(int(m["vocab_size"])).itemsize
    todo = []
    for s in m["shards"]:
        size = HEADER.size + int(s["tokens"]) * width
        if not _have(dest / s["file"], s["sha256"], size):
            todo.append((s["file"], s["sha256"], size))
    tok_file = m["tokenizer"].get("file")
    if tok_file:
        if Path(tok_file).name != tok_file:
            raise ShardError(f"{source}: tokenizer file {tok_file!r} is not a plain file name")
        if not _have(dest / tok_file, m["tokenizer"]["hash"]):
            todo.append((tok_file, m["tokenizer"]["hash"], 0))
    total = sum(size for _, _, size in todo)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="fetch data", disable=not progress
    ) as bar:
        for name, sha256, _ in todo:
            _download(urljoin(base, name), dest / name, sha256, timeout, bar)
    write_manifest(dest, m)  # last: its presence says every file above is in place
    return dest


def _hf(source: str, dest: Path, progress: bool) -> Path:
    # Not exercised by the tests: they cannot reach the Hugging Face Hub. The layout it expects
    # is the same as every other source's (manifest.json + shards), verified the same way.
    rest = source.removeprefix("hf://")
    kind, _, rest = rest.partition("/")
    repo, _, after = rest.partition("@")
    revision, _, subdir = after.partition("/")
    if kind != "datasets" or repo.count("/") != 1 or not revision:
        raise FetchError(
            f"data_source {source!r}: expected hf://datasets/ORG/NAME@REVISION[/SUBDIR] "
            "(REVISION a commit, so every peer gets the same bytes)"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FetchError(
            f"data_source {source} needs huggingface_hub: pip install huggingface_hub"
        ) from None
    patterns = [f"{subdir.strip('/')}/*"] if subdir else None
    try:
        root = snapshot_download(
            repo_id=repo,
            repo_type="dataset",
            revision=revision,
            local_dir=dest,
            allow_patterns=patterns,
        )
    except Exception as err:  # the hub raises many kinds: a missing repo or revision is final
        kind = FetchError if "NotFound" in type(err).__name__ else SourceUnreachable
        raise kind(f"data_source {source}: {type(err).__name__}: {err}") from None
    return _local(Path(root) / subdir if subdir else Path(root), progress)
