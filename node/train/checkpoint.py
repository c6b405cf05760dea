"""Atomic, checksummed, pickle-free checkpoint files: ``ckpt-{sequence:010d}.gtc``.

Why not ``torch.save``: it is pickle, so loading a file can execute code, and a torn write
shows up (if at all) as an obscure unpickling error. This format is a JSON header plus raw
bytes, verified end to end with SHA-256 before anything is returned.

Layout (lengths big-endian; tensor bytes little-endian, the host order this module requires)::

    magic      8 bytes    b"GTCKPT\\x00\\x01"  (the last byte is the format version)
    hlen       4 bytes    u32, length of the header
    header     hlen       UTF-8 JSON {"meta": {...},
                            "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}
    data       sum(nbytes) tensor bytes, contiguous, in header order; offsets count from the data start
    digest     32 bytes   SHA-256 of every byte above
    end magic  8 bytes    b"GTCKEND\\x00"

The header fixes the exact file size, so truncation is caught before any tensor is
allocated, and a damaged header can never make the loader allocate more than the file holds.

Durability: a save streams into ``<name>.tmp``, fsyncs it, renames it onto the final name
and fsyncs the directory; only then are old checkpoints and crash leftovers deleted, so a
crash at any point leaves every earlier checkpoint intact. One writer per directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, NoReturn

import torch

if sys.byteorder != "little":  # tensor bytes are written in host order; torch targets little-endian hosts
    raise ImportError("node.train.checkpoint requires a little-endian host")

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = ".gtc"
MAGIC = b"GTCKPT\x00\x01"
END_MAGIC = b"GTCKEND\x00"
_PREAMBLE = struct.Struct(">8sI")
_TRAILER_LEN = 32 + len(END_MAGIC)
_CHUNK = 8 << 20  # bytes per write/read/hash step: bounds the extra memory of save and verify
_NAME_RE = re.compile(r"ckpt-(\d+)" + re.escape(CHECKPOINT_SUFFIX))
_TMP_RE = re.compile(r"ckpt-\d+" + re.escape(CHECKPOINT_SUFFIX) + r"\.tmp")
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
              torch.int64, torch.int32, torch.uint8, torch.bool)
}
_DTYPE_NAMES = {d: name for name, d in _DTYPES.items()}


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable: truncated, corrupted, wrong magic/version, bad header.

    The message names the path and the reason; both are also kept as attributes.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    sequence: int  # from the file name; -1 if the file was renamed to something else
    meta: dict
    tensors: dict[str, torch.Tensor]


class _Entry(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: list[int]
    nbytes: int


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, newest (highest sequence) first; [] if it is missing."""
    try:
        found = [(int(m.group(1)), Path(e.path)) for e in os.scandir(directory)
                 if (m := _NAME_RE.fullmatch(e.name)) and e.is_file()]
    except FileNotFoundError:
        return []
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(directory: str | Path, meta: dict, tensors: Mapping[str, torch.Tensor], keep: int = 3) -> Path:
    """Durably write a new checkpoint and return its path; then keep only the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    entries, offset = [], 0
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise TypeError(f"tensor {name!r}: need a str name and a dense torch.Tensor")
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        entries.append({"name": name, "dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "offset": offset, "nbytes": nbytes})
        offset += nbytes
    header = json.dumps({"meta": meta, "tensors": entries}, separators=(",", ":")).encode()  # fails before any I/O
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = list_checkpoints(directory)
    sequence = 1 + (_sequence(existing[0]) if existing else 0)
    final = directory / f"ckpt-{sequence:010d}{CHECKPOINT_SUFFIX}"
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            digest = hashlib.sha256()

            def put(buf: bytes | memoryview) -> None:  # hash exactly what is written, chunk by chunk
                f.write(buf)
                digest.update(buf)

            put(_PREAMBLE.pack(MAGIC, len(header)) + header)
            for entry, t in zip(entries, tensors.values(), strict=True):
                flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # one GPU tensor at a time
                if flat.numel() != entry["nbytes"]:
                    raise RuntimeError(f"tensor {entry['name']!r} changed size while being saved")
                view = memoryview(flat.numpy())
                for i in range(0, len(view), _CHUNK):
                    put(view[i:i + _CHUNK])
            f.write(digest.digest() + END_MAGIC)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[keep:]:  # only now that the new file is durable
        old.unlink(missing_ok=True)
    for leftover in os.scandir(directory):  # from a writer killed mid-save
        if _TMP_RE.fullmatch(leftover.name):
            Path(leftover.path).unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and fully verify a checkpoint; any damage (or I/O error) raises CheckpointError."""
    path = Path(path)
    meta, tensors = _scan(path, build=True)
    return Checkpoint(path=path, sequence=_sequence(path), meta=meta, tensors=tensors)


def verify_checkpoint(path: str | Path) -> None:
    """Check structure and SHA-256 without building tensors, in bounded memory."""
    _scan(Path(path), build=False)


