"""Training text: a built-in corpus that needs no download, deterministic shards, a held-out split.

The built-in corpus is this Python's own standard library source, read in sorted path
order. Its fingerprint (sha256 of the bytes) goes into the run manifest, so nodes whose
corpora differ (another Python patch release, other --data files) refuse to average.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BLOCK_BYTES = 16 * 1024  # unit of sharding and of the held-out split; bounds the context length
HELDOUT_EVERY = 20  # every 20th block is held out (5%)
MAX_BUILTIN_BYTES = 24 * 2**20
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".ini", ".html", ".js", ".rs", ".go")


class DataError(ValueError):
    """The requested data cannot be used (missing, empty, too small)."""


@dataclass(frozen=True)
class Corpus:
    data: np.ndarray  # uint8, the whole corpus
    fingerprint: str
    description: str
    vocab_size: int = 256  # token ids in `data` are < vocab_size (bytes: 256)

    @property
    def num_blocks(self) -> int:
        return len(self.data) // BLOCK_BYTES

    def heldout_blocks(self) -> list[int]:
        return [b for b in range(self.num_blocks) if b % HELDOUT_EVERY == HELDOUT_EVERY - 1]

    def train_blocks(self, shard: int, num_shards: int) -> list[int]:
        train = [b for b in range(self.num_blocks) if b % HELDOUT_EVERY != HELDOUT_EVERY - 1]
        mine = train[shard::num_shards]
        return mine or train  # more shards than blocks: fall back to the whole train split


def _builtin_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib).parts
        if relative[0] in ("site-packages", "dist-packages") or "test" in relative[0]:
            continue
        files.append(path)
    return files


def _collect(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"data path {raw} does not exist")
    return files


def load_corpus(paths: list[str] | None = None, max_bytes: int = MAX_BUILTIN_BYTES) -> Corpus:
    """Read the user's files (or the built-in corpus when none are given) into one byte array."""
    files = _collect(paths) if paths else _builtin_files()
    chunks: list[bytes] = []
    total = 0
    for path in files:
        content = path.read_bytes()
        if total + len(content) > max_bytes:
            content = content[: max_bytes - total]
        chunks.append(content)
        total += len(content)
        if total >= max_bytes:
            break
    blob = b"".join(chunks)
    if len(blob) < HELDOUT_EVERY * BLOCK_BYTES:
        raise DataError(f"corpus has {len(blob)} bytes; need at least {HELDOUT_EVERY * BLOCK_BYTES} "
                        "(one held-out block of every 20)")
    description = "builtin:python-stdlib" if not paths else ",".join(paths)
    return Corpus(np.frombuffer(blob, dtype=np.uint8), hashlib.sha256(blob).hexdigest(), description)


class ShardSampler:
    """Random windows from this node's shard; its state is a plain dict so a checkpoint can resume it."""

    def __init__(self, corpus: Corpus, shard: int, num_shards: int, context: int, batch_size: int, seed: int) -> None:
        if context + 1 >= BLOCK_BYTES:
            raise DataError(f"context {context} must be below the {BLOCK_BYTES}-byte data block")
        self.corpus = corpus
        self.context = context
        self.batch_size = batch_size
        self.blocks = np.asarray(corpus.train_blocks(shard, num_shards), dtype=np.int64)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.blocks[self.rng.integers(0, len(self.blocks), self.batch_size)]
        offsets = self.rng.integers(0, BLOCK_BYTES - self.context - 1, self.batch_size)
        starts = blocks * BLOCK_BYTES + offsets
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
        starts = chosen * BLOCK_BYTES + rng.integers(0, BLOCK_BYTES - context - 1, batch_size)
        windows = torch.from_numpy(np.stack([corpus.data[s : s + context + 1] for s in starts]).astype(np.int64))
        batches.append((windows[:, :-1], windows[:, 1:]))
    return batches
