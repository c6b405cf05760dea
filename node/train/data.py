"""Training text: a built-in corpus that needs no download, user data in four formats, deterministic
shards, a held-out split.

The built-in corpus is this Python's own standard library source, read in sorted path order.
User data (`--data`, files or folders) may be plain text, JSONL (one JSON object per line, the
text under `--text-field`), Parquet, or a Hugging Face `datasets` folder written by
`save_to_disk`; the format follows from the suffix (.jsonl/.ndjson, .parquet, .arrow) or, for a
folder, from its contents (dataset_info.json + state.json, or dataset_dict.json: its train split).

Two paths lead to the token array `Corpus.data`:
- byte-level plain text (no `--tokenizer`): the files' raw bytes, concatenated, as before, with
  the sha256 of those bytes as fingerprint. Up to MAX_BUILTIN_BYTES they are read into memory
  (exactly as earlier versions did); larger user data is memory-mapped, never read whole.
- everything else: documents are streamed, tokenized in batches, each one followed by the
  tokenizer's end-of-document ids, and appended to a token cache file that is then memory-mapped.
  The cache lives in $GOSSIPTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/gossiptrain/tokens, else
  ~/.cache/gossiptrain/tokens, shared by the nodes of one machine: `<key>.bin` (token ids,
  uint8/uint16/uint32 by vocabulary size) and `<key>.json`, each written to a temporary file and
  renamed, the .json last, so a crash never leaves a cache that looks complete.

The fingerprint goes into the run manifest, so nodes whose corpora differ refuse to average. For
token corpora the cache key covers the format and sha256 (streamed) of every file in order, the
text field, the tokenizer's fingerprint and TOKEN_SCHEME; the fingerprint covers the key and the
sha256 of the resulting token ids.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import secrets
import sysconfig
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.train.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BLOCK_TOKENS = 16 * 1024  # unit of sharding and of the held-out split, in tokens; bounds the context length
BLOCK_BYTES = BLOCK_TOKENS  # byte-level corpora: one token per byte (the name earlier code uses)
HELDOUT_EVERY = 20  # every 20th block is held out (5%)
MAX_BUILTIN_BYTES = 24 * 2**20  # caps the built-in corpus only
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".ini", ".html", ".js", ".rs", ".go")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
BYTES_TOKENIZER = "bytes"  # Corpus.tokenizer (and the manifest entry) without a tokenizer file
TOKEN_SCHEME = "gossiptrain-tokens/1"  # bump when documents become tokens differently: old caches stop matching
CACHE_ENV = "GOSSIPTRAIN_CACHE_DIR"
SEGMENT_CHARS = 1 << 20  # longest text handed to a tokenizer at once: longer documents are cut at a line end
ENCODE_BATCH_CHARS = 4 << 20  # text per encode_batch call: bounds the memory used while tokenizing
ROWS_PER_BATCH = 1024  # Parquet rows read at once
HASH_CHUNK = 8 << 20
STALE_TEMPORARY_S = 60.0  # a cache temporary unchanged this long, whose writer's pid is gone, is a crash leftover


class DataError(ValueError):
    """The requested data cannot be used (missing, empty, too small, unreadable, no usable rows)."""


@dataclass(frozen=True)
class Corpus:
    data: np.ndarray  # token ids, the whole corpus: in memory, or an np.memmap of a file
    fingerprint: str
    description: str
    vocab_size: int = 256  # token ids in `data` are < vocab_size (bytes: 256)
    tokenizer: str = BYTES_TOKENIZER  # the tokenizer's fingerprint (node/train/tokenizer.py)
    skipped_rows: int = 0  # rows without usable text in the user's data (logged at load)

    @property
    def num_blocks(self) -> int:
        return len(self.data) // BLOCK_TOKENS

    def heldout_blocks(self) -> list[int]:
        return [b for b in range(self.num_blocks) if b % HELDOUT_EVERY == HELDOUT_EVERY - 1]

    def train_blocks(self, shard: int, num_shards: int) -> list[int]:
        train = [b for b in range(self.num_blocks) if b % HELDOUT_EVERY != HELDOUT_EVERY - 1]
        mine = train[shard::num_shards]
        return mine or train  # more shards than blocks: fall back to the whole train split


@dataclass(frozen=True)
class Source:
    """One file of training data."""

    path: Path
    format: str  # "text", "jsonl", "parquet" or "arrow" (a `datasets` shard: Arrow IPC stream or file)
    limit: int | None = None  # read at most this many bytes (the built-in corpus's cap; text only)


@dataclass
class RowCount:
    """Documents read and rows skipped (by reason) while streaming structured data."""

    documents: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))


# ---------------------------------------------------------------------------------------- finding the files
def _builtin_sources(max_bytes: int) -> list[Source]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources: list[Source] = []
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib).parts
        if relative[0] in ("site-packages", "dist-packages") or "test" in relative[0]:
            continue
        size = path.stat().st_size
        sources.append(Source(path, "text", limit=min(size, max_bytes - total)))
        total += size
        if total >= max_bytes:
            break
    return sources


def _format_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    for suffixes, kind in ((JSONL_SUFFIXES, "jsonl"), (PARQUET_SUFFIXES, "parquet"), (ARROW_SUFFIXES, "arrow")):
        if suffix in suffixes:
            return kind
    return "text" if path.suffix in TEXT_SUFFIXES else None


def _is_dataset_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _dataset_sources(folder: Path) -> list[Source]:
    """The Arrow shards of a `save_to_disk` folder, in their recorded order (a DatasetDict: its train split)."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataError(f"{folder}/dataset_dict.json is unreadable: {error}") from None
        if "train" not in splits or not _is_dataset_folder(folder / "train"):
            raise DataError(f"{folder} is a DatasetDict with splits {', '.join(map(str, splits))} and no train split: "
                            f"pass the folder of the split to train on, e.g. {folder}/{splits[0] if splits else 'train'}")
        return _dataset_sources(folder / "train")
    try:
        state = json.loads((folder / "state.json").read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{folder}/state.json is not a `datasets` state file: {error}") from None
    if not names or any(not isinstance(n, str) or Path(n).name != n or not n.endswith(".arrow") for n in names):
        raise DataError(f"{folder}/state.json lists no usable .arrow files: {names!r}")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder} lacks the shards its state.json lists: {', '.join(missing)}")
    return [Source(folder / name, "arrow") for name in names]


