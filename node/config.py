"""Node configuration: one typed dataclass, filled from flags > env > TOML file > defaults.

Every field can be set as a TOML key (``sync_timeout = 8``), an environment variable
(``GOSSIPTRAIN_SYNC_TIMEOUT=8``) or a flag (``--sync-timeout 8``). The merge is a pure
function so the precedence rule is tested without a process.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "GOSSIPTRAIN_"


# Sizes that must be at least 1 (checked by NodeConfig.validate).
_POSITIVE = ("context", "d_model", "n_layers", "n_heads", "batch_size")


class ConfigError(ValueError):
    """A configuration value is unknown, malformed or out of range."""


MAX_RANKS = 64  # data-parallel ranks in one node (`devices`); a verifier replays all of them, so it is bounded


def parse_devices(spec: str, cuda_count: Callable[[], int]) -> list[str]:
    """`devices` as one torch device per data-parallel rank, rank 0 first ([] for "": one process).

    "cpu:N" gives N times "cpu", "auto" every visible GPU, "cuda:0,cuda:1" those GPUs. `cuda_count`
    (torch.cuda.device_count) is only asked when GPUs are named, so a CPU spec never imports torch.
    Raises ConfigError.
    """
    spec = spec.strip()
    if not spec:
        return []
    if spec.startswith("cpu"):
        match = re.fullmatch(r"cpu:(-?\d+)", spec)
        if match is None:
            raise ConfigError(f"devices: expected cpu:N (N processes), got {spec!r}")
        ranks = int(match.group(1))
        if not 1 <= ranks <= MAX_RANKS:
            raise ConfigError(f"devices: cpu:N needs 1 <= N <= {MAX_RANKS}, got {spec!r}")
        return ["cpu"] * ranks
    names = [name.strip() for name in spec.split(",")]
    if spec != "auto" and not all(re.fullmatch(r"cuda:\d+", name) for name in names):
        raise ConfigError(f"devices must be '', auto, cpu:N or a list like cuda:0,cuda:1, got {spec!r}")
    count = cuda_count()
    if count == 0:
        raise ConfigError(f"devices {spec!r} requested but no CUDA GPU is visible (use cpu:N, or leave devices empty)")
    if spec == "auto":
        return [f"cuda:{index}" for index in range(min(count, MAX_RANKS))]
    if len(set(names)) != len(names):
        raise ConfigError(f"devices: each GPU may appear once, got {spec!r}")
    if len(names) > MAX_RANKS:
        raise ConfigError(f"devices: at most {MAX_RANKS} ranks, got {len(names)}")
    if missing := [name for name in names if int(name.split(":")[1]) >= count]:
        raise ConfigError(f"devices: {', '.join(missing)} not present ({count} CUDA GPU(s) visible)")
    return names


def _cuda_count() -> int:
    import torch  # only when `devices` names GPUs: the CLI validates before torch is needed otherwise

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class NodeConfig:
    # --- swarm and identity ---
    run_id: str = "gossiptrain-default"
    initial_peers: list[str] = field(default_factory=list)
    initial_peers_file: str = ""  # multiaddrs (one per line) or a node.json: waited for at start (docker-compose)
    host: str = "127.0.0.1"
    port: int = 0
    announce: list[str] = field(default_factory=list)
    identity: str = ""
    work_dir: str = "./gossiptrain-node"  # "{slot}": the lowest free slot number (node/workdir.py)
    # --- compute ---
    device: str = "auto"
    threads: int = 0
    micro_batches: int = 1
    # data-parallel inner steps inside this one node: "" (one process), "auto" (every GPU), "cuda:0,cuda:1",
    # or "cpu:N" (N gloo processes; tests and CPU boxes). Rank 0 alone talks to the swarm (node/train/parallel.py)
    devices: str = ""
    grad_checkpointing: str = "off"  # on: recompute activations in the backward pass (transformers models)
    compile: str = "off"  # on: torch.compile the model (not used by verification replays)
    # --- model (part of the run manifest) ---
    # "builtin" (the byte-level GPT below), a preset shipped in the package, or a transformers causal-LM
    # config.json (or its directory); built with random weights from `seed`, nothing is downloaded
    model: str = "builtin"
    init_weights: str = ""  # a local safetensors file to start from instead of random weights
    tokenizer: str = ""  # a Hugging Face `tokenizers` JSON file; "": raw bytes (vocab 256)
    seed: int = 0
    context: int = 64
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    # --- data ---
    data: list[str] = field(default_factory=list)
    text_field: str = "text"  # the column holding the text in JSONL, Parquet and `datasets` folders
    shard: int = -1
    num_shards: int = 16
    batch_size: int = 8
    eval_batches: int = 8
    # --- inner optimizer (part of the manifest) ---
    lr: float = 2e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 50
    lr_schedule_steps: int = 5000
    # --- outer step (NoLoCo; part of the manifest) ---
    sync: str = "noloco"
    inner_steps: int = 50
    alpha: float = 0.5
    beta: float = 0.7
    gamma: float = 0.7
    overlap: str = "off"  # on: local outer step at once, the pair's correction lands later; off: wait for the pair
    # --- gossip ---
    rounds: int = 0
    min_peers: int = 0
    min_peers_timeout: float = 120.0
    sync_timeout: float = 10.0
    io_timeout: float = 5.0
    max_staleness: int = 8
    heartbeat: float = 2.0
    presence_ttl: float = 6.0
    max_frame_bytes: int = 8 * 2**20
    chunk_bytes: int = 2 * 2**20
    # the format of an exchange's tensors on the wire (protocol/codecs.py; part of the manifest):
    # bfloat16 halves the bytes of float32 at a relative error of at most 2^-8 per value; blockwise8 quarters
    # them, coding the weights' difference from the swarm's initial weights (best early in a run)
    wire_dtype: str = "bfloat16"
    # a transfer (exchange, state upload/download, audit) lives while it moves at least this many bytes/s,
    # with io_timeout seconds of slack (node/net/limits.py): a 20 Mbit/s link (2.5 MB/s) passes ~10x over
    min_transfer_rate: float = 256.0 * 2**10
    max_streams_per_peer: int = 4  # open incoming streams (all protocols) one peer may hold at once
    max_streams: int = 32  # open incoming streams in all
    # --- join, leave, checkpoints ---
    checkpoint_every: int = 5
    checkpoint_keep: int = 3
    resume_max_lag: int = 8
    state_sync_timeout: float = 120.0
    max_uploads: int = 1
    leave_timeout: float = 60.0
    # --- verification (the switch, rate and tolerances are part of the manifest) ---
    verify: str = "on"
    verify_rate: float = 0.05
    verify_max_hamming: float = 0.08
    verify_max_rel_l2: float = 0.10
    verify_max_norm_ratio: float = 1.02
    vote_timeout: float = 60.0
    audit_window: int = 3
    verify_record_ttl: float = 3600.0
    # peer ids that alone sit on audit committees (repeat --trusted-peer; empty: every peer live before the audited
    # exchange). Part of the manifest: every node must rank the same candidates
    trusted_peers: list[str] = field(default_factory=list)
    # --- observability ---
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9400
    log_level: str = "info"

    def validate(self) -> NodeConfig:
        """Raise ConfigError on values that cannot work; return self for chaining."""
        from protocol.codecs import WIRE_DTYPES  # (numpy: not imported by the CLI before its stop handler)

        checks: list[tuple[bool, str]] = [
            (self.sync in ("noloco", "local"), f"sync must be 'noloco' or 'local', got {self.sync!r}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be auto, cpu or cuda[:N], got {self.device!r}"),
            (self.overlap in ("on", "off"), f"overlap must be 'on' or 'off', got {self.overlap!r}"),
            (self.wire_dtype in WIRE_DTYPES,
             f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}"),
            (self.inner_steps >= 1, "inner_steps must be >= 1"),
            (self.rounds >= 0, "rounds must be >= 0 (0 runs until stopped)"),
            (self.min_peers >= 0 and self.min_peers_timeout >= 0, "min_peers and min_peers_timeout must be >= 0"),
            (min(self._values(*_POSITIVE).values()) >= 1,
             f"{', '.join(_POSITIVE[:-1])} and {_POSITIVE[-1]} must be >= 1"),
            (self.n_heads < 1 or self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads"),
            (self.context <= 8192, "context must be <= 8192 tokens (the data block is 16384 tokens)"),
            (self.text_field.strip() != "", "text_field must name the text column of JSONL/Parquet/datasets data"),
            (not self.tokenizer or Path(self.tokenizer).expanduser().is_file(),
             f"tokenizer file {self.tokenizer} does not exist (a `tokenizers` JSON file; "
             "train one with `gossiptrain tokenizer train`, or leave it empty for bytes)"),
            (self.num_shards >= 1 and -1 <= self.shard < self.num_shards,
             "shard must be -1 (auto) or in [0, num_shards)"),
            (self.sync_timeout > 0 and self.io_timeout > 0, "timeouts must be > 0"),
            (self.heartbeat > 0 and self.presence_ttl > self.heartbeat,
             "presence_ttl must exceed heartbeat"),
            (0 <= self.alpha < 1 and self.beta > 0 and self.gamma > 0, "need 0 <= alpha < 1, beta > 0, gamma > 0"),
            (self.chunk_bytes >= 1024 and self.max_frame_bytes >= self.chunk_bytes + 1024,
             "max_frame_bytes must exceed chunk_bytes by at least 1 KiB"),
            (0 < self.min_transfer_rate < float("inf"), "min_transfer_rate must be > 0 (bytes per second)"),
            (1 <= self.max_streams_per_peer <= self.max_streams,
             "need 1 <= max_streams_per_peer <= max_streams"),
            (self.checkpoint_every >= 0 and self.checkpoint_keep >= 1,
             "checkpoint_every must be >= 0 (0: only on leave) and checkpoint_keep >= 1"),
            (self.resume_max_lag >= 0 and self.max_uploads >= 0, "resume_max_lag and max_uploads must be >= 0"),
            (self.state_sync_timeout > 0 and self.leave_timeout > 0, "state_sync_timeout and leave_timeout must be > 0"),
            (self.micro_batches >= 1 and self.micro_batches <= self.batch_size,
             "micro_batches must be in [1, batch_size]"),
            (self.verify in ("on", "off"), f"verify must be 'on' or 'off', got {self.verify!r}"),
            (0.0 <= self.verify_rate <= 1.0, "verify_rate must be in [0, 1]"),
            (0.0 < self.verify_max_hamming <= 0.5 and self.verify_max_rel_l2 > 0 and self.verify_max_norm_ratio >= 1.0,
             "need 0 < verify_max_hamming <= 0.5, verify_max_rel_l2 > 0, verify_max_norm_ratio >= 1"),
            (self.vote_timeout > 0 and self.audit_window >= 1 and self.verify_record_ttl > 0,
             "vote_timeout and verify_record_ttl must be > 0, audit_window >= 1"),
            (self.log_level in ("debug", "info", "warning", "error"), "log_level must be debug/info/warning/error"),
            (set(re.findall(r"\{[^}]*\}", self.work_dir)) <= {"{slot}"},
             f"work_dir may contain no placeholder but {{slot}}, got {self.work_dir!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._validate_model()
        parse_devices(self.devices, _cuda_count)  # raises on a malformed spec or missing GPUs
        for peer in self.trusted_peers:
            if not re.fullmatch(r"[1-9A-HJ-NP-Za-km-z]{40,60}", peer):
                raise ConfigError(f"trusted_peers: {peer[:80]!r} is not a peer id (base58, like 12D3KooW...)")
        return self

    def _validate_model(self) -> None:
        """The model choice: a builtin or a readable transformers config whose positions cover `context`;
        grad_checkpointing and compile switches; an existing init-weights file. Raises ConfigError."""
        from node.train.presets import BUILTIN, check_init_weights_path, load_model_config, max_positions

        for name in ("grad_checkpointing", "compile"):
            if getattr(self, name) not in ("on", "off"):
                raise ConfigError(f"{name} must be 'on' or 'off', got {getattr(self, name)!r}")
        if self.model == BUILTIN:
            if self.grad_checkpointing == "on":
                raise ConfigError("grad_checkpointing on needs a transformers model (--model a preset or a config.json); "
                                  "the builtin byte-level GPT does not support it")
        else:
            positions = max_positions(load_model_config(self.model))
            if positions is not None and self.context > positions:
                raise ConfigError(f"context {self.context} exceeds the model's max_position_embeddings {positions}")
        if self.init_weights and (problem := check_init_weights_path(self.init_weights)):
            raise ConfigError(problem)

    def manifest(self, data_fingerprint: str, protocol_version: int, vocab_size: int = 256,
                 tokenizer: str = "bytes") -> dict[str, Any]:
        """Everything that must be identical for two nodes to average their models (`vocab_size`: the data's,
        `Corpus.vocab_size`; `tokenizer`: `Corpus.tokenizer`, its fingerprint, which `data_fingerprint` covers too;
        listed only when not "bytes", so byte-level runs keep their hash and checkpoints)."""
        return {
            "protocol_version": protocol_version,
            "run_id": self.run_id,
            "model": self._model_manifest(vocab_size),
            "data": data_fingerprint,
            **({"tokenizer": tokenizer} if tokenizer != "bytes" else {}),
            "inner": {"optimizer": "adamw",
                      **self._values("lr", "weight_decay", "grad_clip", "warmup_steps", "lr_schedule_steps",
                                     "batch_size")},
            "outer": self._values("sync", "inner_steps", "alpha", "beta", "gamma", "overlap"),
            "wire": self._values("chunk_bytes", "wire_dtype"),
            "verify": {"on": self.verify,
                       **self._values("rate", "max_hamming", "max_rel_l2", "max_norm_ratio", prefix="verify_"),
                       **({"trusted_peers": sorted(set(self.trusted_peers))} if self.trusted_peers else {})},
        }

    def _model_manifest(self, vocab_size: int) -> dict[str, Any]:
        """The model section: builtin as it always was (init_weights only when set, so default runs keep their
        hash); a transformers model by the hash of its resolved config (vocab_size included)."""
        from node.train.presets import BUILTIN, config_hash, weights_sha256

        weights = weights_sha256(self.init_weights) if self.init_weights else ""
        if self.model == BUILTIN:
            section = {"arch": "byte-gpt", "vocab": vocab_size,
                       **self._values("context", "d_model", "n_layers", "n_heads", "seed")}
            return {**section, "init_weights": weights} if weights else section
        return {"arch": "hf-causal-lm", "config_hash": config_hash(self.model, vocab_size),
                **self._values("seed", "context"), "init_weights": weights}

    def _values(self, *names: str, prefix: str = "") -> dict[str, Any]:
        """{name: value of the field prefix + name} for the given names (manifest sections, validate)."""
        return {name: getattr(self, prefix + name) for name in names}


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(NodeConfig)}
_HINTS = typing.get_type_hints(NodeConfig)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a raw value (TOML value or env string) to the field's type."""
    kind = _HINTS[name]
    try:
        if kind == list[str]:
            if isinstance(value, str):
                return [item.strip() for item in value.split(",") if item.strip()]
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                return list(value)
            raise TypeError
        if isinstance(value, bool):
            raise TypeError  # TOML true is not an int
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            if not isinstance(value, (str, int, float)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{source}: {name} expects {getattr(kind, '__name__', kind)}, got {value!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file; keys may use dashes or underscores."""
    try:
        with open(path, "rb") as file:
            raw = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    table = raw.get("node", raw) if isinstance(raw.get("node"), dict) else raw
    return {key.replace("-", "_"): value for key, value in table.items()}


def env_values(environ: Mapping[str, str]) -> dict[str, str]:
    """GOSSIPTRAIN_* variables that name a config field (others, like GOSSIPTRAIN_CONFIG, are ignored)."""
    values = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX):].lower()
            if name in FIELDS:
                values[name] = value
    return values


def merge_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    file_values: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Build a NodeConfig with precedence flag > env > file > default. None values are unset."""
    merged: dict[str, Any] = {}
    layers = (("config file", file_values or {}), ("environment", env_values(environ or {})), ("flag", flags or {}))
    for source, layer in layers:
        for name, value in layer.items():
            if name not in FIELDS:
                raise ConfigError(f"{source}: unknown setting {name!r}")
            if value is None:
                continue
            merged[name] = _coerce(name, value, source)
    return NodeConfig(**merged).validate()
