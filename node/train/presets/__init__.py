"""What names a transformers model of a run: the presets shipped here, a user's config.json, their hashes.

Pure file reading (no torch, no transformers): `NodeConfig.validate` and `NodeConfig.manifest`
use it, and the CLI parses and checks its flags before anything heavy is imported. The
presets are Llama-style `LlamaConfig` JSON files in this folder; `node/train/hf_model.py`
builds a model from what `load_model_config` returns.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from node.config import ConfigError

BUILTIN = "builtin"
PRESET_DIR = Path(__file__).resolve().parent
# keys that do not change the model: the writer's library version and where a checkpoint came from; auto_map
# names remote code, which is never run (a config that needs it is refused when the model is built)
IGNORED_KEYS = ("transformers_version", "_name_or_path", "auto_map")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def preset_names() -> tuple[str, ...]:
    return tuple(sorted(path.stem for path in PRESET_DIR.glob("*.json")))


def config_path(model: str) -> Path:
    """The config.json that `--model` names: a preset, a JSON file, or a directory holding config.json."""
    if model in preset_names():
        return PRESET_DIR / f"{model}.json"
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"model directory {model} holds no config.json")
        return path
    if path.is_file():
        return path
    raise ConfigError(f"model must be {BUILTIN!r}, a preset ({', '.join(preset_names())}) or a transformers "
                      f"config.json (or its directory); {model!r} is none of these")


@functools.lru_cache(maxsize=16)
def _read_config(path: Path, size: int, mtime_ns: int) -> str:
    """The file's text (cached by path, size and mtime: validate and manifest read it several times)."""
    return path.read_text(encoding="utf-8")


def load_model_config(model: str) -> dict[str, Any]:
    """The config dict of `--model` (not builtin), without the keys that do not describe the model."""
    path = config_path(model)
    try:
        stat = path.stat()
        config = json.loads(_read_config(path, stat.st_size, stat.st_mtime_ns))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"model config {path} cannot be read as JSON: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(f"model config {path} is not a transformers config (a JSON object with a model_type)")
    return {key: value for key, value in config.items() if key not in IGNORED_KEYS}


def resolved_config(model: str, vocab_size: int | None) -> dict[str, Any]:
    """The config the node builds: the file's, with the data's vocabulary size (None: the file's own)."""
    config = load_model_config(model)
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    return config


def config_hash(model: str, vocab_size: int | None) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the resolved config: the manifest's model id."""
    canonical = json.dumps(resolved_config(model, vocab_size), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence the config's position embeddings allow (None: the config does not say)."""
    for key in POSITION_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None


def weights_sha256(path: str) -> str:
    """sha256 of an init-weights file (cached by path, size and mtime: a 1B model's file is ~5 GB)."""
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError as error:
        raise ConfigError(f"init_weights {path}: {error.strerror or error}") from None
    return _file_sha256(resolved, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def check_init_weights_path(path: str) -> str | None:
    """Why `--init-weights` cannot be used (None: it is a readable file)."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        return f"init_weights {path} is not a file"
    if not os.access(resolved, os.R_OK):
        return f"init_weights {path} is not readable"
    return None