def _folder_sources(folder: Path) -> list[Source]:
    """Every data file under `folder` in sorted path order; `datasets` folders inside count as one unit."""
    if _is_dataset_folder(folder):
        return _dataset_sources(folder)
    datasets = {p.parent for p in folder.rglob("state.json") if _is_dataset_folder(p.parent)}
    datasets |= {p.parent for p in folder.rglob("dataset_dict.json")}
    sources: list[Source] = []
    taken: set[Path] = set()
    for path in sorted(folder.rglob("*")):
        holders = [d for d in datasets if d in path.parents]
        if holders:
            outermost = min(holders, key=lambda d: len(d.parts))
            if outermost not in taken:
                taken.add(outermost)
                sources.extend(_dataset_sources(outermost))
            continue
        kind = _format_of(path) if path.is_file() else None
        if kind is not None and kind != "arrow":  # loose .arrow files in a folder: not a format of their own
            sources.append(Source(path, kind))
    return sources


def _collect(paths: list[str]) -> list[Source]:
    sources: list[Source] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            sources.extend(_folder_sources(path))
        elif path.is_file():
            sources.append(Source(path, _format_of(path) or "text"))  # a file named explicitly: text unless its suffix says
        else:
            raise DataError(f"data path {raw} does not exist")
    return sources


# ---------------------------------------------------------------------------------------- reading documents
def _segments(text: str) -> Iterator[tuple[str, bool]]:
    """`text` in pieces of at most SEGMENT_CHARS, cut after a newline where there is one; True marks the last."""
    start = 0
    while len(text) - start > SEGMENT_CHARS:
        cut = text.rfind("\n", start, start + SEGMENT_CHARS) + 1
        cut = cut if cut > start else start + SEGMENT_CHARS
        yield text[start:cut], False
        start = cut
    yield text[start:], True


def _document(text: str, counts: RowCount) -> Iterator[tuple[str, bool]]:
    if text:  # an empty document adds nothing, not even a separator
        counts.documents += 1
        yield from _segments(text)