def load_latest(directory: str | Path) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint that loads, plus (path, reason) for each newer one skipped as damaged."""
    skipped: list[tuple[Path, str]] = []
    for path in list_checkpoints(directory):
        try:
            return load_checkpoint(path), skipped
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint %s: %s", path, e.reason)
            skipped.append((path, e.reason))
    return None, skipped


def _sequence(path: Path) -> int:
    m = _NAME_RE.fullmatch(path.name)
    return int(m.group(1)) if m else -1


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX only; Windows cannot open directories)."""
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _scan(path: Path, build: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with open(path, "rb") as f:
            return _scan_file(f, path, os.fstat(f.fileno()).st_size, build)
    except OSError as e:
        raise CheckpointError(path, f"unreadable: {e}") from e


def _scan_file(f: BinaryIO, path: Path, size: int, build: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validate framing and header, stream the data through SHA-256, check the trailer."""
    def fail(reason: str) -> NoReturn:
        raise CheckpointError(path, reason)

    def read_into(view: memoryview) -> None:
        while len(view):
            n = f.readinto(view)
            if not n:
                fail("truncated: unexpected end of file (file changed while reading?)")
            digest.update(view[:n])
            view = view[n:]

    if size == 0:
        fail("empty file")
    if size < _PREAMBLE.size + _TRAILER_LEN:
        fail(f"truncated: file is {size} bytes, the fixed framing alone is {_PREAMBLE.size + _TRAILER_LEN}")
    digest = hashlib.sha256()
    pre = bytearray(_PREAMBLE.size)
    read_into(memoryview(pre))
    magic, hlen = _PREAMBLE.unpack(pre)
    if magic != MAGIC:
        fail(f"unsupported format version {magic[-1]}" if magic[:-1] == MAGIC[:-1] else f"bad magic {magic!r}")
    if _PREAMBLE.size + hlen + _TRAILER_LEN > size:
        fail(f"truncated: file is {size} bytes, header says at least {_PREAMBLE.size + hlen + _TRAILER_LEN}")
    raw = bytearray(hlen)
    read_into(memoryview(raw))
    meta, entries = _parse_header(raw, fail)
    data_len = sum(e.nbytes for e in entries)
    expected = _PREAMBLE.size + hlen + data_len + _TRAILER_LEN
    if size != expected:
        fail(f"{'truncated' if size < expected else 'trailing bytes'}: file is {size} bytes, header says {expected}")
    tensors: dict[str, torch.Tensor] = {}
    if build:
        for e in entries:  # read straight into the final tensor's memory: never held twice
            t = torch.empty(e.shape, dtype=e.dtype)
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            for i in range(0, e.nbytes, _CHUNK):
                read_into(view[i:i + _CHUNK])
            tensors[e.name] = t
    else:
        scratch = memoryview(bytearray(min(_CHUNK, data_len)))
        for i in range(0, data_len, _CHUNK):
            read_into(scratch[:min(_CHUNK, data_len - i)])
    trailer = f.read(_TRAILER_LEN)
    if len(trailer) != _TRAILER_LEN or trailer[32:] != END_MAGIC:
        fail(f"bad end magic {trailer[32:]!r}")
    if trailer[:32] != digest.digest():
        fail("checksum mismatch")
    return meta, tensors


def _parse_header(raw: bytes | bytearray, fail: Callable[[str], NoReturn]) -> tuple[dict, list[_Entry]]:
    """Decode the JSON header and check every entry against dtype x shape and the running offset."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        fail(f"bad header: not valid UTF-8 JSON ({e})")
    if not (isinstance(header, dict) and isinstance(header.get("meta"), dict)
            and isinstance(header.get("tensors"), list)):
        fail("bad header: expected an object with 'meta' (object) and 'tensors' (list)")
    entries: list[_Entry] = []
    names: set[str] = set()
    offset = 0
    for i, e in enumerate(header["tensors"]):
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and _DTYPES.get(str(e.get("dtype")))
                and isinstance(e.get("shape"), list) and all(_is_count(d) for d in e["shape"])
                and _is_count(e.get("offset")) and _is_count(e.get("nbytes"))):
            fail(f"bad header: tensor entry {i} is malformed")
        dtype = _DTYPES[e["dtype"]]
        nbytes = math.prod(e["shape"]) * dtype.itemsize
        if (e["offset"], e["nbytes"]) != (offset, nbytes):
            fail(f"bad header: tensor {e['name']!r} has offset/nbytes {e['offset']}/{e['nbytes']}, "
                 f"expected {offset}/{nbytes} for {e['dtype']}{e['shape']}")
        if e["name"] in names:
            fail(f"bad header: duplicate tensor name {e['name']!r}")
        names.add(e["name"])
        entries.append(_Entry(e["name"], dtype, e["shape"], nbytes))
        offset += nbytes
    return header["meta"], entries


def _is_count(x: object) -> bool:
    return type(x) is int and x >= 0
