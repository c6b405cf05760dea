"""Config precedence (flag > env > file > default), typing and refusals."""

import pytest

from node.cli.main import build_parser
from node.cli.run import config_from_args
from node.config import ConfigError, NodeConfig, load_toml, merge_config


def test_defaults_are_the_paper_values():
    cfg = merge_config()
    assert (cfg.alpha, cfg.beta, cfg.gamma, cfg.inner_steps) == (0.5, 0.7, 0.7, 50)
    assert cfg.sync == "noloco"


def test_precedence_flag_over_env_over_file_over_default():
    file_values = {"sync_timeout": 3.0, "inner_steps": 7, "batch_size": 4}
    env = {"GOSSIPTRAIN_SYNC_TIMEOUT": "4.5", "GOSSIPTRAIN_INNER_STEPS": "9"}
    flags = {"sync_timeout": 6.0, "inner_steps": None}
    cfg = merge_config(flags, env, file_values)
    assert cfg.sync_timeout == 6.0  # flag
    assert cfg.inner_steps == 9  # env beats file; an unset flag (None) does not hide it
    assert cfg.batch_size == 4  # file
    assert cfg.lr == NodeConfig().lr  # default


def test_env_lists_are_comma_separated_and_unrelated_env_is_ignored():
    env = {"GOSSIPTRAIN_INITIAL_PEERS": "/ip4/1.2.3.4/tcp/1/p2p/A, /ip4/1.2.3.4/tcp/2/p2p/B",
           "GOSSIPTRAIN_CONFIG": "node.toml", "PATH": "/bin"}
    assert merge_config(environ=env).initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/A", "/ip4/1.2.3.4/tcp/2/p2p/B"]


def test_toml_file_with_dashes_and_node_table(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[node]\nrun-id = "demo"\ninitial_peers = ["/ip4/127.0.0.1/tcp/5/p2p/X"]\nalpha = 0.4\n')
    cfg = merge_config(file_values=load_toml(path))
    assert (cfg.run_id, cfg.initial_peers, cfg.alpha) == ("demo", ["/ip4/127.0.0.1/tcp/5/p2p/X"], 0.4)


@pytest.mark.parametrize(
    "layer, error",
    [
        ({"file_values": {"no_such_key": 1}}, "unknown setting"),
        ({"file_values": {"inner_steps": "many"}}, "inner_steps expects int"),
        ({"file_values": {"inner_steps": True}}, "inner_steps expects int"),
        ({"environ": {"GOSSIPTRAIN_ALPHA": "lots"}}, "alpha expects float"),
        ({"flags": {"sync": "allreduce"}}, "sync must be"),
        ({"flags": {"d_model": 100, "n_heads": 3}}, "divisible"),
        ({"flags": {"heartbeat": 5.0, "presence_ttl": 4.0}}, "presence_ttl"),
    ],
)
def test_bad_values_raise_clear_config_error(layer, error):
    with pytest.raises(ConfigError, match=error):
        merge_config(**layer)


def test_broken_toml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("inner_steps = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_cli_flags_env_and_file_combine(tmp_path, monkeypatch):
    path = tmp_path / "node.toml"
    path.write_text("inner_steps = 11\nbatch_size = 2\nsync_timeout = 1.5\n")
    monkeypatch.setenv("GOSSIPTRAIN_BATCH_SIZE", "3")
    args = build_parser().parse_args(["run", "--config", str(path), "--sync-timeout", "2.5",
                                      "--initial-peer", "/ip4/127.0.0.1/tcp/1/p2p/A",
                                      "--initial-peer", "/ip4/127.0.0.1/tcp/2/p2p/B"])
    cfg = config_from_args(args)
    assert (cfg.inner_steps, cfg.batch_size, cfg.sync_timeout) == (11, 3, 2.5)
    assert len(cfg.initial_peers) == 2


def test_manifest_changes_with_anything_that_must_match():
    base = NodeConfig().manifest("data", 1)
    assert NodeConfig(inner_steps=10).manifest("data", 1) != base
    assert NodeConfig(d_model=64).manifest("data", 1) != base
    assert NodeConfig(wire_dtype="float32").manifest("data", 1) != base  # partners must agree on the wire
    assert NodeConfig().manifest("other-data", 1) != base
    assert NodeConfig().manifest("data", 2) != base
    assert NodeConfig(sync_timeout=1.0, metrics_port=1).manifest("data", 1) == base  # local knobs do not matter


def test_work_dir_placeholders():
    assert NodeConfig(work_dir="/data/node-{slot}").validate().work_dir == "/data/node-{slot}"
    with pytest.raises(ConfigError, match="placeholder"):
        NodeConfig(work_dir="/data/{hostname}").validate()


def test_manifest_hash_is_pinned():
    # The manifest hash is what peers compare: a refactor of NodeConfig.manifest must not change it.
    from protocol import manifest_hash

    assert manifest_hash(NodeConfig().manifest("data", 1)) == (
        "7a282a76c38795bdfd43a2dcf231fbd7afa8c7d54b632d1fe141d376fc4d499c")
    varied = NodeConfig(d_model=64, n_heads=2, verify="off", verify_rate=0.5, gamma=0.3, chunk_bytes=4096,
                        batch_size=3, lr=0.1)
    assert manifest_hash(varied.manifest("fp", 1)) == (
        "ba6a5a11cd93c4284e7265d206664c9228d2d82c514a70865ea033e511d689b4")


def test_model_config_comes_from_the_node_config_and_matches_the_manifest():
    import dataclasses

    from node.train.model import ModelConfig

    cfg = NodeConfig(context=16, d_model=32, n_layers=1, n_heads=2, seed=9)
    model_cfg = ModelConfig.from_node_config(cfg)
    assert model_cfg == ModelConfig(context=16, d_model=32, n_layers=1, n_heads=2)
    model_section = cfg.manifest("data", 1)["model"]
    for field in dataclasses.fields(ModelConfig):  # vocab included: the manifest states it too
        assert model_section[field.name] == getattr(model_cfg, field.name)


@pytest.mark.parametrize("name", ["context", "d_model", "n_layers", "n_heads", "batch_size"])
def test_sizes_below_one_are_refused(name):
    with pytest.raises(ConfigError, match="context, d_model, n_layers, n_heads and batch_size must be >= 1"):
        NodeConfig(**{name: 0}).validate()


def test_trusted_peers_are_peer_ids_repeatable_and_in_the_manifest():
    peer_a, peer_b = "12D3KooW" + "A" * 44, "12D3KooW" + "B" * 44
    args = build_parser().parse_args(["run", "--trusted-peer", peer_b, "--trusted-peer", peer_a])
    cfg = config_from_args(args)
    assert cfg.trusted_peers == [peer_b, peer_a]
    assert cfg.manifest("data", 2)["verify"]["trusted_peers"] == [peer_a, peer_b]  # order does not split a swarm
    assert "trusted_peers" not in NodeConfig().manifest("data", 2)["verify"]  # default manifests are unchanged
    with pytest.raises(ConfigError, match="is not a peer id"):
        NodeConfig(trusted_peers=["not a peer\x1b[31m"]).validate()