def _chunks(source: Source, size: int) -> Iterator[bytes]:
    """The file's bytes (its first `source.limit` when set), `size` at a time."""
    remaining = source.limit if source.limit is not None else float("inf")
    with open(source.path, "rb") as file:
        while remaining > 0 and (chunk := file.read(int(min(size, remaining)))):
            remaining -= len(chunk)
            yield chunk


def _read_text(source: Source, text_field: str, counts: RowCount) -> Iterator[tuple[str, bool]]:
    """A text file is one document, decoded as UTF-8 (bad bytes replaced), streamed SEGMENT_CHARS at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer, nonempty = "", False
    for chunk in _chunks(source, SEGMENT_CHARS):
        buffer += decoder.decode(chunk)
        while len(buffer) > SEGMENT_CHARS:
            cut = buffer.rfind("\n", 0, SEGMENT_CHARS) + 1 or SEGMENT_CHARS
            nonempty = True
            yield buffer[:cut], False
            buffer = buffer[cut:]
    buffer += decoder.decode(b"", final=True)
    if buffer or nonempty:
        counts.documents += 1
        yield buffer, True


def _read_jsonl(source: Source, text_field: str, counts: RowCount) -> Iterator[tuple[str, bool]]:
    with open(source.path, "rb") as file:
        for line in file:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:  # also UnicodeDecodeError
                counts.skip("lines that are not JSON")
                continue
            if not isinstance(row, dict):
                counts.skip("lines that are not JSON objects")
            elif text_field not in row:
                counts.skip(f"rows without {text_field!r}")
            elif not isinstance(row[text_field], str):
                counts.skip(f"rows whose {text_field!r} is not a string")
            else:
                yield from _document(row[text_field], counts)


def _text_column_index(schema: Any, text_field: str, path: Path) -> int:
    """The column of `text_field` in an Arrow schema; DataError when it is missing or does not hold strings."""
    import pyarrow as pa

    index = schema.get_field_index(text_field)
    if index < 0:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
                        "choose one with --text-field")
    kind = schema.field(index).type
    is_text = (pa.types.is_string(kind) or pa.types.is_large_string(kind)
               or getattr(pa.types, "is_string_view", lambda _: False)(kind))
    if not is_text:
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not text; choose another with --text-field")
    return index


def _column_documents(column: Any, counts: RowCount) -> Iterator[tuple[str, bool]]:
    for value in column.to_pylist():
        if value is None:
            counts.skip("rows with a null text")
        else:
            yield from _document(value, counts)


def _read_parquet(source: Source, text_field: str, counts: RowCount) -> Iterator[tuple[str, bool]]:
    """Parquet, one batch of ROWS_PER_BATCH rows of the text column at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path, memory_map=True)
        _text_column_index(parquet.schema_arrow, text_field, source.path)
        batches = parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=[text_field])
        for batch in batches:
            yield from _column_documents(batch.column(0), counts)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{source.path} is not a readable Parquet file: {error}") from None


def _read_arrow(source: Source, text_field: str, counts: RowCount) -> Iterator[tuple[str, bool]]:
    """An Arrow shard, memory-mapped: `datasets` writes the IPC stream format; the IPC file format is read too."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(source.path)) as mapped:
            try:
                reader = pa.ipc.open_stream(mapped)
                batches: Iterator[Any] = iter(reader)
            except pa.ArrowInvalid:
                mapped.seek(0)
                file_reader = pa.ipc.open_file(mapped)
                reader = file_reader
                batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
            index = _text_column_index(reader.schema, text_field, source.path)
            for batch in batches:
                yield from _column_documents(batch.column(index), counts)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{source.path} is not a readable Arrow file: {error}") from None


READERS: dict[str, Callable[[Source, str, RowCount], Iterator[tuple[str, bool]]]] = {
    "text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "arrow": _read_arrow,
}


def iter_documents(sources: list[Source], text_field: str, counts: RowCount) -> Iterator[tuple[str, bool]]:
    """(text, ends a document) pieces of every document, in order; bad rows are skipped and counted in `counts`."""
    for source in sources:
        yield from READERS[source.format](source, text_field, counts)


def iter_texts(paths: list[str], text_field: str = "text") -> Iterator[str]:
    """The text pieces of the user's data (for training a tokenizer); DataError for missing paths and bad files."""
    if not paths:
        raise DataError("no data paths given")
    counts = RowCount()
    for text, _ in iter_documents(_collect(paths), text_field, counts):
        yield text
    if counts.documents == 0:
        raise DataError(f"no usable text in {', '.join(paths)}" + (f" ({counts.summary()})" if counts.skipped else ""))
    if counts.skipped:
        log.warning("skipped rows without usable text: %s", counts.summary())


