"""Transformers models (`--model` a preset or a config.json): built from the seed alone, named in the manifest by
their config, loadable from safetensors, trained and replayed by the same code as the builtin model."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch.nn.utils import parameters_to_vector

from node.config import ConfigError, NodeConfig
from node.ops.doctor import check_model, memory_plan, model_parameters
from node.train.hf_model import CausalLM
from node.train.model import count_parameters, make_model
from node.train.presets import config_hash, preset_names
from node.train.trainer import Trainer, inner_step
from node.verify.replay import Replayer, describe_start, start_from_wire
from tests.unit.conftest import REPO_ROOT

TEST_PRESET = "llama-test"
WEIGHTS_DIGEST = """
import hashlib, sys
from torch.nn.utils import parameters_to_vector
from node.config import NodeConfig
from node.train.model import make_model
for seed in (0, 1):
    flat = parameters_to_vector(make_model(NodeConfig(model="llama-test", seed=seed)).parameters()).detach()
    print(hashlib.sha256(flat.numpy().tobytes()).hexdigest())
"""


def weights_digest(model: torch.nn.Module) -> str:
    import hashlib

    return hashlib.sha256(parameters_to_vector(model.parameters()).detach().numpy().tobytes()).hexdigest()


def write_config(path, **changes) -> dict:
    """A small Llama config.json (untied embeddings, unlike the presets) at `path`."""
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128, "vocab_size": 300,
              "tie_word_embeddings": False, "transformers_version": "4.0.0", **changes}
    path.write_text(json.dumps(config, indent=2))
    return config


def test_same_seed_same_weights_in_another_process_and_the_rng_is_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    ours = [weights_digest(make_model(NodeConfig(model=TEST_PRESET, seed=seed))) for seed in (0, 1)]
    assert torch.equal(torch.rand(1), expected_next)  # building a model does not disturb the caller's RNG
    result = subprocess.run([sys.executable, "-c", WEIGHTS_DIGEST], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.split() == ours
    assert ours[0] != ours[1]


@pytest.mark.parametrize("name", ["llama-test", "llama-25m", "llama-125m", "llama-1b"])
def test_presets_ship_in_the_package_and_have_their_stated_sizes(name):
    sizes = {"llama-test": (100_000, 1_000_000), "llama-25m": (20e6, 30e6), "llama-125m": (100e6, 150e6),
             "llama-1b": (1.0e9, 1.5e9)}
    assert name in preset_names()
    low, high = sizes[name]
    assert low <= model_parameters(NodeConfig(model=name), 256 if name == TEST_PRESET else 32000) <= high


def test_tied_embeddings_are_one_parameter_and_the_flat_vector_covers_each_weight_once():
    model = make_model(NodeConfig(model=TEST_PRESET))
    assert isinstance(model, CausalLM)
    assert model.hf.lm_head.weight is model.hf.model.embed_tokens.weight
    flat = parameters_to_vector(model.parameters())
    assert flat.numel() == count_parameters(model) == sum(p.numel() for p in set(model.parameters()))
    tokens = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        assert logits.shape == (2, 16, 256)
        assert abs(model.loss(tokens[:, :-1], tokens[:, 1:]).item() - torch.log(torch.tensor(256.0)).item()) < 0.2


def test_config_json_by_path_or_directory_and_the_data_vocabulary_wins(tmp_path):
    write_config(tmp_path / "config.json")
    by_file, by_dir = NodeConfig(model=str(tmp_path / "config.json")), NodeConfig(model=str(tmp_path))
    model = make_model(by_file, vocab_size=1000)
    assert model.hf.model.embed_tokens.weight.shape == (1000, 32)  # the tokenizer's vocabulary, not the file's 300
    assert model.hf.lm_head.weight is not model.hf.model.embed_tokens.weight  # untied: two parameters
    assert weights_digest(make_model(by_dir, vocab_size=1000)) == weights_digest(model)
    assert config_hash(str(tmp_path), 1000) == config_hash(str(tmp_path / "config.json"), 1000)
    assert config_hash(str(tmp_path), 1000) != config_hash(str(tmp_path), 256)
    assert config_hash(str(tmp_path), None) == config_hash(str(tmp_path), 300)  # no vocabulary given: the file's


def test_unusable_models_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="llama-test"):  # the message lists the presets
        NodeConfig(model="llama-7t").validate()
    with pytest.raises(ConfigError, match="holds no config.json"):
        NodeConfig(model=str(tmp_path)).validate()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        NodeConfig(model=str(tmp_path)).validate()
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ConfigError, match="model_type"):
        NodeConfig(model=str(tmp_path)).validate()
    write_config(tmp_path / "config.json", model_type="no-such-architecture")
    with pytest.raises(ConfigError, match="no-such-architecture"):
        make_model(NodeConfig(model=str(tmp_path)))
    write_config(tmp_path / "config.json", model_type="t5")  # an encoder-decoder: no causal LM
    with pytest.raises(ConfigError, match="not a causal language model"):
        make_model(NodeConfig(model=str(tmp_path)))


def test_model_settings_are_validated():
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings 512"):
        NodeConfig(model=TEST_PRESET, context=1024).validate()
    NodeConfig(model=TEST_PRESET, context=512).validate()
    with pytest.raises(ConfigError, match="needs a transformers model"):
        NodeConfig(grad_checkpointing="on").validate()
    NodeConfig(model=TEST_PRESET, grad_checkpointing="on", compile="on").validate()
    with pytest.raises(ConfigError, match="compile must be 'on' or 'off'"):
        NodeConfig(compile="yes").validate()
    with pytest.raises(ConfigError, match="is not a file"):
        NodeConfig(init_weights="/no/such/weights.safetensors").validate()


def test_manifest_names_the_resolved_config_and_the_initial_weights(tmp_path):
    section = NodeConfig(model=TEST_PRESET, seed=3).manifest("data", 1)["model"]
    assert section == {"arch": "hf-causal-lm", "config_hash": config_hash(TEST_PRESET, 256), "seed": 3, "context": 64,
                       "init_weights": ""}
    base = NodeConfig(model=TEST_PRESET).manifest("data", 1)
    assert NodeConfig(model=TEST_PRESET).manifest("data", 1, vocab_size=300) != base  # another tokenizer
    assert NodeConfig(model=TEST_PRESET, d_model=64).manifest("data", 1) == base  # builtin sizes do not apply
    write_config(tmp_path / "a.json")
    write_config(tmp_path / "b.json", num_hidden_layers=2)
    write_config(tmp_path / "c.json", transformers_version="9.9.9")  # the writer's version changes nothing
    a, b, c = (NodeConfig(model=str(tmp_path / f"{n}.json")).manifest("d", 1)["model"] for n in "abc")
    assert a["config_hash"] != b["config_hash"] and a == c
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(weights))
    with_weights = NodeConfig(model=TEST_PRESET, init_weights=str(weights)).manifest("data", 1)["model"]
    assert len(with_weights["init_weights"]) == 64 and with_weights["config_hash"] == section["config_hash"]
    builtin = NodeConfig().manifest("data", 1)["model"]
    assert "init_weights" not in builtin  # default runs keep their manifest hash
    assert NodeConfig(init_weights=str(weights)).manifest("data", 1)["model"] == {
        **builtin, "init_weights": with_weights["init_weights"]}


def test_init_weights_round_trip_and_strict_mismatch_errors(tmp_path):
    source = make_model(NodeConfig(model=TEST_PRESET, seed=7))
    path = tmp_path / "model.safetensors"
    save_model(source.hf, str(path))  # as transformers saves a tied model: the embedding once
    loaded = make_model(NodeConfig(model=TEST_PRESET, seed=0, init_weights=str(path)))
    assert weights_digest(loaded) == weights_digest(source) != weights_digest(make_model(NodeConfig(model=TEST_PRESET)))
    # bfloat16 files (common for published checkpoints) are cast to the float32 parameters
    half = {k: v.to(torch.bfloat16) for k, v in source.hf.state_dict().items() if k != "lm_head.weight"}
    save_file(half, str(tmp_path / "half.safetensors"))
    make_model(NodeConfig(model=TEST_PRESET, init_weights=str(tmp_path / "half.safetensors")))
    # another vocabulary, a missing and an unexpected key: each one named
    state = {k: v.clone() for k, v in source.hf.state_dict().items() if k != "lm_head.weight"}
    del state["model.norm.weight"]
    state["model.extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError) as refused:
        make_model(NodeConfig(model=TEST_PRESET, init_weights=str(tmp_path / "bad.safetensors")), vocab_size=300)
    message = str(refused.value)
    assert "model.embed_tokens.weight: shape (256, 64) in the file, (300, 64) in the model" in message
    assert "missing key model.norm.weight" in message and "unexpected key model.extra.weight" in message
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        make_model(NodeConfig(model=TEST_PRESET, init_weights=str(tmp_path / "junk.safetensors")))
    # the builtin model takes init weights too, under its own names
    builtin = make_model(NodeConfig(d_model=32, n_heads=2, seed=4))
    save_model(builtin, str(tmp_path / "builtin.safetensors"))
    again = make_model(NodeConfig(d_model=32, n_heads=2, init_weights=str(tmp_path / "builtin.safetensors")))
    assert weights_digest(again) == weights_digest(builtin)
    # doctor checks the same from the file's header, on a model it never allocates
    check, parameters, vocab = check_model(NodeConfig(model=TEST_PRESET, init_weights=str(tmp_path / "bad.safetensors")))
    assert check.verdict == "fail" and "missing key model.norm.weight" in check.detail and parameters == 108_864


def test_trainer_inner_steps_lower_the_loss_of_a_transformers_model(corpus, tiny_config):
    cfg = tiny_config(model=TEST_PRESET, inner_steps=12, warmup_steps=1, lr=3e-3)
    trainer = Trainer(cfg, corpus, shard=0, sampler_seed=1)
    stats = trainer.run_round()
    assert stats.steps == 12 and all(map(torch.isfinite, torch.tensor(stats.losses)))
    assert sum(stats.losses[-3:]) / 3 < sum(stats.losses[:3]) / 3 - 0.3
    assert trainer.numel == count_parameters(trainer.model) == trainer.fast_weights().numel()


def test_replay_of_a_transformers_round_is_bit_exact(corpus, tiny_config):
    trainer = Trainer(tiny_config(model=TEST_PRESET, warmup_steps=1), corpus, shard=1, sampler_seed=5)
    trainer.run_round()
    trainer.apply_outer_step(None)
    trainer.run_round()
    honest = trainer.fast_weights() - trainer.slow_weights
    tensors, data = describe_start(trainer.round_start)
    rebuilt = start_from_wire({k: v.copy() for k, v in tensors.items()}, data, trainer.round_start.global_step,
                              trainer.numel)
    replayed = Replayer(trainer.cfg, corpus).replay(rebuilt, trainer.cfg.inner_steps)
    assert float(honest.norm()) > 0 and torch.equal(replayed, honest)


def test_gradient_checkpointing_and_bf16_autocast_change_memory_not_the_math():
    tokens = torch.randint(0, 256, (2, 33))
    grads = []
    for setting in ("off", "on"):
        model = make_model(NodeConfig(model=TEST_PRESET, grad_checkpointing=setting))
        model.train()
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
        grads.append(parameters_to_vector(p.grad for p in model.parameters()))
    assert torch.equal(grads[0], grads[1])  # recomputation repeats the same arithmetic
    # CPU autocast runs the same bfloat16 path CUDA training takes; parameters and AdamW stay float32
    model = make_model(NodeConfig(model=TEST_PRESET))
    optimizer = torch.optim.AdamW(model.parameters())
    loss = inner_step(model, optimizer, tokens[:, :-1], tokens[:, 1:], 1e-3, 1.0, autocast=torch.bfloat16)
    assert torch.isfinite(loss)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {torch.float32}
    # the builtin GPT stays float32 under any autocast request (ByteGPT.mixed_precision)
    steps = []
    for autocast in (None, torch.bfloat16):
        builtin = make_model(NodeConfig(d_model=32, n_heads=2))
        inner_step(builtin, torch.optim.AdamW(builtin.parameters()), tokens[:, :-1], tokens[:, 1:], 1e-3, 1.0,
                   autocast=autocast)
        steps.append(parameters_to_vector(builtin.parameters()))
    assert torch.equal(steps[0], steps[1])


def test_doctor_memory_plan_for_transformers_models():
    cfg = NodeConfig(model="llama-125m", batch_size=8, context=1024, verify="off")
    parameters = model_parameters(cfg, 32000)
    plan = memory_plan(cfg, parameters, 32000, cuda=False)
    assert plan.parts["weights"] == 4 * parameters and plan.parts["AdamW moments"] == 8 * parameters
    assert plan.parts["exchange"] == 10 * parameters  # sent and received float32, one bfloat16 wire buffer
    checkpointed = memory_plan(NodeConfig(model="llama-125m", batch_size=8, context=1024, verify="off",
                                          grad_checkpointing="on"), parameters, 32000, cuda=False)
    assert checkpointed.parts["activations"] < plan.parts["activations"] / 2  # the logits stay
    gpu = memory_plan(cfg, parameters, 32000, cuda=True)
    assert gpu.device_bytes() + gpu.host_bytes() < plan.device_bytes()  # bfloat16 activations on the GPU
    assert gpu.host_bytes() == int(1.2 * (8 + 10) * parameters)  # published φ+δ and the exchange stay in RAM
