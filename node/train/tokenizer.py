"""Tokenizers: raw bytes (the default, vocab 256) or a Hugging Face `tokenizers` JSON file.

A tokenizer is part of what nodes must share to average their models, so each one has a
fingerprint for the run manifest: "bytes", or the sha256 of the JSON file's canonical form
(parsed and re-serialised with sorted keys), so re-indenting a file does not split a swarm.

`train_bpe` builds a byte-level BPE tokenizer (`gossiptrain tokenizer train`). The same
input gives the same JSON byte for byte, in any process: nodes that train their tokenizer
from the same data independently still agree on its fingerprint.

Nothing here downloads anything: files are read with `Tokenizer.from_str`, never from the hub.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node.train.data import DataError

BYTES = "bytes"  # the fingerprint (and manifest entry) of the byte-level tokenizer
EOS_TOKEN = "<|endoftext|>"  # the separator `train_bpe` adds; also the first name looked for in other files
# special tokens that end a document, most common first (GPT-2/NeoX, Llama 3, Llama 2/T5/Mistral, others)
EOS_NAMES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
DOCUMENT_SEPARATOR = "\n\n"  # joins documents where a tokenizer has no end-of-document token (and for bytes)
MIN_BPE_VOCAB = 257  # 256 byte symbols + the end-of-document token
MAX_VOCAB = 2**32  # token ids are stored as uint32 at most


class TokenizerError(DataError):
    """A tokenizer file cannot be used (missing, not JSON, not a `tokenizers` file), or training cannot start."""


@dataclass(frozen=True)
class ByteTokenizer:
    """Every UTF-8 byte is a token: no file, no vocabulary, nothing to disagree on."""

    fingerprint: str = BYTES
    vocab_size: int = 256
    separator: tuple[int, ...] = tuple(DOCUMENT_SEPARATOR.encode())
    description: str = "bytes"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class FileTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a local JSON file."""

    fingerprint: str
    vocab_size: int
    separator: tuple[int, ...]  # appended after every document
    description: str
    backend: Any = field(repr=False, compare=False)  # tokenizers.Tokenizer

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # no template tokens (BOS...): documents are joined with `separator` only, the same for every tokenizer
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # fast: no offsets
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


Tokenizer = ByteTokenizer | FileTokenizer


def canonical_fingerprint(parsed: Any) -> str:
    """sha256 of the canonical JSON form: sorted keys, no whitespace, UTF-8."""
    canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _end_of_document(parsed: dict, backend: Any) -> tuple[int, ...]:
    """The ids that end a document: the tokenizer's own end-of-text special token, else its encoding of a blank line."""
    specials = {t.get("content"): t.get("id") for t in parsed.get("added_tokens") or []
                if isinstance(t, dict) and t.get("special") and isinstance(t.get("id"), int)}
    for name in EOS_NAMES:
        if name in specials:
            return (specials[name],)
    ids = tuple(backend.encode(DOCUMENT_SEPARATOR, add_special_tokens=False).ids)
    if not ids:
        raise TokenizerError(f"the tokenizer has no end-of-document token ({', '.join(EOS_NAMES)}) and encodes a "
                             "blank line as nothing: documents could not be told apart")
    return ids


def load_tokenizer(path: str | os.PathLike | None) -> Tokenizer:
    """The byte-level tokenizer for "" / None, else the `tokenizers` JSON file at `path` (TokenizerError if unusable)."""
    if not path:
        return ByteTokenizer()
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"tokenizer file {path} cannot be read: {error}") from None
    try:
        parsed = json.loads(text)
    except ValueError as error:
        raise TokenizerError(f"tokenizer file {path} is not JSON ({error}); expected a Hugging Face "
                             "`tokenizers` tokenizer.json") from None
    if not isinstance(parsed, dict) or "model" not in parsed:
        raise TokenizerError(f"tokenizer file {path} is JSON but not a `tokenizers` tokenizer.json (no \"model\")")
    from tokenizers import Tokenizer as Backend  # (imported only when a tokenizer file is used: start-up time)

    try:
        backend = Backend.from_str(text)
    except Exception as error:  # noqa: BLE001 -- the Rust side raises plain Exception for every malformed file
        raise TokenizerError(f"tokenizer file {path} cannot be loaded by `tokenizers`: {error}") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise TokenizerError(f"tokenizer file {path} has {vocab_size} tokens; need 1 to {MAX_VOCAB}")
    return FileTokenizer(canonical_fingerprint(parsed), vocab_size, _end_of_document(parsed, backend), str(path), backend)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> str:
    """A byte-level BPE tokenizer trained on `texts`, as JSON text (deterministic: same texts, same bytes).

    Byte-level: the 256 byte symbols are always in the vocabulary, so any text can be encoded;
    EOS_TOKEN is id 0 and ends every document in the token cache (node/train/data.py).
    """
    if not MIN_BPE_VOCAB <= vocab_size <= MAX_VOCAB:
        raise TokenizerError(f"vocab must be in [{MIN_BPE_VOCAB}, {MAX_VOCAB}] (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    if min_frequency < 1:
        raise TokenizerError(f"min_frequency must be >= 1, got {min_frequency}")
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return backend.to_str(pretty=True) + "\n"


def write_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: a crash never leaves half a tokenizer."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, target)
    return target