# ---------------------------------------------------------------------------------------- building the corpus
def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "gossiptrain" / "tokens"


def _sha256(source: Source) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks(source, HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 2**8 else np.uint16 if vocab_size <= 2**16 else np.uint32)


def _too_small(count: int, unit: str) -> DataError:
    need = HELDOUT_EVERY * BLOCK_TOKENS
    return DataError(f"corpus has {count} {unit}; need at least {need} (one held-out block of every 20)")


def _open_cache(cache_dir: Path, key: str) -> tuple[np.memmap, dict] | None:
    """The cached token array under `key`, or None when absent or inconsistent (then it is rebuilt)."""
    meta_path, bin_path = cache_dir / f"{key}.json", cache_dir / f"{key}.bin"
    try:
        meta = json.loads(meta_path.read_text())
        dtype, tokens, size = np.dtype(meta["dtype"]), int(meta["tokens"]), bin_path.stat().st_size
        if meta["key"] != key or not isinstance(meta["sha256"], str) or tokens <= 0 or size != tokens * dtype.itemsize:
            raise ValueError(f"{bin_path.name} holds {size} bytes, not {tokens} {dtype} tokens")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("token cache %s is unusable (%s): rebuilding it", meta_path, error)
        return None
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(tokens,)), meta


def _remove_stale_temporaries(cache_dir: Path, key: str) -> None:
    """Delete temporaries of `key` left by writers that died: their pid is gone and they stopped growing.

    (A pid alone is not proof: a writer in another container sharing the folder has a pid we cannot see.)
    """
    for leftover in cache_dir.glob(f"{key}.*.tmp-*"):
        try:
            if time.time() - leftover.stat().st_mtime < STALE_TEMPORARY_S:
                continue
            os.kill(int(leftover.name.rsplit("tmp-", 1)[1].split("-")[0]), 0)
        except ProcessLookupError:
            leftover.unlink(missing_ok=True)
        except (OSError, ValueError):  # gone already, not our naming, or a live process of another user: leave it
            pass


