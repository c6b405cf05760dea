"""The built-in model, a small byte-level GPT (vocab 256, no tokenizer to agree on), and `make_model`, the one
place a node configuration becomes a model (the builtin here, a transformers model from node/train/hf_model.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from node.config import NodeConfig


@dataclass(frozen=True)
class ModelConfig:
    context: int = 64
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    vocab: int = 256

    @classmethod
    def from_node_config(cls, cfg: NodeConfig, vocab: int = 256) -> ModelConfig:
        """The model a node configuration describes: the one place a NodeConfig becomes a ModelConfig."""
        return cls(context=cfg.context, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, vocab=vocab)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        shape = (batch, length, self.n_heads, width // self.n_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    """Decoder-only transformer over raw bytes."""

    # trains in float32 on every device, as it always has: under bfloat16 autocast its rounds drifted 3-8% (relative
    # L2 of Δ over 50 steps) from a float32 replay, too close to the 10% verification tolerance for CPU verifiers of
    # GPU peers; the transformers models drifted < 1% (measured with CPU autocast)
    mixed_precision = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2 residual scaling keeps early activations bounded as depth grows
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_model(cfg: ModelConfig, seed: int) -> ByteGPT:
    """Same seed, same initial weights on every node: the swarm starts from one point."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return ByteGPT(cfg)
    finally:
        torch.random.set_rng_state(generator_state)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_model(cfg: NodeConfig, vocab_size: int = 256, *, load_weights: bool = True) -> nn.Module:
    """The model `cfg` describes, for data of `vocab_size` token ids (`Corpus.vocab_size`): `--model builtin` or
    a transformers causal LM, random weights from `cfg.seed` (identical on every node), then `--init-weights` if
    set (`load_weights=False` skips it: a replay overwrites every weight anyway). Called by the trainer, the
    verification replays, doctor and the benchmarks, so all of them build the same model.

    Whatever it builds answers `model(tokens) -> logits` and `model.loss(inputs, targets)`.
    """
    from node.train.presets import BUILTIN

    if cfg.model == BUILTIN:
        model: nn.Module = build_model(ModelConfig.from_node_config(cfg, vocab_size), cfg.seed)
    else:
        from node.train.hf_model import build_hf_model  # transformers costs seconds to import: only when used

        model = build_hf_model(cfg.model, vocab_size, cfg.seed, grad_checkpointing=cfg.grad_checkpointing == "on")
    if cfg.init_weights and load_weights:
        load_init_weights(model, cfg.init_weights)
    return model


def weights_module(model: nn.Module) -> nn.Module:
    """The module whose state-dict names an init-weights file uses: the transformers model itself (so a Hugging
    Face model.safetensors fits as is), else the model."""
    return getattr(model, "hf", model)


def init_weights_problems(model: nn.Module, path: str) -> list[str]:
    """Every way a safetensors file fails to fit `model` (read from its header alone: also works on a model
    built on the meta device): unexpected and missing keys, wrong shapes, non-float dtypes. Tied weights may
    appear under any of their names. ConfigError if the file cannot be read as safetensors."""
    from safetensors import SafetensorError, safe_open

    from node.config import ConfigError

    expected = weights_module(model).state_dict(keep_vars=True)  # tied weights appear under each of their names
    try:
        with safe_open(path, framework="pt") as file:
            found = {key: (tuple(file.get_slice(key).get_shape()), file.get_slice(key).get_dtype()) for key in file.keys()}
    except (OSError, SafetensorError) as error:
        raise ConfigError(f"init_weights {path} is not a readable safetensors file: {error}") from None
    problems = [f"unexpected key {key}" for key in sorted(found.keys() - expected.keys())]
    covered: set[int] = set()
    for key in sorted(found.keys() & expected.keys()):
        (shape, dtype), want = found[key], expected[key]
        if shape != tuple(want.shape):
            problems.append(f"{key}: shape {shape} in the file, {tuple(want.shape)} in the model")
        elif not (dtype.startswith("F") or dtype == "BF16"):
            problems.append(f"{key}: dtype {dtype} is not a floating point type")
        else:
            covered.add(id(want))
    problems += [f"missing key {key}" for key, tensor in expected.items() if id(tensor) not in covered and key not in found]
    return problems


def load_init_weights(model: nn.Module, path: str) -> None:
    """Copy a safetensors file into `model`, after checking its keys and shapes strictly (ConfigError listing
    every mismatch); any floating dtype is cast to the parameter's (float32)."""
    from safetensors import safe_open

    from node.config import ConfigError

    problems = init_weights_problems(model, path)
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ConfigError(f"init_weights {path} does not fit the model ({len(problems)} mismatches): {shown}")
    expected = weights_module(model).state_dict(keep_vars=True)
    with torch.no_grad(), safe_open(path, framework="pt") as file:
        for key in file.keys():  # one tensor at a time: the file is never held whole next to the model
            expected[key].copy_(file.get_tensor(key))
