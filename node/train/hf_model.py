"""Transformers causal LMs (`--model` a preset or a config.json): built locally with random weights from the seed.

Nothing is downloaded: the config is a local file, the weights are drawn from the swarm seed (or
loaded from `--init-weights`), and no remote code is ever run. The model is wrapped so the rest of
the node keeps calling `model(tokens) -> logits` and `model.loss(inputs, targets)`, exactly as it
does the builtin byte-level GPT.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from node.config import ConfigError
from node.train.presets import resolved_config

# belt and braces: nothing here names a hub model, and nothing may fetch one if something ever did
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# every node runs the same attention kernel ("sdpa": in torch itself), so whether flash-attn happens to be
# installed on one machine cannot change its numbers and make its honest rounds fail verification
ATTENTION = "sdpa"


class CausalLM(nn.Module):
    """A transformers causal LM behind the builtin model's interface. `hf` is the transformers model: its
    state-dict names are the ones a Hugging Face checkpoint uses (`--init-weights` files match them)."""

    mixed_precision = True  # the inner step may autocast it (bfloat16 on CUDA; trainer.autocast_dtype)

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens, use_cache=False).logits

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(inputs)  # the same cross-entropy as ByteGPT.loss: node losses compare across models
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def transformers_config(model: str, vocab_size: int | None) -> Any:
    """The transformers config object for `--model` with the data's vocabulary size. ConfigError if transformers
    does not know the model_type or refuses the values."""
    from transformers import AutoConfig

    values = resolved_config(model, vocab_size)
    model_type = values.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"model {model}: transformers cannot make a {model_type!r} config: {error}") from None
    config.use_cache = False  # training never reuses a key/value cache
    return config


def build_hf_model(model: str, vocab_size: int | None, seed: int, grad_checkpointing: bool = False) -> CausalLM:
    """Random weights from `seed` under a saved and restored torch RNG (as `build_model` does): the same on
    every node and in every process, and the caller's RNG is left as it was. Parameters are float32 whatever
    dtype the config names (the inner step autocasts on CUDA; φ, δ and AdamW stay float32)."""
    from transformers import AutoModelForCausalLM

    config = transformers_config(model, vocab_size)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        hf = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION)
    except ValueError as error:
        raise ConfigError(f"model {model}: not a causal language model transformers can build: {error}") from None
    finally:
        torch.random.set_rng_state(generator_state)
    hf = hf.float()
    if grad_checkpointing:
        # recompute each layer's activations in the backward pass: the same arithmetic, so training and
        # replays agree bit for bit either way; the non-reentrant variant needs no grad-requiring inputs
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return CausalLM(hf)


def activation_bytes(config: dict[str, Any], batch: int, context: int, grad_checkpointing: bool,
                     element_bytes: int) -> int:
    """An estimate of the activations one micro-batch keeps for its backward pass in a Llama-style decoder
    (norm inputs, q/k/v/o, the gated MLP's four intermediates, the residual stream; sdpa's fused kernels keep
    no attention matrix), plus the logits and their softmax. With gradient checkpointing only each layer's
    input is kept, and one layer's full set during its recompute. A planning figure, not a measurement (on
    CPU it came within ~10% of the measured growth of peak RSS with the context, for llama-25m)."""
    hidden = int(config.get("hidden_size", 0))
    inner = int(config.get("intermediate_size", 4 * hidden))
    layers = int(config.get("num_hidden_layers", 0))
    vocab = int(config.get("vocab_size", 0))
    tokens = batch * context
    per_layer = tokens * (10 * hidden + 4 * inner)
    kept = layers * tokens * hidden + per_layer if grad_checkpointing else layers * per_layer
    logits = 3 * tokens * vocab  # logits, their float32 softmax and its gradient
    return element_bytes * kept + 4 * logits