def _commit(temporary: Path, target: Path) -> None:
    with open(temporary, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(temporary, target)


class _HashingWriter:
    """A file that also hashes what is written to it: the cache's sha256 costs no second pass."""

    def __init__(self, file: Any) -> None:
        self.file, self.digest = file, hashlib.sha256()

    def write(self, chunk: bytes) -> int:
        self.digest.update(chunk)
        return self.file.write(chunk)

    def tell(self) -> int:
        return self.file.tell()


def _write_cache(cache_dir: Path, key: str, meta: dict, fill: Callable[[Any], int]) -> None:
    """Write the token file through `fill(file) -> tokens`, then its metadata (with the file's sha256), each via a
    temporary file and a rename: the metadata last, so its presence means the .bin is whole."""
    suffix = f"tmp-{os.getpid()}-{secrets.token_hex(4)}"
    temporary, meta_temporary = cache_dir / f"{key}.bin.{suffix}", cache_dir / f"{key}.json.{suffix}"
    try:
        with open(temporary, "wb") as file:
            writer = _HashingWriter(file)
            meta["tokens"] = fill(writer)
        meta.update(key=key, sha256=writer.digest.hexdigest())
        _commit(temporary, cache_dir / f"{key}.bin")
        meta_temporary.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        _commit(meta_temporary, cache_dir / f"{key}.json")
    finally:
        temporary.unlink(missing_ok=True)
        meta_temporary.unlink(missing_ok=True)


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the token cache folder {folder} ({error}); set {CACHE_ENV} to another") from None
    return folder


def _tokenize_into(file: Any, sources: list[Source], tokenizer: Tokenizer, text_field: str, dtype: np.dtype,
                   counts: RowCount) -> int:
    """Stream the documents into `file` as token ids, each followed by the tokenizer's separator; the token count."""
    separator = np.asarray(tokenizer.separator, dtype=dtype)
    written, open_document = 0, False
    pending: list[str] = []
    ends: list[bool] = []

    def flush() -> None:
        nonlocal written, open_document
        pieces = []
        for ids, end in zip(tokenizer.encode_batch(pending), ends):
            if len(ids):
                pieces.append(ids.astype(dtype, copy=False))
                open_document = True
            if end and open_document:
                pieces.append(separator)
                open_document = False
        if pieces:
            block = np.concatenate(pieces)
            file.write(block.tobytes())
            written += len(block)
        pending.clear()
        ends.clear()

    characters = 0
    for text, end in iter_documents(sources, text_field, counts):
        pending.append(text)
        ends.append(end)
        characters += len(text)
        if characters >= ENCODE_BATCH_CHARS:
            flush()
            characters = 0
    flush()
    return written


def _token_corpus(sources: list[Source], tokenizer: Tokenizer, text_field: str, description: str,
                  cache_dir: str | os.PathLike | None) -> Corpus:
    """Tokenized documents from the cache, built first if needed. The fingerprint covers the inputs (the cache key)
    and the sha256 of the token ids themselves: nodes whose `tokenizers` versions split text differently refuse
    each other at start, instead of failing each other's verification replays later."""
    structured = any(source.format != "text" for source in sources)
    spec = {"scheme": TOKEN_SCHEME, "tokenizer": tokenizer.fingerprint,
            "files": [[source.format, _sha256(source)] for source in sources],
            **({"text_field": text_field} if structured else {})}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    folder = _cache_dir(cache_dir)
    cached = _open_cache(folder, key)
    if cached is None:
        _remove_stale_temporaries(folder, key)
        dtype = _token_dtype(tokenizer.vocab_size)
        counts = RowCount()
        started = time.monotonic()
        log.info("tokenizing %s (%d files) with %s into %s", description, len(sources), tokenizer.description, folder)
        meta = {"scheme": TOKEN_SCHEME, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                "tokenizer": tokenizer.fingerprint}

        def fill(file: Any) -> int:
            tokens = _tokenize_into(file, sources, tokenizer, text_field, dtype, counts)
            if counts.documents == 0:
                raise DataError(f"no usable text in {description}" + (f": {counts.summary()}" if counts.skipped else ""))
            if tokens < HELDOUT_EVERY * BLOCK_TOKENS:
                raise _too_small(tokens, "tokens")
            meta.update(documents=counts.documents, skipped_rows=sum(counts.skipped.values()),
                        skipped=dict(counts.skipped))
            return tokens

        _write_cache(folder, key, meta, fill)
        log.info("tokenized %d documents into %d tokens in %.1f s", counts.documents, meta["tokens"],
                 time.monotonic() - started)
        cached = _open_cache(folder, key)
        if cached is None:
            raise DataError(f"the token cache {folder / key}.bin vanished right after it was written")
    data, meta = cached
    if meta.get("skipped_rows"):
        log.warning("%s: skipped %d rows without usable text (%s)", description, meta["skipped_rows"],
                    ", ".join(f"{n} {why}" for why, n in sorted(meta.get("skipped", {}).items())))
    fingerprint = hashlib.sha256(f"{key}:{meta['sha256']}".encode()).hexdigest()
    return Corpus(data, fingerprint, description, tokenizer.vocab_size, tokenizer.fingerprint,
                  int(meta.get("skipped_rows", 0)))


def _byte_corpus(sources: list[Source], description: str, cache_dir: str | os.PathLike | None) -> Corpus:
    """Raw bytes of text files, concatenated: the fingerprint is the sha256 of those bytes (as it always was)."""
    sizes = [source.limit if source.limit is not None else source.path.stat().st_size for source in sources]
    total = sum(sizes)
    if total < HELDOUT_EVERY * BLOCK_TOKENS:
        raise _too_small(total, "bytes")
    if total <= MAX_BUILTIN_BYTES:  # small: in memory
        chunks = []
        for source in sources:
            with open(source.path, "rb") as file:
                chunks.append(file.read(source.limit) if source.limit is not None else file.read())
        blob = b"".join(chunks)
        if len(blob) < HELDOUT_EVERY * BLOCK_TOKENS:
            raise _too_small(len(blob), "bytes")
        return Corpus(np.frombuffer(blob, dtype=np.uint8), hashlib.sha256(blob).hexdigest(), description)
    digest = hashlib.sha256()
    for source in sources:
        for chunk in _chunks(source, HASH_CHUNK):
            digest.update(chunk)
    fingerprint = digest.hexdigest()
    if len(sources) == 1 and sources[0].limit is None:  # one large file: map it as it is
        return Corpus(np.memmap(sources[0].path, dtype=np.uint8, mode="r"), fingerprint, description)
    folder = _cache_dir(cache_dir)
    cached = _open_cache(folder, fingerprint)
    if cached is None:
        _remove_stale_temporaries(folder, fingerprint)

        def fill(out: Any) -> int:
            for source in sources:
                for chunk in _chunks(source, HASH_CHUNK):
                    out.write(chunk)
            return out.tell()

        _write_cache(folder, fingerprint, {"scheme": "bytes", "dtype": "uint8"}, fill)
        cached = _open_cache(folder, fingerprint)
        if cached is None:
            raise DataError(f"the byte cache {folder / fingerprint}.bin vanished right after it was written")
    return Corpus(cached[0], fingerprint, description)


def load_corpus(paths: list[str] | None = None, max_bytes: int = MAX_BUILTIN_BYTES, *, tokenizer: str = "",
                text_field: str = "text", cache_dir: str | os.PathLike | None = None) -> Corpus:
    """The user's data (or the built-in corpus, its first `max_bytes`, when none is given) as token ids.

    `tokenizer`: a `tokenizers` JSON file, or "" for raw bytes. `text_field`: the text column of JSONL,
    Parquet and `datasets` data. `cache_dir`: where token caches live (default: default_cache_dir()).
    """
    if not text_field:
        raise DataError("text_field must not be empty")
    sources = _collect(paths) if paths else _builtin_sources(max_bytes)
    description = ",".join(paths) if paths else "builtin:python-stdlib"
    if not tokenizer and all(source.format == "text" for source in sources):
        return _byte_corpus(sources, description, cache_dir)
    from node.train.tokenizer import load_tokenizer  # (tokenizers is imported only when used: start-up time)

    return _token_corpus(sources, load_tokenizer(tokenizer), text_field, description, cache_dir)


def load_run_corpus(cfg: NodeConfig) -> Corpus:
    """The corpus a node with this config trains on: its --data, --tokenizer and --text-field."""
    return load_corpus(cfg.data or None, tokenizer=cfg.tokenizer, text_field=cfg.text_field)


# ---------------------------------------------------------------------------------------- sampling
class ShardSampler:
    """Random windows from this node's shard; its state is a plain dict so a checkpoint can resume it."""

    def __init__(self, corpus: Corpus, shard: int, num_shards: int, context: int, batch_size: int, seed: int) -> None:
        if context + 1 >= BLOCK_TOKENS:
            raise DataError(f"context {context} must be below the {BLOCK_TOKENS}-token data block")
        self.corpus = corpus
        self.context = context
        self.batch_size = batch_size
        self.blocks = np.asarray(corpus.train_blocks(shard, num_shards), dtype=np.int64)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.blocks[self.rng.integers(0, len(self.blocks), self.batch_size)]
        offsets = self.rng.integers(0, BLOCK_TOKENS - self.context - 1, self.batch_size)
        starts = blocks * BLOCK_TOKENS + offsets
        windows = np.stack([self.corpus.data[s : s + self.context + 1] for s in starts]).astype(np.int64)
        self.batches_drawn += 1
        tokens = torch.from_numpy(windows)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.batches_drawn = state["batches_drawn"]


def heldout_batches(corpus: Corpus, context: int, batch_size: int, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set, identical on every node, so held-out losses are comparable."""
    rng = np.random.Generator(np.random.PCG64(12345))
    blocks = np.asarray(corpus.heldout_blocks(), dtype=np.int64)
    batches = []
    for _ in range(num_batches):
        chosen = blocks[rng.integers(0, len(blocks), batch_size)]
        starts = chosen * BLOCK_TOKENS + rng.integers(0, BLOCK_TOKENS - context - 1, batch_size)
        windows = torch.from_numpy(np.stack([corpus.data[s : s + context + 1] for s in starts]).astype(np.int64))
        batches.append((windows[:, :-1], windows[:, 1:]))
    return batches
